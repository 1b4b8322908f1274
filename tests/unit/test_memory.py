"""`lazy.memory`: once a big buffer has been freed, later big buffers still go back to the
system when freed (glibc would otherwise raise its mmap threshold and keep them resident)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from imagefs.lazy.memory import keep_big_buffers_unmapped
if sys.argv[1] == "fixed":
    assert keep_big_buffers_unmapped()
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) << 10
MiB = 1 << 20
big = bytearray(24 * MiB)  # a TOC's worth, freed: glibc's threshold would move to 24 MiB
del big
before = anon()
kept, gone = [], []
for k in range(64):  # fetched ranges and pieces, 1 MiB each; half of them freed
    buf = bytearray(b"x" * MiB)
    (kept if k % 2 else gone).append(buf)
del gone
print((anon() - before) // MiB)
"""


def _grown(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


def test_freed_big_buffers_leave_rss_after_a_bigger_one_was_freed() -> None:
    assert _grown("fixed") <= 40  # the 32 MiB kept, the freed 32 MiB given back
    assert _grown("glibc-default") >= 56  # the control: the freed ones stayed resident
