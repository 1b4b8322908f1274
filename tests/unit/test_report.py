"""The trace report's pure parts: trace lines -> summary values -> HTML, on hand-written traces
whose every number can be checked by hand."""

from __future__ import annotations

import json
import re
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from imagefs.errors import NotFound, UsageError
from imagefs.report import (
    WATERFALL_LIMIT,
    ImageInfo,
    human_bytes,
    human_duration,
    image_info,
    load_image_json,
    parse_line,
    render_html,
    summarise,
    write_report,
)

MS = 1_000_000

# A small trace: two files in two layers, a non-UTF-8 name (escaped by the mount as `\xe9`),
# a name with HTML in it, a line cut short and a line that is not JSON.
TRACE = [
    '{"t":1000000,"op":"lookup","path":"etc"}',
    '{"t":1500000,"op":"lookup","path":"etc/motd"}',
    '{"t":2000000,"op":"open","path":"etc/motd"}',
    '{"t":52000000,"op":"read","path":"etc/motd","layer":0,"offset":0,"length":100,'
    '"from":"registry","fetched":4096,"latency":0.045}',
    '{"t":53000000,"op":"read","path":"etc/motd","layer":0,"offset":100,"length":50,'
    '"from":"memory","fetched":0,"latency":0.0}',
    "this is not json",
    '{"t":60000000,"op":"lookup","path":"usr/lib/caf\\\\xe9"}',
    '{"t":61000000,"op":"open","path":"usr/lib/caf\\\\xe9"}',
    '{"t":90000000,"op":"read","path":"usr/lib/caf\\\\xe9","layer":1,"offset":0,"length":2048,'
    '"from":"registry","fetched":8192,"latency":0.02}',
    "",
    '{"t":95000000,"op":"read","path":"a/<b>&c","layer":1,"offset":0,"length":10,'
    '"from":"cache","fetched":0,"latency":0.0}',
    '{"t":96000000,"op":"readdir","path":"usr"}',
    '{"t":97000000,"op":"read","path":"etc/mo',
]
CAFE = "usr/lib/caf\\xe9"  # the path as the trace spells it: backslash, x, e, 9


def image_json(sizes: list[int]) -> list[dict[str, Any]]:
    return [
        {
            "Id": "sha256:" + "ab" * 32,
            "RepoTags": ["localhost:5000/demo:1"],
            "ImageFS": {
                "Layers": [
                    {"Digest": f"sha256:{i:064x}", "Size": size} for i, size in enumerate(sizes)
                ]
            },
        }
    ]


# -- parsing ----------------------------------------------------------------------------------


def test_parse_line_reads_every_field_of_a_read() -> None:
    event = parse_line(TRACE[3].encode())
    assert event is not None
    assert (event.t, event.op, event.path, event.layer) == (52 * MS, "read", "etc/motd", 0)
    assert (event.offset, event.length, event.source) == (0, 100, "registry")
    assert (event.fetched, event.latency) == (4096, 0.045)


def test_parse_line_keeps_escaped_bytes_as_written() -> None:
    event = parse_line(TRACE[6])
    assert event is not None and event.path == CAFE and len(event.path) == len("usr/lib/caf") + 4


@pytest.mark.parametrize(
    "line",
    [
        "",
        "   ",
        "not json",
        "[1, 2]",
        '{"op":"read","path":"x"}',  # no t
        '{"t":true,"op":"lookup","path":"x"}',  # a bool is not a time
        '{"t":-5,"op":"lookup","path":"x"}',
        '{"t":1,"path":"x"}',  # no op
        '{"t":1,"op":"lookup","path":7}',
        '{"t":1,"op":"read","path":"x","length":-1}',
        '{"t":1,"op":"read","path":"x","length":1,"latency":"slow"}',
        # json.loads takes NaN and Infinity: no duration, and no crash later
        '{"t":1,"op":"read","path":"x","length":1,"latency":Infinity}',
        '{"t":1,"op":"read","path":"x","length":1,"latency":NaN}',
        '{"t":1,"op":"read","path":"x","length":1,"wait":Infinity}',
        '{"t":1,"op":"read","path":"x","length":1,"wait":-1}',
        '{"t":1,"op":"read","path":"x","length":1,"wait":"long"}',
        '{"t":1,"op":"read","path":"x","length":1,"latency":1' + "0" * 400 + "}",
        '{"t":1,"op":"fetch","cause":"read","bytes":5,"latency":NaN}',
        # integers past int64: the page's float arithmetic would overflow on them
        '{"t":1' + "0" * 400 + ',"op":"lookup","path":"x"}',
        '{"t":1,"op":"read","path":"x","length":1' + "0" * 400 + "}",
        '{"t":1,"op":"read","path":"x","length":1,"fetched":9223372036854775808}',
        '{"t":1,"op":"read","path":"x","length":1',  # cut short
    ],
)
def test_parse_line_rejects_what_is_not_an_event(line: str) -> None:
    assert parse_line(line) is None


