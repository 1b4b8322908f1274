"""True lazy loading: byte ranges, not layers — counted in the real registry's access log.

One content tree (a few small files and four 3 MiB incompressible files) is published as a
plain gzip image with a pushed imagefs index, as zstd:chunked (skopeo) and as eStargz (our
writer, checked against the format facts in its unit tests). Each test mounts it from an
empty store and checks what crossed the network.
"""

from __future__ import annotations

import errno
import hashlib
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagefs.testing.mounts import imagefs, mounted
from imagefs.testing.proxy import FaultProxy, Rule
from imagefs.testing.registry import LocalRegistry
from tests.integration.lazy_content import (
    BIG,
    FILES,
    SMALL,
    Published,
    layer_fetches,
    rot_piece,
)

pytestmark = pytest.mark.fuse


def test_cat_of_one_small_file_fetches_only_its_pieces(
    tmp_path: Path, published: Published, registry: LocalRegistry
) -> None:
    root = tmp_path / "root"
    registry.mark()
    with mounted(root, published.ref, tmp_path / "mnt", mount_args=published.flags) as mnt:
        assert (mnt / "etc" / "motd").read_bytes() == SMALL["etc/motd"]
        fetched = layer_fetches(registry, published)
    assert fetched and all(status == 206 for status, _ in fetched), fetched
    total = sum(n for _, n in fetched)
    # TOC/index pieces plus the small file's piece(s): far below the 12 MiB layer
    assert total < published.layer_size // 4, (total, published.layer_size)


def test_whole_tree_reads_back_exactly(
    tmp_path: Path, published: Published, registry: LocalRegistry
) -> None:
    with mounted(
        tmp_path / "root", published.ref, tmp_path / "mnt", mount_args=published.flags
    ) as mnt:
        for name, data in FILES.items():
            got = (mnt / name).read_bytes()
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), name
        names = {str(p.relative_to(mnt)) for p in mnt.rglob("*") if p.is_file()}
        assert names == set(FILES)  # no stargz.index.json, no landmark files


