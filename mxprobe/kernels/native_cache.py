"""The cache of the native quantizer's built libraries, and what may be loaded from it.

Loading a shared library runs its code (its constructors) at once, so a library is loaded only
when this user built it:

- the cache directory must be owned by this user and writable by no one else (and its parent
  owned by this user or root, writable by no one else unless sticky, as ``/tmp``); a new one is
  created ``0700``;
- each library has, beside it, the SHA-256 recorded when this user built it
  (``mxquant-<key>.json``, written atomically); a library owned by another user, writable by
  others, with no record or a different digest is not loaded but rebuilt, and the reason said
  once (:func:`trusted_bytes` returns it);
- the bytes that were checked are the bytes loaded: they are written to a private file that is
  opened and removed at once (:func:`load_bytes`), so the library cannot change between the
  check and the load.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path

from mxprobe import atomic


class UntrustedCacheError(RuntimeError):
    """The cache directory could be changed by another user: nothing is built or loaded
    there. The message names the directory and why."""


def cache_dir() -> Path:
    """``$MXPROBE_CACHE_DIR/native`` (default ``~/.cache/mxprobe/native``)."""
    root = os.environ.get("MXPROBE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mxprobe"
    )
    return Path(root) / "native"


def _problem(path: Path, st: os.stat_result, parent: bool = False) -> str | None:
    """Why another user could change ``path`` (a parent directory may also be root's, and
    writable by others when sticky, as ``/tmp``), or None."""
    owners = (os.getuid(), 0) if parent else (os.getuid(),)
    if st.st_uid not in owners:
        return f"{path} is owned by uid {st.st_uid}, not this user ({os.getuid()})"
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable and not (parent and st.st_mode & stat.S_ISVTX):
        return f"{path} is writable by {'others' if st.st_mode & stat.S_IWOTH else 'its group'}"
    return None


def ensure_private_directory(directory: Path) -> Path:
    """``directory``, created ``0700`` if missing, after checking that no other user can
    change it or its parent.

    Raises:
        UntrustedCacheError: naming the directory and why.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        pass
    parent = directory.parent
    problem = _problem(parent, parent.stat(), parent=True) or _problem(directory, directory.lstat())
    if directory.is_symlink():
        problem = f"{directory} is a symbolic link"
    if problem:
        raise UntrustedCacheError(
            f"native kernel cache refused: {problem}; another user could put code there "
            "(set MXPROBE_CACHE_DIR to a private directory)"
        )
    return directory


def record_path(library: Path) -> Path:
    return library.with_suffix(".json")


def record_build(library: Path, data: bytes) -> None:
    """Record ``data``'s SHA-256 beside ``library`` (before ``library`` is put in place)."""
    text = json.dumps({"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})
    atomic.write_text(record_path(library), text + "\n")


def trusted_bytes(library: Path) -> tuple[bytes | None, str]:
    """``(bytes, "")`` of ``library`` when this user built it (owner, mode and the recorded
    digest agree), else ``(None, why not)``; ``why`` is empty when it does not exist."""
    try:
        st = library.lstat()
    except FileNotFoundError:
        return None, ""
    record = record_path(library)
    problem = _problem(library, st)
    if problem is None and not stat.S_ISREG(st.st_mode):
        problem = f"{library} is not a regular file"
    if problem is None:
        try:
            problem = _problem(record, record.lstat())
            recorded = json.loads(record.read_text(encoding="utf-8"))["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            recorded = None
            problem = problem or f"no digest was recorded for {library.name} when it was built"
    if problem:
        return None, problem
    data = library.read_bytes()
    if hashlib.sha256(data).hexdigest() != recorded:
        return None, f"{library.name} differs from the library this user built (SHA-256)"
    return data, ""


def load_bytes(data: bytes, directory: Path) -> ctypes.CDLL:
    """``ctypes.CDLL`` of exactly ``data``: written to a private file in ``directory``,
    opened, and removed (the process keeps its mapping)."""
    fd, path = tempfile.mkstemp(prefix=".load-", suffix=".so", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return ctypes.CDLL(path)
    finally:
        os.unlink(path)
