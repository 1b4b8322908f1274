"""A short run of tools/loadtest (the full one runs for minutes; see docs/faults.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagefs.testing.loadtest import run

pytestmark = pytest.mark.fuse


def test_short_load_run_finds_no_corruption_hang_or_loss(tmp_path: Path) -> None:
    lines: list[str] = []
    # 20 s is mostly warm-up for memory; the minutes-long run checks that RSS stays flat.
    code = run(20, 16, tmp_path, stall=30, rss_growth=400, log=lines.append)
    report = "\n".join(lines)
    assert code == 0, report
    assert "cat " in report and "churn-prune" in report and "all good" in report
