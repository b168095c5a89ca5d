"""Exclusive file locks that the operating system releases when their process dies.

One writer per run and one process per harvest work folder: each takes :func:`exclusive` on a lock file. The lock
is an ``fcntl.flock`` on an open file, so it lasts exactly as long as the process holding it — a ``kill -9`` leaves
no stale lock to clear by hand (the file may stay behind; an unlocked file is no lock). A second process does not
wait: it meets :class:`LockBusy`, an :class:`~autoexplain.tools.errors.InputError` (one line, exit code 2) that
names the holder's pid.

The lock file holds the holder's pid and purpose (for that message only; the flock is what counts). It is removed
on release; a process that acquired a file which was unlinked meanwhile retries on the new one, so two processes
can never both hold "the" lock of one path.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from autoexplain.tools.errors import InputError


class LockBusy(InputError):
    """Another live process holds the lock (``holder``: what it wrote into the lock file)."""

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


def holder_of(path: Path) -> str:
    """What the holder of ``path`` wrote (``pid N: purpose``), or ``an unknown process``."""
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "an unknown process"


def try_acquire(path: Path, purpose: str) -> int | None:
    """Lock ``path`` (created if needed) without waiting; return the open descriptor, or None if it is held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:  # the file we locked must still be the one at ``path`` (a releaser may have unlinked it)
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}: {purpose}\n".encode())
        return fd


def release(path: Path, fd: int) -> None:
    """Remove ``path`` and let go of its lock (``fd`` from :func:`try_acquire`)."""
    with contextlib.suppress(OSError):
        os.unlink(path)
    os.close(fd)


def is_locked(path: Path) -> bool:
    """Whether a live process holds ``path`` (a leftover file of a dead process is not a lock)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@contextlib.contextmanager
def exclusive(path: Path, purpose: str, busy: str) -> Iterator[None]:
    """Hold the lock ``path`` for the block; if another process holds it, raise :class:`LockBusy` with ``busy``
    (a sentence saying what to do) after the holder's pid."""
    fd = try_acquire(path, purpose)
    if fd is None:
        who = holder_of(path)
        raise LockBusy(f"{busy} (held by {who})", who)
    try:
        yield
    finally:
        release(path, fd)
