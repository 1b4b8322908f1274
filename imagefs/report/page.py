"""The report page: the summary's numbers as cards, the charts and tables, in one HTML string
with inline CSS and SVG and no script; and `write_report`, the one function that touches files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from imagefs.errors import NotFound, UsageError
from imagefs.report import svg
from imagefs.report.charts import (
    FETCHED,
    IMAGE,
    LAYER_COLOURS,
    READ,
    SOURCE_COLOURS,
    cause_colour,
    comparison_chart,
    layer_chart,
    read_bars,
    timeline_chart,
    waterfall_chart,
    wire_bars,
)
from imagefs.report.trace import SOURCES, ReportSummary, image_info, summarise
from imagefs.report.units import human_bytes, human_duration, pct, plural, shorten

WATERFALL_LIMIT = 200
"""Bars in the fetch waterfall: beyond this the page gets long and nobody reads bar 201."""

TOP_FILES = 25
"""Rows in the files table: the heavy hitters; the count says how many more there are."""

_CSS = (
    ":root { --ink:#1f2937; --muted:#6b7280; --line:#e5e7eb; --bg:#f4f6f9; --card:#fff; "
    f"--read:{READ}; --fetched:{FETCHED}; --image:{IMAGE}; }}"
    + """
* { box-sizing:border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans","Helvetica Neue",
  Arial,sans-serif; -webkit-font-smoothing:antialiased; }
main { max-width:1180px; margin:0 auto; padding:28px 24px 48px; }
header h1 { font-size:26px; margin:0 0 4px; letter-spacing:-0.01em; }
header .sub { color:var(--muted); margin:0; }
header .sub code { color:var(--ink); }
.cards { display:grid; grid-template-columns:repeat(4,1fr); gap:14px; margin:22px 0; }
.card { background:var(--card); border:1px solid var(--line); border-radius:12px;
  padding:14px 16px; box-shadow:0 1px 2px rgba(16,24,40,.04); }
.card .k { font-size:12px; text-transform:uppercase; letter-spacing:.06em; color:var(--muted);
  font-weight:600; }
.card .v { font-size:28px; font-weight:700; margin:2px 0 0; font-variant-numeric:tabular-nums;
  line-height:1.2; }
.card .d { font-size:13px; color:var(--muted); margin-top:4px; overflow-wrap:anywhere; }
.card.read .v { color:var(--read); } .card.fetched .v { color:var(--fetched); }
section { background:var(--card); border:1px solid var(--line); border-radius:12px;
  padding:18px 20px 16px; margin:0 0 18px; box-shadow:0 1px 2px rgba(16,24,40,.04); }
section h2 { font-size:17px; margin:0 0 2px; }
section p.lead { margin:0 0 12px; color:var(--muted); font-size:14px; }
.note { margin:10px 0 0; color:var(--muted); font-size:13px; }
.warn { background:#fff7ed; border:1px solid #fed7aa; color:#9a3412; border-radius:10px;
  padding:10px 14px; margin:16px 0 0; font-size:14px; }
svg.chart { width:100%; height:auto; display:block; overflow:visible; }
svg text { font-family:inherit; fill:var(--ink); font-size:13px; }
svg .tick { font-size:12px; fill:var(--muted); font-variant-numeric:tabular-nums; }
svg .b { font-weight:600; }
svg .lbl { font-size:14px; font-weight:600; }
svg .sub { font-size:12px; fill:var(--muted);
  font-family:ui-monospace,"DejaVu Sans Mono",monospace; }
