"""Whatever a background task or a request handler raises, the mount daemon stays up
(issue 9.8): the operation that needed it gets EIO, the log gets one line (plus a traceback
for an unexpected exception type), and every other read keeps working.

A real registry cannot raise a `RuntimeError` inside the daemon on demand, so the daemon runs
from a small launcher that plants failures (an honest fake in addition to the real parts):
`IMAGEFS_INJECT=landmark,readahead,readdir,stats` makes the landmark prefetch raise KeyError,
every read-ahead raise RuntimeError, readdir's bookkeeping raise RuntimeError and the stats
snapshot raise ValueError. The shifted-Content-Range registry of the red-team run is the real
fault proxy's `shift_content_range`.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagefs.fs.lifecycle import log_path_for
from imagefs.fs.mountinfo import mount_at, read_mounts
from imagefs.testing.mounts import force_unmount, imagefs
from imagefs.testing.proxy import FaultProxy, Rule
from imagefs.testing.registry import LocalRegistry
from tests.integration.lazy_content import BIG, FILES, Published

pytestmark = pytest.mark.fuse

LAUNCHER = """
import os, sys
from imagefs.lazy.layers import LayerSet
from imagefs.lazy.telemetry import Telemetry
from imagefs.overlay import Overlay

inject = set(os.environ.get("IMAGEFS_INJECT", "").split(","))
if "landmark" in inject:
    async def landmarks(self):
        raise KeyError("injected landmark failure")
    LayerSet.prefetch_landmarks = landmarks
if "readahead" in inject:
    async def prefetch(self, i, offset, length):
        raise RuntimeError("injected read-ahead failure")
    LayerSet.prefetch = prefetch
if "readdir" in inject:
    def remember(self, ino):
        raise RuntimeError("injected readdir failure")
    Overlay.remember = remember
if "stats" in inject:
    def snapshot(self, extra=None):
        raise ValueError("injected stats failure")
    Telemetry.snapshot = snapshot
from imagefs.cli import main
sys.exit(main(sys.argv[1:]))
"""


class Daemon:
    def __init__(self, root: Path, mnt: Path, proc: subprocess.Popen[str]) -> None:
        self.root, self.mnt, self.proc = root, mnt, proc

    def alive(self) -> bool:
        os.statvfs(self.mnt)  # ENOTCONN once the daemon is gone
        return self.proc.poll() is None

    def log(self) -> str:
        return log_path_for(self.root, self.mnt).read_text(errors="replace")


def start_daemon(started: list[Daemon], root: Path, mnt: Path, ref: str, inject: str) -> Daemon:
    """`imagefs mount -f REF MNT` through the launcher; returns once the kernel shows it."""
    launcher = root.parent / "launcher.py"
    launcher.write_text(LAUNCHER)
    mnt.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, str(launcher), "--root", str(root), "mount", "-f", ref, str(mnt)],
        env={**os.environ, "IMAGEFS_INJECT": inject},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    daemon = Daemon(root, mnt, proc)
    started.append(daemon)  # cleaned up whatever happens next
    deadline = time.monotonic() + 120
    while mount_at(read_mounts(), str(mnt)) is None:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the mount never came up"
        time.sleep(0.05)
    os.statvfs(mnt)  # answers once the daemon serves requests
    return daemon


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        force_unmount(d.mnt)
        try:
            d.proc.wait(30)
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.proc.wait()


def test_failing_background_tasks_and_handlers_never_end_the_daemon(
    tmp_path: Path, estargz_image: Published, daemon_factory: list[Daemon]
) -> None:
    root = tmp_path / "root"
    imagefs(root, "pull", estargz_image.ref)
    inject = "landmark,readahead,readdir,stats"
    d = start_daemon(daemon_factory, root, tmp_path / "mnt", estargz_image.ref, inject)
    mnt = d.mnt
    # the landmark prefetch failed at start: the daemon is up and serves
    assert (mnt / "etc" / "motd").read_bytes() == FILES["etc/motd"]
    # readdir's bookkeeping fails: that listing gets EIO, nothing else
    with pytest.raises(OSError) as err:
        os.listdir(mnt / "data")
    assert err.value.errno == errno.EIO
    # every sequential read starts a read-ahead that raises; under concurrent readers
    results: dict[str, bytes] = {}

    def read(name: str) -> None:
        results[name] = (mnt / name).read_bytes()

    readers = [threading.Thread(target=read, args=(name,)) for name in BIG for _ in range(2)]
    for t in readers:
        t.start()
    for t in readers:
        t.join(120)
    assert results == BIG
    # the stats snapshot raises: `imagefs stats` says so in one line; the mount stays
    stats = imagefs(root, "stats", str(mnt), check=False)
    assert stats.returncode == 1 and "injected stats failure" in stats.stderr
    assert "Traceback" not in stats.stderr
    assert d.alive()
    assert (mnt / "usr" / "share" / "doc" / "readme.txt").read_bytes() == FILES[
        "usr/share/doc/readme.txt"
    ]
    log = d.log()
    for line in (
        "landmark prefetch failed: KeyError",
        "failed: RuntimeError: injected read-ahead failure",
        "readdir",
        "stats snapshot",
    ):
        assert line in log, log
    assert "Traceback" in log  # unexpected types keep their traceback
    assert "unmounted" not in log


def test_a_registry_shifting_content_range_costs_reads_not_the_mount(
    tmp_path: Path, estargz_image: Published, registry: LocalRegistry
) -> None:
    """The red-team case: ranges answered with a shifted Content-Range, many readers at once."""
    with FaultProxy(registry.url) as proxy:
        ref = estargz_image.ref.replace(estargz_image.ref.split("/")[0], proxy.host, 1)
        root, mnt = tmp_path / "root", tmp_path / "mnt"
        mnt.mkdir()
        imagefs(root, "mount", "--no-prefetch-landmark", ref, str(mnt))
        try:
            assert (mnt / "etc" / "motd").read_bytes() == FILES["etc/motd"]  # TOC loaded
            proxy.add(Rule("GET", r"/blobs/", "shift_content_range", shift=512))
            errors: list[int] = []

            def read(name: str) -> None:
                try:
                    (mnt / name).read_bytes()
                except OSError as exc:
                    errors.append(exc.errno or 0)

            readers = [threading.Thread(target=read, args=(n,)) for n in BIG for _ in range(3)]
            for t in readers:
                t.start()
            for t in readers:
                t.join(120)
            assert errors and set(errors) == {errno.EIO}
            os.statvfs(mnt)  # still up
            proxy.clear()
            for name, data in FILES.items():
                assert (mnt / name).read_bytes() == data
            assert "unmounted" not in log_path_for(root, mnt).read_text()
        finally:
            proc = imagefs(root, "umount", str(mnt), check=False)
            if proc.returncode != 0:
                force_unmount(mnt)
