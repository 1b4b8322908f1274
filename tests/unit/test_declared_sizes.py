"""Sizes a layer's metadata declares are checked before anything is fetched or allocated for
them (issue 9 follow-up, item 2): a footer, a manifest-position annotation, a TOC's chunk
sizes and lost-name offsets, a published seek index's spans, a "zeros" chunk.

The layers here are *declared* huge (20 GiB); the fake `fetch_range` serves the few real
bytes a TOC lookup needs (footer, TOC member) and fails the test on any range larger than
the caps, so nothing of that size is ever allocated, by the code or by the test.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import trio

from imagefs.errors import LayerFormatError
from imagefs.layers import chunks, estargz, seekindex, tocverify, zstdchunked
from imagefs.lazy.layers import LayerSet
from imagefs.lazy.loading import ESTARGZ_TOC_DIGEST, TAIL_FETCH
from imagefs.oci.digest import Digest
from imagefs.oci.image import Layer
from imagefs.oci.manifest import Descriptor
from imagefs.store import Store

GiB = 1 << 30
HUGE = 20 * GiB
GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
CAP = 64 << 20  # `loading.MAX_TOC_FETCH`, `lostnames.MAX_GAP`: no range near HUGE


class WholeBlob(Exception):
    """The loader gave up on the lazy TOC and asked for the whole blob (streamed to disk)."""


def _toc_member(entries: list[dict[str, Any]]) -> tuple[bytes, bytes]:
    toc_json = json.dumps({"version": 1, "entries": entries}).encode()
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as tf:
        info = tarfile.TarInfo(estargz.TOC_TAR_NAME)
        info.size = len(toc_json)
        tf.addfile(info, io.BytesIO(toc_json))
    return gzip.compress(tar.getvalue(), mtime=0), toc_json


class VirtualBlob:
    """A blob of `size` bytes: zeros, then `tail` at its end."""

    def __init__(self, size: int, tail: bytes) -> None:
        self.size, self.tail = size, tail
        self.asked: list[tuple[int, int]] = []

    async def fetch_range(self, _: Layer, start: int, end: int) -> bytes:
        self.asked.append((start, end))
        assert end - start <= 3 * CAP, f"asked for {end - start} bytes at {start}"
        tail_at = self.size - len(self.tail)
        zeros = bytes(max(0, min(end, tail_at) - start))  # the blob's bulk: zeros, say
        return zeros + self.tail[max(0, start - tail_at) : max(0, end - tail_at)]

    async def fetch_blob(self, _: Layer) -> None:
        raise WholeBlob


def _load(tmp_path: Path, blob: VirtualBlob, annotations: dict[str, str]) -> None:
    layer = Layer(
        Descriptor(GZIP, Digest.of(b"declared"), blob.size, annotations=annotations),
        Digest.of(b"diff"),
    )
    ls = LayerSet(Store(tmp_path), [layer], blob.fetch_blob, fetch_range=blob.fetch_range)

    async def main() -> None:
        with pytest.raises(WholeBlob):
            await ls.ensure(0)

    try:
        trio.run(main)
    finally:
        ls.close()


def test_an_estargz_footer_pointing_at_offset_zero_is_not_fetched(tmp_path: Path) -> None:
    member, toc_json = _toc_member([])
    blob = VirtualBlob(HUGE, member + estargz.make_footer(0))
    _load(tmp_path, blob, {ESTARGZ_TOC_DIGEST: str(Digest.of(toc_json))})
    assert all(end - start <= TAIL_FETCH for start, end in blob.asked), blob.asked


def test_a_zstd_chunked_position_declaring_a_huge_toc_is_not_fetched(tmp_path: Path) -> None:
    blob = VirtualBlob(HUGE, b"")
    position = f"{GiB}:{2 * GiB}:{2 * GiB}:1"
    ann = {zstdchunked.POSITION_KEY: position, zstdchunked.CHECKSUM_KEY: f"sha256:{'a' * 64}"}
    _load(tmp_path, blob, ann)
    assert blob.asked == []


def test_lost_names_spread_over_gigabytes_are_not_fetched(tmp_path: Path) -> None:
    """A name the TOC lost (U+FFFD) is read from its tar header between the files' offsets:
    offsets 20 GiB apart would be one 20 GiB range."""
    far = HUGE - (1 << 20)
    digest = f"sha256:{'b' * 64}"
    entries = [
        {"name": "a", "type": "reg", "size": 10, "offset": 512, "chunkDigest": digest},
        {"name": "\ufffd", "type": "reg", "size": 10, "offset": far, "chunkDigest": digest},
    ]
    member, toc_json = _toc_member(entries)
    toc_offset = HUGE - estargz.FOOTER_SIZE - len(member)
    blob = VirtualBlob(HUGE, member + estargz.make_footer(toc_offset))
    _load(tmp_path, blob, {ESTARGZ_TOC_DIGEST: str(Digest.of(toc_json))})


def test_a_toc_chunk_declaring_gigabytes_is_refused_before_any_fetch() -> None:
    d = f"sha256:{'c' * 64}"
    toc = estargz.parse_toc(
        json.dumps(
            {
                "version": 1,
                "entries": [
                    {
                        "name": "big",
                        "type": "reg",
                        "size": HUGE,
                        "offset": 512,
                        "chunkDigest": d,
                    }
                ],
            }
        ).encode()
    )
    with pytest.raises(LayerFormatError, match="more than the"):
        chunks.from_estargz(toc, HUGE + 4096)


def test_a_published_seek_index_declaring_a_huge_span_is_refused() -> None:
    index = seekindex.build_index(io.BytesIO(b"x" * 1000), "none")
    point = index.points[0]
    forged = type(index)("none", HUGE, HUGE, (point,), index.span_digests, "", index.raw_digests)
    with pytest.raises(LayerFormatError, match="span 0 declares"):
        seekindex.check_span_bounds(forged)
    seekindex.check_span_bounds(index)  # an honest one passes


def test_a_zeros_chunk_is_hashed_without_holding_it() -> None:
    size = 256 << 20
    h = hashlib.sha256()
    block = bytes(1 << 20)
    for _ in range(size // len(block)):
        h.update(block)
    tracemalloc.start()
    try:
        got = tocverify._zeros_digest(size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == h.hexdigest()
    assert peak < 8 << 20, peak