# -- the summary ------------------------------------------------------------------------------


def test_summary_sums_reads_fetches_and_files() -> None:
    s = summarise(TRACE)
    assert s.events == 10 and s.skipped_lines == 2 and s.sessions == 1
    assert s.ops == {"read": 4, "lookup": 3, "open": 2, "readdir": 1}
    assert s.reads == 4
    assert s.bytes_read == 100 + 50 + 2048 + 10
    assert s.bytes_fetched == 4096 + 8192
    assert s.reads_by_source == {"memory": 1, "cache": 1, "registry": 2}
    assert s.bytes_by_source == {"memory": 50, "cache": 10, "registry": 2148}
    assert s.duration_ns == 96 * MS and s.first_event_ns == 1 * MS
    assert s.files_touched == 3
    assert s.paths_seen == 5  # etc, etc/motd, the café, a/<b>&c, usr
    assert s.image_size is None and s.image_name is None
    assert len(s.warnings) == 1 and "2 lines" in s.warnings[0]


def test_files_are_ordered_by_bytes_read_with_first_access() -> None:
    s = summarise(TRACE)
    assert [f.path for f in s.files] == [CAFE, "etc/motd", "a/<b>&c"]
    cafe, motd, html = s.files
    assert (cafe.bytes_read, cafe.bytes_fetched, cafe.reads) == (2048, 8192, 1)
    assert (motd.bytes_read, motd.bytes_fetched, motd.reads) == (150, 4096, 2)
    assert motd.first_access_ns == 1_500_000  # its lookup, not its first read
    assert motd.first_read_ns == 52 * MS
    assert cafe.first_access_ns == 60 * MS
    assert html.first_access_ns == html.first_read_ns == 95 * MS  # read without a lookup


def test_per_layer_shares_without_and_with_the_image() -> None:
    s = summarise(TRACE)
    assert [
        (la.index, la.bytes_read, la.bytes_fetched, la.reads, la.fetches) for la in s.layers
    ] == [
        (0, 150, 4096, 2, 1),
        (1, 2058, 8192, 2, 1),
    ]
    assert all(la.size is None and la.digest is None for la in s.layers)

    s = summarise(TRACE, image_json([10_000, 20_000, 5_000]))
    assert s.image_size == 35_000 and s.image_name == "localhost:5000/demo:1"
    assert [la.size for la in s.layers] == [10_000, 20_000, 5_000]
    assert s.layers[2].bytes_read == 0 and s.layers[2].reads == 0  # untouched, still listed
    assert s.layers[1].digest == f"sha256:{1:064x}"
    assert s.warnings == (s.warnings[0],)  # only the skipped lines


def test_a_layer_beyond_the_image_is_reported() -> None:
    s = summarise(TRACE, image_json([10_000]))
    assert [la.index for la in s.layers] == [0, 1] and s.layers[1].size is None
    assert any("reads layer 1 but the image JSON lists 1 layer:" in w for w in s.warnings)


def test_time_to_first_byte_is_the_first_read() -> None:
    s = summarise(TRACE)
    assert s.first_read is not None and s.ttfb_ns == 52 * MS
    assert s.first_read.path == "etc/motd" and s.first_read.source == "registry"
    assert s.first_read.latency_ns == 45 * MS


def test_fetches_are_ordered_by_when_they_started_waiting() -> None:
    lines = [
        '{"t":100000000,"op":"read","path":"quick","layer":0,"length":1,"fetched":10,'
        '"from":"registry","latency":0.01}',  # waited 90..100 ms
        '{"t":150000000,"op":"read","path":"slow","layer":0,"length":1,"fetched":20,'
        '"from":"registry","latency":0.12}',  # waited 30..150 ms: started first
        '{"t":160000000,"op":"read","path":"local","layer":0,"length":1,"fetched":0,'
        '"from":"memory","latency":0.0}',
    ]
    s = summarise(lines)
    assert [(f.path, f.start_ns, f.end_ns, f.fetched) for f in s.fetches] == [
        ("slow", 30 * MS, 150 * MS, 20),
        ("quick", 90 * MS, 100 * MS, 10),
    ]
    assert s.latency_p50_ns == 120 * MS and s.latency_max_ns == 120 * MS
    assert s.latency_p90_ns == 120 * MS


