"""`imagefs trace report`: a mount's trace (JSON lines) as one self-contained HTML page.

Why a page rather than numbers on stdout: the questions a trace answers — what did the workload
touch, how much of the image did that cost, and where did it sit waiting for the registry — are
about shares of a whole and shapes over time, which a picture shows at a glance. The page has no
scripts and loads nothing (inline CSS, inline SVG drawn here, no charting library), so it opens
offline, can be attached to a bug report and archived as a CI artefact.

The trace format is documented in `imagefs.lazy.telemetry`. "Fetched" is every registry
response the trace's `fetch` lines record, by cause (manifest, TOC, index, whole layer, read,
read-ahead, prefetch, ...): the same sum as `imagefs stats`. What a trace cannot say, the page
says it cannot: an older trace without `fetch` lines only knows what reads waited for; layer
sizes come only from `imagefs inspect` JSON, if given.

The package, by idea: `trace` reads a trace and `imagefs inspect` output into values,
`units` says numbers the way a person would, `svg` holds the SVG building blocks (shared with
the bench's plots), `charts` draws each chart and `page` puts the page together. All of it is
pure (`parse_line`, `summarise`, `image_info`: values in, values out; `render_html`: a summary
in, a string out) except `write_report` and `load_image_json`, the two that touch files, for
the CLI.
"""

from __future__ import annotations

from imagefs.report.page import TOP_FILES, WATERFALL_LIMIT, render_html, write_report
from imagefs.report.trace import (
    SOURCES,
    CauseStats,
    CurvePoint,
    Fetch,
    FileStats,
    FirstRead,
    ImageInfo,
    LayerStats,
    ReadBin,
    ReportSummary,
    TraceEvent,
    WireFetch,
    image_info,
    load_image_json,
    parse_line,
    summarise,
)
from imagefs.report.units import human_bytes, human_duration

__all__ = [
    "SOURCES",
    "TOP_FILES",
    "WATERFALL_LIMIT",
    "CauseStats",
    "CurvePoint",
    "Fetch",
    "FileStats",
    "FirstRead",
    "ImageInfo",
    "LayerStats",
    "ReadBin",
    "ReportSummary",
    "TraceEvent",
    "WireFetch",
    "human_bytes",
    "human_duration",
    "image_info",
    "load_image_json",
    "parse_line",
    "render_html",
    "summarise",
    "write_report",
]
