"""`--progress auto` on a terminal: the live view (tty mode) against the plain style."""

from __future__ import annotations

import io
import re

from rich.console import Console

from imagefs.build.progress import TAIL_LINES, Progress

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _plain_text(raw: str) -> list[str]:
    return [line.rstrip() for line in ANSI.sub("", raw).replace("\r", "\n").splitlines()]


def _run_steps(progress: Progress) -> None:
    with progress:
        s = progress.step("[stage-0 1/2] RUN echo hi")
        for i in range(10):
            s.line(f"out {i}")
        s.done()
        c = progress.step("[stage-0 2/2] COPY a /a")
        c.cached()
        c.done()


def test_tty_keeps_one_line_per_finished_step_and_no_run_output() -> None:
    out = io.StringIO()
    _run_steps(Progress("tty", out))
    lines = _plain_text(out.getvalue())
    assert any(re.fullmatch(r"#1 \[stage-0 1/2\] RUN echo hi DONE \d+\.\ds", ln) for ln in lines)
    assert "#2 [stage-0 2/2] COPY a /a CACHED" in lines
    # the plain style's per-line records ("#1 0.001 out 0") are not printed in the tty view
    assert not any(re.fullmatch(r"#1 \d+\.\d{3} out \d", ln) for ln in lines)


def test_tty_live_area_shows_the_running_step_and_its_last_lines() -> None:
    progress = Progress("tty", io.StringIO())
    step = progress.step("[stage-0 1/1] RUN make")
    for i in range(TAIL_LINES + 4):
        step.line(f"line {i}")
    screen = Console(file=io.StringIO(), width=100, force_terminal=False)
    screen.print(progress._render())
    shown = _plain_text(screen.file.getvalue())  # type: ignore[attr-defined]
    assert re.fullmatch(r"#1 \[stage-0 1/1\] RUN make \d+\.\ds", shown[0])
    assert shown[1:] == [f"#1 line {i}" for i in range(4, TAIL_LINES + 4)]
    step.done()
    screen = Console(file=io.StringIO(), width=100)
    screen.print(progress._render())
    assert screen.file.getvalue().strip() == ""  # type: ignore[attr-defined]


def test_plain_mode_unchanged() -> None:
    out = io.StringIO()
    _run_steps(Progress("plain", out))
    lines = out.getvalue().splitlines()
    assert lines[1] == "#1 [stage-0 1/2] RUN echo hi"
    assert re.fullmatch(r"#1 \d+\.\d{3} out 0", lines[2])
    assert "#2 CACHED" in lines