def test_traces_of_two_mount_sessions_are_placed_one_after_the_other() -> None:
    read = (
        '{{"t":{t},"op":"read","path":"f","layer":0,"length":5,"fetched":5,'
        '"from":"registry","latency":0.001}}'
    )
    s = summarise([read.format(t=10 * MS), read.format(t=20 * MS), read.format(t=4 * MS)])
    assert s.sessions == 2
    assert s.duration_ns == 24 * MS
    assert [f.end_ns for f in s.fetches] == [10 * MS, 20 * MS, 24 * MS]
    assert any("2 mount sessions" in w for w in s.warnings)


def test_the_timeline_is_cumulative_and_thinned_for_long_traces() -> None:
    lines = [
        json.dumps(
            {"t": i * 1000, "op": "read", "path": "big", "layer": 0, "length": 10,
             "from": "registry" if i % 10 == 0 else "memory",
             "fetched": 100 if i % 10 == 0 else 0, "latency": 0.0001}
        )
        for i in range(1, 20_001)
    ]  # fmt: skip
    s = summarise(lines)
    assert len(s.curve) <= 1_600
    assert s.curve[0].read == 0 and s.curve[-1].read == 200_000 == s.bytes_read
    assert s.curve[-1].fetched == 200_000 == s.bytes_fetched
    assert [p.t_ns for p in s.curve] == sorted(p.t_ns for p in s.curve)
    assert all(a.read <= b.read and a.fetched <= b.fetched for a, b in pairwise(s.curve))
    assert sum(sum(b.counts) for b in s.read_bins) == 20_000
    assert sum(b.counts[2] for b in s.read_bins) == 2_000


def test_an_empty_trace_summarises_and_renders() -> None:
    s = summarise([])
    assert s.events == 0 and s.reads == 0 and s.first_read is None and s.files == ()
    page = render_html(s)
    assert "no reads in this trace" in page and "No read waited for the registry" in page


# -- the image JSON ---------------------------------------------------------------------------


def test_image_info_takes_the_inspect_array_or_its_element() -> None:
    array = image_json([3, 4])
    assert image_info(array) == image_info(array[0])
    assert image_info(array) == ImageInfo(
        "localhost:5000/demo:1", ((f"sha256:{0:064x}", 3), (f"sha256:{1:064x}", 4))
    )
    assert image_info(array).size == 7


@pytest.mark.parametrize(
    "bad",
    [[], {"Id": "x"}, {"ImageFS": {"Layers": [{"Digest": "d"}]}}, {"ImageFS": {"Layers": "x"}}],
)
def test_image_info_names_what_is_missing(bad: Any) -> None:
    with pytest.raises(UsageError, match="image JSON"):
        image_info(bad)


# -- human units ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (12_900_000, "12.3 MiB"),
     (200 * 2**30, "200 GiB")],
)  # fmt: skip
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text


@pytest.mark.parametrize(
    ("ns", "text"),
    [(0, "0 ns"), (850_000, "850 µs"), (52 * MS, "52 ms"), (1_500 * MS, "1.5 s"),
     (125 * 10**9, "2 min 5 s")],
)  # fmt: skip
def test_human_duration(ns: int, text: str) -> None:
    assert human_duration(ns) == text


# -- the page ---------------------------------------------------------------------------------


def test_the_page_shows_the_numbers() -> None:
    s = summarise(TRACE, image_json([10_000, 20_000]))
    page = render_html(s, "trace.jsonl")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for text in (
        "2,208 bytes in 4 reads",  # bytes read, exactly
        "12,288 bytes",  # bytes fetched, exactly
        human_bytes(2208),
        "12 KiB",
        "41.0%",  # fetched of the image: 12,288 of 30,000
        "image size 29.3 KiB (30,000 bytes)",
        "52 ms",  # time to first byte
        ">3<",  # files touched
        "localhost:5000/demo:1",
        "read 2.01 KiB (93.2%)",  # layer 1's share of bytes read
        "fetched 8 KiB (66.7%) · 41.0% of layer",  # layer 1's share of fetches
        "first access",
    ):
        assert text in page, text
    assert re.search(r"<svg[^>]*aria-label=\"fetch waterfall\"", page)
    assert "<script" not in page and "https://" not in page


