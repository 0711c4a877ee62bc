"""Files that are complete or absent: every file mxprobe writes for a user (tables, reports,
configs, checkpoints, the native cache's digests) is written to a temporary name in the same
directory, flushed to disk and renamed over the final name.

A reader, a crash or a full disk then sees the previous complete file or the new one, never half
of one; a failure removes the temporary file and raises :class:`WriteError`, which names the
final path and says what is left there.
"""

from __future__ import annotations

import contextlib
import csv
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO


class WriteError(OSError):
    """A file could not be written (disk full, read-only, ...); the previous file under its
    name, if any, is unchanged, and no temporary file is left."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """``open(path, mode)`` that only replaces ``path`` once the ``with`` block completes.

    ``mode`` is ``"w"`` or ``"wb"``; ``kwargs`` go to :func:`open` (``newline``, ``encoding``).

    Raises:
        WriteError: when writing, flushing or renaming fails, naming ``path``.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    fd, tmp = _temporary(path)
    try:
        with open(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise _write_error(path, err) from err
        raise
    _sync_directory(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_open`)."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_open`)."""
    with atomic_open(path, "w") as f:
        f.write(text)


def write_csv(path: str | os.PathLike, rows: Iterable[dict], columns: Iterable[str]) -> None:
    """Write ``rows`` as a CSV table with the header ``columns`` (keys not in ``columns`` are
    ignored) atomically (:func:`atomic_open`): a reader never sees half a table.

    Values are rendered once, here: booleans as ``true``/``false``, None as an empty field,
    anything else as ``str`` does (floats keep their repr, so they read back exactly).
    """
    with atomic_open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: _csv_text(v) for k, v in row.items()} for row in rows)


def _csv_text(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def _temporary(path: Path) -> tuple[int, str]:
    try:
        return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _write_error(path, err) from err


def _write_error(path: Path, err: OSError) -> WriteError:
    left = "the previous file is unchanged" if path.exists() else "no file was written"
    reason = err.strerror or str(err)
    return WriteError(err.errno, f"cannot write {path}: {reason}; {left}")


def _sync_directory(directory: Path) -> None:
    # The rename is durable once the directory entry is on disk; not every platform or file
    # system lets a directory be opened for that, and the file itself is complete either way.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
