"""The mount daemon's collector settings (`fs.daemon.settle_garbage_collector`): start-up's
objects frozen out of every later collection, a larger young generation, and cyclic garbage
still collected. In a fresh interpreter: the settings are process-wide."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import gc, json
from imagefs.fs.daemon import GC_YOUNG_THRESHOLD, settle_garbage_collector

settle_garbage_collector()
frozen = gc.get_freeze_count()

class Node:
    def __init__(self):
        self.me = self  # a cycle: only the collector frees it

peak = 0
for k in range(200_000):
    Node()
    if k % 1000 == 0:
        peak = max(peak, len(gc.get_objects()))
print(json.dumps({
    "young": gc.get_threshold()[0] == GC_YOUNG_THRESHOLD,
    "frozen": frozen,
    "peak_tracked": peak,
    "cycles_left": sum(isinstance(o, Node) for o in gc.get_objects()),
}))
"""


def test_the_daemon_freezes_start_up_and_still_collects_cycles() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60
    )
    got = json.loads(out.stdout)
    assert got["young"]
    assert got["frozen"] > 10_000  # imports: modules, functions, classes
    # 200,000 cycles made, never more than a few young generations' worth alive at once
    assert got["cycles_left"] < 5 * 10_000
    assert got["peak_tracked"] < 5 * 10_000