def test_paths_are_escaped_in_the_page() -> None:
    page = render_html(summarise(TRACE))
    assert "a/&lt;b&gt;&amp;c" in page and "<b>&c" not in page
    assert "usr/lib/caf\\xe9" in page  # the mount's escape, shown as the mount wrote it


def test_the_page_says_when_the_image_size_is_unknown() -> None:
    page = render_html(summarise(TRACE))
    assert "unknown" in page and "--image-json" in page


def test_the_waterfall_is_capped_with_a_note() -> None:
    lines = [
        json.dumps(
            {"t": (i + 1) * MS, "op": "read", "path": f"f{i}", "layer": 0, "length": 1,
             "from": "registry", "fetched": 1, "latency": 0.0005}
        )
        for i in range(WATERFALL_LIMIT + 50)
    ]  # fmt: skip
    s = summarise(lines)
    page = render_html(s)
    assert len(s.fetches) == WATERFALL_LIMIT + 50
    assert f"Showing the first {WATERFALL_LIMIT} of {WATERFALL_LIMIT + 50:,}" in page
    assert f">f{WATERFALL_LIMIT - 1}<" in page and f">f{WATERFALL_LIMIT}<" not in page


def test_render_is_deterministic() -> None:
    s = summarise(TRACE, image_json([10_000, 20_000]))
    assert render_html(s, "t") == render_html(s, "t")


# -- the file shell ---------------------------------------------------------------------------


def test_write_report_writes_the_page_and_returns_the_summary(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join(TRACE) + "\n")
    image_file = tmp_path / "image.json"
    image_file.write_text(json.dumps(image_json([10_000, 20_000])))
    out = tmp_path / "report.html"
    summary = write_report(trace, out, load_image_json(image_file))
    assert summary.bytes_fetched == 12_288 and summary.image_size == 30_000
    assert out.read_text(encoding="utf-8") == render_html(summary, "trace.jsonl")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_write_report_without_a_trace_or_with_a_bad_image(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no such file"):
        write_report(tmp_path / "missing.jsonl", tmp_path / "r.html")
    with pytest.raises(NotFound):
        load_image_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(UsageError, match="image JSON"):
        load_image_json(bad)
    assert not (tmp_path / "r.html").exists()


def test_reads_that_waited_count_read_ahead_waits_too() -> None:
    lines = [
        # fetched for itself: waited for its fetch and a little more
        '{"t":100000000,"op":"read","path":"a","layer":0,"length":1,"fetched":10,'
        '"from":"registry","latency":0.04,"wait":0.05}',
        # behind a read-ahead fetch: fetched nothing itself, waited all the same
        '{"t":150000000,"op":"read","path":"b","layer":0,"length":1,"fetched":0,'
        '"from":"cache","latency":0.0,"wait":0.02}',
        '{"t":160000000,"op":"read","path":"c","layer":0,"length":1,"fetched":0,'
        '"from":"cache","latency":0.0,"wait":0}',  # answered at once
    ]
    s = summarise(lines)
    assert s.waited_reads == 2 and s.wait_total_ns == 70 * MS
    assert s.wait_p50_ns == 50 * MS and s.wait_max_ns == 50 * MS
    assert [f.path for f in s.fetches] == ["a"]  # "reads that fetched" are as before
    page = render_html(s)
    assert "Reads that waited" in page and "70 ms in all · p50 50 ms · slowest 50 ms" in page


def test_a_trace_without_waits_shows_no_wait_card() -> None:
    s = summarise(TRACE)
    assert s.waited_reads is None and s.wait_total_ns == 0
    assert "Reads that waited" not in render_html(s)


def test_a_trace_with_non_finite_durations_renders_without_them() -> None:
    lines = [
        '{"t":1000,"op":"read","path":"a","layer":0,"length":1,"fetched":1,"latency":Infinity}',
        '{"t":2000,"op":"fetch","cause":"read","layer":0,"bytes":5,"latency":NaN}',
        '{"t":3000,"op":"read","path":"b","layer":0,"length":1,"fetched":0,"wait":0.5}',
    ]
    s = summarise(lines)
    assert s.skipped_lines == 2 and s.reads == 1 and s.waited_reads == 1
    assert "could not be read" in render_html(s)
