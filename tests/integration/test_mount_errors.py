"""Why a mount failed, said by the command (issue 11.6): the reason libfuse and fusermount3
gave, and the log path; a missing mountpoint; a warning for a non-empty one. And mounting as
an ordinary user: fusermount3, a store under `$XDG_DATA_HOME`."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagefs.fs.mountinfo import mount_at, read_mounts
from imagefs.testing.images import SampleImage
from imagefs.testing.mounts import force_unmount, imagefs

pytestmark = pytest.mark.fuse


def test_mount_on_a_non_empty_directory_warns(tmp_path: Path, sample_image: SampleImage) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (mnt / "mine.txt").write_bytes(b"hidden while mounted\n")
    root = tmp_path / "root"
    proc = imagefs(root, "mount", sample_image.ref, str(mnt))
    try:
        assert "warning:" in proc.stderr and "is not empty" in proc.stderr, proc.stderr
        assert (mnt / "etc" / "hello.txt").exists() and not (mnt / "mine.txt").exists()
    finally:
        imagefs(root, "umount", str(mnt))
    assert (mnt / "mine.txt").read_bytes() == b"hidden while mounted\n"
    missing = imagefs(root, "mount", sample_image.ref, str(tmp_path / "nope"), check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


AS_NOBODY = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]


class User:
    """Runs imagefs as `nobody` with its own HOME and XDG dirs (no --root, no IMAGEFS_ROOT)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "XDG_DATA_HOME": str(home / "data"),
            "XDG_CONFIG_HOME": str(home / "config"),
        }
        if "PYTHONPATH" in os.environ:  # the same imagefs as the test's
            self.env["PYTHONPATH"] = os.environ["PYTHONPATH"]

    def argv(self, *args: str) -> list[str]:
        return [*AS_NOBODY, sys.executable, "-m", "imagefs", *args]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args),
            env=self.env,
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=180,
            stdin=subprocess.DEVNULL,
        )

    def mkdir(self, name: str) -> Path:
        path = self.home / name
        subprocess.run([*AS_NOBODY, "mkdir", str(path)], check=True)
        return path


@pytest.fixture
def nobody() -> Iterator[User]:
    # under /tmp itself: pytest's tmp_path lives in a directory only root may enter
    home = Path(tempfile.mkdtemp(prefix="imagefs-nobody-"))
    pw = pwd.getpwnam("nobody")
    os.chown(home, pw.pw_uid, pw.pw_gid)
    try:
        yield User(home)
    finally:
        for name in ("mnt", "mnt2"):
            force_unmount(home / name)
        shutil.rmtree(home, ignore_errors=True)


def wait_mounted(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 120
    while mount_at(read_mounts(), str(path)) is None:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the mount never came up"
        time.sleep(0.05)


def test_an_ordinary_user_mounts_with_fusermount3_or_hears_why_not(
    nobody: User, sample_image: SampleImage
) -> None:
    """As `nobody`, store under $XDG_DATA_HOME. In the foreground (`mount -f`): on this machine
    the interpreter lives under /root (mode 0700), which `nobody` cannot exec again for a
    detached daemon. Where /dev/fuse is not open to others (here: crw------- root), libfuse
    cannot even reach fusermount3, and the command must say exactly that."""
    assert nobody.run("pull", sample_image.ref).returncode == 0
    assert (nobody.home / "data" / "imagefs" / "index.json").exists()
    mnt = nobody.mkdir("mnt")
    if os.stat("/dev/fuse").st_mode & 0o006 != 0o006:
        refused = nobody.run("mount", "-f", sample_image.ref, str(mnt))
        assert refused.returncode == 1
        last = refused.stderr.strip().splitlines()[-1]
        assert f"cannot mount on {mnt}: fuse: failed to open /dev/fuse: Permission denied" in last
        log = nobody.home / "data" / "imagefs" / "logs"
        assert f"(log: {log}/mount-" in last and "fuse_session_mount failed" not in last
        assert mount_at(read_mounts(), str(mnt)) is None
        return
    daemon = subprocess.Popen(
        nobody.argv("mount", "-f", sample_image.ref, str(mnt)),
        env=nobody.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_mounted(mnt, daemon)
        hello = subprocess.run(
            [*AS_NOBODY, "cat", str(mnt / "etc" / "hello.txt")], capture_output=True, check=True
        )
        assert hello.stdout == sample_image.files["etc/hello.txt"]
        assert str(mnt) in nobody.run("mounts").stdout
        # allow_other needs user_allow_other in /etc/fuse.conf: the reason, and the log
        other = str(nobody.mkdir("mnt2"))
        refused = nobody.run("mount", "-f", "-o", "allow_other", sample_image.ref, other)
        assert refused.returncode == 1, refused.stderr
        last = refused.stderr.strip().splitlines()[-1]
        assert "user_allow_other" in last and "(log: " in last, refused.stderr
        down = nobody.run("umount", str(mnt))
        assert down.returncode == 0, down.stderr
        assert daemon.wait(30) == 0
    finally:
        if daemon.poll() is None:
            force_unmount(mnt)
            daemon.wait(30)
