"""Build progress in BuildKit's plain style:

```
#3 [stage-0 2/4] RUN echo hi
#3 0.214 hi
#3 DONE 0.3s

#4 [stage-0 3/4] COPY app /app
#4 CACHED
```

`quiet` prints nothing (the CLI prints the image ID at the end). `tty` (what `--progress
auto` picks on a terminal) is a live view like BuildKit's: the running step with its elapsed
time and the last few lines of its output is redrawn in place; each finished step stays as
one line (`#3 [stage-0 2/4] RUN echo hi DONE 0.3s`), so the scrollback holds no RUN output.
A RUN's output lines are kept in a bounded tail for the error message whatever the mode.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from types import TracebackType
from typing import TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

TAIL_LINES = 6
"""Output lines of the running step shown in the live view (the rest scrolls away)."""


class Progress:
    def __init__(self, mode: str = "plain", out: TextIO | None = None) -> None:
        self.quiet = mode == "quiet"
        self.out = out or sys.stderr
        self._n = 0
        self._live: Live | None = None
        self.current: Step | None = None
        if mode == "tty":
            console = Console(file=self.out, force_terminal=True, highlight=False)
            # get_renderable is called at each refresh, so the elapsed time moves on its own.
            self._live = Live(
                console=console, get_renderable=self._render, refresh_per_second=4,
                transient=True, redirect_stdout=False, redirect_stderr=False,
            )  # fmt: skip

    def __enter__(self) -> Progress:
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._live is not None:
            self._live.stop()

    def _render(self) -> Group:
        step = self.current
        if step is None:
            return Group()
        head = Text(f"#{step.n} {step.title} {time.monotonic() - step.start:.1f}s", "bold")
        # list(): one atomic copy, as the refresh thread reads while the build appends
        tail = [Text(f"#{step.n} {line}", "dim", no_wrap=True) for line in list(step.tail)]
        return Group(head, *tail)

    def _print(self, text: str) -> None:
        if not self.quiet and self._live is None:
            print(text, file=self.out, flush=True)

    def _finish(self, step: Step, status: str) -> None:
        """In the live view a finished step becomes one permanent line above the live area."""
        if self._live is not None:
            self._live.console.print(Text(f"#{step.n} {step.title} {status}"))
            if self.current is step:
                self.current = None
            self._live.refresh()

    def step(self, title: str) -> Step:
        self._n += 1
        step = Step(self, self._n, title)
        self.current = step
        return step


class Step:
    def __init__(self, progress: Progress, n: int, title: str) -> None:
        self.progress = progress
        self.n = n
        self.title = title
        self.start = time.monotonic()
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._cached = False
        progress._print(f"\n#{n} {title}")

    def line(self, text: str) -> None:
        self.tail.append(text)
        self.progress._print(f"#{self.n} {time.monotonic() - self.start:.3f} {text}")

    def note(self, text: str) -> None:
        self.tail.append(text)
        self.progress._print(f"#{self.n} {text}")

    def cached(self) -> None:
        self._cached = True
        self.progress._print(f"#{self.n} CACHED")
        self.progress._finish(self, "CACHED")

    def done(self) -> None:
        if not self._cached:
            elapsed = f"{time.monotonic() - self.start:.1f}s"
            self.progress._print(f"#{self.n} DONE {elapsed}")
            self.progress._finish(self, f"DONE {elapsed}")

    def error(self, message: str) -> None:
        self.progress._print(f"#{self.n} ERROR: {message}")
        self.progress._finish(self, f"ERROR: {message}")
