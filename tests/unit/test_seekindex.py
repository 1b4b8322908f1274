"""Seek points: build in one pass, read anywhere, verify spans, persist the index."""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import os
import random
import shutil
import struct
import subprocess
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import xxhash
import zstandard
from isal import igzip

from imagefs.errors import IntegrityError, LayerFormatError
from imagefs.layers import seekindex as si
from imagefs.layers.seekindex import priming

SPACING = 128 * 1024


def _payload(seed: int = 1, parts: int = 45) -> bytes:
    """A mix that makes deflate use stored, fixed and dynamic blocks: noise, text, zeros."""
    rnd = random.Random(seed)
    words = [bytes(rnd.choices(b"abcdefghijklmnop ", k=rnd.randint(2, 9))) for _ in range(400)]
    out = []
    for i in range(parts):
        kind = i % 3
        if kind == 0:
            out.append(rnd.randbytes(40_000 + rnd.randrange(20_000)))
        elif kind == 1:
            out.append(b" ".join(rnd.choices(words, k=15_000 + rnd.randrange(5_000))))
        else:
            out.append(b"\0" * rnd.randrange(1, 40_000))
    return b"".join(out)


DATA = _payload()


def _tar_gz_by_gnu_tar(tmp: Path) -> tuple[bytes, bytes]:
    src = tmp / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(DATA[: len(DATA) // 2])
    (src / "b.txt").write_bytes(DATA[len(DATA) // 2 :])
    subprocess.run(["tar", "-C", str(src), "-czf", str(tmp / "x.tar.gz"), "."], check=True)
    blob = (tmp / "x.tar.gz").read_bytes()
    return blob, gzip.decompress(blob)


def _multi_member() -> bytes:
    cuts = [0, 1000, 1000, 300_000, 1_200_000, len(DATA)]  # includes an empty member
    return b"".join(gzip.compress(DATA[a:b], mtime=0) for a, b in itertools.pairwise(cuts))


def _zstd_multi_frame() -> bytes:
    c = zstandard.ZstdCompressor(level=3)
    skippable = struct.pack("<II", 0x184D2A50, 5) + b"hello"
    frames = [c.compress(DATA[i : i + 200_000]) for i in range(0, len(DATA), 200_000)]
    return skippable + frames[0] + skippable + b"".join(frames[1:]) + skippable


CASES: dict[str, tuple[si.Compression, Callable[[], bytes]]] = {
    "python-gzip": ("gzip", lambda: gzip.compress(DATA, compresslevel=6, mtime=0)),
    "gzip-level1": ("gzip", lambda: gzip.compress(DATA, compresslevel=1, mtime=0)),
    "multi-member": ("gzip", _multi_member),
    "isal": ("gzip", lambda: igzip.compress(DATA, compresslevel=2)),
    "zstd-single": ("zstd", lambda: zstandard.ZstdCompressor(level=3).compress(DATA)),
    "zstd-multi": ("zstd", _zstd_multi_frame),
    "none": ("none", lambda: DATA),
}


def _reader(blob: bytes, calls: list[tuple[int, int]] | None = None) -> si.ReadRange:
    def read(start: int, end: int) -> bytes:
        assert 0 <= start <= end <= len(blob), (start, end)
        if calls is not None:
            calls.append((start, end))
        return blob[start:end]

    return read


def _build(blob: bytes, comp: si.Compression, spacing: int = SPACING) -> tuple[si.SeekIndex, bytes]:
    seen: list[bytes] = []
    index = si.build_index(io.BytesIO(blob), comp, spacing=spacing, on_uncompressed=seen.append)
    return index, b"".join(seen)


def _offsets(index: si.SeekIndex, seed: int = 7) -> Iterator[tuple[int, int]]:
    rnd = random.Random(seed)
    size = index.uncompressed_size
    for p in index.points:
        for d in (-2, -1, 0, 1, 2):
            if 0 <= p.uncompressed + d < size:
                yield p.uncompressed + d, rnd.choice((1, 7, 4096, 70_000))
    for _ in range(60):
        yield rnd.randrange(size), rnd.choice((1, 100, 5000, 40_000, 400_000))
    yield size - 1, 1
    yield size - 1, 100
    yield 0, size
    yield size // 3, size  # runs past the end: truncated at EOF


def _built(name: str) -> tuple[str, bytes, si.SeekIndex]:
    comp, make = CASES[name]
    blob = make()
    index, streamed = _build(blob, comp)
    assert streamed == DATA, "consumer must receive the whole stream, in order"
    return name, blob, index


@pytest.fixture(scope="module", params=sorted(CASES))
def built(request: pytest.FixtureRequest) -> tuple[str, bytes, si.SeekIndex]:
    return _built(request.param)


GZIP_CASES = sorted(name for name, (comp, _) in CASES.items() if comp == "gzip")
# A single zstd frame has one point only: no span boundaries to stay within.
MULTI_SPAN_CASES = sorted(name for name in CASES if name != "zstd-single")


@pytest.fixture(scope="module", params=GZIP_CASES)
def gzip_built(request: pytest.FixtureRequest) -> tuple[str, bytes, si.SeekIndex]:
    return _built(request.param)


@pytest.fixture(scope="module", params=MULTI_SPAN_CASES)
def multi_span_built(request: pytest.FixtureRequest) -> tuple[str, bytes, si.SeekIndex]:
    return _built(request.param)


def test_index_shape(built: tuple[str, bytes, si.SeekIndex]) -> None:
    name, blob, index = built
    assert index.compressed_size == len(blob)
    assert index.uncompressed_size == len(DATA)
    assert index.points[0].uncompressed == 0
    assert len(index.span_digests) == len(index.points)
    if name == "zstd-single":
        assert len(index.points) == 1
        assert si.needs_local_copy(index, max_span=SPACING)
    elif name != "zstd-multi":
        assert len(index.points) > 5
        gaps = [index.span_uncompressed_end(i) - p.uncompressed for i, p in enumerate(index.points)]
        assert max(gaps) <= 3 * SPACING


def test_random_reads_match_stream(built: tuple[str, bytes, si.SeekIndex]) -> None:
    _, blob, index = built
    read = _reader(blob)
    for offset, length in _offsets(index):
        assert si.read_at(index, read, offset, length) == DATA[offset : offset + length], (
            offset,
            length,
        )
    assert si.read_at(index, read, len(DATA), 10) == b""
    assert si.read_at(index, read, len(DATA) + 5, 10) == b""
    assert si.read_at(index, read, 5, 0) == b""


def test_verified_reads_match_stream(built: tuple[str, bytes, si.SeekIndex]) -> None:
    _, blob, index = built
    read = _reader(blob)
    for offset, length in list(_offsets(index, seed=3))[::4]:
        got = si.read_at(index, read, offset, length, verify=True)
        assert got == DATA[offset : offset + length]


def test_reads_stay_within_needed_spans(
    multi_span_built: tuple[str, bytes, si.SeekIndex],
) -> None:
    _, blob, index = multi_span_built
    assert len(index.points) >= 3
    calls: list[tuple[int, int]] = []
    read = _reader(blob, calls)
    p = index.points[1]
    si.read_at(index, read, p.uncompressed + 10, 100)
    start, end = index.span_range(1)
    assert calls and all(start <= a and b <= end for a, b in calls)


def test_stdlib_zlib_restart_matches_isal(
    gzip_built: tuple[str, bytes, si.SeekIndex], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, blob, index = gzip_built
    monkeypatch.setattr(priming, "_fast_zlib", None)
    read = _reader(blob)
    for p in index.points:
        assert si.read_at(index, read, p.uncompressed, 3000) == DATA[p.uncompressed :][:3000]


def test_all_bit_offsets_are_exercised() -> None:
    bits: set[int] = set()
    for name in ("python-gzip", "gzip-level1", "isal", "multi-member"):
        comp, make = CASES[name]
        index, _ = _build(make(), comp, spacing=64 * 1024)
        bits |= {p.bits for p in index.points}
    assert bits >= set(range(1, 8))


def test_primed_start_restarts_mid_byte() -> None:
    """Each splice prefix is an empty, non-final block that leaves the real bits in place."""
    payload = b"splice test " * 50
    stream = zlib.compress(payload, 9)[2:-4]  # raw deflate
    for bits in range(1, 8):
        # Put the stream `8 - bits` bits into a byte: shift it left, garbage below.
        shifted = (int.from_bytes(stream, "little") << (8 - bits)) | ((1 << (8 - bits)) - 1)
        buf = shifted.to_bytes(len(stream) + 1, "little")
        fed = si.primed_start(buf[0], bits) + buf[1:]
        for mod in (zlib, getattr(priming, "_fast_zlib")):  # noqa: B009
            assert mod is not None
            assert mod.decompressobj(-15).decompress(fed) == payload


def test_gnu_tar_and_gzip_cli(tmp_path: Path) -> None:
    if shutil.which("tar") is None or shutil.which("gzip") is None:
        pytest.skip("GNU tar/gzip not installed")
    blob, stream = _tar_gz_by_gnu_tar(tmp_path)
    index = si.build_index(io.BytesIO(blob), "gzip", spacing=SPACING)
    read = _reader(blob)
    for offset, length in _offsets(index):
        assert si.read_at(index, read, offset, length) == stream[offset : offset + length]
    with tarfile.open(fileobj=io.BytesIO(stream)) as tf:
        names = tf.getnames()
    assert "./a.bin" in names
    (tmp_path / "plain").write_bytes(DATA)
    cli = subprocess.run(
        ["gzip", "-9", "-c", str(tmp_path / "plain")], check=True, capture_output=True
    )
    index = si.build_index(io.BytesIO(cli.stdout), "gzip", spacing=SPACING)
    read = _reader(cli.stdout)
    for offset, length in _offsets(index, seed=11):
        assert si.read_at(index, read, offset, length) == DATA[offset : offset + length]


def test_callable_source_is_spooled_for_gzip(tmp_path: Path) -> None:
    blob = gzip.compress(DATA, mtime=0)
    stream = io.BytesIO(blob)
    index = si.build_index(stream.read, "gzip", spacing=SPACING, spool_dir=str(tmp_path))
    same = si.build_index(io.BytesIO(blob), "gzip", spacing=SPACING)
    assert index == same
    assert index.blob_digest.startswith("sha256:")


def test_callable_source_zstd_and_plain() -> None:
    cases: tuple[tuple[si.Compression, bytes], ...] = (
        ("zstd", _zstd_multi_frame()),
        ("none", DATA),
    )
    for comp, blob in cases:
        got: list[bytes] = []
        index = si.build_index(
            io.BytesIO(blob).read, comp, spacing=SPACING, on_uncompressed=got.append
        )
        assert b"".join(got) == DATA
        assert index == si.build_index(io.BytesIO(blob), comp, spacing=SPACING)


def test_corrupt_span_is_detected(built: tuple[str, bytes, si.SeekIndex]) -> None:
    _, blob, index = built
    k = len(index.points) // 2
    start, end = index.span_range(k)
    good = blob[start:end]
    si.verify_span(index, k, good)
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x40
    with pytest.raises(IntegrityError):
        si.verify_span(index, k, bytes(bad))
    with pytest.raises(IntegrityError):
        si.verify_span(index, k, good[:-1])
    corrupt_blob = blob[:start] + bytes(bad) + blob[end:]
    offset = index.points[k].uncompressed
    with pytest.raises(IntegrityError):
        si.read_at(index, _reader(corrupt_blob), offset, 10, verify=True)


def test_index_round_trip_and_torn_index(built: tuple[str, bytes, si.SeekIndex]) -> None:
    _, _, index = built
    data = index.to_bytes()
    assert si.SeekIndex.from_bytes(data) == index
    for torn in (data[:-1], data[: len(data) // 2], data[:10], b""):
        with pytest.raises(LayerFormatError):
            si.SeekIndex.from_bytes(torn)
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 1
    with pytest.raises(LayerFormatError):
        si.SeekIndex.from_bytes(bytes(flipped))


def test_windows_are_stored_compactly() -> None:
    comp, make = CASES["python-gzip"]
    index, _ = _build(make(), comp)
    raw_windows = sum(len(p.window) for p in index.points)
    assert raw_windows > 0
    assert len(index.to_bytes()) < raw_windows


def _with_window_spoiled(data: bytes, index: si.SeekIndex, k: int) -> bytes:
    """`data` (format 3) with point k's deflated window replaced by bytes of the same length
    that do not inflate, the checksum made right again: rot the checksum cannot see."""
    table_len, ztable_len = struct.unpack_from("<QQ", data, 9)
    table = zlib.decompress(data[25 : 25 + ztable_len])
    assert len(table) == table_len
    pos = struct.calcsize("<BQQI") + 2 + len(index.blob_digest)
    lengths = [
        int(struct.unpack_from("<QQBII", table, pos + 25 * i)[4]) for i in range(len(index.points))
    ]
    at = 25 + ztable_len + sum(lengths[:k])
    body = data[:at] + b"\xff" * lengths[k] + data[at + lengths[k] : -8]
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


def test_windows_are_inflated_on_first_use_only() -> None:
    """Loading an index inflates no window (a warm mount never needs one); a window that
    does not inflate fails the reads of its span only, when they happen."""
    comp, make = CASES["python-gzip"]
    blob = make()
    index, data = _build(blob, comp)
    k = next(i for i, p in enumerate(index.points) if p.window and i + 1 < len(index.points))
    spoiled = si.SeekIndex.from_bytes(_with_window_spoiled(index.to_bytes(), index, k))
    other = next(i for i, p in enumerate(index.points) if i != k and p.window)
    at = index.points[other].uncompressed
    assert si.read_at(spoiled, _reader(blob), at, 1000) == data[at : at + 1000]
    with pytest.raises(LayerFormatError):
        si.read_at(spoiled, _reader(blob), index.points[k].uncompressed, 1000)


def test_a_table_that_would_inflate_past_its_limit_is_refused_before_inflating() -> None:
    """A bomb: 100 MiB of zeros deflate to ~100 KB; the index declares them as its table."""
    bomb = zlib.compress(bytes(100 << 20), 9)
    head = b"IFSEEKIX" + struct.pack("<BQQ", 3, 100 << 20, len(bomb)) + bomb
    with pytest.raises(LayerFormatError) as info:
        si.SeekIndex.from_bytes(head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head)))
    assert "limit" in str(info.value)


def test_format_2_as_earlier_versions_wrote_it_is_read() -> None:
    """Published indexes made by earlier versions (format 2: one deflated body, the windows
    after the table) are still read."""
    comp, make = CASES["python-gzip"]
    blob = make()
    index, data = _build(blob, comp)
    body = io.BytesIO()
    digest = index.blob_digest.encode()
    body.write(
        struct.pack("<BQQI", 1, index.compressed_size, index.uncompressed_size, len(index.points))
    )
    body.write(struct.pack("<H", len(digest)) + digest)
    for p in index.points:
        body.write(struct.pack("<QQBI", p.compressed, p.uncompressed, p.bits, len(p.window)))
    body.write(b"".join(index.span_digests) + b"".join(index.raw_digests))
    body.write(b"".join(p.window for p in index.points))
    raw = body.getvalue()
    head = b"IFSEEKIX" + struct.pack("<BQ", 2, len(raw)) + zlib.compress(raw)
    old = si.SeekIndex.from_bytes(head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head)))
    assert old == index
    at = index.points[-1].uncompressed
    assert si.read_at(old, _reader(blob), at, 5000) == data[at : at + 5000]


def test_decompress_to_file_for_single_frame_zstd(tmp_path: Path) -> None:
    blob = zstandard.ZstdCompressor().compress(DATA)
    with open(tmp_path / "cache", "w+b") as dest:
        blob_index, file_index = si.decompress_to_file(io.BytesIO(blob), "zstd", dest)
        assert blob_index.blob_digest == "sha256:" + hashlib.sha256(blob).hexdigest()
        assert file_index.blob_digest == "sha256:" + hashlib.sha256(DATA).hexdigest()
        assert file_index.compression == "none"
        read = si.file_range_reader(dest)
        assert si.read_at(file_index, read, 12345, 999) == DATA[12345 : 12345 + 999]
    assert (tmp_path / "cache").read_bytes() == DATA


def test_bad_inputs() -> None:
    with pytest.raises(LayerFormatError):
        si.build_index(io.BytesIO(b"not gzip at all"), "gzip")
    with pytest.raises(LayerFormatError):
        si.build_index(io.BytesIO(b"\x00" * 100), "zstd")
    truncated = gzip.compress(DATA)[:-5000]
    with pytest.raises(LayerFormatError):
        si.build_index(io.BytesIO(truncated), "gzip")
    with pytest.raises(ValueError):
        si.build_index(io.BytesIO(b""), "lzma")  # type: ignore[arg-type]


def test_empty_blobs() -> None:
    for comp, blob in (
        ("gzip", gzip.compress(b"")),
        ("zstd", zstandard.ZstdCompressor().compress(b"")),
        ("none", b""),
    ):
        index = si.build_index(io.BytesIO(blob), comp)  # type: ignore[arg-type]
        assert index.uncompressed_size == 0
        assert si.read_at(index, _reader(blob), 0, 10) == b""
        assert si.SeekIndex.from_bytes(index.to_bytes()) == index


def test_tiny_random_gzip_members_like_estargz() -> None:
    rnd = random.Random(5)
    pieces = [rnd.randbytes(rnd.randrange(0, 3000)) for _ in range(400)]
    blob = b"".join(gzip.compress(p, mtime=0) for p in pieces)
    data = b"".join(pieces)
    index, streamed = _build(blob, "gzip", spacing=64 * 1024)
    assert streamed == data
    read = _reader(blob)
    for _ in range(200):
        off = rnd.randrange(len(data))
        n = rnd.randrange(1, 20_000)
        assert si.read_at(index, read, off, n) == data[off : off + n]


def test_urandom_is_incompressible_path() -> None:
    data = os.urandom(600_000)
    blob = gzip.compress(data, mtime=0)
    index, _ = _build(blob, "gzip", spacing=64 * 1024)
    read = _reader(blob)
    for off in (0, 1, 65_535, 65_536, 300_000, 599_999):
        assert si.read_at(index, read, off, 70_000) == data[off : off + 70_000]


def test_span_parts_cover_exactly_the_bytes_asked_for() -> None:
    """`LayerSet`'s read plan from a seek index (a fast path for a read within one span, the
    general one across spans): every part names its span's piece, and the parts laid end to
    end are [offset, end) of the stream, for reads starting and ending on and around every
    span boundary."""
    from imagefs.lazy.layers import _span_parts

    starts = [0, 100, 250, 251, 600]
    total = 1000
    raws = tuple(hashlib.sha256(bytes([k])).digest() for k in range(len(starts)))
    index = si.SeekIndex(
        "gzip",
        500,
        total,
        tuple(si.SeekPoint(10 * k, s) for k, s in enumerate(starts)),
        tuple(b"\0" * 32 for _ in starts),
        raw_digests=raws,
    )
    ends = [*starts[1:], total]
    near = {e + d for e in starts for d in (-1, 0, 1)} | {total - 1}
    edges = sorted(x for x in near if 0 <= x < total)
    for offset in edges:
        for end in sorted({min(e + 1, total) for e in edges if e >= offset} | {total}):
            ks, parts = _span_parts(index, offset, end)
            pos = offset
            for n, (k, (name, lo, length, place, size)) in enumerate(zip(ks, parts, strict=True)):
                assert (name, place, size) == (raws[k].hex(), n, ends[k] - starts[k])
                assert starts[k] + lo == pos and length > 0
                pos += length
            assert pos == end, (offset, end, parts)
