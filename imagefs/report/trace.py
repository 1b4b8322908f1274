"""The trace model: a mount's trace (JSON lines) and `imagefs inspect` output read into values.

Pure (values in, values out) except `load_image_json`, which reads the one file the CLI hands
over. The trace format is documented in `imagefs.lazy.telemetry`. A trace has a `fetch` line
for every registry response with its cause (TOC, index, whole layer, read, read-ahead,
prefetch, manifest, ...): "bytes fetched" is their sum, what came over the wire. Traces
written before `fetch` lines existed only know what reads waited for; then that is the total.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagefs.errors import NotFound, UsageError
from imagefs.report.units import plural

SOURCES = ("memory", "cache", "registry")
"""Where a read was served from, cheapest first (as in the trace's `from`)."""

_CURVE_POINTS = 1500  # about two points per pixel column of the timeline
_READ_BINS = 220  # columns of the read-event strip under the timeline

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
    wait: float | None = None  # reads: all they waited for (None: a trace from before `wait`)
    cause: str | None = None  # fetch lines: why it was fetched
    status: int = 0  # fetch lines: the HTTP status


def _seconds(value: object) -> float | None:
    """A duration: a finite, non-negative JSON number (`json.loads` also takes NaN and
    Infinity, and integers too large for a float), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _count(value: object) -> int | None:
    """A non-negative JSON integer an int64 holds (times in ns, bytes, offsets, layers),
    or None (bool is an int to Python, not to JSON; a larger one would overflow the page's
    float arithmetic)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63:
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
    if op == "fetch":
        return _parse_fetch(t, record)
    if op != "read":
        return TraceEvent(t=t, op=op, path=path)
    layer = _count(record.get("layer"))
    offset = _count(record.get("offset", 0))
    length = _count(record.get("length", 0))
    fetched = _count(record.get("fetched", 0))
    latency = _seconds(record.get("latency", 0.0))
    source = record.get("from")
    if offset is None or length is None or fetched is None or latency is None:
        return None
    wait = record.get("wait")  # absent from traces written before it existed
    if wait is not None and (wait := _seconds(wait)) is None:
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
        latency=latency,
        wait=wait,
    )


