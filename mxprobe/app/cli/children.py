"""Processes a command starts end with it, and a directory is worked on by one process at a time.

- :func:`child_env` / :func:`end_with_parent`: a child started with ``child_env()`` calls
  ``end_with_parent()`` first thing; it is then killed (SIGKILL) when its parent dies, however
  the parent dies (``kill -9`` included): on Linux by the kernel (``prctl(PR_SET_PDEATHSIG)``),
  elsewhere by a thread that watches the parent's pid. A child whose parent is already gone
  exits at once.
- :func:`exclusive`: an advisory lock file (``fcntl.flock``) held while a sweep, or one of its
  runs, works in a directory; a second one is refused, naming the holder's pid. The kernel
  releases the lock when its holder dies, so a killed sweep never leaves a stale lock. Where
  ``fcntl`` does not exist (Windows) nothing is locked.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from mxprobe.app.parsing import UsageError

PARENT_ENV = "MXPROBE_PARENT_PID"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def child_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a child that should end with this process (see :func:`end_with_parent`)."""
    return {**env, PARENT_ENV: str(os.getpid())}


def end_with_parent() -> None:
    """In a child started with :func:`child_env`: be killed when the parent dies. A no-op in a
    process started otherwise."""
    expected = os.environ.pop(PARENT_ENV, None)
    if not expected:
        return
    parent = int(expected)
    if not _kernel_kills_us():
        threading.Thread(target=_watch, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # it died before the signal was armed
        os.kill(os.getpid(), signal.SIGKILL)


def _kernel_kills_us() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold the lock file ``path`` for the ``with`` block.

    Raises:
        UsageError: when another live process holds it: ``<what> is in use by pid N``.
    """
    try:
        import fcntl
    except ImportError:  # no advisory locks here: one sweep per directory is up to the user
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(
                f"{what} is in use by pid {_pid_in(fd)} (lock {path}); wait for it to end or "
                "stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def holder(path: Path) -> int | None:
    """The pid holding the lock file ``path``, or None when no live process holds it."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _pid_in(fd) or -1
    finally:
        os.close(fd)
    return None


def _pid_in(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).split()[0])
    except (OSError, ValueError, IndexError):
        return None
