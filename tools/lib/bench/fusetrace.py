"""`--fuse-trace`: what each FUSE request of a session cost, as the kernel saw it.

The kernel's `fuse_request_send` and `fuse_request_end` tracepoints (recent kernels; this
machine's 6.18 has them) mark when a request is queued for the daemon and when its answer
came back. They are recorded in a trace instance of its own
(`/sys/kernel/tracing/instances/imagefs-bench`: nothing using the global buffer is disturbed)
while a workload runs, and paired by request number on the session's FUSE connection. Per
opcode that gives the number of requests, their median latency and their total: the same
yardstick for imagefs and the floor, taken outside both. Where the handler-level replay
(`adaptercost.py`) says what imagefs's Python costs, this says what the kernel waited for,
pyfuse3's and trio's share included.

The parse is pure (`latencies`), tested on trace text; recording needs root and a kernel
with the tracepoints, and is skipped with one log line otherwise.
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
from collections.abc import Iterable, Iterator
from pathlib import Path

TRACING = Path("/sys/kernel/tracing")
INSTANCE = "imagefs-bench"
EVENTS = ("fuse_request_send", "fuse_request_end")
BUFFER_KB = 65536  # per CPU: ~150k requests of a warm `tar` leave room to spare

_SEND = re.compile(
    rb" (\d+\.\d+): fuse_request_send: connection (\d+) req (\d+) opcode \d+ \((\w+)\)"
)
_END = re.compile(rb" (\d+\.\d+): fuse_request_end: connection (\d+) req (\d+) ")


def available() -> bool:
    """Whether this kernel has the FUSE request tracepoints and we may use them."""
    return (TRACING / "events" / "fuse" / "fuse_request_send").is_dir() and os.access(
        TRACING / "instances", os.W_OK
    )


def connection_of(mountpoint: Path) -> int:
    """The FUSE connection number the tracepoints print for a mount: its device number in the
    kernel's own encoding (major << 20 | minor; FUSE mounts have major 0)."""
    dev = os.stat(mountpoint).st_dev
    return os.major(dev) << 20 | os.minor(dev)


def latencies(lines: Iterable[bytes], connection: int | None = None) -> dict[str, list[float]]:
    """Seconds from queued to answered of every request in a trace, by opcode name
    (`FUSE_LOOKUP`, ...). Requests of other connections (`connection`: None keeps all), and
    requests whose send or end fell outside the trace, are left out."""
    sent: dict[tuple[int, int], tuple[float, str]] = {}
    out: dict[str, list[float]] = {}
    for line in lines:
        m = _SEND.search(line)
        if m is not None:
            conn = int(m.group(2))
            if connection is None or conn == connection:
                sent[(conn, int(m.group(3)))] = (float(m.group(1)), m.group(4).decode())
            continue
        m = _END.search(line)
        if m is not None:
            start = sent.pop((int(m.group(2)), int(m.group(3))), None)
            if start is not None:
                when, op = start
                out.setdefault(op, []).append(float(m.group(1)) - when)
    return out


def summary(lat: dict[str, list[float]]) -> dict[str, float]:
    """Metrics for the results file: per opcode (`FUSE_` dropped) its count, median
    latency in µs and total seconds."""
    out: dict[str, float] = {}
    for op, values in lat.items():
        name = op.removeprefix("FUSE_")
        out[f"fuse.{name}.n"] = float(len(values))
        out[f"fuse.{name}.p50_us"] = statistics.median(values) * 1e6
        out[f"fuse.{name}.sum_s"] = sum(values)
    return out


class Recording:
    def __init__(self, mountpoint: Path) -> None:
        self.connection = connection_of(mountpoint)
        self.metrics: dict[str, float] = {}


@contextlib.contextmanager
def record(mountpoint: Path) -> Iterator[Recording]:
    """Record the session's FUSE requests while the body runs; `metrics` filled on exit."""
    rec = Recording(mountpoint)
    inst = TRACING / "instances" / INSTANCE
    with contextlib.suppress(FileExistsError):
        inst.mkdir()  # a trace instance: its own buffer and event switches
    try:
        (inst / "tracing_on").write_text("0")
        (inst / "buffer_size_kb").write_text(str(BUFFER_KB))
        (inst / "trace").write_text("")  # cleared
        for event in EVENTS:
            (inst / "events" / "fuse" / event / "enable").write_text("1")
        (inst / "tracing_on").write_text("1")
        yield rec
        (inst / "tracing_on").write_text("0")
        with open(inst / "trace", "rb") as f:
            rec.metrics = summary(latencies(f, rec.connection))
    finally:
        with contextlib.suppress(OSError):
            (inst / "tracing_on").write_text("0")
        with contextlib.suppress(OSError):
            inst.rmdir()  # the kernel frees the instance's buffer with it
