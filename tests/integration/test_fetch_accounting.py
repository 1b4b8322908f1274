"""Every byte a mount fetched is counted once, with its cause: `imagefs stats`, the trace's
`fetch` lines (and the report drawn from them) and the registry's own access log agree.

Each mount starts from an empty store, so the daemon pulls the manifest and config itself;
then a TOC (eStargz), a published index (gzip), or the whole layer (an eStargz layer whose
TOC does not match its annotation) is fetched before the reads' pieces. The reads jump
around (no read goes on where the last one ended), so no read-ahead is still running when
`stats` is asked: the three counts are of the same finished work.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from imagefs.layers import estargz
from imagefs.report import summarise
from imagefs.testing.mounts import imagefs, mounted
from imagefs.testing.registry import LocalRegistry
from tests.integration.lazy_content import FILES, Published, push_estargz

pytestmark = pytest.mark.fuse

# (path, offset, length): far apart in the layer, each a read of its own
READS = [("data/big2.bin", 2 << 20, 4096), ("etc/motd", 0, 4096), ("data/big0.bin", 1 << 20, 4096)]


def _read(mnt: Path) -> None:
    for path, offset, length in READS:
        fd = os.open(mnt / path, os.O_RDONLY)
        try:
            got = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        assert got == FILES[path][offset : offset + length]


def _mount_read_count(
    tmp_path: Path, registry: LocalRegistry, ref: str, flags: tuple[str, ...] = ()
) -> tuple[dict[str, Any], list[dict[str, Any]], int, Path]:
    """Mount `ref` from an empty store, read READS, and return (stats, the trace's fetch
    lines, the body bytes the registry logged for the mount's requests, the trace)."""
    root, trace = tmp_path / "root", tmp_path / "trace.jsonl"
    registry.mark()
    args = ["--trace", str(trace), "--no-prefetch-landmark", *flags]
    with mounted(root, ref, tmp_path / "mnt", mount_args=args) as mnt:
        _read(mnt)
        stats = json.loads(imagefs(root, "stats", "--json", str(mnt)).stdout)
    logged = sum(r.bytes_written or 0 for r in registry.requests())
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    return stats, [e for e in events if e["op"] == "fetch"], logged, trace


def _check_agreement(
    stats: dict[str, Any], fetches: list[dict[str, Any]], logged: int, trace: Path
) -> dict[str, int]:
    by_cause: dict[str, int] = {}
    for f in fetches:
        by_cause[f["cause"]] = by_cause.get(f["cause"], 0) + f["bytes"]
    # the trace and stats count the same responses: exactly equal
    assert sum(f["bytes"] for f in fetches) == stats["bytes_fetched"]
    assert by_cause == stats["fetched_by_cause"]
    assert len(fetches) == stats["fetches"]
    assert stats["fetches_in_flight"] == 0  # nothing was still coming when stats were asked
    # reads answered from pieces just made are cache hits too
    assert 0 <= stats["cache"]["held_reads"] <= stats["cache"]["hits"]
    # and both are what the registry says it sent (it counts the bodies it wrote)
    assert logged > 0
    assert abs(stats["bytes_fetched"] - logged) <= 0.03 * logged, (stats["bytes_fetched"], logged)
    # the report adds up the same bytes, by the same causes
    summary = summarise(trace.read_bytes().splitlines())
    assert summary.bytes_fetched == stats["bytes_fetched"]
    assert {c.cause: c.nbytes for c in summary.by_cause} == by_cause
    # per layer: everything fetched for layer 0 (the content layer is the image's only one)
    layer_bytes = sum(f["bytes"] for f in fetches if f["layer"] == 0)
    assert stats["layers"][0]["fetched"] == layer_bytes
    return by_cause


def test_estargz_mount_counts_manifest_config_toc_and_reads(
    tmp_path: Path, estargz_image: Published, registry: LocalRegistry
) -> None:
    stats, fetches, logged, trace = _mount_read_count(tmp_path, registry, estargz_image.ref)
    by_cause = _check_agreement(stats, fetches, logged, trace)
    assert {"manifest", "config", "toc", "read"} <= set(by_cause)
    assert "whole layer" not in by_cause
    toc = [f for f in fetches if f["cause"] == "toc"]
    assert all(f["layer"] == 0 for f in toc)
    # the TOC is fetched before the first read's pieces: it is the first read's wait
    first_read = min(f["t"] - f["latency"] * 1e9 for f in fetches if f["cause"] == "read")
    assert min(f["t"] for f in toc) <= first_read
    assert by_cause["read"] < estargz_image.layer_size // 2  # still lazy


def test_gzip_mount_counts_the_published_index(
    tmp_path: Path, gzip_image: Published, registry: LocalRegistry
) -> None:
    stats, fetches, logged, trace = _mount_read_count(
        tmp_path, registry, gzip_image.ref, gzip_image.flags
    )
    by_cause = _check_agreement(stats, fetches, logged, trace)
    assert {"manifest", "config", "referrers", "index", "read"} <= set(by_cause)
    assert by_cause["index"] > 0 and "whole layer" not in by_cause
    assert stats["layer_sources"] == ["registry index"]


@pytest.fixture(scope="module")
def estargz_bad_toc(registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory) -> Published:
    """The lazy content as eStargz whose annotation names another TOC: the TOC fetched is
    refused, and the layer must come whole."""
    dirs = sorted({str(Path(n).parent) for n in FILES} | {"usr", "usr/share"})
    specs = [estargz.FileSpec(name=d + "/", type="dir", mode=0o755) for d in dirs]
    specs += [estargz.FileSpec(name=n, data=d) for n, d in sorted(FILES.items())]
    work = tmp_path_factory.mktemp("badtoc")
    wrong = "sha256:" + "0" * 64
    pushed, image = push_estargz(
        registry, work, "lazy/estargz-bad-toc:v1", specs, chunk_size=1 << 20, toc_digest=wrong
    )
    layers = image.layers()
    return Published(pushed.ref, [str(x["digest"]) for x in layers], int(layers[-1]["size"]))


def test_a_layer_fetched_whole_is_counted_whole(
    tmp_path: Path, estargz_bad_toc: Published, registry: LocalRegistry
) -> None:
    stats, fetches, logged, trace = _mount_read_count(tmp_path, registry, estargz_bad_toc.ref)
    by_cause = _check_agreement(stats, fetches, logged, trace)
    assert by_cause["whole layer"] == estargz_bad_toc.layer_size
    assert by_cause["toc"] > 0  # fetched, refused: its cost is in the count all the same
    assert stats["layers"][0]["fetched_pct"] > 100 - 1e-9
    assert stats["layer_sources"] == ["built from the blob"]
    summary = summarise(trace.read_bytes().splitlines())
    whole = [f for f in summary.wire if f.cause == "whole layer"]
    assert [f.nbytes for f in whole] == [estargz_bad_toc.layer_size]
    assert summary.bytes_fetched > estargz_bad_toc.layer_size


def test_reads_that_waited_are_timed(
    tmp_path: Path, estargz_image: Published, registry: LocalRegistry
) -> None:
    """A read whose bytes were not there yet says how long it waited (`wait` in its trace
    line, `read_wait` in stats), its own fetches included; the same bytes read again from
    the daemon's cache wait for nothing. Every request is 150 ms late (`--net-latency`)."""
    root, trace = tmp_path / "root", tmp_path / "trace.jsonl"
    args = ["--trace", str(trace), "--no-prefetch-landmark"]
    net = ("--net-latency", "150")
    with mounted(root, estargz_image.ref, tmp_path / "mnt", extra=net, mount_args=args) as mnt:
        _read(mnt)
        cold = json.loads(imagefs(root, "stats", "--json", str(mnt)).stdout)
        for path, offset, length in READS:  # again, the kernel's copy dropped first
            fd = os.open(mnt / path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                assert os.pread(fd, length, offset) == FILES[path][offset : offset + length]
            finally:
                os.close(fd)
        warm = json.loads(imagefs(root, "stats", "--json", str(mnt)).stdout)
    reads = [e for e in map(json.loads, trace.read_text().splitlines()) if e["op"] == "read"]
    fetching = [r for r in reads if r["fetched"]]
    assert fetching
    for r in fetching:  # waited for its own fetch at least, 150 ms late
        assert r["wait"] >= max(0.15, r["latency"]), r
    # the trace and stats count the same waits
    waited = [r["wait"] for r in reads if r["wait"] > 0]
    assert warm["read_wait"]["reads"] == len(waited) == cold["read_wait"]["reads"]
    assert abs(warm["read_wait"]["seconds"] - sum(waited)) < 1e-5 * (len(waited) + 1)
    assert warm["read_wait"]["max"] == max(waited)
    # the second pass went to the daemon and found every byte there
    assert warm["reads"] > cold["reads"]
    assert warm["served_from"]["registry"] == cold["served_from"]["registry"]
