"""Byte-level text data for the LLM: no tokenizer, no download, one cached ``uint8`` memmap.

Tokens are bytes (vocab 256). The corpus is every file under the paths a user names, or by
default the Python standard library's own ``.py`` sources (``sysconfig.get_paths()["stdlib"]``,
present on every Python install). Files are concatenated, each followed by a NUL byte that marks
the document boundary, in an order shuffled by a hash of their names (so the held-out tail is a
sample of files rather than the alphabetically last package). The last ``val_fraction`` of the
stream, cut at a file boundary where one is close, is the validation split.

The stream is written once to ``<cache_dir>/<key>/tokens.bin`` with a ``meta.json``; the key
hashes the file list with sizes and mtimes plus the split settings, so editing a file rebuilds
the cache and nothing else does. The directory is written under a temporary name and renamed, so
concurrent builders (DDP ranks, parallel runs) never see a half-written cache.

Sampling is a pure function of ``(seed, batch index)``: batch ``i`` draws ``batch_size *
world_size`` window starts from ``numpy.random.default_rng([seed, i])`` and rank ``r`` takes the
``r``-th slice, so the global batch is the same for any number of ranks and a resumed run
continues the stream exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

CACHE_VERSION = 1
DOCUMENT_SEPARATOR = b"\0"
_SKIPPED_DIRS = ("__pycache__", "site-packages", "dist-packages")


def default_cache_dir() -> Path:
    """``$MXPROBE_CACHE`` or ``~/.cache/mxprobe``."""
    return Path(os.environ.get("MXPROBE_CACHE") or Path.home() / ".cache" / "mxprobe")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(
    paths: Sequence[str | os.PathLike] | None = None, suffixes: Sequence[str] | None = None
) -> list[tuple[str, Path]]:
    """(name, path) of every corpus file, in the stream's order.

    ``paths`` are files or directories (walked recursively, skipping hidden directories,
    ``__pycache__`` and installed packages); ``None`` means the standard library with
    ``suffixes=(".py",)``. ``suffixes`` filters the files found in directories (``None``: all);
    files named directly are always taken. A name is the path relative to the directory it was
    found in, so the order is the same on every machine with the same files.

    Raises:
        FileNotFoundError: for a path that does not exist.
        ValueError: when no file is found.
    """
    if paths is None:
        paths, suffixes = [stdlib_root()], suffixes or (".py",)
    found: dict[Path, str] = {}
    for entry in map(Path, paths):
        if entry.is_file():
            found.setdefault(entry.resolve(), entry.name)
        elif entry.is_dir():
            for root, dirs, files in os.walk(entry):
                dirs[:] = sorted(
                    d for d in dirs if not d.startswith(".") and d not in _SKIPPED_DIRS
                )
                for name in files:
                    if suffixes is None or name.endswith(tuple(suffixes)):
                        path = Path(root, name)
                        found.setdefault(path.resolve(), path.relative_to(entry).as_posix())
        else:
            raise FileNotFoundError(f"corpus path {str(entry)!r} does not exist")
    if not found:
        raise ValueError(
            f"no corpus files under {[str(p) for p in paths]} with suffixes {suffixes}"
        )
    order = sorted(found.items(), key=lambda item: (_digest(item[1]), item[1], str(item[0])))
    return [(name, path) for path, name in order]


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def cache_key(files: Sequence[tuple[str, Path]], val_fraction: float, max_bytes: int | None) -> str:
    """Hash of the file list (paths, sizes, mtimes) and the settings that shape the stream."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, val_fraction, max_bytes]).encode())
    for name, path in files:
        stat = path.stat()
        h.update(f"{name}\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


@dataclass(frozen=True)
class TokenSplits:
    """The cached stream as ``uint8`` memmaps: ``train`` and ``val`` views of one file."""

    directory: Path
    train: np.ndarray
    val: np.ndarray
    meta: dict


def build_cache(
    paths: Sequence[str | os.PathLike] | None = None,
    *,
    suffixes: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.01,
    max_bytes: int | None = None,
    min_split_bytes: int = 1024,
) -> Path:
    """Tokenise the corpus into ``<cache_dir>/<key>`` unless already there; return that directory.

    ``max_bytes`` truncates the stream (files after the limit are left out). The validation split
    is the last ``val_fraction`` of the stream; each split must hold ``min_split_bytes``.

    Raises:
        ValueError: for a ``val_fraction`` outside (0, 1) or a corpus too small to split.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    files = corpus_files(paths, suffixes)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "text" / cache_key(files, val_fraction, max_bytes)
    if (target / "meta.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        ends = _write_stream(files, work / "tokens.bin", max_bytes)
        total = ends[-1]
        val_start = _split_point(ends, total, val_fraction)
        if min(val_start, total - val_start) < min_split_bytes:
            raise ValueError(
                f"corpus of {total} bytes is too small: each split needs {min_split_bytes} bytes "
                f"(val_fraction={val_fraction})"
            )
        meta = {
            "version": CACHE_VERSION,
            "files": len(ends),
            "bytes": total,
            "val_start": val_start,
            "val_fraction": val_fraction,
            "max_bytes": max_bytes,
            "sources": [str(p) for p in (paths or [stdlib_root()])],
        }
        (work / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(work, target)
        except OSError:
            if not (target / "meta.json").exists():  # lost the race to a finished twin: fine
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _write_stream(files: Sequence[tuple[str, Path]], out: Path, max_bytes: int | None) -> list[int]:
    """Write the files, each followed by the separator; return the end offset of each."""
    ends: list[int] = []
    written = 0
    with open(out, "wb") as f:
        for _, path in files:
            data = path.read_bytes() + DOCUMENT_SEPARATOR
            if max_bytes is not None:
                data = data[: max_bytes - written]
            f.write(data)
            written += len(data)
            ends.append(written)
            if max_bytes is not None and written >= max_bytes:
                break
    return ends


def _split_point(ends: list[int], total: int, val_fraction: float) -> int:
    """The first file boundary at or after the target cut if it keeps half the intended
    validation bytes; otherwise the target itself (mid-file, e.g. a one-file corpus)."""
    target = total - max(1, round(total * val_fraction))
    for end in ends:
        if end >= target:
            return end if total - end >= (total - target) / 2 else target
    return target


def load_cache(directory: str | os.PathLike) -> TokenSplits:
    """Open a cache directory written by :func:`build_cache` (read-only memmaps)."""
    directory = Path(directory)
    meta = json.loads((directory / "meta.json").read_text())
    tokens = np.memmap(directory / "tokens.bin", dtype=np.uint8, mode="r")
    return TokenSplits(directory, tokens[: meta["val_start"]], tokens[meta["val_start"] :], meta)


def _windows(tokens: np.ndarray, starts: np.ndarray, context: int) -> tuple[torch.Tensor, ...]:
    w = torch.from_numpy(np.stack([tokens[s : s + context + 1] for s in starts]).astype(np.int64))
    return w[:, :-1], w[:, 1:]  # inputs, next-byte targets: (B, context) each


class TrainWindows(IterableDataset):
    """An endless stream of (inputs, targets) batches of random windows, this rank's share.

    Batch ``i`` is a pure function of ``(seed, i)`` (see the module docstring); iteration starts
    at ``start_batch``. With DataLoader workers, worker ``w`` of ``n`` yields batches ``i = w
    mod n``, which the DataLoader's round-robin puts back in order. Use with ``batch_size=None``.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        context: int,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
    ):
        if len(tokens) <= context:
            raise ValueError(f"{len(tokens)} training tokens cannot fill a window of {context + 1}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.tokens, self.context, self.batch_size = tokens, context, batch_size
        self.seed, self.start_batch = seed, start_batch
        self.rank, self.world_size = rank, world_size

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index])
        starts = rng.integers(0, len(self.tokens) - self.context, self.batch_size * self.world_size)
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return _windows(self.tokens, mine, self.context)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker = get_worker_info()
        index, step = self.start_batch, 1
        if worker is not None:
            index, step = index + worker.id, worker.num_workers
        while True:
            yield self.batch(index)
            index += step


class ValWindows(IterableDataset):
    """The fixed validation set: the first ``max_windows`` non-overlapping windows of the
    validation split; rank ``r`` of ``n`` takes windows ``r, r + n, ...``, in batches."""

    def __init__(
        self,
        tokens: np.ndarray,
        context: int,
        batch_size: int,
        *,
        max_windows: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        available = (len(tokens) - 1) // context
        if available < 1:
            raise ValueError(
                f"{len(tokens)} validation tokens cannot fill a window of {context + 1}"
            )
        count = available if max_windows is None else min(max_windows, available)
        self.tokens, self.context, self.batch_size = tokens, context, batch_size
        self.starts = np.arange(count)[rank::world_size] * context

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.starts), self.batch_size):
            yield _windows(self.tokens, self.starts[i : i + self.batch_size], self.context)
