"""kill -9 in the middle of pull --full, push, index and a mount's cache writes: the next
command finds a consistent store (`imagefs check`: all good, or only removable leftovers;
`check --repair`: all good) and the image pulls, pushes and mounts again (docs/faults.md).

Each kill is placed deterministically: the fault proxy stalls the transfer in the middle, the
test waits until the victim is visibly at that point, then SIGKILLs it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imagefs.testing.hostile import Layer, RegistryWriter, gzip_stream, many_entries_tar
from imagefs.testing.images import SampleImage, skopeo_inspect
from imagefs.testing.mounts import force_unmount, imagefs, mounted
from imagefs.testing.proxy import FaultProxy, Rule
from imagefs.testing.registry import LocalRegistry
from tests.integration.lazy_content import FILES, Published

pytestmark = pytest.mark.fuse


@pytest.fixture
def proxy(registry: LocalRegistry) -> Iterator[FaultProxy]:
    with FaultProxy(registry.url) as p:
        yield p


def start(root: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "imagefs", "--root", str(root), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def wait_for(
    what: str,
    cond: Callable[[], bool],
    victim: subprocess.Popen[str] | None = None,
    timeout: float = 30,
) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if victim is not None and victim.poll() is not None:
            raise AssertionError(f"ended before {what}: {victim.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def kill9(proc: subprocess.Popen[str]) -> None:
    assert proc.poll() is None, f"finished before the kill: {proc.communicate()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def assert_recovers(root: Path) -> list[str]:
    """check: all good or removable leftovers only; check --repair; then all good."""
    first = imagefs(root, "check", check=False)
    problems = first.stdout.strip().splitlines()[:-1]
    for line in problems:
        assert line.startswith(("leftover temporary file", "empty partial download")), line
    assert first.returncode == (1 if problems else 0), first.stdout
    imagefs(root, "check", "--repair")
    assert imagefs(root, "check").stdout.strip().endswith("all good")
    return problems


def test_kill_during_pull_full(
    tmp_path: Path, sample_image: SampleImage, proxy: FaultProxy
) -> None:
    layer = max(sample_image.layout.layers(), key=lambda x: int(x["size"]))["digest"]
    rule = proxy.add(Rule("GET", layer, "stall_body", truncate_to=60_000, stall_seconds=60))
    root = tmp_path / "root"
    ref = f"{proxy.host}/{sample_image.pushed.repo_tag}"
    victim = start(root, "pull", "--full", ref)
    partial = root / "ingest" / f"{layer.split(':')[1]}.partial"
    wait_for("a download in the middle", lambda: rule.hits > 0 and partial.exists(), victim)
    time.sleep(0.3)  # 60 kB of the layer are in the client's hands: kill it there
    kill9(victim)
    assert not (root / "blobs" / "sha256" / layer.split(":")[1]).exists()
    assert_recovers(root)
    proxy.clear()
    imagefs(root, "pull", "--full", ref)
    blob = root / "blobs" / "sha256" / layer.split(":")[1]
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == layer.split(":")[1]
    with mounted(root, ref, tmp_path / "mnt") as mnt:
        assert (mnt / "etc" / "hello.txt").read_bytes() == sample_image.files["etc/hello.txt"]


def test_kill_during_push(
    tmp_path: Path, sample_image: SampleImage, fresh_registry: LocalRegistry
) -> None:
    root = tmp_path / "root"
    imagefs(root, "pull", "--full", sample_image.ref)
    with FaultProxy(fresh_registry.url) as target:
        rule = target.add(Rule("PUT", r"/blobs/uploads/", "stall", stall_seconds=60))
        ref = f"{target.host}/crash/push:v1"
        imagefs(root, "tag", sample_image.ref, ref)
        victim = start(root, "push", ref)
        wait_for("an upload in flight", lambda: rule.hits > 0, victim)
        kill9(victim)
        assert_recovers(root)
        rule.times = 0
        imagefs(root, "push", ref)
    assert skopeo_inspect(fresh_registry, "crash/push:v1")["Digest"] == sample_image.digest
    with mounted(root, ref, tmp_path / "mnt") as mnt:
        assert (mnt / "etc" / "hello.txt").read_bytes() == sample_image.files["etc/hello.txt"]


def test_kill_during_index_build(
    tmp_path: Path, writer_registry: RegistryWriter, repo_name: str
) -> None:
    count = 300_000  # a few seconds of indexing: long enough to be killed in the middle
    pieces = list(many_entries_tar(count))
    tar_sha = "sha256:" + hashlib.sha256(b"".join(pieces)).hexdigest()
    ref = writer_registry.image(repo_name, "idx", [Layer(gzip_stream(iter(pieces)), tar_sha)])
    root = tmp_path / "root"
    imagefs(root, "pull", "--full", ref)
    victim = start(root, "index", ref)
    time.sleep(1.5)  # the blob is local: the build itself is running now
    kill9(victim)
    assert not list((root / "indexes").rglob("*")) or all(
        p.is_dir() or p.name.startswith(".") for p in (root / "indexes").rglob("*")
    )
    assert_recovers(root)
    out = imagefs(root, "index", ref).stdout
    assert f"{count + count // 1000}" in out  # files and their directories
    with mounted(root, ref, tmp_path / "mnt") as mnt:
        assert (mnt / "d00299" / "f0299999").stat().st_size == 0


@pytest.fixture
def writer_registry(registry: LocalRegistry) -> RegistryWriter:
    return RegistryWriter(registry)


def test_kill_mount_daemon_during_cache_writes(
    tmp_path: Path, estargz_image: Published, proxy: FaultProxy
) -> None:
    ref = estargz_image.ref.replace(estargz_image.ref.split("/")[0], proxy.host, 1)
    root, mnt = tmp_path / "root", tmp_path / "mnt"
    mnt.mkdir()
    imagefs(root, "mount", ref, str(mnt))
    try:
        (mnt / "etc" / "motd").read_bytes()
        pid = int(imagefs(root, "mounts", "--format", "{{.PID}}").stdout.split()[0])
        # the next pieces arrive slowly: the daemon is in the middle of fetching and caching
        rule = proxy.add(
            Rule("GET", r"/blobs/", "stall_body", truncate_to=200_000, stall_seconds=60)
        )
        reader = threading.Thread(
            target=lambda: _read_quietly(mnt / "data" / "big2.bin"), daemon=True
        )
        reader.start()
        wait_for("a stalled fetch", lambda: rule.hits > 0)
        time.sleep(0.3)
        os.kill(pid, signal.SIGKILL)
        reader.join(30)
    finally:
        force_unmount(mnt)
    assert_recovers(root)
    proxy.clear()
    with mounted(root, ref, mnt) as m:
        for name, data in FILES.items():
            assert (m / name).read_bytes() == data


def _read_quietly(path: Path) -> None:
    # the daemon is killed under this read: ENOTCONN is the expected answer
    with contextlib.suppress(OSError):
        path.read_bytes()
