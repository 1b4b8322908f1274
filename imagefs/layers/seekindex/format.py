"""The seek index itself: seek points, the index of one layer blob, its stored form, and
the checks of fetched bytes against it (compressed span sha256 before inflating, the
uncompressed span sha256 after).

A layer blob is a gzip, zstd or uncompressed tar stream. The tar scanner records where each
file's bytes sit in the *uncompressed* stream; a seek index maps "N bytes at uncompressed
offset X" onto a range of the *compressed* blob, so a read costs one Range GET of at most a
span (~1 MiB of output) instead of the whole layer.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import xxhash

from imagefs.errors import IntegrityError, LayerFormatError

Compression = Literal["gzip", "zstd", "none"]


ReadCompressed = Callable[[int], bytes]


ReadRange = Callable[[int, int], bytes]


# Seek points every 1 MiB of output: a random small-file read inflates 0.5 MiB on average
# (p50 0.64 ms on the bench image) where 4 MiB spacing cost 2.7 ms; the index grows by
# ~32 KiB of (compressed) window per point, small next to the TOC. Measured in docs/bench.md.
DEFAULT_SPACING = 1024 * 1024


WINDOW_SIZE = 32 * 1024


_READ_CHUNK = 1024 * 1024


_ZSTD_FEED = 2048  # compressed bytes per decompress call: at most ~64 MiB of output


_GZIP_MAGIC = b"\x1f\x8b"


_ZSTD_MAGIC = 0xFD2FB528


_ZSTD_SKIPPABLE_LO = 0x184D2A50


_ZSTD_SKIPPABLE_HI = 0x184D2A5F


@dataclass(frozen=True)
class SeekPoint:
    """A place where decompression can restart without the bytes before it.

    ``compressed`` is the first whole byte of compressed data; when ``bits`` is non-zero the
    stream really starts ``bits`` bits earlier, in the high bits of byte ``compressed - 1``
    (the convention of zlib's zran example and of indexed_gzip). ``window`` is the up to
    32 KiB of output preceding the point that back-references may reach; it is empty where
    no history is needed (deflate/zstd frame starts, uncompressed blobs).
    """

    compressed: int
    uncompressed: int
    bits: int = 0
    window: bytes = b""


@dataclass(frozen=True)
class SeekIndex:
    """Everything needed to serve reads of one layer blob from its compressed bytes.

    ``span_digests[i]`` is the sha256 of compressed span ``i`` (see `span_range`), so a span
    fetched by a Range GET can be verified before a single byte of it is inflated.
    ``blob_digest`` is the sha256 of the whole compressed blob the index was built from;
    callers compare it with the layer descriptor so an index is never used with the wrong
    blob. ``raw_digests[i]`` is the sha256 of span ``i``'s *uncompressed* bytes
    ([points[i].uncompressed, span_uncompressed_end(i))): the name of its piece in the
    piece cache, checked after inflating (format version 2; version 1 had none).
    """

    compression: Compression
    compressed_size: int
    uncompressed_size: int
    points: tuple[SeekPoint, ...]
    span_digests: tuple[bytes, ...]
    blob_digest: str = ""
    raw_digests: tuple[bytes, ...] = ()
    _uncompressed_keys: tuple[int, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_uncompressed_keys", tuple(p.uncompressed for p in self.points))

    def point_for(self, offset: int) -> int:
        """Index of the last point at or before uncompressed ``offset``."""
        if not self.points:
            raise LayerFormatError("seek index has no points")
        return max(0, bisect_right(self._uncompressed_keys, offset) - 1)

    def span_range(self, i: int) -> tuple[int, int]:
        """Compressed byte range [start, end) of span ``i`` (what its digest covers)."""
        p = self.points[i]
        start = p.compressed - (1 if p.bits else 0)
        end = self.points[i + 1].compressed if i + 1 < len(self.points) else self.compressed_size
        return start, end

    def span_uncompressed_end(self, i: int) -> int:
        """Uncompressed offset where span ``i`` ends (the next point, or the stream end)."""
        if i + 1 < len(self.points):
            return self.points[i + 1].uncompressed
        return self.uncompressed_size

    def to_bytes(self) -> bytes:
        """Versioned, compact serialisation; the body is zlib-compressed (windows shrink ~3x).

        Layout: ``MAGIC | u8 version | u64 body length | zlib(body) | u64 xxh3_64``; the
        checksum covers everything before it, so a torn or rotted file is detected.
        """
        body = io.BytesIO()
        body.write(
            struct.pack(
                "<BQQI",
                _COMPRESSION_CODES[self.compression],
                self.compressed_size,
                self.uncompressed_size,
                len(self.points),
            )
        )
        digest = self.blob_digest.encode("ascii")
        body.write(struct.pack("<H", len(digest)))
        body.write(digest)
        for p in self.points:
            body.write(struct.pack("<QQBI", p.compressed, p.uncompressed, p.bits, len(p.window)))
        for d in self.span_digests:
            body.write(d)
        for d in self.raw_digests:
            body.write(d)
        for p in self.points:
            body.write(p.window)
        raw = body.getvalue()
        head = _INDEX_MAGIC + struct.pack("<BQ", _INDEX_VERSION, len(raw)) + zlib.compress(raw, 6)
        return head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head))

    @classmethod
    def from_bytes(cls, data: bytes) -> SeekIndex:
        """Parse `to_bytes` output; any damage or inconsistency raises `LayerFormatError`."""
        fixed = len(_INDEX_MAGIC) + 9
        if len(data) < fixed + 8 or not data.startswith(_INDEX_MAGIC):
            raise LayerFormatError("seek index: not an imagefs seek index")
        (checksum,) = struct.unpack_from("<Q", data, len(data) - 8)
        if xxhash.xxh3_64_intdigest(data[:-8]) != checksum:
            raise LayerFormatError("seek index: checksum mismatch (torn or corrupt index)")
        version, body_len = struct.unpack_from("<BQ", data, len(_INDEX_MAGIC))
        if version != _INDEX_VERSION:
            raise LayerFormatError(f"seek index: unsupported version {version}")
        try:
            d = zlib.decompressobj()
            raw = d.decompress(data[fixed:-8], body_len + 1)
        except zlib.error as e:
            raise LayerFormatError(f"seek index: body does not inflate: {e}") from None
        if len(raw) != body_len or not d.eof:
            raise LayerFormatError("seek index: body length mismatch")
        try:
            return cls._parse_body(raw)
        except struct.error:
            raise LayerFormatError("seek index: truncated body") from None

    @classmethod
    def _parse_body(cls, raw: bytes) -> SeekIndex:
        code, csize, usize, n = struct.unpack_from("<BQQI", raw, 0)
        pos = struct.calcsize("<BQQI")
        compression = _COMPRESSION_NAMES.get(code)
        if compression is None:
            raise LayerFormatError(f"seek index: unknown compression code {code}")
        (dlen,) = struct.unpack_from("<H", raw, pos)
        pos += 2
        blob_digest = raw[pos : pos + dlen].decode("ascii", "replace")
        pos += dlen
        heads = []
        rec = struct.calcsize("<QQBI")
        for _ in range(n):
            heads.append(struct.unpack_from("<QQBI", raw, pos))
            pos += rec
        digests = tuple(raw[pos + 32 * i : pos + 32 * (i + 1)] for i in range(n))
        pos += 32 * n
        raw_digests = tuple(raw[pos + 32 * i : pos + 32 * (i + 1)] for i in range(n))
        pos += 32 * n
        points = []
        for c, u, bits, wlen in heads:
            window = raw[pos : pos + wlen]
            if len(window) != wlen:
                raise LayerFormatError("seek index: truncated window data")
            pos += wlen
            points.append(SeekPoint(c, u, bits, window))
        if pos != len(raw) or any(len(x) != 32 for x in digests + raw_digests):
            raise LayerFormatError("seek index: body size does not match its point table")
        index = cls(compression, csize, usize, tuple(points), digests, blob_digest, raw_digests)
        _check_index(index)
        return index


_INDEX_MAGIC = b"IFSEEKIX"


_INDEX_VERSION = 2  # 2 added raw_digests; a version 1 index is not used (rebuilt/fetched)


_COMPRESSION_CODES: dict[Compression, int] = {"none": 0, "gzip": 1, "zstd": 2}


_COMPRESSION_NAMES: dict[int, Compression] = {v: k for k, v in _COMPRESSION_CODES.items()}


def _check_index(index: SeekIndex) -> None:
    """Reject indexes whose points could make a reader loop, overrun or mis-seek."""
    pts = index.points
    if not pts or pts[0].uncompressed != 0:
        raise LayerFormatError("seek index: first point must be at uncompressed offset 0")
    if len(index.span_digests) != len(pts) or len(index.raw_digests) != len(pts):
        raise LayerFormatError("seek index: one span digest per point expected")
    prev: SeekPoint | None = None
    for p in pts:
        if not 0 <= p.bits <= 7 or (p.bits and index.compression != "gzip"):
            raise LayerFormatError(f"seek index: bad bit offset {p.bits}")
        if len(p.window) > WINDOW_SIZE:
            raise LayerFormatError("seek index: bad window")
        if p.compressed > index.compressed_size or p.uncompressed > index.uncompressed_size:
            raise LayerFormatError("seek index: point beyond the end of the blob")
        if p.bits and p.compressed == 0:
            raise LayerFormatError("seek index: bit offset at compressed offset 0")
        if prev is not None and (
            p.uncompressed <= prev.uncompressed or p.compressed <= prev.compressed
        ):
            raise LayerFormatError("seek index: points are not strictly increasing")
        prev = p


def verify_raw_span(index: SeekIndex, k: int, data: bytes) -> None:
    """Check span ``k``'s uncompressed bytes against its raw digest."""
    if hashlib.sha256(data).digest() != index.raw_digests[k]:
        raise IntegrityError(
            f"span {k} of blob {index.blob_digest or '?'} inflates to bytes that do not match "
            "its digest"
        )


def verify_span(index: SeekIndex, i: int, data: bytes) -> None:
    """Check compressed span ``i`` (bytes of `SeekIndex.span_range`) against its digest."""
    if not 0 <= i < len(index.span_digests):
        raise IndexError(f"no span {i}")
    start, end = index.span_range(i)
    if len(data) != end - start or hashlib.sha256(data).digest() != index.span_digests[i]:
        raise IntegrityError(
            f"compressed span {i} [{start}, {end}) of blob {index.blob_digest or '?'} "
            "does not match its digest"
        )


def needs_local_copy(index: SeekIndex, *, max_span: int = 4 * DEFAULT_SPACING) -> bool:
    """Whether some span is too long to inflate per read (e.g. a single-frame zstd layer).

    Such a layer is better decompressed once into a cache file (`decompress_to_file`) and
    then served with an identity ("none") index of that file.
    """
    return any(
        index.span_uncompressed_end(i) - p.uncompressed > max_span
        for i, p in enumerate(index.points)
    )


MAX_SPAN = 64 << 20
"""The largest span an index from elsewhere may declare (compressed or not); see
`check_span_bounds`. imagefs's own indexes put a point every 1 MiB of output."""


def check_span_bounds(index: SeekIndex) -> None:
    """Refuse an index whose spans declare more than MAX_SPAN bytes: for an index from the
    registry, whose sizes are the publisher's word, so that one read never fetches or
    inflates gigabytes into memory. (An index built here from a single-frame zstd blob has
    one span of the whole layer; it is read from the local blob, flattened once on disk.)"""
    for k in range(len(index.points)):
        start, end = index.span_range(k)
        n = index.span_uncompressed_end(k) - index.points[k].uncompressed
        if n > MAX_SPAN or end - start > MAX_SPAN:
            raise LayerFormatError(
                f"seek index: span {k} declares {n} bytes ({end - start} compressed), more "
                f"than the {MAX_SPAN} imagefs reads at once"
            )
