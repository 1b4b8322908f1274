"""File locks that several imagefs processes on one root agree on.

`flock(2)` locks vanish with the process that held them, so a `kill -9` never leaves a stale
lock behind; that is why they are used instead of lock files whose mere existence counts.
Lock files are opened like every file under the store (`fsutil.safe_open`): a symlink planted
at a lock's name is refused, never opened. All functions here block; async callers run them
in a thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from imagefs.store import fsutil


@contextlib.contextmanager
def locked(path: Path, *, shared: bool = False, root: Path | None = None) -> Iterator[int]:
    """Hold a flock on `path` (created if missing) for the duration of the block."""
    try:
        fd = fsutil.safe_open(path.parent, path.name, os.O_RDWR | os.O_CREAT, root=root)
    except OSError as exc:
        raise fsutil.os_error(exc, path, "locking") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # closing releases the lock


def try_lock(path: Path, *, root: Path | None = None) -> int | None:
    """Take an exclusive flock without waiting; the fd (to close later) or None if held or
    missing. A link or other non-regular file at `path` is LinkInStore."""
    try:
        fd = fsutil.safe_open(path.parent, path.name, os.O_RDWR, root=root)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
