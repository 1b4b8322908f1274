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
