"""A small SVG writer for grouped horizontal bar charts on a log scale (no matplotlib here).

`render([Panel(title, [Group(label, [(series, value), ...]), ...], unit), ...])` stacks the
panels vertically; each series keeps one colour across panels, shown in a legend per panel.
The SVG building blocks (escaping, text, rectangles, lines) are imagefs's own, shared with
`imagefs trace report` (`imagefs.report.svg`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from imagefs.report import svg

PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#e15759",
    "#76b7b2",
    "#b07aa1",
    "#9c755f",
    "#edc948",
    "#ff9da7",
    "#bab0ac",
)
WIDTH = 900
LABEL_W = 150
RIGHT_PAD = 80
BAR_H = 11
GROUP_GAP = 10
FONT = ' font-family="DejaVu Sans, Arial, sans-serif"'


@dataclass(frozen=True)
class Group:
    label: str
    bars: Sequence[tuple[str, float]]


@dataclass(frozen=True)
class Panel:
    title: str
    groups: Sequence[Group]
    unit: str


def _fmt(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _panel(p: Panel, y0: float, colours: dict[str, str]) -> tuple[list[str], float]:
    out: list[str] = []
    values = [v for g in p.groups for _, v in g.bars if v > 0]
    lo = 10 ** math.floor(math.log10(min(values))) if values else 0.01
    hi = 10 ** math.ceil(math.log10(max(values))) if values else 1.0
    if hi <= lo:
        hi = lo * 10
    plot_w = WIDTH - LABEL_W - RIGHT_PAD

    def x(v: float) -> float:
        v = max(v, lo)
        return LABEL_W + plot_w * (math.log10(v) - math.log10(lo)) / (
            math.log10(hi) - math.log10(lo)
        )

    out.append(svg.text(10, y0 + 16, p.title, extra=f' font-size="14" font-weight="bold"{FONT}'))
    y = y0 + 28
    series = list(dict.fromkeys(name for g in p.groups for name, _ in g.bars))
    lx: float = LABEL_W
    for name in series:
        if lx + 24 + 6.5 * len(name) > WIDTH - 10:
            lx = LABEL_W
            y += 16
        out.append(svg.rect(lx, y, 10, 10, colours[name]))
        out.append(svg.text(lx + 14, y + 9, name, extra=f' font-size="11"{FONT}'))
        lx += 24 + 6.5 * len(name)
    y += 22
    top = y
    for g in p.groups:
        gh = BAR_H * len(g.bars)
        out.append(
            svg.text(
                LABEL_W - 6, y + gh / 2 + 4, g.label, anchor="end", extra=f' font-size="12"{FONT}'
            )
        )
        for name, v in g.bars:
            w = x(v) - LABEL_W
            tip = f"{name}: {_fmt(v)} {p.unit}"
            out.append(svg.rect(LABEL_W, y, max(w, 1), BAR_H - 1, colours[name], tip))
            out.append(
                svg.text(
                    LABEL_W + max(w, 1) + 3, y + BAR_H - 2, _fmt(v), extra=f' font-size="9"{FONT}'
                )
            )
            y += BAR_H
        y += GROUP_GAP
    # decades: grid lines and labels
    d = lo
    while d <= hi * 1.0001:
        gx = x(d)
        out.append(svg.line(gx, top - 4, gx, y, extra=' stroke="#ccc" stroke-width="0.5"'))
        label = f"{_fmt(d)} {p.unit}"
        out.append(svg.text(gx, y + 12, label, anchor="middle", extra=f' font-size="10"{FONT}'))
        d *= 10
    return out, y + 24


def render(panels: Sequence[Panel]) -> str:
    names = list(dict.fromkeys(n for p in panels for g in p.groups for n, _ in g.bars))
    colours = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}
    body: list[str] = []
    y = 0.0
    for p in panels:
        part, y = _panel(p, y, colours)
        body += part
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{y:.0f}' "
        f"viewBox='0 0 {WIDTH} {y:.0f}'><rect width='100%' height='100%' fill='white'/>\n"
        + "\n".join(body)
        + "\n</svg>\n"
    )
