"""The report of a trace with `fetch` lines (every registry response with its cause): the
totals, the per-layer shares and the waterfall include the TOC, index and whole-layer fetches,
not only what reads waited for — the issue was a report that said "3.87 MiB fetched" for a
mount that had fetched a 57 MB layer whole."""

from __future__ import annotations

import json
import re
from pathlib import Path

from imagefs.report import render_html, summarise, write_report

MS = 1_000_000


def fetch(t_ms: int, cause: str, nbytes: int, latency: float, layer: int | None = 0) -> str:
    return json.dumps(
        {"t": t_ms * MS, "op": "fetch", "cause": cause, "layer": layer, "bytes": nbytes,
         "latency": latency, "status": 206 if cause == "read" else 200, "method": "GET"}
    )  # fmt: skip


# A cold start: the manifest and config, layer 0's TOC, layer 1's published index, layer 2
# fetched whole (no usable TOC), then one read in layer 0 that waited for its piece, and
# read-ahead behind it. The first byte is answered at 5.7 s: the whole layer explains it.
TRACE = [
    fetch(10, "manifest", 1_000, 0.009, None),
    fetch(20, "config", 2_000, 0.009, None),
    fetch(120, "toc", 65_536, 0.1),
    fetch(200, "referrers", 500, 0.05, None),
    fetch(260, "index", 40_000, 0.05, 1),
    '{"t":300000000,"op":"lookup","path":"etc/os-release"}',
    fetch(5_600, "whole layer", 57_300_000, 5.3, 2),
    fetch(5_690, "read", 262_144, 0.08),
    '{"t":5700000000,"op":"read","path":"etc/os-release","layer":0,"offset":0,"length":300,'
    '"from":"registry","fetched":262144,"latency":0.09}',
    fetch(5_900, "read-ahead", 1_048_576, 0.19),
]
WIRE_TOTAL = 1_000 + 2_000 + 65_536 + 500 + 40_000 + 57_300_000 + 262_144 + 1_048_576


def test_bytes_fetched_are_every_response_by_cause() -> None:
    s = summarise(TRACE)
    assert s.counts_wire
    assert s.bytes_fetched == WIRE_TOTAL
    assert s.bytes_fetched_for_reads == 262_144
    causes = {c.cause: (c.nbytes, c.fetches) for c in s.by_cause}
    assert causes == {
        "manifest": (1_000, 1),
        "config": (2_000, 1),
        "toc": (65_536, 1),
        "referrers": (500, 1),
        "index": (40_000, 1),
        "whole layer": (57_300_000, 1),
        "read": (262_144, 1),
        "read-ahead": (1_048_576, 1),
    }
    assert s.by_cause[0].cause == "whole layer"  # most bytes first
    # fetch lines are not filesystem operations
    assert s.ops == {"lookup": 1, "read": 1} and s.events == 2
    assert s.sessions == 1


def test_layers_are_charged_what_came_for_them() -> None:
    s = summarise(TRACE)
    by_layer = {la.index: (la.bytes_fetched, la.fetches) for la in s.layers}
    assert by_layer == {
        0: (65_536 + 262_144 + 1_048_576, 3),
        1: (40_000, 1),
        2: (57_300_000, 1),
    }


def test_the_waterfall_has_a_bar_for_each_response_from_its_request() -> None:
    s = summarise(TRACE)
    assert [f.cause for f in s.wire] == [
        "manifest", "config", "toc", "referrers", "index", "whole layer", "read", "read-ahead"
    ]  # fmt: skip
    whole = s.wire[5]
    assert (whole.start_ns, whole.end_ns, whole.layer) == (300 * MS, 5_600 * MS, 2)
    page = render_html(s)
    waterfall = page[page.index("<h2>Fetch waterfall</h2>") :]
    waterfall = waterfall[: waterfall.index("</section>")]
    for label in ("toc · layer 0", "index · layer 1", "whole layer · layer 2", "manifest"):
        assert f">{label}<" in waterfall, label
    assert re.search(r"whole layer · layer 2\n57,300,000 bytes \(HTTP 200\)", waterfall)


def test_the_page_totals_include_toc_index_and_whole_layer(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join(TRACE) + "\n")
    s = write_report(trace, tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert f"{WIRE_TOTAL:,} bytes in 8 responses" in page  # the "Bytes fetched" card
    assert "Fetched by cause" in page
    table = page[page.index("<h2>Fetched by cause</h2>") :]
    table = table[: table.index("</section>")]
    for cause in ("whole layer", "toc", "index", "read-ahead"):
        assert f"</i>{cause}</td>" in table, cause
    assert f"title='{WIRE_TOTAL:,} bytes'" in table
    assert s.curve[-1].fetched == WIRE_TOTAL  # the timeline climbs to the same total


def test_a_trace_without_fetch_lines_still_counts_what_reads_waited_for() -> None:
    reads_only = [line for line in TRACE if '"op":"fetch"' not in line.replace(" ", "")]
    s = summarise(reads_only)
    assert not s.counts_wire and s.bytes_fetched == 262_144
    assert "has no fetch lines" in render_html(s)


def test_a_bad_fetch_line_is_skipped() -> None:
    bad = [
        '{"t":1,"op":"fetch","cause":"toc","bytes":-5,"latency":0}',
        '{"t":2,"op":"fetch","bytes":5,"latency":0}',
        '{"t":3,"op":"fetch","cause":"toc","bytes":5,"latency":"slow"}',
    ]
    s = summarise(bad)
    assert s.skipped_lines == 3 and s.bytes_fetched == 0 and not s.wire
