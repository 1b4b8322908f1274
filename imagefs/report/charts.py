"""The report's charts, each a function from a summary to one inline SVG.

Colours carry meaning across every chart on the page (and the page's CSS): read is indigo,
fetched is orange (as are reads served from the registry, which are the ones that fetch), the
image is slate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from imagefs.report import svg
from imagefs.report.trace import SOURCES, Fetch, ReportSummary, WireFetch
from imagefs.report.units import human_bytes, human_duration, pct, plural, shorten

READ = "#4f46e5"
FETCHED = "#ea580c"
IMAGE = "#94a3b8"
SOURCE_COLOURS = {"memory": "#16a34a", "cache": "#0891b2", "registry": FETCHED}
# Why bytes were fetched: the metadata in greys and blues, whole layers in red (the costly
# fallback), what reads pulled in oranges (as fetched bytes everywhere on the page).
CAUSE_COLOURS = {
    "manifest": "#64748b",
    "config": "#94a3b8",
    "referrers": "#a78bfa",
    "index": "#7c3aed",
    "toc": "#2563eb",
    "lost names": "#0891b2",
    "whole layer": "#dc2626",
    "read": FETCHED,
    "read-ahead": "#f59e0b",
    "prefetch": "#facc15",
    "auth": "#16a34a",
    "other": "#cbd5e1",
}
LAYER_COLOURS = (
    "#4e79a7",
    "#e15759",
    "#59a14f",
    "#b07aa1",
    "#edc948",
    "#76b7b2",
    "#ff9da7",
    "#9c755f",
    "#f28e2b",
    "#79706e",
)


def comparison_chart(s: ReportSummary) -> str:
    """Read vs fetched vs the whole image, on one linear scale: the headline in one picture.

    Only fetched bytes get a percentage of the image: both are compressed layer bytes, while
    bytes read are file contents after decompression, so "% of image" would compare unlike
    things (a workload can read more than the image's size)."""
    fetched_note = human_bytes(s.bytes_fetched)
    if s.image_size:
        fetched_note += f"  ·  {pct(s.bytes_fetched, s.image_size)} of the image"
    layers = sum(1 for layer in s.layers if layer.size is not None)
    rows: list[tuple[str, int | None, str, str]] = [
        ("Read by the workload", s.bytes_read, READ, f"{human_bytes(s.bytes_read)} of file data"),
        (
            "Fetched (all causes)" if s.counts_wire else "Fetched for reads",
            s.bytes_fetched,
            FETCHED,
            fetched_note,
        ),
        (
            "Image (compressed)",
            s.image_size,
            IMAGE,
            f"{human_bytes(s.image_size or 0)} in {plural(layers, 'layer')}",
        ),
    ]
    width, label_w, value_w, row_h, top = 1100, 190, 270, 40, 10
    bar_w = width - label_w - value_w
    scale = max([v for _, v, _, _ in rows if v] or [1])
    out = []
    for i, (label, value, colour, note) in enumerate(rows):
        y = top + i * row_h
        out.append(svg.text(0, y + 21, label, "lbl"))
        out.append(svg.rect(label_w, y + 6, bar_w, 22, "#eef1f5", extra=' rx="4"'))
        if value is None:
            out.append(svg.text(label_w + 12, y + 21, "unknown: pass --image-json", "muted"))
            continue
        w = max(bar_w * value / scale, 2 if value else 0)
        out.append(svg.rect(label_w, y + 6, w, 22, colour, f"{value:,} bytes", ' rx="4"'))
        out.append(svg.text(label_w + bar_w + 14, y + 21, note, "val"))
    return svg.chart(width, top + len(rows) * row_h + 4, "bytes read, fetched and image size", out)


def timeline_chart(s: ReportSummary) -> str:
    """Cumulative bytes read and fetched over time, with every read marked in a strip below
    (by source), the first byte marked, and the image size as a ceiling when it is in reach."""
    width, height = 1100, 420
    left, right, top = 84, 24, 34
    plot_bottom = 300
    strip_top, lane_h = plot_bottom + 12, 13
    axis_y = strip_top + 3 * lane_h + 4
    x_max = max(s.duration_ns, 1)
    x_ticks = svg.time_ticks(0, x_max, 8)
    y_hi = max(s.bytes_read, s.bytes_fetched, 1)
    show_image = bool(s.image_size) and s.image_size is not None and s.image_size <= 2.5 * y_hi
    if show_image and s.image_size:
        y_hi = max(y_hi, s.image_size)
    y_max, y_ticks = svg.byte_ticks(y_hi, 6)

    def x(t: float) -> float:
        return left + (width - left - right) * t / x_max

    def y(v: float) -> float:
        return plot_bottom - (plot_bottom - top) * v / y_max

    out = []
    for value, label in y_ticks:
        out.append(svg.line(left, y(value), width - right, y(value), "grid"))
        out.append(svg.text(left - 8, y(value) + 4, label, "tick", "end"))
    for value, label in x_ticks:
        out.append(svg.line(x(value), top, x(value), axis_y, "grid"))
        out.append(svg.text(x(value), axis_y + 17, label, "tick", "middle"))
    out.append(svg.line(left, plot_bottom, width - right, plot_bottom, "axis"))
    out.append(svg.line(left, top, left, plot_bottom, "axis"))
    out.append(
        svg.text(
            left + (width - left - right) / 2, height - 8, "time since mount", "axlbl", "middle"
        )
    )
    out.append(
        '<text class="axlbl" text-anchor="middle" '
        f'transform="translate(16 {svg.num((top + plot_bottom) / 2)}) rotate(-90)">'
        "cumulative bytes</text>"
    )
    if show_image and s.image_size:
        iy = y(s.image_size)
        out.append(svg.line(left, iy, width - right, iy, "ceiling"))
        out.append(
            svg.text(
                width - right - 4, iy - 6, f"image size {human_bytes(s.image_size)}", "ceil", "end"
            )
        )

    if s.reads:
        for attr, colour, fill in (("fetched", FETCHED, True), ("read", READ, False)):
            d = [f"M{svg.num(x(0))} {svg.num(y(0))}"]
            for p in s.curve:
                d.append(f"H{svg.num(x(p.t_ns))}V{svg.num(y(getattr(p, attr)))}")
            path = "".join(d)
            if fill:
                out.append(
                    f'<path d="{path}V{plot_bottom}H{svg.num(x(0))}Z" fill="{colour}" '
                    'fill-opacity="0.13" stroke="none"/>'
                )
            dash = ' stroke-dasharray="6 4"' if attr == "read" else ""
            out.append(
                f'<path d="{path}" fill="none" stroke="{colour}" stroke-width="2.4" '
                f'stroke-linejoin="round"{dash}/>'
            )
        end = s.curve[-1]
        out.append(
            svg.text(
                x(end.t_ns) - 6, y(end.fetched) - 8, human_bytes(end.fetched), "endlbl f", "end"
            )
        )
        if abs(y(end.read) - y(end.fetched)) > 16:
            out.append(
                svg.text(
                    x(end.t_ns) - 6, y(end.read) + 18, human_bytes(end.read), "endlbl r", "end"
                )
            )
    else:
        out.append(
            svg.text(
                (left + width) / 2,
                (top + plot_bottom) / 2,
                "no reads in this trace",
                "muted",
                "middle",
            )
        )

    if s.first_read is not None:
        fx = x(s.first_read.t_ns)
        out.append(svg.line(fx, top, fx, plot_bottom, "marker"))
        out.append(
            svg.text(fx + 5, top + 12, f"first byte {human_duration(s.first_read.t_ns)}", "mark")
        )

    # the read-event strip: one lane per source, a cell per time bin, darker = more reads
    peak = max((max(b.counts) for b in s.read_bins), default=1)
    for lane, source in enumerate(reversed(SOURCES)):
        k = SOURCES.index(source)
        ly = strip_top + lane * lane_h
        out.append(svg.rect(left, ly + 1, width - left - right, lane_h - 2, "#f3f5f8"))
        out.append(svg.text(left - 8, ly + lane_h - 3, source, "lane", "end"))
        for b in s.read_bins:
            c = b.counts[k]
            if not c:
                continue
            opacity = 0.3 + 0.7 * math.log1p(c) / math.log1p(peak)
            x0, x1 = x(b.start_ns), x(b.end_ns)
            out.append(
                svg.rect(
                    x0,
                    ly + 1,
                    max(x1 - x0, 1.5),
                    lane_h - 2,
                    SOURCE_COLOURS[source],
                    f"{c:,} read{'s' if c != 1 else ''} from {source}, "
                    f"{human_duration(b.start_ns)}–{human_duration(b.end_ns)}",
                    f' fill-opacity="{opacity:.2f}"',
                )
            )

    # legend
    lx = left + 14
    for label, colour, dash in (
        ("fetched", FETCHED, ""),
        ("read", READ, ' stroke-dasharray="6 4"'),
    ):
        out.append(
            svg.line(
                lx, top - 16, lx + 26, top - 16, extra=f' stroke="{colour}" stroke-width="3"{dash}'
            )
        )
        out.append(svg.text(lx + 32, top - 12, label, "lgd"))
        lx += 110
    return svg.chart(width, height, "cumulative bytes read and fetched over time", out)


def layer_chart(s: ReportSummary) -> str:
    """Each layer's share of all bytes read and of all bytes fetched (0–100%), with the
    absolute numbers and, when the size is known, how much of that layer was fetched."""
    width, label_w, value_w, top, row_h = 1100, 200, 330, 30, 46
    bar_w = width - label_w - value_w
    layers = s.layers
    height = top + row_h * max(len(layers), 1) + 8
    out = []
    for percent in (0, 25, 50, 75, 100):
        gx = label_w + bar_w * percent / 100
        out.append(svg.line(gx, top - 6, gx, height - 6, "grid"))
        out.append(svg.text(gx, top - 12, f"{percent}%", "tick", "middle"))
    if not layers:
        out.append(svg.text(label_w + 10, top + 24, "no layer was read", "muted"))
    for i, layer in enumerate(layers):
        y0 = top + i * row_h
        name = f"layer {layer.index}" + (" (base)" if layer.index == 0 else "")
        out.append(svg.text(0, y0 + 17, name, "lbl"))
        sub = []
        if layer.digest:
            sub.append(layer.digest.split(":")[-1][:12])
        if layer.size is not None:
            sub.append(human_bytes(layer.size))
        if sub:
            out.append(svg.text(0, y0 + 33, " · ".join(sub), "sub"))
        for j, (value, total, colour, what) in enumerate(
            (
                (layer.bytes_read, s.bytes_read, READ, "read"),
                (layer.bytes_fetched, s.bytes_fetched, FETCHED, "fetched"),
            )
        ):
            by = y0 + 6 + j * 16
            out.append(svg.rect(label_w, by, bar_w, 13, "#eef1f5", extra=' rx="3"'))
            share = value / total if total else 0.0
            if value:
                out.append(
                    svg.rect(
                        label_w,
                        by,
                        max(bar_w * share, 2),
                        13,
                        colour,
                        f"layer {layer.index}: {value:,} bytes {what} "
                        f"({pct(value, total)} of all bytes {what})",
                        ' rx="3"',
                    )
                )
        text = f"read {human_bytes(layer.bytes_read)} ({pct(layer.bytes_read, s.bytes_read)})"
        out.append(svg.text(label_w + bar_w + 14, y0 + 17, text, "val"))
        text = f"fetched {human_bytes(layer.bytes_fetched)}"
        text += f" ({pct(layer.bytes_fetched, s.bytes_fetched)})"
        if layer.size:
            text += f" · {pct(layer.bytes_fetched, layer.size)} of layer"
        out.append(svg.text(label_w + bar_w + 14, y0 + 33, text, "val"))
    return svg.chart(width, height, "share of bytes read and fetched per layer", out)


@dataclass(frozen=True)
class Bar:
    """One row of the waterfall: a label, a span of time, a colour, a hover text, a note."""

    start_ns: int
    end_ns: int
    label: str
    colour: str
    title: str
    detail: str
    dim: bool = False  # the same label as the row above: named once


def read_bars(fetches: Sequence[Fetch]) -> list[Bar]:
    """Reads that waited for the registry (a trace without `fetch` lines), coloured by layer."""
    bars = []
    previous = None
    for f in fetches:
        waited = f.end_ns - f.start_ns
        title = (
            f"{f.path}\nlayer {f.layer} · waited {human_duration(waited)} from "
            f"{human_duration(f.start_ns)} · fetched {f.fetched:,} bytes for a "
            f"{f.length:,}-byte read"
        )
        detail = f"{human_duration(waited)} · {human_bytes(f.fetched)}"
        colour = LAYER_COLOURS[(f.layer or 0) % len(LAYER_COLOURS)]
        bars.append(
            Bar(f.start_ns, f.end_ns, f.path, colour, title, detail, dim=f.path == previous)
        )
        previous = f.path
    return bars


def wire_bars(fetches: Sequence[WireFetch]) -> list[Bar]:
    """Every registry response, coloured by why it was fetched."""
    bars = []
    for f in fetches:
        took = f.end_ns - f.start_ns
        label = f.cause + (f" · layer {f.layer}" if f.layer is not None else "")
        title = (
            f"{label}\n{f.nbytes:,} bytes (HTTP {f.status}) in {human_duration(took)} "
            f"from {human_duration(f.start_ns)}"
        )
        detail = f"{human_duration(took)} · {human_bytes(f.nbytes)}"
        bars.append(Bar(f.start_ns, f.end_ns, label, cause_colour(f.cause), title, detail))
    return bars


def cause_colour(cause: str) -> str:
    return CAUSE_COLOURS.get(cause, IMAGE)


def waterfall_chart(bars: Sequence[Bar], what: str = "file") -> str:
    """One bar per fetch, from when it started to when it was done: the critical path of a
    cold start (a TOC or index before the first read, a whole layer), and what overlapped."""
    width, label_w, value_w, top, row_h = 1100, 330, 150, 44, 17
    plot_w = width - label_w - value_w - 10
    rows_bottom = top + row_h * len(bars)
    height = rows_bottom + 30
    lo = min(f.start_ns for f in bars)
    hi = max(f.end_ns for f in bars)
    if lo < (hi - lo) / 8:
        lo = 0  # the fetches start soon after the mount: count from the mount, like the rest
    span = max(hi - lo, 1)

    def x(t: float) -> float:
        return label_w + plot_w * (t - lo) / span

    out = [
        svg.text(label_w - 10, 12, what, "tick b", "end"),
        svg.text(label_w, 12, "time since mount", "tick b"),
        svg.text(width, 12, "took · fetched", "tick b", "end"),
    ]
    for i in range(1, len(bars), 2):  # zebra rows guide the eye from name to bar
        out.append(svg.rect(0, top + i * row_h - 3, width, row_h, "#f6f7f9"))
    for value, label in svg.time_ticks(lo, hi, 7):
        gx = x(value)
        out.append(svg.line(gx, top - 10, gx, rows_bottom + 2, "grid"))
        out.append(svg.text(gx, top - 16, label, "tick", "middle"))
        out.append(svg.text(gx, rows_bottom + 18, label, "tick", "middle"))
    for i, b in enumerate(bars):
        ry = top + i * row_h
        cls = "path dim" if b.dim else "path"
        out.append(svg.text(label_w - 10, ry + 9, shorten(b.label, 46), cls, "end"))
        x0, x1 = x(b.start_ns), x(b.end_ns)
        out.append(svg.rect(x0, ry, max(x1 - x0, 3), row_h - 5, b.colour, b.title, ' rx="2"'))
        out.append(svg.text(width, ry + 9, b.detail, "val sm", "end"))
    return svg.chart(width, height, "fetch waterfall", out)