def _parse_fetch(t: int, record: dict[str, Any]) -> TraceEvent | None:
    nbytes = _count(record.get("bytes"))
    latency = _seconds(record.get("latency", 0.0))
    cause = record.get("cause")
    layer = record.get("layer")
    if nbytes is None or latency is None or not isinstance(cause, str) or not cause:
        return None
    return TraceEvent(
        t=t,
        op="fetch",
        path="",
        layer=_count(layer),
        fetched=nbytes,
        latency=latency,
        cause=cause[:40],
        status=_count(record.get("status")) or 0,
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
class WireFetch:
    """One registry response (a trace's `fetch` line): from the request being sent
    (`start_ns`) to its body's end (`end_ns`), why, for which layer, how many bytes."""

    start_ns: int
    end_ns: int
    cause: str
    layer: int | None
    nbytes: int
    status: int


@dataclass(frozen=True)
class CauseStats:
    """What one cause fetched: bytes over the wire and responses."""

    cause: str
    nbytes: int
    fetches: int


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
    bytes_fetched: int  # over the wire (the `fetch` lines), or what reads waited for (old)
    bytes_fetched_for_reads: int  # what reads waited for (their own `fetched`)
    reads_by_source: dict[str, int]
    bytes_by_source: dict[str, int]
    files: tuple[FileStats, ...]  # by bytes read, most first; then first access, then path
    paths_seen: int
    layers: tuple[LayerStats, ...]
    image_name: str | None
    image_size: int | None
    first_event_ns: int | None
    first_read: FirstRead | None
    fetches: tuple[Fetch, ...]  # reads that waited: by start, then end, then path
    wire: tuple[WireFetch, ...]  # every registry response: by start, then end
    by_cause: tuple[CauseStats, ...]  # most bytes first
    latency_p50_ns: int | None
    latency_p90_ns: int | None
    latency_max_ns: int | None
    # Reads that were not answered at once (the trace's `wait`: their own fetches, a
    # read-ahead fetch in flight for their bytes, an index); None for a trace without it.
    waited_reads: int | None
    wait_total_ns: int
    wait_p50_ns: int | None
    wait_max_ns: int | None
    curve: tuple[CurvePoint, ...]
    read_bins: tuple[ReadBin, ...]
    warnings: tuple[str, ...]

    @property
    def counts_wire(self) -> bool:
        """Whether the trace has `fetch` lines (then bytes fetched are what came over the wire)."""
        return bool(self.wire)

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
    wire_layers: dict[int, list[int]] = {}  # index -> [bytes, fetches] over the wire
    fetches: list[Fetch] = []
    wire: list[WireFetch] = []
    causes: dict[str, list[int]] = {}  # cause -> [bytes, fetches]
    read_t: list[int] = []
    read_src: list[int] = []
    curve_t: list[int] = []
    cum_read: list[int] = []
    cum_fetched: list[int] = []  # what reads waited for
    cum_wire: list[int] = []
    total_read = total_fetched = total_wire = 0
    first_event: int | None = None
    first_read: FirstRead | None = None
    waits: list[int] = []
    has_waits = False
    for line in lines:
        event = parse_line(line)
        if event is None:
            if line.strip():
                skipped += 1
            continue
        if event.t < last_raw:
            sessions += 1
            base = duration
        last_raw = event.t
        t = base + event.t
        duration = max(duration, t)
        if event.op == "fetch":  # not a filesystem operation: a response from the registry
            assert event.cause is not None
            total_wire += event.fetched
            c = causes.setdefault(event.cause, [0, 0])
            c[0] += event.fetched
            c[1] += 1
            if event.layer is not None:
                wl = wire_layers.setdefault(event.layer, [0, 0])
                wl[0] += event.fetched
                wl[1] += 1
            start = max(0, t - round(event.latency * 1e9))
            wire.append(WireFetch(start, t, event.cause, event.layer, event.fetched, event.status))
            curve_t.append(t)
            cum_read.append(total_read)
            cum_fetched.append(total_fetched)
            cum_wire.append(total_wire)
            continue
        events += 1
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
        if event.wait is not None:
            has_waits = True
            if event.wait > 0:
                waits.append(round(event.wait * 1e9))
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
        curve_t.append(t)
        cum_read.append(total_read)
        cum_fetched.append(total_fetched)
        cum_wire.append(total_wire)

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
    if wire:  # the layers' fetched bytes are what came over the wire for them
        for i in set(layers) | set(wire_layers):
            lay = layers.setdefault(i, [0, 0, 0, 0])
            lay[1], lay[3] = wire_layers.get(i, [0, 0])
    layer_stats = _layer_stats(layers, info, warnings)
    wire.sort(key=lambda f: (f.start_ns, f.end_ns))
    latencies = sorted(f.end_ns - f.start_ns for f in fetches)
    waits.sort()
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
        bytes_fetched=total_wire if wire else total_fetched,
        bytes_fetched_for_reads=total_fetched,
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
        wire=tuple(wire),
        by_cause=tuple(
            sorted(
                (CauseStats(c, n, k) for c, (n, k) in causes.items()),
                key=lambda c: (-c.nbytes, c.cause),
            )
        ),
        latency_p50_ns=_percentile(latencies, 0.5),
        latency_p90_ns=_percentile(latencies, 0.9),
        latency_max_ns=latencies[-1] if latencies else None,
        waited_reads=len(waits) if has_waits else None,
        wait_total_ns=sum(waits),
        wait_p50_ns=_percentile(waits, 0.5),
        wait_max_ns=waits[-1] if waits else None,
        curve=_thin_curve(curve_t, cum_read, cum_wire if wire else cum_fetched, duration),
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
            f"{plural(known, 'layer')}: "
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