svg .val { font-size:13px; font-variant-numeric:tabular-nums; }
svg .sm { font-size:12px; fill:var(--muted); }
svg .muted { fill:var(--muted); font-style:italic; }
svg .axlbl { font-size:13px; fill:var(--muted); font-weight:600; }
svg .lgd { font-size:13px; font-weight:600; }
svg .lane { font-size:11px; fill:var(--muted); }
svg .mark, svg .ceil { font-size:12px; fill:var(--muted); font-weight:600; }
svg .endlbl { font-size:13px; font-weight:700; }
svg .endlbl.f { fill:var(--fetched); } svg .endlbl.r { fill:var(--read); }
svg .path { font-size:12px; font-family:ui-monospace,"DejaVu Sans Mono",monospace; }
svg .path.dim { fill:#a3aab5; }
svg .grid { stroke:#e9ecf1; stroke-width:1; }
svg .axis { stroke:#9ca3af; stroke-width:1; }
svg .marker { stroke:#374151; stroke-width:1.2; stroke-dasharray:3 3; }
svg .ceiling { stroke:var(--image); stroke-width:1.6; stroke-dasharray:8 5; }
.sources { display:flex; height:14px; border-radius:7px; overflow:hidden; background:#eef1f5;
  margin:10px 0 6px; }
.sources span { display:block; height:100%; }
.legend { display:flex; flex-wrap:wrap; gap:6px 18px; font-size:13px; color:var(--muted); }
.legend i, i.sw { display:inline-block; width:10px; height:10px; border-radius:3px;
  margin-right:6px; vertical-align:-1px; }
table { width:100%; border-collapse:collapse; font-size:14px; }
th { text-align:left; font-size:12px; text-transform:uppercase; letter-spacing:.05em;
  color:var(--muted); font-weight:600; padding:8px 10px; border-bottom:1px solid var(--line); }
td { padding:7px 10px; border-bottom:1px solid #f0f2f5; vertical-align:middle; }
tr:hover td { background:#fafbfc; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
td.path { font-family:ui-monospace,"DejaVu Sans Mono",monospace; font-size:13px;
  overflow-wrap:anywhere; }
td.path { width:100%; }
td.bar { min-width:120px; }
td.bar div { height:8px; border-radius:4px; background:var(--read); min-width:2px; }
td.rank { color:var(--muted); width:28px; }
.ops { display:flex; flex-wrap:wrap; gap:8px; margin-top:6px; }
.ops span { background:#f1f5f9; border-radius:999px; padding:3px 12px; font-size:13px; }
.ops b { font-variant-numeric:tabular-nums; }
footer { color:var(--muted); font-size:13px; text-align:center; margin-top:8px; }
@media (max-width: 900px) { .cards { grid-template-columns:repeat(2,1fr); } }
"""
)


def _card(key: str, value: str, detail: str = "", cls: str = "", title: str = "") -> str:
    t = f' title="{svg.esc(title)}"' if title else ""
    d = f'<div class="d">{detail}</div>' if detail else ""
    return (
        f'<div class="card {cls}"{t}><div class="k">{svg.esc(key)}</div>'
        f'<div class="v">{svg.esc(value)}</div>{d}</div>'
    )


def _cards(s: ReportSummary) -> str:
    cards = [
        _card(
            "Files touched",
            f"{s.files_touched:,}",
            svg.esc(f"{s.paths_seen:,} paths looked at in {s.events:,} operations"),
        ),
        _card(
            "Bytes read",
            human_bytes(s.bytes_read),
            svg.esc(f"{s.bytes_read:,} bytes in {plural(s.reads, 'read')}"),
            "read",
        ),
        _card(
            "Bytes fetched",
            human_bytes(s.bytes_fetched),
            svg.esc(
                f"{s.bytes_fetched:,} bytes"
                + (f" in {plural(len(s.wire), 'response')}" if s.counts_wire else "")
                + (f" · {s.bytes_fetched / s.bytes_read:.2f}× of read" if s.bytes_read else "")
            ),
            "fetched",
            title="every response from the registry, whatever its cause"
            if s.counts_wire
            else "what reads waited for (this trace has no fetch lines)",
        ),
    ]
    if s.image_size is not None:
        cards.append(
            _card(
                "Fetched of image",
                pct(s.bytes_fetched, s.image_size) if s.image_size else "–",
                svg.esc(f"image size {human_bytes(s.image_size)} ({s.image_size:,} bytes)"),
            )
        )
    else:
        cards.append(
            _card("Image size", "unknown", "pass <code>--image-json</code> from imagefs inspect")
        )
    if s.first_read is not None:
        fr = s.first_read
        detail = f"<code>{svg.esc(shorten(fr.path, 40))}</code> from {svg.esc(fr.source)}"
        if fr.latency_ns:
            detail += svg.esc(f", waited {human_duration(fr.latency_ns)}")
        cards.append(_card("Time to first byte", human_duration(fr.t_ns), detail, title=fr.path))
    else:
        cards.append(_card("Time to first byte", "–", "no read in this trace"))
    first_op = human_duration(s.first_event_ns) if s.first_event_ns is not None else "–"
    cards.append(
        _card("Duration", human_duration(s.duration_ns), svg.esc(f"first operation at {first_op}"))
    )
    cards.append(
        _card(
            "Reads that fetched",
            f"{len(s.fetches):,}",
            svg.esc(f"of {plural(s.reads, 'read')} ({pct(len(s.fetches), s.reads)})"),
        )
    )
    if s.latency_p50_ns is not None:
        p50, p90 = human_duration(s.latency_p50_ns), human_duration(s.latency_p90_ns or 0)
        unit50, unit90 = p50.split(" ", 1)[1], p90.split(" ", 1)[1]
        value = f"{p50.split()[0]} / {p90}" if unit50 == unit90 else f"{p50} / {p90}"
        cards.append(
            _card(
                "Fetch wait p50 / p90",
                value,
                svg.esc(f"slowest {human_duration(s.latency_max_ns or 0)}"),
            )
        )
    else:
        cards.append(_card("Fetch wait", "–", "no read waited for the registry"))
    if s.waited_reads:  # read-ahead's fetches too: a read behind one fetched nothing itself
        cards.append(
            _card(
                "Reads that waited",
                f"{s.waited_reads:,}",
                svg.esc(
                    f"{human_duration(s.wait_total_ns)} in all · p50 "
                    f"{human_duration(s.wait_p50_ns or 0)} · slowest "
                    f"{human_duration(s.wait_max_ns or 0)}"
                ),
                title="reads not answered at once: their own fetches, a read-ahead fetch "
                "in flight for their bytes, an index to load",
            )
        )
    return '<div class="cards">' + "".join(cards) + "</div>"


def _sources_bar(s: ReportSummary) -> str:
    """Reads by where they were served from, as one stacked bar with a legend."""
    total = sum(s.reads_by_source.values()) or 1
    segments, legend = [], []
    for source in SOURCES:
        n = s.reads_by_source.get(source, 0)
        b = s.bytes_by_source.get(source, 0)
        colour = SOURCE_COLOURS[source]
        tip = f"{plural(n, 'read')} ({b:,} bytes) from {source}"
        segments.append(
            f'<span style="width:{100 * n / total:.3f}%;background:{colour}" '
            f'title="{svg.esc(tip)}"></span>'
        )
        legend.append(
            f'<span><i style="background:{colour}"></i><b>{svg.esc(source)}</b> '
            f"{plural(n, 'read')} · {svg.esc(human_bytes(b))} ({pct(n, s.reads)})</span>"
        )
    return (
        '<div class="sources">'
        + "".join(segments)
        + '</div><div class="legend">'
        + "".join(legend)
        + "</div>"
    )


def _files_table(s: ReportSummary, limit: int) -> str:
    if not s.files:
        return '<p class="note">No file was read.</p>'
    top = s.files[:limit]
    peak = max(top[0].bytes_read, 1)
    rows = []
    for rank, f in enumerate(top, 1):
        rows.append(
            f'<tr><td class="rank num">{rank}</td><td class="path">{svg.esc(f.path)}</td>'
            f'<td class="bar"><div style="width:{100 * f.bytes_read / peak:.1f}%"></div></td>'
            f'<td class="num" title="{f.bytes_read:,} bytes">'
            f"{svg.esc(human_bytes(f.bytes_read))}</td>"
            f'<td class="num" title="{f.bytes_fetched:,} bytes">'
            f"{svg.esc(human_bytes(f.bytes_fetched))}</td>"
            f'<td class="num">{f.reads:,}</td>'
            f'<td class="num">{svg.esc(human_duration(f.first_access_ns))}</td></tr>'
        )
    more = ""
    if len(s.files) > limit:
        rest = s.files[limit:]
        more = (
            f'<p class="note">…and {len(rest):,} more files, '
            f"{svg.esc(human_bytes(sum(f.bytes_read for f in rest)))} read between them.</p>"
        )
    return (
        "<table><thead><tr><th></th><th>file</th><th></th><th class='num'>read</th>"
        "<th class='num'>fetched</th><th class='num'>reads</th>"
        "<th class='num'>first access</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
        + more
    )


def _causes_section(s: ReportSummary) -> str:
    """Bytes fetched by cause: one stacked bar and a table that adds up to the total."""
    total = s.bytes_fetched or 1
    segments, rows = [], []
    for c in s.by_cause:
        colour = cause_colour(c.cause)
        tip = f"{c.cause}: {c.nbytes:,} bytes in {plural(c.fetches, 'response')}"
        segments.append(
            f'<span style="width:{100 * c.nbytes / total:.3f}%;background:{colour}" '
            f'title="{svg.esc(tip)}"></span>'
        )
        rows.append(
            f'<tr><td><i class="sw" style="background:{colour}"></i>{svg.esc(c.cause)}</td>'
            f'<td class="num">{c.fetches:,}</td>'
            f'<td class="num" title="{c.nbytes:,} bytes">{svg.esc(human_bytes(c.nbytes))}</td>'
            f'<td class="num">{pct(c.nbytes, s.bytes_fetched)}</td></tr>'
        )
    rows.append(
        f"<tr><td><b>total</b></td><td class='num'><b>{len(s.wire):,}</b></td>"
        f"<td class='num' title='{s.bytes_fetched:,} bytes'>"
        f"<b>{svg.esc(human_bytes(s.bytes_fetched))}</b></td><td></td></tr>"
    )
    return (
        "<section><h2>Fetched by cause</h2>"
        '<p class="lead">Every response from the registry, by why it was fetched: the '
        "image's metadata, tables of contents and indexes, whole layers where nothing lazier "
        "was possible, and the pieces reads, read-ahead and prefetch brought in.</p>"
        '<div class="sources">' + "".join(segments) + "</div>"
        "<table><thead><tr><th>cause</th><th class='num'>responses</th>"
        "<th class='num'>fetched</th><th class='num'>share</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></section>"
    )


def _wire_waterfall(s: ReportSummary) -> str:
    # The bars worth seeing first: responses that carried bytes (a 0-byte HEAD or 404 is a
    # round trip, still drawn when there is room), in order of start.
    carried = [f for f in s.wire if f.nbytes]
    empty = [f for f in s.wire if not f.nbytes]
    shown = sorted((carried + empty)[:WATERFALL_LIMIT], key=lambda f: (f.start_ns, f.end_ns))
    cap = ""
    if len(s.wire) > WATERFALL_LIMIT:
        cap = (
            f'<p class="note">Showing {WATERFALL_LIMIT} of {len(s.wire):,} responses '
            "(those that carried bytes first, by start time); the table above counts them all."
            "</p>"
        )
    legend = "".join(
        f'<span><i style="background:{cause_colour(c)}"></i>{svg.esc(c)}</span>'
        for c in sorted({f.cause for f in shown})
    )
    return (
        "<section><h2>Fetch waterfall</h2>"
        '<p class="lead">One bar per response from the registry, from the request to the '
        "end of its body, by cause (and layer): what the time before the first byte was "
        "spent on, and what overlapped.</p>"
        f'<div class="legend" style="margin-bottom:8px">{legend}</div>'
        + waterfall_chart(wire_bars(shown), "cause")
        + cap
        + "</section>"
    )


def render_html(s: ReportSummary, title: str = "trace", *, top_files: int = TOP_FILES) -> str:
    """The whole page as one string: inline CSS and SVG, no script, nothing fetched.

    `title` names what was traced (the CLI passes the trace's file name). Deterministic: the
    same summary gives the same bytes, so reports can be diffed and tested.
    """
    subject = s.image_name or title
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>imagefs trace report · {svg.esc(subject)}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        "<header><h1>imagefs trace report</h1>",
        f'<p class="sub">Trace <code>{svg.esc(title)}</code>'
        + (f" of <code>{svg.esc(s.image_name)}</code>" if s.image_name else "")
        + svg.esc(
            f": {s.events:,} operations over {human_duration(s.duration_ns)}"
            + (f" in {s.sessions} mount sessions" if s.sessions > 1 else "")
        )
        + ".</p>",
    ]
    parts.extend(f'<div class="warn">{svg.esc(w)}</div>' for w in s.warnings)
    parts.append("</header>")
    parts.append(_cards(s))

    parts.append(
        "<section><h2>Read vs fetched vs image</h2>"
        '<p class="lead">What the workload read, what had to come from the registry for it, '
        "and what a full pull would have downloaded.</p>"
        + comparison_chart(s)
        + "<h2 style='margin-top:14px'>Where reads were served from</h2>"
        + _sources_bar(s)
        + "</section>"
    )
    parts.append(
        "<section><h2>Bytes over time</h2>"
        '<p class="lead">Cumulative bytes fetched '
        + ("(every response, whatever its cause)" if s.counts_wire else "for reads")
        + " and bytes read, since the mount "
        "started. The strip underneath marks every read by where it was served from "
        "(darker = more reads in that slice of time).</p>" + timeline_chart(s) + "</section>"
    )
    parts.append(
        "<section><h2>Per-layer share</h2>"
        '<p class="lead">Each layer\'s share of all bytes read and of all bytes fetched; '
        "layer 0 is the base of the image.</p>" + layer_chart(s) + "</section>"
    )
    if s.counts_wire:
        parts.append(_causes_section(s))
        parts.append(_wire_waterfall(s))
    elif s.fetches:
        shown = s.fetches[:WATERFALL_LIMIT]
        cap = ""
        if len(s.fetches) > WATERFALL_LIMIT:
            cap = (
                f'<p class="note">Showing the first {WATERFALL_LIMIT} of '
                f"{len(s.fetches):,} reads that fetched (by start time).</p>"
            )
        layer_ids = sorted({f.layer or 0 for f in shown})
        legend = "".join(
            f'<span><i style="background:{LAYER_COLOURS[i % len(LAYER_COLOURS)]}"></i>'
            f"layer {i}</span>"
            for i in layer_ids
        )
        parts.append(
            "<section><h2>Fetch waterfall</h2>"
            '<p class="lead">One bar per read that waited for the registry, from when it '
            "started waiting to when it was answered, in order of start. This trace has no "
            "fetch lines (written by an older imagefs): TOC, index, whole-layer and "
            "background fetches are not in it.</p>"
            f'<div class="legend" style="margin-bottom:8px">{legend}</div>'
            + waterfall_chart(read_bars(shown))
            + cap
            + "</section>"
        )
    else:
        parts.append(
            "<section><h2>Fetch waterfall</h2>"
            '<p class="note">No read waited for the registry: everything came from memory '
            "or the local cache.</p></section>"
        )
    parts.append(
        f"<section><h2>Top files by bytes read</h2>"
        f'<p class="lead">{s.files_touched:,} files were read; the heaviest first. '
        "First access is the file's first operation of any kind, since the mount started."
        "</p>" + _files_table(s, top_files) + "</section>"
    )
    ops = "".join(f"<span>{svg.esc(op)} <b>{n:,}</b></span>" for op, n in s.ops.items())
    parts.append(
        "<section><h2>Operations</h2>"
        f'<div class="ops">{ops or "<span>none</span>"}</div>'
        + (
            '<p class="note">Bytes fetched are every response from the registry, counted as '
            "they arrived, whatever the cause: the same sum as <code>imagefs stats</code>. "
            "A file's fetched bytes are what its reads waited for.</p></section>"
            if s.counts_wire
            else '<p class="note">Fetched bytes are those reads waited for: this trace has no '
            "fetch lines, so TOC, index, whole-layer, read-ahead and background fetches are "
            "not in it.</p></section>"
        )
    )
    parts.append("<footer>imagefs trace report</footer></main></body></html>")
    return "\n".join(parts)


def write_report(
    trace: Path,
    output: Path,
    image: Mapping[str, Any] | Sequence[Any] | None = None,
) -> ReportSummary:
    """Reads the trace at `trace`, writes the HTML page to `output`, returns the summary.

    `image` is `imagefs inspect` output (the array, or its first element; `load_image_json`
    reads a file); without it the page says the image size is unknown. The page is written
    to a temporary name beside `output` and renamed, so a viewer never sees half a page.
    Raises NotFound for a missing trace, UsageError for unreadable input.
    """
    info = image_info(image) if image is not None else None
    try:
        with trace.open("rb") as lines:
            summary = summarise(lines, info)
    except FileNotFoundError:
        raise NotFound(f"trace {trace}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"trace {trace}: is a directory") from None
    page = render_html(summary, trace.name)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(page, encoding="utf-8", errors="backslashreplace")
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
    return summary
