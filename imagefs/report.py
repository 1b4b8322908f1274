"""`imagefs trace report`: a mount's trace (JSON lines) as one self-contained HTML page.

Why a page rather than numbers on stdout: the questions a trace answers — what did the workload
touch, how much of the image did that cost, and where did it sit waiting for the registry — are
about shares of a whole and shapes over time, which a picture shows at a glance. The page has no
scripts and loads nothing (inline CSS, inline SVG drawn here, no charting library), so it opens
offline, can be attached to a bug report and archived as a CI artefact.

The trace format is documented in `imagefs.lazy.telemetry`. What a trace cannot say, the page
says it cannot: read-ahead and background fetches are not attributed to any read, so "fetched"
here is what reads waited for; layer sizes come only from `imagefs inspect` JSON, if given.

Shape of this module (the ARCHITECTURE rules): `parse_line`, `summarise` and `image_info` are
pure (values in, values out), `render_html` is pure (a summary in, a string out), and
`write_report` is the one function that touches files, for the CLI.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagefs.errors import NotFound, UsageError

__all__ = [
    "SOURCES",
    "TOP_FILES",
    "WATERFALL_LIMIT",
    "CurvePoint",
    "Fetch",
    "FileStats",
    "FirstRead",
    "ImageInfo",
    "LayerStats",
    "ReadBin",
    "ReportSummary",
    "TraceEvent",
    "human_bytes",
    "human_duration",
    "image_info",
    "load_image_json",
    "parse_line",
    "render_html",
    "summarise",
    "write_report",
]

SOURCES = ("memory", "cache", "registry")
"""Where a read was served from, cheapest first (as in the trace's `from`)."""

WATERFALL_LIMIT = 200
"""Bars in the fetch waterfall: beyond this the page gets long and nobody reads bar 201."""

TOP_FILES = 25
"""Rows in the files table: the heavy hitters; the count says how many more there are."""

_CURVE_POINTS = 1500  # about two points per pixel column of the timeline
_READ_BINS = 220  # columns of the read-event strip under the timeline

# Colours carry meaning across every chart on the page: read is indigo, fetched is orange
# (as are reads served from the registry, which are the ones that fetch), the image is slate.
_READ = "#4f46e5"
_FETCHED = "#ea580c"
_IMAGE = "#94a3b8"
_SOURCE_COLOURS = {"memory": "#16a34a", "cache": "#0891b2", "registry": _FETCHED}
_LAYER_COLOURS = (
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

# -- parsing ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """One trace line. Non-read operations leave the read fields at their defaults."""

    t: int
    op: str
    path: str
    layer: int | None = None
    offset: int = 0
    length: int = 0
    source: str | None = None
    fetched: int = 0
    latency: float = 0.0


def _count(value: object) -> int | None:
    """A non-negative JSON integer, or None (bool is an int to Python, not to JSON)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def parse_line(line: str | bytes) -> TraceEvent | None:
    """One event, or None for a line that is blank or not a trace event.

    Tolerant on purpose: a trace is readable while the mount still writes it, so its last line
    can be cut short, and one bad line should not cost the whole report (`summarise` counts
    the lines it skipped and the page says how many).
    """
    if isinstance(line, bytes):
        line = line.decode("utf-8", "replace")
    line = line.strip()
    if not line:
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    t = _count(record.get("t"))
    op = record.get("op")
    path = record.get("path", "")
    if t is None or not isinstance(op, str) or not isinstance(path, str):
        return None
    if op != "read":
        return TraceEvent(t=t, op=op, path=path)
    layer = _count(record.get("layer"))
    offset = _count(record.get("offset", 0))
    length = _count(record.get("length", 0))
    fetched = _count(record.get("fetched", 0))
    latency = record.get("latency", 0.0)
    source = record.get("from")
    if offset is None or length is None or fetched is None:
        return None
    if isinstance(latency, bool) or not isinstance(latency, (int, float)) or latency < 0:
        return None
    if not isinstance(source, str):
        source = "registry" if fetched else "memory"
    return TraceEvent(
        t=t,
        op=op,
        path=path,
        layer=layer,
        offset=offset,
        length=length,
        source=source,
        fetched=fetched,
        latency=float(latency),
    )


# -- the image --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageInfo:
    """What the page needs of `imagefs inspect`: a name and each layer's digest and size."""

    name: str | None
    layers: tuple[tuple[str, int], ...]

    @property
    def size(self) -> int:
        """Compressed bytes of all layers: what a full pull would download."""
        return sum(size for _, size in self.layers)


def image_info(image: Mapping[str, Any] | Sequence[Any]) -> ImageInfo:
    """Reads `imagefs inspect` output: the JSON array itself, or its first element.

    Both are accepted because the CLI hands over the file's content, while a caller holding
    `api.inspect_json`'s result has the element. Raises UsageError naming what is missing.
    """
    if isinstance(image, Sequence) and not isinstance(image, (str, bytes)):
        if not image:
            raise UsageError("image JSON is an empty array: expected `imagefs inspect` output")
        image = image[0]
    if not isinstance(image, Mapping):
        raise UsageError("image JSON is not an object: expected `imagefs inspect` output")
    extra = image.get("ImageFS")
    layers = extra.get("Layers") if isinstance(extra, Mapping) else None
    if not isinstance(layers, list):
        raise UsageError("image JSON has no ImageFS.Layers: expected `imagefs inspect` output")
    parsed: list[tuple[str, int]] = []
    for i, layer in enumerate(layers):
        size = _count(layer.get("Size")) if isinstance(layer, Mapping) else None
        if size is None:
            raise UsageError(f"image JSON: ImageFS.Layers[{i}] has no Size")
        digest = layer.get("Digest")
        parsed.append((digest if isinstance(digest, str) else "", size))
    name = None
    for key in ("RepoTags", "RepoDigests"):
        names = image.get(key)
        if isinstance(names, list) and names and isinstance(names[0], str):
            name = names[0]
            break
    if name is None and isinstance(image.get("Id"), str):
        name = image["Id"]
    return ImageInfo(name=name, layers=tuple(parsed))


# -- the summary ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileStats:
    """One file that was read. Times are ns since the mount started, as in the trace."""

    path: str
    bytes_read: int
    bytes_fetched: int
    reads: int
    first_access_ns: int  # its first operation of any kind (usually the lookup)
    first_read_ns: int


@dataclass(frozen=True)
class LayerStats:
    """Reads and fetches of one layer (index as in the trace: manifest order, 0 is the base)."""

    index: int
    digest: str | None
    size: int | None
    bytes_read: int
    bytes_fetched: int
    reads: int
    fetches: int


@dataclass(frozen=True)
class Fetch:
    """A read that waited for the registry: it started waiting at `start_ns` (its t minus
    its latency) and was answered at `end_ns` (its t)."""

    start_ns: int
    end_ns: int
    path: str
    layer: int | None
    fetched: int
    length: int


@dataclass(frozen=True)
class CurvePoint:
    """Cumulative bytes read and fetched as of `t_ns` (the timeline, thinned to screen size)."""

    t_ns: int
    read: int
    fetched: int


@dataclass(frozen=True)
class ReadBin:
    """Read events in [start_ns, end_ns) by source, for the strip under the timeline."""

    start_ns: int
    end_ns: int
    counts: tuple[int, int, int]  # memory, cache, registry, as SOURCES


@dataclass(frozen=True)
class FirstRead:
    """The first read answered: when, what, from where, and how long it waited."""

    t_ns: int
    path: str
    source: str
    latency_ns: int


@dataclass(frozen=True)
class ReportSummary:
    """Everything the page shows, as plain values (tests assert on this, not on HTML)."""

    events: int
    skipped_lines: int
    sessions: int
    duration_ns: int
    ops: dict[str, int]
    reads: int
    bytes_read: int
    bytes_fetched: int
    reads_by_source: dict[str, int]
    bytes_by_source: dict[str, int]
    files: tuple[FileStats, ...]  # by bytes read, most first; then first access, then path
    paths_seen: int
    layers: tuple[LayerStats, ...]
    image_name: str | None
    image_size: int | None
    first_event_ns: int | None
    first_read: FirstRead | None
    fetches: tuple[Fetch, ...]  # by start, then end, then path
    latency_p50_ns: int | None
    latency_p90_ns: int | None
    latency_max_ns: int | None
    curve: tuple[CurvePoint, ...]
    read_bins: tuple[ReadBin, ...]
    warnings: tuple[str, ...]

    @property
    def files_touched(self) -> int:
        """Distinct files read (lookups alone don't count, as in `imagefs stats`)."""
        return len(self.files)

    @property
    def ttfb_ns(self) -> int | None:
        """Time to first byte: when the first read was answered, since the mount started."""
        return self.first_read.t_ns if self.first_read else None


def _percentile(sorted_values: Sequence[int], p: float) -> int | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]


def summarise(
    lines: Iterable[str | bytes],
    image: Mapping[str, Any] | Sequence[Any] | ImageInfo | None = None,
) -> ReportSummary:
    """Reads trace lines once and returns the summary the page is drawn from.

    Streams: only per-file and per-layer totals, the fetches and one (t, read, fetched) triple
    per read are kept, so traces of millions of events fit. A trace file is opened for
    appending, so two mounts with one `--trace FILE` leave two runs whose clocks both start
    at 0; each run where `t` goes backwards is placed after the previous one (and counted in
    `sessions`) rather than interleaved with it.
    """
    info = image if isinstance(image, ImageInfo) or image is None else image_info(image)
    events = skipped = 0
    sessions = 1
    base = last_raw = duration = 0
    ops: dict[str, int] = {}
    reads_by_source: dict[str, int] = {s: 0 for s in SOURCES}
    bytes_by_source: dict[str, int] = {s: 0 for s in SOURCES}
    first_seen: dict[str, int] = {}
    files: dict[str, list[int]] = {}  # path -> [read, fetched, reads, first read]
    layers: dict[int, list[int]] = {}  # index -> [read, fetched, reads, fetches]
    fetches: list[Fetch] = []
    read_t: list[int] = []
    read_src: list[int] = []
    cum_read: list[int] = []
    cum_fetched: list[int] = []
    total_read = total_fetched = 0
    first_event: int | None = None
    first_read: FirstRead | None = None
    for line in lines:
        event = parse_line(line)
        if event is None:
            if line.strip():
                skipped += 1
            continue
        events += 1
        if event.t < last_raw:
            sessions += 1
            base = duration
        last_raw = event.t
        t = base + event.t
        duration = max(duration, t)
        if first_event is None:
            first_event = t
        ops[event.op] = ops.get(event.op, 0) + 1
        first_seen.setdefault(event.path, t)
        if event.op != "read":
            continue
        source = event.source or "memory"
        reads_by_source[source] = reads_by_source.get(source, 0) + 1
        bytes_by_source[source] = bytes_by_source.get(source, 0) + event.length
        total_read += event.length
        total_fetched += event.fetched
        f = files.get(event.path)
        if f is None:
            f = files[event.path] = [0, 0, 0, t]
        f[0] += event.length
        f[1] += event.fetched
        f[2] += 1
        if event.layer is not None:
            lay = layers.setdefault(event.layer, [0, 0, 0, 0])
            lay[0] += event.length
            lay[1] += event.fetched
            lay[2] += 1
            lay[3] += 1 if event.fetched else 0
        latency_ns = round(event.latency * 1e9)
        if first_read is None:
            first_read = FirstRead(t, event.path, source, latency_ns)
        if event.fetched or latency_ns:
            fetches.append(
                Fetch(
                    start_ns=max(0, t - latency_ns),
                    end_ns=t,
                    path=event.path,
                    layer=event.layer,
                    fetched=event.fetched,
                    length=event.length,
                )
            )
        read_t.append(t)
        read_src.append(SOURCES.index(source) if source in SOURCES else 0)
        cum_read.append(total_read)
        cum_fetched.append(total_fetched)

    warnings: list[str] = []
    if skipped:
        warnings.append(
            f"{skipped:,} line{'s' if skipped != 1 else ''} of the trace could not be read "
            "and were skipped (a trace still being written can end mid-line)."
        )
    if sessions > 1:
        warnings.append(
            f"The trace holds {sessions} mount sessions (its clock restarts); they are shown "
            "one after another."
        )
    layer_stats = _layer_stats(layers, info, warnings)
    latencies = sorted(f.end_ns - f.start_ns for f in fetches)
    fetches.sort(key=lambda f: (f.start_ns, f.end_ns, f.path))
    file_stats = sorted(
        (
            FileStats(path, r, fe, n, min(first_seen.get(path, fr), fr), fr)
            for path, (r, fe, n, fr) in files.items()
        ),
        key=lambda s: (-s.bytes_read, s.first_access_ns, s.path),
    )
    return ReportSummary(
        events=events,
        skipped_lines=skipped,
        sessions=sessions,
        duration_ns=duration,
        ops=dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        reads=len(read_t),
        bytes_read=total_read,
        bytes_fetched=total_fetched,
        reads_by_source=reads_by_source,
        bytes_by_source=bytes_by_source,
        files=tuple(file_stats),
        paths_seen=len(first_seen),
        layers=layer_stats,
        image_name=info.name if info else None,
        image_size=info.size if info else None,
        first_event_ns=first_event,
        first_read=first_read,
        fetches=tuple(fetches),
        latency_p50_ns=_percentile(latencies, 0.5),
        latency_p90_ns=_percentile(latencies, 0.9),
        latency_max_ns=latencies[-1] if latencies else None,
        curve=_thin_curve(read_t, cum_read, cum_fetched, duration),
        read_bins=_bin_reads(read_t, read_src, duration),
        warnings=tuple(warnings),
    )


def _layer_stats(
    seen: dict[int, list[int]], info: ImageInfo | None, warnings: list[str]
) -> tuple[LayerStats, ...]:
    """Every layer of the image (untouched ones too: that they cost nothing is the point),
    or, without the image, the layers the trace names."""
    known = len(info.layers) if info else 0
    indexes = sorted(set(range(known)) | set(seen))
    extra = [i for i in indexes if i >= known]
    if info is not None and extra:
        warnings.append(
            f"The trace reads layer {extra[0]} but the image JSON lists "
            f"{_plural(known, 'layer')}: "
            "is it the image that was mounted?"
        )
    out = []
    for i in indexes:
        r, fe, n, nf = seen.get(i, [0, 0, 0, 0])
        digest, size = info.layers[i] if info and i < known else (None, None)
        out.append(LayerStats(i, digest or None, size, r, fe, n, nf))
    return tuple(out)


def _thin_curve(
    ts: list[int], reads: list[int], fetched: list[int], duration: int
) -> tuple[CurvePoint, ...]:
    """The cumulative curves with at most one point per bucket of time (the last one in it),
    so a million reads draw as ~_CURVE_POINTS path segments and look the same."""
    points = [CurvePoint(0, 0, 0)]
    span = max(duration, 1)
    last_bucket = -1
    for t, r, f in zip(ts, reads, fetched, strict=True):
        bucket = t * _CURVE_POINTS // span
        if bucket == last_bucket:
            points[-1] = CurvePoint(t, r, f)
        else:
            points.append(CurvePoint(t, r, f))
            last_bucket = bucket
    if points[-1].t_ns < duration:
        points.append(CurvePoint(duration, points[-1].read, points[-1].fetched))
    return tuple(points)


def _bin_reads(ts: list[int], sources: list[int], duration: int) -> tuple[ReadBin, ...]:
    if not ts:
        return ()
    span = max(duration, 1)
    counts = [[0, 0, 0] for _ in range(_READ_BINS)]
    for t, s in zip(ts, sources, strict=True):
        counts[min(_READ_BINS - 1, t * _READ_BINS // span)][s] += 1
    return tuple(
        ReadBin(i * span // _READ_BINS, (i + 1) * span // _READ_BINS, (c[0], c[1], c[2]))
        for i, c in enumerate(counts)
        if any(c)
    )


# -- human units ------------------------------------------------------------------------------

_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def _sig3(x: float) -> str:
    """Three significant digits without trailing zeros: 1.5, 12.3, 123."""
    if x >= 100:
        return f"{x:.0f}"
    text = f"{x:.1f}" if x >= 10 else f"{x:.2f}"
    return text.rstrip("0").rstrip(".")


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB': binary units, as `imagefs images` and du -h count."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in _BYTE_UNITS[1:]:
        n /= 1024
        if n < 1024 or unit == _BYTE_UNITS[-1]:
            return f"{_sig3(n)} {unit}"
    raise AssertionError("unreachable")


def human_duration(ns: float) -> str:
    """ns -> '84.2 ms', '1.5 s', '2 min 5 s': the unit a person would say."""
    if ns < 1_000:
        return f"{int(ns)} ns"
    if ns < 1_000_000:
        return f"{_sig3(ns / 1e3)} µs"
    if ns < 1_000_000_000:
        return f"{_sig3(ns / 1e6)} ms"
    if ns < 60e9:
        return f"{_sig3(ns / 1e9)} s"
    minutes, seconds = divmod(round(ns / 1e9), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _pct(part: int, whole: int | None) -> str:
    if not whole:
        return "–"
    value = 100 * part / whole
    if 0 < value < 0.1:
        return "<0.1%"
    return f"{value:.1f}%"


# -- SVG building blocks ----------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _n(x: float) -> str:
    """A coordinate, short: SVGs with thousands of elements stay small."""
    return f"{x:.1f}".rstrip("0").rstrip(".")


def _nice_step(raw: float) -> float:
    mag = 10.0 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag * (1 + 1e-9):
            return m * mag
    return 10 * mag


def _byte_ticks(hi: float, target: int = 6) -> tuple[float, list[tuple[float, str]]]:
    """A nice axis maximum >= hi and ticks from 0, labelled in the largest binary unit that
    keeps them >= 1 ('0', '20 MiB', '40 MiB', ...)."""
    k = 0
    while k < len(_BYTE_UNITS) - 1 and hi >= 1024 ** (k + 1):
        k += 1
    div, unit = float(1024**k), _BYTE_UNITS[k]
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


def _time_ticks(lo: float, hi: float, target: int = 7) -> list[tuple[float, str]]:
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


def _svg(width: int, height: int, label: str, body: Iterable[str]) -> str:
    return (
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{_e(label)}" xmlns="http://www.w3.org/2000/svg">' + "".join(body) + "</svg>"
    )


def _text(
    x: float, y: float, text: str, cls: str = "", anchor: str = "start", extra: str = ""
) -> str:
    c = f' class="{cls}"' if cls else ""
    a = f' text-anchor="{anchor}"' if anchor != "start" else ""
    return f'<text x="{_n(x)}" y="{_n(y)}"{c}{a}{extra}>{_e(text)}</text>'


def _rect(
    x: float, y: float, w: float, h: float, fill: str, title: str = "", extra: str = ""
) -> str:
    t = f"<title>{_e(title)}</title>" if title else ""
    return (
        f'<rect x="{_n(x)}" y="{_n(y)}" width="{_n(max(w, 0))}" height="{_n(h)}" '
        f'fill="{fill}"{extra}>{t}</rect>'
    )


def _shorten(path: str, limit: int) -> str:
    """Keep the end of a long path: the file name says more than the top directories."""
    return path if len(path) <= limit else "…" + path[-(limit - 1) :]


# -- the charts -------------------------------------------------------------------------------


def _comparison_chart(s: ReportSummary) -> str:
    """Read vs fetched vs the whole image, on one linear scale: the headline in one picture.

    Only fetched bytes get a percentage of the image: both are compressed layer bytes, while
    bytes read are file contents after decompression, so "% of image" would compare unlike
    things (a workload can read more than the image's size)."""
    fetched_note = human_bytes(s.bytes_fetched)
    if s.image_size:
        fetched_note += f"  ·  {_pct(s.bytes_fetched, s.image_size)} of the image"
    layers = sum(1 for layer in s.layers if layer.size is not None)
    rows: list[tuple[str, int | None, str, str]] = [
        ("Read by the workload", s.bytes_read, _READ, f"{human_bytes(s.bytes_read)} of file data"),
        ("Fetched for reads", s.bytes_fetched, _FETCHED, fetched_note),
        (
            "Image (compressed)",
            s.image_size,
            _IMAGE,
            f"{human_bytes(s.image_size or 0)} in {_plural(layers, 'layer')}",
        ),
    ]
    width, label_w, value_w, row_h, top = 1100, 190, 270, 40, 10
    bar_w = width - label_w - value_w
    scale = max([v for _, v, _, _ in rows if v] or [1])
    out = []
    for i, (label, value, colour, note) in enumerate(rows):
        y = top + i * row_h
        out.append(_text(0, y + 21, label, "lbl"))
        out.append(_rect(label_w, y + 6, bar_w, 22, "#eef1f5", extra=' rx="4"'))
        if value is None:
            out.append(_text(label_w + 12, y + 21, "unknown: pass --image-json", "muted"))
            continue
        w = max(bar_w * value / scale, 2 if value else 0)
        out.append(_rect(label_w, y + 6, w, 22, colour, f"{value:,} bytes", ' rx="4"'))
        out.append(_text(label_w + bar_w + 14, y + 21, note, "val"))
    return _svg(width, top + len(rows) * row_h + 4, "bytes read, fetched and image size", out)


def _timeline_chart(s: ReportSummary) -> str:
    """Cumulative bytes read and fetched over time, with every read marked in a strip below
    (by source), the first byte marked, and the image size as a ceiling when it is in reach."""
    width, height = 1100, 420
    left, right, top = 84, 24, 34
    plot_bottom = 300
    strip_top, lane_h = plot_bottom + 12, 13
    axis_y = strip_top + 3 * lane_h + 4
    x_max = max(s.duration_ns, 1)
    x_ticks = _time_ticks(0, x_max, 8)
    y_hi = max(s.bytes_read, s.bytes_fetched, 1)
    show_image = bool(s.image_size) and s.image_size is not None and s.image_size <= 2.5 * y_hi
    if show_image and s.image_size:
        y_hi = max(y_hi, s.image_size)
    y_max, y_ticks = _byte_ticks(y_hi, 6)

    def x(t: float) -> float:
        return left + (width - left - right) * t / x_max

    def y(v: float) -> float:
        return plot_bottom - (plot_bottom - top) * v / y_max

    out = []
    for value, label in y_ticks:
        out.append(
            f'<line x1="{left}" x2="{width - right}" y1="{_n(y(value))}" '
            f'y2="{_n(y(value))}" class="grid"/>'
        )
        out.append(_text(left - 8, y(value) + 4, label, "tick", "end"))
    for value, label in x_ticks:
        out.append(
            f'<line x1="{_n(x(value))}" x2="{_n(x(value))}" y1="{top}" y2="{axis_y}" class="grid"/>'
        )
        out.append(_text(x(value), axis_y + 17, label, "tick", "middle"))
    out.append(
        f'<line x1="{left}" x2="{width - right}" y1="{plot_bottom}" y2="{plot_bottom}" '
        'class="axis"/>'
    )
    out.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{plot_bottom}" class="axis"/>')
    out.append(
        _text(left + (width - left - right) / 2, height - 8, "time since mount", "axlbl", "middle")
    )
    out.append(
        '<text class="axlbl" text-anchor="middle" '
        f'transform="translate(16 {_n((top + plot_bottom) / 2)}) rotate(-90)">'
        "cumulative bytes</text>"
    )
    if show_image and s.image_size:
        iy = y(s.image_size)
        out.append(
            f'<line x1="{left}" x2="{width - right}" y1="{_n(iy)}" y2="{_n(iy)}" class="ceiling"/>'
        )
        out.append(
            _text(
                width - right - 4, iy - 6, f"image size {human_bytes(s.image_size)}", "ceil", "end"
            )
        )

    if s.reads:
        for attr, colour, fill in (("fetched", _FETCHED, True), ("read", _READ, False)):
            d = [f"M{_n(x(0))} {_n(y(0))}"]
            for p in s.curve:
                d.append(f"H{_n(x(p.t_ns))}V{_n(y(getattr(p, attr)))}")
            path = "".join(d)
            if fill:
                out.append(
                    f'<path d="{path}V{plot_bottom}H{_n(x(0))}Z" fill="{colour}" '
                    'fill-opacity="0.13" stroke="none"/>'
                )
            dash = ' stroke-dasharray="6 4"' if attr == "read" else ""
            out.append(
                f'<path d="{path}" fill="none" stroke="{colour}" stroke-width="2.4" '
                f'stroke-linejoin="round"{dash}/>'
            )
        end = s.curve[-1]
        out.append(
            _text(x(end.t_ns) - 6, y(end.fetched) - 8, human_bytes(end.fetched), "endlbl f", "end")
        )
        if abs(y(end.read) - y(end.fetched)) > 16:
            out.append(
                _text(x(end.t_ns) - 6, y(end.read) + 18, human_bytes(end.read), "endlbl r", "end")
            )
    else:
        out.append(
            _text(
                (left + width) / 2,
                (top + plot_bottom) / 2,
                "no reads in this trace",
                "muted",
                "middle",
            )
        )

    if s.first_read is not None:
        fx = x(s.first_read.t_ns)
        out.append(
            f'<line x1="{_n(fx)}" x2="{_n(fx)}" y1="{top}" y2="{plot_bottom}" class="marker"/>'
        )
        out.append(
            _text(fx + 5, top + 12, f"first byte {human_duration(s.first_read.t_ns)}", "mark")
        )

    # the read-event strip: one lane per source, a cell per time bin, darker = more reads
    peak = max((max(b.counts) for b in s.read_bins), default=1)
    for lane, source in enumerate(reversed(SOURCES)):
        k = SOURCES.index(source)
        ly = strip_top + lane * lane_h
        out.append(_rect(left, ly + 1, width - left - right, lane_h - 2, "#f3f5f8"))
        out.append(_text(left - 8, ly + lane_h - 3, source, "lane", "end"))
        for b in s.read_bins:
            c = b.counts[k]
            if not c:
                continue
            opacity = 0.3 + 0.7 * math.log1p(c) / math.log1p(peak)
            x0, x1 = x(b.start_ns), x(b.end_ns)
            out.append(
                _rect(
                    x0,
                    ly + 1,
                    max(x1 - x0, 1.5),
                    lane_h - 2,
                    _SOURCE_COLOURS[source],
                    f"{c:,} read{'s' if c != 1 else ''} from {source}, "
                    f"{human_duration(b.start_ns)}–{human_duration(b.end_ns)}",
                    f' fill-opacity="{opacity:.2f}"',
                )
            )

    # legend
    lx = left + 14
    for label, colour, dash in (
        ("fetched", _FETCHED, ""),
        ("read", _READ, ' stroke-dasharray="6 4"'),
    ):
        out.append(
            f'<line x1="{lx}" x2="{lx + 26}" y1="{top - 16}" y2="{top - 16}" stroke="{colour}" '
            f'stroke-width="3"{dash}/>'
        )
        out.append(_text(lx + 32, top - 12, label, "lgd"))
        lx += 110
    return _svg(width, height, "cumulative bytes read and fetched over time", out)


def _layer_chart(s: ReportSummary) -> str:
    """Each layer's share of all bytes read and of all bytes fetched (0–100%), with the
    absolute numbers and, when the size is known, how much of that layer was fetched."""
    width, label_w, value_w, top, row_h = 1100, 200, 330, 30, 46
    bar_w = width - label_w - value_w
    layers = s.layers
    height = top + row_h * max(len(layers), 1) + 8
    out = []
    for pct in (0, 25, 50, 75, 100):
        gx = label_w + bar_w * pct / 100
        out.append(
            f'<line x1="{_n(gx)}" x2="{_n(gx)}" y1="{top - 6}" y2="{height - 6}" class="grid"/>'
        )
        out.append(_text(gx, top - 12, f"{pct}%", "tick", "middle"))
    if not layers:
        out.append(_text(label_w + 10, top + 24, "no layer was read", "muted"))
    for i, layer in enumerate(layers):
        y0 = top + i * row_h
        name = f"layer {layer.index}" + (" (base)" if layer.index == 0 else "")
        out.append(_text(0, y0 + 17, name, "lbl"))
        sub = []
        if layer.digest:
            sub.append(layer.digest.split(":")[-1][:12])
        if layer.size is not None:
            sub.append(human_bytes(layer.size))
        if sub:
            out.append(_text(0, y0 + 33, " · ".join(sub), "sub"))
        for j, (value, total, colour, what) in enumerate(
            (
                (layer.bytes_read, s.bytes_read, _READ, "read"),
                (layer.bytes_fetched, s.bytes_fetched, _FETCHED, "fetched"),
            )
        ):
            by = y0 + 6 + j * 16
            out.append(_rect(label_w, by, bar_w, 13, "#eef1f5", extra=' rx="3"'))
            share = value / total if total else 0.0
            if value:
                out.append(
                    _rect(
                        label_w,
                        by,
                        max(bar_w * share, 2),
                        13,
                        colour,
                        f"layer {layer.index}: {value:,} bytes {what} "
                        f"({_pct(value, total)} of all bytes {what})",
                        ' rx="3"',
                    )
                )
        text = f"read {human_bytes(layer.bytes_read)} ({_pct(layer.bytes_read, s.bytes_read)})"
        out.append(_text(label_w + bar_w + 14, y0 + 17, text, "val"))
        text = f"fetched {human_bytes(layer.bytes_fetched)}"
        text += f" ({_pct(layer.bytes_fetched, s.bytes_fetched)})"
        if layer.size:
            text += f" · {_pct(layer.bytes_fetched, layer.size)} of layer"
        out.append(_text(label_w + bar_w + 14, y0 + 33, text, "val"))
    return _svg(width, height, "share of bytes read and fetched per layer", out)


def _waterfall_chart(fetches: Sequence[Fetch]) -> str:
    """One bar per read that waited for the registry, from when it started waiting to when
    it was answered: the critical path of a cold start, and any fetches that overlapped."""
    width, label_w, value_w, top, row_h = 1100, 330, 150, 44, 17
    plot_w = width - label_w - value_w - 10
    rows_bottom = top + row_h * len(fetches)
    height = rows_bottom + 30
    lo = min(f.start_ns for f in fetches)
    hi = max(f.end_ns for f in fetches)
    if lo < (hi - lo) / 8:
        lo = 0  # the fetches start soon after the mount: count from the mount, like the rest
    span = max(hi - lo, 1)

    def x(t: float) -> float:
        return label_w + plot_w * (t - lo) / span

    out = [
        _text(label_w - 10, 12, "file", "tick b", "end"),
        _text(label_w, 12, "time since mount", "tick b"),
        _text(width, 12, "waited · fetched", "tick b", "end"),
    ]
    for i in range(1, len(fetches), 2):  # zebra rows guide the eye from name to bar
        out.append(_rect(0, top + i * row_h - 3, width, row_h, "#f6f7f9"))
    for value, label in _time_ticks(lo, hi, 7):
        gx = x(value)
        out.append(
            f'<line x1="{_n(gx)}" x2="{_n(gx)}" y1="{top - 10}" y2="{rows_bottom + 2}" '
            'class="grid"/>'
        )
        out.append(_text(gx, top - 16, label, "tick", "middle"))
        out.append(_text(gx, rows_bottom + 18, label, "tick", "middle"))
    previous = None
    for i, f in enumerate(fetches):
        ry = top + i * row_h
        colour = _LAYER_COLOURS[(f.layer or 0) % len(_LAYER_COLOURS)]
        # a run of fetches for one file names it once; the repeats are dimmed
        cls = "path dim" if f.path == previous else "path"
        previous = f.path
        out.append(_text(label_w - 10, ry + 9, _shorten(f.path, 46), cls, "end"))
        x0, x1 = x(f.start_ns), x(f.end_ns)
        waited = f.end_ns - f.start_ns
        title = (
            f"{f.path}\nlayer {f.layer} · waited {human_duration(waited)} from "
            f"{human_duration(f.start_ns)} · fetched {f.fetched:,} bytes for a "
            f"{f.length:,}-byte read"
        )
        out.append(_rect(x0, ry, max(x1 - x0, 3), row_h - 5, colour, title, ' rx="2"'))
        detail = f"{human_duration(waited)} · {human_bytes(f.fetched)}"
        out.append(_text(width, ry + 9, detail, "val sm", "end"))
    return _svg(width, height, "fetch waterfall", out)


# -- the page ---------------------------------------------------------------------------------

_CSS = (
    ":root { --ink:#1f2937; --muted:#6b7280; --line:#e5e7eb; --bg:#f4f6f9; --card:#fff; "
    f"--read:{_READ}; --fetched:{_FETCHED}; --image:{_IMAGE}; }}"
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
.legend i { display:inline-block; width:10px; height:10px; border-radius:3px; margin-right:6px;
  vertical-align:-1px; }
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
    t = f' title="{_e(title)}"' if title else ""
    d = f'<div class="d">{detail}</div>' if detail else ""
    return (
        f'<div class="card {cls}"{t}><div class="k">{_e(key)}</div>'
        f'<div class="v">{_e(value)}</div>{d}</div>'
    )


def _cards(s: ReportSummary) -> str:
    cards = [
        _card(
            "Files touched",
            f"{s.files_touched:,}",
            _e(f"{s.paths_seen:,} paths looked at in {s.events:,} operations"),
        ),
        _card(
            "Bytes read",
            human_bytes(s.bytes_read),
            _e(f"{s.bytes_read:,} bytes in {_plural(s.reads, 'read')}"),
            "read",
        ),
        _card(
            "Bytes fetched",
            human_bytes(s.bytes_fetched),
            _e(
                f"{s.bytes_fetched:,} bytes"
                + (f" · {s.bytes_fetched / s.bytes_read:.2f}× of read" if s.bytes_read else "")
            ),
            "fetched",
        ),
    ]
    if s.image_size is not None:
        cards.append(
            _card(
                "Fetched of image",
                _pct(s.bytes_fetched, s.image_size) if s.image_size else "–",
                _e(f"image size {human_bytes(s.image_size)} ({s.image_size:,} bytes)"),
            )
        )
    else:
        cards.append(
            _card("Image size", "unknown", "pass <code>--image-json</code> from imagefs inspect")
        )
    if s.first_read is not None:
        fr = s.first_read
        detail = f"<code>{_e(_shorten(fr.path, 40))}</code> from {_e(fr.source)}"
        if fr.latency_ns:
            detail += _e(f", waited {human_duration(fr.latency_ns)}")
        cards.append(_card("Time to first byte", human_duration(fr.t_ns), detail, title=fr.path))
    else:
        cards.append(_card("Time to first byte", "–", "no read in this trace"))
    first_op = human_duration(s.first_event_ns) if s.first_event_ns is not None else "–"
    cards.append(
        _card("Duration", human_duration(s.duration_ns), _e(f"first operation at {first_op}"))
    )
    cards.append(
        _card(
            "Reads that fetched",
            f"{len(s.fetches):,}",
            _e(f"of {_plural(s.reads, 'read')} ({_pct(len(s.fetches), s.reads)})"),
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
                _e(f"slowest {human_duration(s.latency_max_ns or 0)}"),
            )
        )
    else:
        cards.append(_card("Fetch wait", "–", "no read waited for the registry"))
    return '<div class="cards">' + "".join(cards) + "</div>"


def _sources_bar(s: ReportSummary) -> str:
    """Reads by where they were served from, as one stacked bar with a legend."""
    total = sum(s.reads_by_source.values()) or 1
    segments, legend = [], []
    for source in SOURCES:
        n = s.reads_by_source.get(source, 0)
        b = s.bytes_by_source.get(source, 0)
        colour = _SOURCE_COLOURS[source]
        tip = f"{_plural(n, 'read')} ({b:,} bytes) from {source}"
        segments.append(
            f'<span style="width:{100 * n / total:.3f}%;background:{colour}" '
            f'title="{_e(tip)}"></span>'
        )
        legend.append(
            f'<span><i style="background:{colour}"></i><b>{_e(source)}</b> {_plural(n, "read")} · '
            f"{_e(human_bytes(b))} ({_pct(n, s.reads)})</span>"
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
            f'<tr><td class="rank num">{rank}</td><td class="path">{_e(f.path)}</td>'
            f'<td class="bar"><div style="width:{100 * f.bytes_read / peak:.1f}%"></div></td>'
            f'<td class="num" title="{f.bytes_read:,} bytes">{_e(human_bytes(f.bytes_read))}</td>'
            f'<td class="num" title="{f.bytes_fetched:,} bytes">'
            f"{_e(human_bytes(f.bytes_fetched))}</td>"
            f'<td class="num">{f.reads:,}</td>'
            f'<td class="num">{_e(human_duration(f.first_access_ns))}</td></tr>'
        )
    more = ""
    if len(s.files) > limit:
        rest = s.files[limit:]
        more = (
            f'<p class="note">…and {len(rest):,} more files, '
            f"{_e(human_bytes(sum(f.bytes_read for f in rest)))} read between them.</p>"
        )
    return (
        "<table><thead><tr><th></th><th>file</th><th></th><th class='num'>read</th>"
        "<th class='num'>fetched</th><th class='num'>reads</th>"
        "<th class='num'>first access</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
        + more
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
        f"<title>imagefs trace report · {_e(subject)}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        "<header><h1>imagefs trace report</h1>",
        f'<p class="sub">Trace <code>{_e(title)}</code>'
        + (f" of <code>{_e(s.image_name)}</code>" if s.image_name else "")
        + _e(
            f": {s.events:,} operations over {human_duration(s.duration_ns)}"
            + (f" in {s.sessions} mount sessions" if s.sessions > 1 else "")
        )
        + ".</p>",
    ]
    parts.extend(f'<div class="warn">{_e(w)}</div>' for w in s.warnings)
    parts.append("</header>")
    parts.append(_cards(s))

    parts.append(
        "<section><h2>Read vs fetched vs image</h2>"
        '<p class="lead">What the workload read, what had to come from the registry for it, '
        "and what a full pull would have downloaded.</p>"
        + _comparison_chart(s)
        + "<h2 style='margin-top:14px'>Where reads were served from</h2>"
        + _sources_bar(s)
        + "</section>"
    )
    parts.append(
        "<section><h2>Bytes over time</h2>"
        '<p class="lead">Cumulative bytes fetched for reads and bytes read, since the mount '
        "started. The strip underneath marks every read by where it was served from "
        "(darker = more reads in that slice of time).</p>" + _timeline_chart(s) + "</section>"
    )
    parts.append(
        "<section><h2>Per-layer share</h2>"
        '<p class="lead">Each layer\'s share of all bytes read and of all bytes fetched; '
        "layer 0 is the base of the image.</p>" + _layer_chart(s) + "</section>"
    )
    if s.fetches:
        shown = s.fetches[:WATERFALL_LIMIT]
        cap = ""
        if len(s.fetches) > WATERFALL_LIMIT:
            cap = (
                f'<p class="note">Showing the first {WATERFALL_LIMIT} of '
                f"{len(s.fetches):,} reads that fetched (by start time).</p>"
            )
        layer_ids = sorted({f.layer or 0 for f in shown})
        legend = "".join(
            f'<span><i style="background:{_LAYER_COLOURS[i % len(_LAYER_COLOURS)]}"></i>'
            f"layer {i}</span>"
            for i in layer_ids
        )
        parts.append(
            "<section><h2>Fetch waterfall</h2>"
            '<p class="lead">One bar per read that waited for the registry, from when it '
            "started waiting to when it was answered, in order of start.</p>"
            f'<div class="legend" style="margin-bottom:8px">{legend}</div>'
            + _waterfall_chart(shown)
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
    ops = "".join(f"<span>{_e(op)} <b>{n:,}</b></span>" for op, n in s.ops.items())
    parts.append(
        "<section><h2>Operations</h2>"
        f'<div class="ops">{ops or "<span>none</span>"}</div>'
        '<p class="note">Fetched bytes are those reads waited for. Read-ahead and background '
        "fetches are not attributed to any read and are not in a trace, so "
        "<code>imagefs stats</code> on the live mount can show more.</p></section>"
    )
    parts.append("<footer>imagefs trace report</footer></main></body></html>")
    return "\n".join(parts)


# -- the shell --------------------------------------------------------------------------------


def load_image_json(path: Path) -> dict[str, Any]:
    """Reads `imagefs inspect` output saved to a file (for `--image-json`); returns the first
    image, checked to have what the report needs."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFound(f"image JSON {path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"image JSON {path}: {exc}") from None
    image = data[0] if isinstance(data, list) and data else data
    if not isinstance(image, dict):
        raise UsageError(f"image JSON {path}: expected the output of `imagefs inspect`")
    image_info(image)
    return image


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
