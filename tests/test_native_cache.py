"""The native kernel cache loads only what this user built: a replaced library, a forged one in
a directory others can write, or one owned by another user is never loaded (its constructor
never runs), and the kernel is rebuilt or the torch path used, saying why (issue 27)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mxprobe.kernels import native_cache

CC = shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")
pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler on this machine")
REPO = Path(__file__).resolve().parents[1]

# A library whose constructor runs at load, before any of its functions is called.
EVIL = r"""
#include <stdio.h>
__attribute__((constructor)) static void mark(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("loaded", f); fclose(f); }
}
int mx_abi_version(void) { return 3; }
int mx_openmp(void) { return 0; }
"""


def _evil_library(tmp_path: Path, marker: Path) -> bytes:
    source = tmp_path / "evil.c"
    source.write_text(EVIL.replace("MARKER", json.dumps(str(marker))))
    out = tmp_path / "evil.so"
    subprocess.run([CC, "-shared", "-fPIC", str(source), "-o", str(out)], check=True)
    return out.read_bytes()


def _quantize(cache: Path) -> subprocess.CompletedProcess:
    """In a fresh process: build or load the kernel from ``cache`` and quantize once."""
    code = textwrap.dedent(
        """
        import warnings, torch
        warnings.simplefilter("always")
        from mxprobe import kernels
        from mxprobe.quantize import quantize_mx
        with warnings.catch_warnings(record=True) as seen:
            x = torch.randn(4, 64)
            same = torch.equal(quantize_mx(x, "e4m3"), quantize_mx(x, "e4m3", backend="torch"))
        print("available", kernels.status().native, "same", same)
        for w in seen:
            print("warning:", w.message)
        """
    )
    env = {**os.environ, "MXPROBE_CACHE_DIR": str(cache)}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A cache holding this user's build of the kernel: the library and its digest."""
    cache = tmp_path_factory.mktemp("cache")
    done = _quantize(cache)
    assert "available True same True" in done.stdout, done.stderr
    (library,) = (cache / "native").glob("mxquant-*.so")
    return library


def _copy(built: Path, tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    shutil.copytree(built.parent.parent, cache)
    return cache / "native" / built.name


def test_a_replaced_library_is_not_loaded_but_rebuilt(built, tmp_path):
    library, marker = _copy(built, tmp_path), tmp_path / "marker"
    library.write_bytes(_evil_library(tmp_path, marker))
    done = _quantize(library.parent.parent)
    assert not marker.exists(), "the replaced library was loaded: its constructor ran"
    assert "available True same True" in done.stdout, done.stderr
    assert "differs from the library this user built" in done.stdout
    assert "rebuilding" in done.stdout and done.stdout.count("warning:") == 1
    assert library.read_bytes() == built.read_bytes()  # rebuilt: the same build again


@pytest.mark.slow  # builds the C library again (about 4.5 s)
def test_a_library_without_a_recorded_digest_is_rebuilt(built, tmp_path):
    library, marker = _copy(built, tmp_path), tmp_path / "marker"
    library.write_bytes(_evil_library(tmp_path, marker))
    native_cache.record_path(library).unlink()
    done = _quantize(library.parent.parent)
    assert not marker.exists()
    assert "no digest was recorded" in done.stdout and "available True" in done.stdout


def test_a_directory_others_can_write_is_refused(built, tmp_path):
    library, marker = _copy(built, tmp_path), tmp_path / "marker"
    data = _evil_library(tmp_path, marker)
    library.write_bytes(data)
    native_cache.record_build(library, data)  # forged by whoever could write the directory
    library.parent.chmod(0o777)
    done = _quantize(library.parent.parent)
    assert not marker.exists()
    assert "available False same True" in done.stdout, done.stderr
    assert "is writable by others" in done.stdout and str(library.parent) in done.stdout


def test_a_library_writable_by_its_group_is_rebuilt(built, tmp_path):
    library, marker = _copy(built, tmp_path), tmp_path / "marker"
    library.chmod(0o775)
    done = _quantize(library.parent.parent)
    assert "is writable by its group" in done.stdout and "available True" in done.stdout
    assert not marker.exists()


@pytest.mark.slow  # builds the C library again (about 4.5 s)
@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a file to another user")
def test_a_library_owned_by_another_user_is_rebuilt(built, tmp_path):
    library = _copy(built, tmp_path)
    os.chown(library, 65534, 65534)
    done = _quantize(library.parent.parent)
    assert "owned by uid 65534" in done.stdout and "available True" in done.stdout
    assert library.stat().st_uid == os.getuid()


def test_a_new_cache_directory_is_private(tmp_path, monkeypatch):
    monkeypatch.setenv("MXPROBE_CACHE_DIR", str(tmp_path / "fresh"))
    directory = native_cache.ensure_private_directory(native_cache.cache_dir())
    assert directory.stat().st_mode & 0o777 == 0o700
