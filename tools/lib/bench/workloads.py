"""What is done to each system's tree. One workload runs in one session (a fresh mount).

A workload names the phases it runs in and returns metrics as a dict. Metric keys are
`"<workload>.<phase>.<what>"`; `report.METRICS` says how each is shown. Add a workload by
subclassing `Workload` and listing it in `WORKLOADS`.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import time
from abc import ABC, abstractmethod
from pathlib import Path

from bench.images import BuiltImage
from bench.systems import Phase, Tree
from bench.util import BenchError, vm_hwm_mb

MB = 1_000_000
SMALL_FILE_LIMIT = 64 * 1024
RANDOM_FILES = 2000
RANDOM_SEED = 20240607


class Workload(ABC):
    name: str
    phases: tuple[Phase, ...] = ("cold", "warm")
    # Whether the bench may look up the serving process (a CLI call, ~0.3 s) before the
    # workload to report its CPU: not for a workload timed from the mount command's start.
    daemon_cpu: bool = True

    @abstractmethod
    def run(self, tree: Tree, image: BuiltImage, phase: Phase) -> dict[str, float]: ...


class FindLs(Workload):
    """`find . -ls` of the whole tree: every lookup, getattr and readdir, no file data."""

    name = "find"

    def run(self, tree: Tree, image: BuiltImage, phase: Phase) -> dict[str, float]:
        start = time.perf_counter()
        proc = subprocess.run(["find", ".", "-ls"], cwd=tree.root, capture_output=True, check=False)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise BenchError(f"find -ls in {tree.root}: {proc.stderr.decode(errors='replace')}")
        return {"s": seconds, "entries": float(proc.stdout.count(b"\n") - 1)}


class ReadAll(Workload):
    """`tar cf - . | wc -c`: every file read once, in directory order; then the daemon's RSS."""

    name = "readall"

    def run(self, tree: Tree, image: BuiltImage, phase: Phase) -> dict[str, float]:
        start = time.perf_counter()
        proc = subprocess.run(
            ["bash", "-c", "set -o pipefail; tar cf - . | wc -c"],
            cwd=tree.root,
            capture_output=True,
            text=True,
            check=False,
        )
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise BenchError(f"tar in {tree.root} exited {proc.returncode}: {proc.stderr}")
        nbytes = int(proc.stdout.strip())
        out = {"s": seconds, "bytes": float(nbytes), "mbps": nbytes / seconds / MB}
        if tree.ready_s is not None:
            # What a user waits for from nothing to everything read: mount, then read.
            out["e2e_mbps"] = nbytes / (tree.ready_s + seconds) / MB
        if tree.rss and tree.pid is not None:
            rss = vm_hwm_mb(tree.pid)
            if rss is not None:
                out["rss_mb"] = rss
        return out


class LargestFile(Workload):
    """Sequential read of the view's largest file in 1 MiB reads."""

    name = "largest"

    def run(self, tree: Tree, image: BuiltImage, phase: Phase) -> dict[str, float]:
        rel, size = image.view(tree.view).largest()
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        total = 0
        start = time.perf_counter()
        with open(tree.root / rel, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
        seconds = time.perf_counter() - start
        if total != size:
            raise BenchError(f"{rel}: read {total} bytes, the catalog says {size}")
        return {"s": seconds, "bytes": float(size), "mbps": size / seconds / MB}


def random_small_files(image: BuiltImage, view: str) -> list[str]:
    """RANDOM_FILES regular files of 1 B .. 64 KiB, in a fixed seeded order."""
    small = [p for p, size in image.view(view).files if 0 < size < SMALL_FILE_LIMIT]
    rng = random.Random(RANDOM_SEED)
    return rng.sample(small, min(RANDOM_FILES, len(small)))


class RandomReads(Workload):
    """Whole-file reads of random small files, one after another, in one process."""

    name = "random"

    def run(self, tree: Tree, image: BuiltImage, phase: Phase) -> dict[str, float]:
        paths = [tree.root / p for p in random_small_files(image, tree.view)]
        latencies: list[float] = []
        nbytes = 0
        start = time.perf_counter()
        for path in paths:
            t0 = time.perf_counter()
            nbytes += len(_read(path))
            latencies.append(time.perf_counter() - t0)
        seconds = time.perf_counter() - start
        q = statistics.quantiles(latencies, n=10)
        return {
            "s": seconds,
            "files": float(len(paths)),
            "files_per_s": len(paths) / seconds,
            "p50_ms": statistics.median(latencies) * 1000,
            "p90_ms": q[8] * 1000,
            "bytes": float(nbytes),
        }


FIRST_BYTE_FILE = "etc/debian_version"


def first_byte_file(image: BuiltImage, view: str) -> str:
    """/etc/debian_version when the view has it (as `--experiment lazy` reads), else the
    first of the random small files."""
    names = {p for p, _ in image.view(view).files}
    return FIRST_BYTE_FILE if FIRST_BYTE_FILE in names else random_small_files(image, view)[0]


class FirstByte(Workload):
    """Start-up: from starting the mount command to the first byte of one small file, read
    with one read(2) right after the mount answered. Runs first in its session, so nothing
    else warmed the mount; systems without a mount command (a plain tree) report nothing."""

    name = "firstbyte"
    daemon_cpu = False  # timed from the mount command: nothing may run before the read

    def run(self, tree: Tree, image: BuiltImage, phase: Phase) -> dict[str, float]:
        if tree.started is None:
            return {}
        fd = os.open(tree.root / first_byte_file(image, tree.view), os.O_RDONLY)
        try:
            got = os.read(fd, 1)
        finally:
            os.close(fd)
        seconds = time.perf_counter() - tree.started
        if len(got) != 1:
            raise BenchError(f"first byte: read {len(got)} bytes")
        return {"s": seconds, "after_ready_s": seconds - (tree.ready_s or 0.0)}


def _read(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, SMALL_FILE_LIMIT):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


WORKLOADS: dict[str, Workload] = {
    w.name: w for w in (FindLs(), ReadAll(), LargestFile(), RandomReads(), FirstByte())
}
