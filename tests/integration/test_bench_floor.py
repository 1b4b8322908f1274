"""The bench's floor (`tools/lib/bench/floorfs.py`) serves exactly the tree it was given.

The floor is the yardstick issue 10 measures imagefs against, so it must serve the *same*
tree as the image: a treecmp of its mount against the directory it loaded (a `umoci unpack`
of a real image, plus a hand-made tree with what images carry rarely: hard links, xattrs,
device nodes, a fifo, a non-UTF-8 name, an empty file) must find no difference. It must also
go away cleanly on SIGTERM, as the bench stops it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagefs.testing import treecmp
from imagefs.testing.images import SampleImage, umoci_unpack
from imagefs.testing.mounts import force_unmount

pytestmark = pytest.mark.fuse

FLOORFS = Path(__file__).resolve().parents[2] / "tools" / "lib" / "bench" / "floorfs.py"


def _wait_mounted(mnt: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while not os.path.ismount(mnt):
        if proc.poll() is not None:
            raise AssertionError(f"floorfs exited {proc.returncode}: {proc.stderr!r}")
        if time.monotonic() > deadline:
            raise AssertionError("floorfs did not mount within 60 s")
        time.sleep(0.01)


@contextlib.contextmanager
def _floor(rootfs: Path, mnt: Path) -> Iterator[subprocess.Popen[bytes]]:
    mnt.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(FLOORFS), str(rootfs), str(mnt)],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_mounted(mnt, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
        force_unmount(mnt)


@pytest.fixture
def odd_tree(tmp_path: Path) -> Path:
    root = tmp_path / "odd"
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "a.txt").write_bytes(b"alpha\n")
    (root / "empty").write_bytes(b"")
    (root / "big").write_bytes(os.urandom(300_000))  # several FUSE reads
    os.link(root / "dir" / "a.txt", root / "dir" / "sub" / "hardlink")
    os.symlink("dir/a.txt", root / "link")
    os.symlink("x" * 200, root / "long-dangling-link")
    (root / os.fsdecode(b"caf\xe9")).write_bytes(b"latin-1 name\n")
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", 0o666 | 0o020000, os.makedev(1, 3))
    os.chmod(root / "dir" / "sub", 0o1750)
    os.chown(root / "empty", 1234, 5678)
    os.setxattr(root / "big", "user.note", b"\x00binary\xff")
    os.utime(root / "dir", ns=(1_000_000_123, 1_000_000_123))
    return root


def test_floor_serves_the_same_tree_as_its_source(odd_tree: Path, tmp_path: Path) -> None:
    with _floor(odd_tree, tmp_path / "mnt") as proc:
        assert treecmp.diff(treecmp.listing(odd_tree), treecmp.listing(tmp_path / "mnt")) == []
        assert proc.poll() is None


def test_floor_serves_an_unpacked_image(sample_image: SampleImage, tmp_path: Path) -> None:
    rootfs = umoci_unpack(sample_image.layout, tmp_path / "bundle")
    with _floor(rootfs, tmp_path / "mnt"):
        got = treecmp.listing(tmp_path / "mnt")
        assert treecmp.diff(treecmp.listing(rootfs), got) == []
        assert (tmp_path / "mnt" / "etc" / "hello.txt").read_bytes() == (
            rootfs / "etc" / "hello.txt"
        ).read_bytes()


def test_floor_unmounts_on_sigterm(odd_tree: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with _floor(odd_tree, mnt) as proc:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not os.path.ismount(mnt)
