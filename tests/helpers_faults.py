"""A disk that fills up mid-write, for the atomic-file tests (issue 27)."""

from __future__ import annotations

import errno

from mxprobe import atomic


class _FillingFile:
    """A file whose first write lands half its bytes, then fails as a full disk does."""

    def __init__(self, real) -> None:
        self.real = real

    def write(self, data):
        self.real.write(data[: len(data) // 2])
        self.real.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.real.close()

    def __getattr__(self, name):
        return getattr(self.real, name)


def full_disk(monkeypatch) -> None:
    """Every file mxprobe writes through :mod:`mxprobe.atomic` from now on hits a full disk."""
    monkeypatch.setattr(
        atomic, "open", lambda *args, **kw: _FillingFile(open(*args, **kw)), raising=False
    )


def leftovers(directory) -> list[str]:
    """Temporary files :mod:`mxprobe.atomic` would have left in ``directory``."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))
