"""A mount daemon killed with `kill -9` leaves a dead FUSE mount (ENOTCONN); `imagefs umount`
and `imagefs mount` recognise it by the kernel's mount table and clear it, while `umount`
refuses every filesystem imagefs did not mount (issue 9.5)."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagefs.testing.images import SampleImage
from imagefs.testing.mounts import force_unmount, imagefs, mounted

pytestmark = pytest.mark.fuse


def daemon_pid(root: Path) -> int:
    return int(imagefs(root, "mounts", "--format", "{{.PID}}").stdout.split()[0])


def kill_daemon(root: Path, mnt: Path) -> None:
    os.kill(daemon_pid(root), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while stat_errno(mnt) != errno.ENOTCONN:  # the kernel aborts the connection
        assert time.monotonic() < deadline, "the mount never went dead"
        time.sleep(0.02)


def stat_errno(path: Path) -> int | None:
    try:
        os.statvfs(path)  # stat may be answered from the kernel's attribute cache
    except OSError as exc:
        return exc.errno
    return None


@contextlib.contextmanager
def tmpfs(path: Path) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], check=True)
    try:
        (path / "keep").write_bytes(b"mine")
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def dead_mount(tmp_path: Path, sample_image: SampleImage) -> Iterator[tuple[Path, Path]]:
    root, mnt = tmp_path / "root", tmp_path / "mnt"
    mnt.mkdir()
    imagefs(root, "mount", sample_image.ref, str(mnt))
    try:
        kill_daemon(root, mnt)
        yield root, mnt
    finally:
        force_unmount(mnt)


def test_umount_clears_the_mount_of_a_killed_daemon(
    dead_mount: tuple[Path, Path], sample_image: SampleImage
) -> None:
    root, mnt = dead_mount
    imagefs(root, "umount", str(mnt))
    assert not os.path.ismount(mnt) and os.listdir(mnt) == []
    assert imagefs(root, "mounts").stdout.strip().splitlines()[1:] == []
    with mounted(root, sample_image.ref, mnt) as m:
        assert (m / "etc" / "hello.txt").read_bytes() == sample_image.files["etc/hello.txt"]


def test_umount_clears_a_dead_mount_that_a_process_still_sits_in(
    tmp_path: Path, sample_image: SampleImage
) -> None:
    root, mnt = tmp_path / "root", tmp_path / "mnt"
    mnt.mkdir()
    imagefs(root, "mount", sample_image.ref, str(mnt))
    # a shell whose cwd is the mount keeps it busy: a plain unmount fails, -z works
    sitter = subprocess.Popen(["sleep", "600"], cwd=mnt)
    try:
        kill_daemon(root, mnt)
        imagefs(root, "umount", str(mnt))
        assert not os.path.ismount(mnt)
    finally:
        sitter.kill()
        sitter.wait()
        force_unmount(mnt)


def test_mount_over_a_dead_mount_clears_it_first(
    dead_mount: tuple[Path, Path], sample_image: SampleImage
) -> None:
    root, mnt = dead_mount
    proc = imagefs(root, "mount", sample_image.ref, str(mnt))
    try:
        assert "cleared the dead imagefs mount" in proc.stderr
        assert (mnt / "etc" / "hello.txt").read_bytes() == sample_image.files["etc/hello.txt"]
    finally:
        imagefs(root, "umount", str(mnt))


def test_mount_refuses_a_live_mount_and_other_filesystems(
    tmp_path: Path, sample_image: SampleImage
) -> None:
    root = tmp_path / "root"
    with mounted(root, sample_image.ref, tmp_path / "mnt") as mnt:
        again = imagefs(root, "mount", sample_image.ref, str(mnt), check=False)
        assert again.returncode == 1 and "already an imagefs mount" in again.stderr
        assert (mnt / "etc" / "hello.txt").exists()
    with tmpfs(tmp_path / "tmpfs") as t:
        other = imagefs(root, "mount", sample_image.ref, str(t), check=False)
        assert other.returncode == 1 and "already a mountpoint (tmpfs)" in other.stderr


def test_umount_refuses_a_tmpfs_and_a_plain_directory(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with tmpfs(tmp_path / "tmpfs") as t:
        proc = imagefs(root, "umount", str(t), check=False)
        assert proc.returncode == 1 and "not an imagefs mount" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "umount -l" not in proc.stderr
        assert os.path.ismount(t) and (t / "keep").read_bytes() == b"mine"
    plain = tmp_path / "plain"
    plain.mkdir()
    proc = imagefs(root, "umount", str(plain), check=False)
    assert proc.returncode == 1 and "is not mounted" in proc.stderr


def test_umount_refuses_proc(tmp_path: Path) -> None:
    proc = imagefs(tmp_path / "root", "umount", "/proc", check=False)
    assert proc.returncode == 1 and "not an imagefs mount (it is proc" in proc.stderr
    assert "umount -l" not in proc.stderr and "Traceback" not in proc.stderr
    assert os.path.ismount("/proc") and Path("/proc/self/mountinfo").exists()
