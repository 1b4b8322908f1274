"""Durable writes: temp name in the same directory, fsync, rename, fsync the directory.

A reader either sees the old file or the whole new one; a crash leaves at worst a temp file
that `prune`/`check` remove. Disk-full errors surface as `StoreError` naming the path, and
the temp file is removed so nothing half-written stays.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from imagefs.errors import StoreError

TEMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def os_error(exc: OSError, path: Path, action: str) -> StoreError:
    """One error message for the OS failures users can act on."""
    if exc.errno == errno.ENOSPC:
        return StoreError(f"no space left on device while {action} {path}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoreError(f"permission denied while {action} {path} (try --root or sudo)")
    return StoreError(f"{action} {path}: {exc.strerror or exc}")


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644, durable: bool = True) -> None:
    """Replace `path` with `data` so that no reader ever sees a partial file.

    `durable=False` skips the fsyncs: for cache pieces, whose own checksum catches a file
    that a crash left torn, and which are cheaper to refetch than to sync one by one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise os_error(exc, path, "writing") from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
