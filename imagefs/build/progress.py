"""Build progress in BuildKit's plain style:

```
#3 [stage-0 2/4] RUN echo hi
#3 0.214 hi
#3 DONE 0.3s

#4 [stage-0 3/4] COPY app /app
#4 CACHED
```

`quiet` prints nothing (the CLI prints the image ID at the end). A RUN's output lines are
kept in a bounded tail for the error message whatever the mode.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, mode: str = "plain", out: TextIO | None = None) -> None:
        self.quiet = mode == "quiet"
        self.out = out or sys.stderr
        self._n = 0

    def _print(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.out, flush=True)

    def step(self, title: str) -> Step:
        self._n += 1
        return Step(self, self._n, title)


class Step:
    def __init__(self, progress: Progress, n: int, title: str) -> None:
        self.progress = progress
        self.n = n
        self.start = time.monotonic()
        self._cached = False
        progress._print(f"\n#{n} {title}")

    def line(self, text: str) -> None:
        self.progress._print(f"#{self.n} {time.monotonic() - self.start:.3f} {text}")

    def note(self, text: str) -> None:
        self.progress._print(f"#{self.n} {text}")

    def cached(self) -> None:
        self._cached = True
        self.progress._print(f"#{self.n} CACHED")

    def done(self) -> None:
        if not self._cached:
            self.progress._print(f"#{self.n} DONE {time.monotonic() - self.start:.1f}s")

    def error(self, message: str) -> None:
        self.progress._print(f"#{self.n} ERROR: {message}")
