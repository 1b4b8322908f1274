"""SVG building blocks: escaping, short coordinates, text and rectangles, nice axis ticks.

Shared by the trace report's charts and the bench's plots (`tools/lib/bench/svgplot.py`), so
that there is one copy of each. Pure: values in, markup out.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable

from imagefs.report.units import BYTE_UNITS


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def num(x: float) -> str:
    """A coordinate, short: SVGs with thousands of elements stay small."""
    return f"{x:.1f}".rstrip("0").rstrip(".")


def _nice_step(raw: float) -> float:
    mag = 10.0 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag * (1 + 1e-9):
            return m * mag
    return 10 * mag


def byte_ticks(hi: float, target: int = 6) -> tuple[float, list[tuple[float, str]]]:
    """A nice axis maximum >= hi and ticks from 0, labelled in the largest binary unit that
    keeps them >= 1 ('0', '20 MiB', '40 MiB', ...)."""
    k = 0
    while k < len(BYTE_UNITS) - 1 and hi >= 1024 ** (k + 1):
        k += 1
    div, unit = float(1024**k), BYTE_UNITS[k]
    step = _nice_step(max(hi / div, 1e-9) / target)
    count = max(1, math.ceil(hi / div / step - 1e-9))
    decimals = _decimals(step)
    ticks = [
        (i * step * div, "0" if i == 0 else f"{_fixed(i * step, decimals)} {unit}")
        for i in range(count + 1)
    ]
    return count * step * div, ticks


def _decimals(step: float) -> int:
    """Digits after the point that a tick step needs: 2.5 -> 1, 0.02 -> 2, 20 -> 0."""
    for decimals in range(7):
        if abs(round(step, decimals) - step) < 1e-9 * max(step, 1):
            return decimals
    return 6


def _fixed(value: float, decimals: int) -> str:
    """A tick value with the step's decimals, minus trailing zeros: 2.5, 5 (not 5.0), 7.5."""
    text = f"{value:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


_TIME_UNITS = (  # (below this many ns, divide by, unit)
    (1e3, 1.0, "ns"),
    (1e6, 1e3, "µs"),
    (1e9, 1e6, "ms"),
    (180e9, 1e9, "s"),
    (math.inf, 60e9, "min"),
)


def time_ticks(lo: float, hi: float, target: int = 7) -> list[tuple[float, str]]:
    """Nice ticks within [lo, hi] (ns since mount start), labelled absolutely in one unit
    chosen by `hi` ('0', '2.5 s', '5 s' or '10.02 s', '10.04 s'), so every time on the page
    reads the same way."""
    hi = max(hi, lo + 1)
    div, unit = next((d, u) for limit, d, u in _TIME_UNITS if hi < limit)
    step = _nice_step((hi - lo) / div / target)
    decimals = _decimals(step)
    first = math.ceil(lo / div / step - 1e-9)
    ticks = []
    i = first
    while i * step <= hi / div * (1 + 1e-9):
        value = i * step
        ticks.append((value * div, "0" if i == 0 else f"{_fixed(value, decimals)} {unit}"))
        i += 1
    return ticks


def chart(width: int, height: int, label: str, body: Iterable[str]) -> str:
    return (
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{esc(label)}" xmlns="http://www.w3.org/2000/svg">' + "".join(body) + "</svg>"
    )


def text(
    x: float, y: float, text: str, cls: str = "", anchor: str = "start", extra: str = ""
) -> str:
    c = f' class="{cls}"' if cls else ""
    a = f' text-anchor="{anchor}"' if anchor != "start" else ""
    return f'<text x="{num(x)}" y="{num(y)}"{c}{a}{extra}>{esc(text)}</text>'


def rect(
    x: float, y: float, w: float, h: float, fill: str, title: str = "", extra: str = ""
) -> str:
    t = f"<title>{esc(title)}</title>" if title else ""
    return (
        f'<rect x="{num(x)}" y="{num(y)}" width="{num(max(w, 0))}" height="{num(h)}" '
        f'fill="{fill}"{extra}>{t}</rect>'
    )


def line(x1: float, y1: float, x2: float, y2: float, cls: str = "", extra: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f'<line x1="{num(x1)}" x2="{num(x2)}" y1="{num(y1)}" y2="{num(y2)}"{c}{extra}/>'
