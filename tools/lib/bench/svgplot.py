"""A small SVG writer for grouped horizontal bar charts on a log scale (no matplotlib here).

`render([Panel(title, [Group(label, [(series, value), ...]), ...], unit), ...])` stacks the
panels vertically; each series keeps one colour across panels, shown in a legend per panel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

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
FONT = "font-family='DejaVu Sans, Arial, sans-serif'"


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

    out.append(f"<text x='10' y='{y0 + 16}' font-size='14' font-weight='bold' {FONT}>")
    out.append(f"{escape(p.title)}</text>")
    y = y0 + 28
    series = list(dict.fromkeys(name for g in p.groups for name, _ in g.bars))
    lx: float = LABEL_W
    for name in series:
        if lx + 24 + 6.5 * len(name) > WIDTH - 10:
            lx = LABEL_W
            y += 16
        out.append(
            f"<rect x='{lx}' y='{y}' width='10' height='10' fill='{colours[name]}'/>"
            f"<text x='{lx + 14}' y='{y + 9}' font-size='11' {FONT}>{escape(name)}</text>"
        )
        lx += 24 + 6.5 * len(name)
    y += 22
    top = y
    for g in p.groups:
        gh = BAR_H * len(g.bars)
        out.append(
            f"<text x='{LABEL_W - 6}' y='{y + gh / 2 + 4}' font-size='12' text-anchor='end' "
            f"{FONT}>{escape(g.label)}</text>"
        )
        for name, v in g.bars:
            w = x(v) - LABEL_W
            out.append(
                f"<rect x='{LABEL_W}' y='{y}' width='{max(w, 1):.1f}' height='{BAR_H - 1}' "
                f"fill='{colours[name]}'><title>{escape(name)}: {_fmt(v)} {p.unit}</title></rect>"
                f"<text x='{LABEL_W + max(w, 1) + 3:.1f}' y='{y + BAR_H - 2}' font-size='9' "
                f"{FONT}>{_fmt(v)}</text>"
            )
            y += BAR_H
        y += GROUP_GAP
    # decades: grid lines and labels
    d = lo
    while d <= hi * 1.0001:
        gx = x(d)
        out.append(
            f"<line x1='{gx:.1f}' y1='{top - 4}' x2='{gx:.1f}' y2='{y}' stroke='#ccc' "
            f"stroke-width='0.5'/><text x='{gx:.1f}' y='{y + 12}' font-size='10' "
            f"text-anchor='middle' {FONT}>{_fmt(d)} {p.unit}</text>"
        )
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
