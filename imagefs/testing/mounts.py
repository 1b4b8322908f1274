"""Mount an image with the real `imagefs mount` command for a test, and always clean up."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path


def imagefs(
    root: Path, *args: str, check: bool = True, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """Run `python -m imagefs --root ROOT ARGS` and return the finished process."""
    proc = subprocess.run(
        [sys.executable, "-m", "imagefs", "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"imagefs {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def force_unmount(mountpoint: Path) -> None:
    """Detach whatever is mounted there, a dead mount too (os.path.ismount says False for
    one: its stat fails with ENOTCONN), so the kernel's table decides."""
    from imagefs.fs.mountinfo import mount_at, read_mounts

    if mount_at(read_mounts(), os.path.realpath(mountpoint)) is not None:
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


@contextlib.contextmanager
def mounted(
    root: Path,
    reference: str,
    mountpoint: Path,
    extra: Sequence[str] = (),
    mount_args: Sequence[str] = (),
) -> Iterator[Path]:
    """`imagefs [EXTRA] mount [MOUNT_ARGS] REF DIR` (daemonized, as users run it); unmounted
    on exit whatever happens. EXTRA are global options, MOUNT_ARGS those of `mount`."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    imagefs(root, *extra, "mount", *mount_args, reference, str(mountpoint))
    try:
        yield mountpoint
    finally:
        proc = imagefs(root, "umount", str(mountpoint), check=False)
        if proc.returncode != 0:
            force_unmount(mountpoint)
