"""`--profile`: py-spy samples the process serving a mount while a workload runs.

py-spy (from the .bench venv) writes collapsed stacks (`-f raw`); `summarize` turns them into
the functions with the most samples, on the stack at all (inclusive) and at the top (self).
Profiled timings are perturbed (py-spy pauses the process to sample it), so a profiling run
writes its table to `.bench/profile.md`, never over docs/bench.md.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from bench.util import log, stop_process


@contextlib.contextmanager
def py_spy(binary: Path, pid: int, out: Path, rate: int = 200) -> Iterator[None]:
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = out.with_suffix(".collapsed.txt")
    proc = subprocess.Popen(
        [str(binary), "record", "-p", str(pid), "-o", str(raw), "-f", "raw", "-F", "-r", str(rate)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        stop_process(proc, timeout=20)
    if raw.exists():
        text = summarize(raw.read_text())
        out.with_suffix(".top.txt").write_text(text)
        log(f"profile: {raw} and {out.with_suffix('.top.txt')}")


def summarize(collapsed: str, top: int = 30) -> str:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "no samples (the process was idle)\n"
    lines = [f"{total} samples of busy (non-idle) threads", "", "inclusive (on the stack):"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    lines += ["", "self (top of the stack):"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    return "\n".join(lines) + "\n"
