"""`imagefs stats` as a person reads it (`format_stats`), from a real telemetry snapshot
with the fields the daemon adds (`fs/daemon.py`)."""

from __future__ import annotations

from typing import Any

from imagefs.cli.output import format_stats
from imagefs.lazy import telemetry


def _snapshot(cache: dict[str, int]) -> dict[str, Any]:
    tele = telemetry.Telemetry([1000, 2000])
    tele.read(3, b"etc/os-release", 1, 0, 100, telemetry.ReadInfo(source="cache"))
    return tele.snapshot(
        {
            "image": "example.com/app:1",
            "manifest_digest": "sha256:" + "a" * 64,
            "mountpoint": "/mnt",
            "registry_requests": 4,
            "fetches_in_flight": 0,
            "cache": cache,
            "layer_sources": ["published index", None],
        }
    )


def test_stats_show_the_cache_counters() -> None:
    text = format_stats(_snapshot({"hits": 7, "misses": 2, "corrupt": 0, "held_reads": 0}))
    assert "cache    7 hits, 2 misses\n" in text
    text = format_stats(_snapshot({"hits": 7, "misses": 2, "corrupt": 1, "held_reads": 5}))
    cache = next(line for line in text.splitlines() if line.startswith("cache"))
    assert cache == (
        "cache    7 hits, 2 misses (5 hits from pieces just made, in memory); "
        "1 damaged pieces dropped and fetched again"
    )
    assert " in 1 reads (memory 0, cache 1, registry 0)" in text


def test_reads_that_waited_are_counted_and_shown() -> None:
    tele = telemetry.Telemetry([1000])
    tele.read(3, b"a", 0, 0, 10, telemetry.ReadInfo(source="cache"))  # answered at once
    for wait in (0.004, 0.010, 0.250):  # e.g. behind a read-ahead fetch: fetched nothing
        tele.read(4, b"b", 0, 0, 10, telemetry.ReadInfo(source="cache", wait=wait))
    waited = tele.snapshot()["read_wait"]
    assert waited == {
        "reads": 3,
        "seconds": 0.264,
        "p50": 0.010,
        "p90": 0.250,
        "p99": 0.250,
        "max": 0.250,
    }
    text = format_stats(
        tele.snapshot(
            {
                "image": "example.com/app:1",
                "mountpoint": "/mnt",
                "registry_requests": 0,
                "cache": {"hits": 4, "misses": 0},
                "layer_sources": [None],
            }
        )
    )
    lines = text.splitlines()
    assert lines[1].startswith("served ")
    assert (
        lines[2]
        == "waited   3 reads for their bytes, 0.26s in all; p50 10.0ms p99 250.0ms max 250.0ms"
    )
    assert lines[3].startswith("fetched ")


def test_no_waited_line_when_every_read_was_answered_at_once() -> None:
    text = format_stats(_snapshot({"hits": 1, "misses": 0}))
    assert "waited" not in text
