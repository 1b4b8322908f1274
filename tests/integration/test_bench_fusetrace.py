"""`tools/bench --fuse-trace` (`tools/lib/bench/fusetrace.py`): FUSE requests as the kernel
timed them.

The parse is checked on trace lines in the kernel's own format; the recording on a real mount
of the bench's floor (`floorfs.py`), against requests this test makes the kernel send: opening
a file it never looked up is one LOOKUP, one OPEN, one READ and one RELEASE, and a stat of
something already looked up is none (the floor's entries are cached for a day).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagefs.testing.mounts import force_unmount

LIB = Path(__file__).resolve().parents[2] / "tools" / "lib"
sys.path.insert(0, str(LIB))

from bench import fusetrace, report  # noqa: E402

pytestmark = pytest.mark.fuse

TRACE = b"""\
# tracer: nop
          python-9904    [001] ...2. 77419.108980: fuse_request_send: connection 39 req 2 opcode 26 (FUSE_INIT) len 104
          python-9904    [001] ..... 77419.109826: fuse_request_end: connection 39 req 2 len 80 error 0
            find-12      [000] ...1. 77420.000100: fuse_request_send: connection 39 req 8 opcode 1 (FUSE_LOOKUP) len 45
            find-12      [000] ...1. 77420.000105: fuse_request_send: connection 40 req 8 opcode 15 (FUSE_READ) len 80
          python-9904    [001] ..... 77420.000130: fuse_request_end: connection 39 req 8 len 144 error 0
          python-9904    [001] ..... 77420.000900: fuse_request_end: connection 40 req 8 len 4096 error 0
            find-12      [000] ...1. 77420.001000: fuse_request_send: connection 39 req 10 opcode 1 (FUSE_LOOKUP) len 45
          python-9904    [001] ..... 77420.001050: fuse_request_end: connection 39 req 10 len 16 error -2
          python-9904    [001] ..... 77420.002000: fuse_request_end: connection 39 req 6 len 16 error 0
            find-12      [000] ...1. 77420.003000: fuse_request_send: connection 39 req 12 opcode 14 (FUSE_OPEN) len 48
"""  # noqa: E501


def test_latencies_pair_send_and_end_by_request_on_one_connection() -> None:
    lat = fusetrace.latencies(TRACE.splitlines(), connection=39)
    # req 6 ended with no send seen, req 12 was sent and never answered: both left out;
    # connection 40's READ is another mount's
    assert sorted(lat) == ["FUSE_INIT", "FUSE_LOOKUP"]
    assert [round(x * 1e6) for x in lat["FUSE_LOOKUP"]] == [30, 50]
    assert fusetrace.latencies(TRACE.splitlines())["FUSE_READ"] == [pytest.approx(795e-6)]
    m = fusetrace.summary(lat)
    assert m["fuse.LOOKUP.n"] == 2
    assert m["fuse.LOOKUP.p50_us"] == pytest.approx(40)
    assert m["fuse.LOOKUP.sum_s"] == pytest.approx(80e-6)


def test_report_shows_each_system_per_request() -> None:
    results: report.Results = {
        "imagefs": {
            "random.warm.fuse.LOOKUP.n": [2661, 2661, 2661],
            "random.warm.fuse.LOOKUP.p50_us": [60, 62, 59],
            "random.warm.fuse.LOOKUP.sum_s": [0.17, 0.19, 0.168],
        },
        "floor": {
            "random.warm.fuse.LOOKUP.n": [2661],
            "random.warm.fuse.LOOKUP.p50_us": [26],
            "random.warm.fuse.LOOKUP.sum_s": [0.071],
        },
    }
    lines = report.fuse_requests(results, ["imagefs", "floor", "ratarmount"])
    assert "| workload | request | imagefs | floor |" in lines
    assert "| random.warm | LOOKUP | 2,661 × 60 µs = 0.17 s | 2,661 × 26 µs = 0.07 s |" in lines
    assert report.fuse_requests({"imagefs": {"random.warm.s": [1.0]}}, ["imagefs"]) == []


def test_recording_a_real_mount_counts_the_requests_made(tmp_path: Path) -> None:
    if not fusetrace.available():
        pytest.skip("this kernel has no fuse_request_send/end tracepoints")
    tree = tmp_path / "tree"
    (tree / "dir").mkdir(parents=True)
    (tree / "dir" / "a").write_bytes(b"alpha")
    (tree / "dir" / "b").write_bytes(b"bravo")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(LIB / "bench" / "floorfs.py"), str(tree), str(mnt)],
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not os.path.ismount(mnt):
            assert proc.poll() is None, "floorfs exited"
            assert time.monotonic() < deadline, "floorfs did not mount"
            time.sleep(0.01)
        os.stat(mnt / "dir" / "a")  # looked up before the recording: cached
        with fusetrace.record(mnt) as rec:
            os.stat(mnt / "dir" / "a")
            with open(mnt / "dir" / "b", "rb") as f:
                assert f.read() == b"bravo"
        m = rec.metrics
        assert m["fuse.LOOKUP.n"] == 1  # b; dir and a were cached
        assert m["fuse.OPEN.n"] == 1
        assert m["fuse.READ.n"] >= 1
        assert m["fuse.OPEN.p50_us"] > 0
        assert not (fusetrace.TRACING / "instances" / fusetrace.INSTANCE).exists()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        force_unmount(mnt)