def test_concurrent_readers_of_one_file_cause_one_fetch_per_piece(
    tmp_path: Path, published: Published, registry: LocalRegistry
) -> None:
    name = "data/big2.bin"
    with FaultProxy(registry.url) as proxy:  # records the Range header of every request
        ref = published.ref.replace(published.ref.split("/")[0], proxy.host, 1)
        with mounted(tmp_path / "root", ref, tmp_path / "mnt", mount_args=published.flags) as mnt:
            (mnt / "etc" / "hostname").read_bytes()  # TOC/index in place first
            proxy.recorded.clear()
            results: list[bytes] = []

            def reader() -> None:
                with open(mnt / name, "rb", buffering=0) as f:
                    results.append(f.read())

            threads = [threading.Thread(target=reader) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        ranges = [
            r.headers.get("Range")
            for r in proxy.recorded
            if r.path.rsplit("/", 1)[1] in published.layer_digests
        ]
    assert len(results) == 8 and all(r == BIG[name] for r in results)
    assert ranges and None not in ranges  # ranges only, never the whole blob
    assert len(ranges) == len(set(ranges)), ranges  # no piece fetched twice


def test_cold_read_all_fetches_each_byte_once(
    tmp_path: Path, published: Published, registry: LocalRegistry
) -> None:
    """Everything read from an empty store, in the order `tar` reads it: every byte of the
    layer blob comes over the network at most once (index or TOC, pieces, read-ahead, all
    counted from the Range headers), and in all at most 5% more than the blob itself."""
    with FaultProxy(registry.url) as proxy:
        ref = published.ref.replace(published.ref.split("/")[0], proxy.host, 1)
        with mounted(tmp_path / "root", ref, tmp_path / "mnt", mount_args=published.flags) as mnt:
            tar = subprocess.run(
                ["tar", "cf", "-", "."], cwd=mnt, stdout=subprocess.PIPE, check=True
            )
            ranges = [
                r.headers.get("Range")
                for r in proxy.recorded
                if r.path.rsplit("/", 1)[1] in published.layer_digests and r.status in (200, 206)
            ]
    assert len(tar.stdout) > sum(len(d) for d in FILES.values())
    assert ranges and None not in ranges, ranges  # ranges only, never the whole blob
    times: Counter[int] = Counter()
    for r in ranges:
        assert r is not None
        first, last = (int(x) for x in r.removeprefix("bytes=").split("-"))
        times.update(range(first, last + 1))
    twice = sorted(b for b, n in times.items() if n > 1)
    assert not twice, (f"{len(twice)} bytes fetched twice, from {twice[0]}", ranges)
    assert sum(times.values()) <= 1.05 * published.layer_size, ranges


def test_eviction_under_a_tiny_cap_while_reading(tmp_path: Path, gzip_image: Published) -> None:
    root = tmp_path / "root"
    with mounted(
        root,
        gzip_image.ref,
        tmp_path / "mnt",
        mount_args=["--cache-size", "2MiB", *gzip_image.flags],
    ) as mnt:
        for _ in range(2):
            for name, data in BIG.items():
                assert (mnt / name).read_bytes() == data
        pieces = [p for p in (root / "cache" / "pieces").rglob("*") if p.is_file()]
        assert pieces
        # the cap, plus at most one pack (<= 1 MiB request of incompressible data) written
        # since the last eviction; a pack counts once, however many pieces it holds
        packs = {p.stat().st_ino: p.stat().st_size for p in pieces}
        assert sum(packs.values()) <= (2 << 20) + (1 << 20) + 4096


def test_corrupted_cached_piece_is_dropped_and_refetched(
    tmp_path: Path, zstd_chunked_image: Published, registry: LocalRegistry
) -> None:
    root = tmp_path / "root"
    with mounted(root, zstd_chunked_image.ref, tmp_path / "mnt") as mnt:
        assert (mnt / "data" / "big1.bin").read_bytes() == BIG["data/big1.bin"]
    pieces = sorted(
        (root / "cache" / "pieces" / "sha256").iterdir(), key=lambda p: p.stat().st_size
    )
    assert pieces
    for piece in pieces:
        rot_piece(piece)  # rot in the payload: its xxh3 in the pack's table no longer matches
    registry.mark()
    with mounted(root, zstd_chunked_image.ref, tmp_path / "mnt") as mnt:
        assert (mnt / "data" / "big1.bin").read_bytes() == BIG["data/big1.bin"]
    assert any(status == 206 for status, _ in layer_fetches(registry, zstd_chunked_image))


@pytest.fixture
def proxy(registry: LocalRegistry) -> Iterator[FaultProxy]:
    with FaultProxy(registry.url) as p:
        yield p


def test_corrupted_range_from_the_network_is_refused(
    tmp_path: Path, estargz_image: Published, proxy: FaultProxy
) -> None:
    ref = estargz_image.ref.replace(estargz_image.ref.split("/")[0], proxy.host, 1)
    root = tmp_path / "root"
    with mounted(root, ref, tmp_path / "mnt") as mnt:
        (mnt / "etc" / "hostname").read_bytes()  # the TOC arrives intact
        rule = proxy.add(Rule("GET", r"/blobs/", "flip", flip_at=40))
        with pytest.raises(OSError) as info:
            (mnt / "data" / "big3.bin").read_bytes()
        assert info.value.errno == errno.EIO
        rule.times = 0  # the network heals: the same mount reads it now
        assert (mnt / "data" / "big3.bin").read_bytes() == BIG["data/big3.bin"]
    log = next((root / "logs").glob("mount-*.log")).read_text()
    assert "failed verification" in log


def test_registry_ignoring_range_still_works(
    tmp_path: Path, gzip_image: Published, proxy: FaultProxy
) -> None:
    proxy.add(Rule("GET", r"/blobs/", "ignore_range"))
    ref = gzip_image.ref.replace(gzip_image.ref.split("/")[0], proxy.host, 1)
    with mounted(tmp_path / "root", ref, tmp_path / "mnt", mount_args=gzip_image.flags) as mnt:
        for name, data in FILES.items():
            assert (mnt / name).read_bytes() == data


def test_cached_data_is_served_with_the_registry_gone(
    tmp_path: Path, estargz_image: Published, proxy: FaultProxy
) -> None:
    ref = estargz_image.ref.replace(estargz_image.ref.split("/")[0], proxy.host, 1)
    with mounted(tmp_path / "root", ref, tmp_path / "mnt") as mnt:
        assert (mnt / "data" / "big0.bin").read_bytes() == BIG["data/big0.bin"]
        proxy.stop()
        assert (mnt / "data" / "big0.bin").read_bytes() == BIG["data/big0.bin"]
        Path("/proc/sys/vm/drop_caches").write_text("3\n")  # ours, not the kernel's cache
        assert (mnt / "data" / "big0.bin").read_bytes() == BIG["data/big0.bin"]
        # big3 lies beyond the read-ahead of big0: never fetched, so it cannot be read now
        with pytest.raises(OSError) as info:
            (mnt / "data" / "big3.bin").read_bytes()
        assert info.value.errno == errno.EIO


def test_redirect_to_storage_is_resolved_once_and_reused(
    tmp_path: Path, zstd_chunked_image: Published, registry: LocalRegistry
) -> None:
    with FaultProxy(registry.url) as storage, FaultProxy(registry.url) as front:
        front.add(Rule("GET", r"/blobs/sha256:", "redirect", redirect_to=storage.url))
        ref = zstd_chunked_image.ref.replace(zstd_chunked_image.ref.split("/")[0], front.host, 1)
        with mounted(tmp_path / "root", ref, tmp_path / "mnt") as mnt:
            for name, data in FILES.items():
                assert (mnt / name).read_bytes() == data
        layer = zstd_chunked_image.layer_digests[-1]
        via_registry = [r for r in front.recorded if layer in r.path]
        via_storage = [r for r in storage.recorded if layer in r.path]
    assert len(via_registry) == 1 and via_registry[0].status == 307
    assert len(via_storage) > 1  # the later ranges went straight to storage
    assert all("Authorization" not in r.headers for r in via_storage)


def test_background_fetch_makes_the_image_complete(
    tmp_path: Path, estargz_image: Published, proxy: FaultProxy
) -> None:
    import json
    import time

    ref = estargz_image.ref.replace(estargz_image.ref.split("/")[0], proxy.host, 1)
    root = tmp_path / "root"
    with mounted(root, ref, tmp_path / "mnt", mount_args=["--background-fetch"]) as mnt:
        deadline = time.monotonic() + 60
        cached = 0
        size = 0
        while time.monotonic() < deadline:
            info = json.loads(imagefs(root, "inspect", ref).stdout)[0]["ImageFS"]["Layers"][-1]
            cached, size = info["Cached"], info["Size"]
            if cached >= size * 0.95:  # all chunks; the TOC member and footer are not chunks
                break
            time.sleep(0.2)
        assert cached >= size * 0.95, (cached, size)
        proxy.stop()  # offline from here on
        for name, data in FILES.items():
            assert (mnt / name).read_bytes() == data
