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


class SeekPoint:
    """A place where decompression can restart without the bytes before it.

    ``compressed`` is the first whole byte of compressed data; when ``bits`` is non-zero the
    stream really starts ``bits`` bits earlier, in the high bits of byte ``compressed - 1``
    (the convention of zlib's zran example and of indexed_gzip). ``window`` is the up to
    32 KiB of output preceding the point that back-references may reach; it is empty where
    no history is needed (deflate/zstd frame starts, uncompressed blobs).

    A point read from a stored index (format 3) keeps its window deflated and inflates it
    the first time it is asked for: loading an index then costs no inflating, and a mount
    whose spans are all in the piece cache never inflates a window at all (a 40k-entry
    layer's windows took ~13 ms to inflate on every load, a warm mount's and a cold one's).
    Immutable, like the frozen dataclass it was.
    """

    __slots__ = ("_deflated", "_length", "_window", "bits", "compressed", "uncompressed")

    compressed: int
    uncompressed: int
    bits: int
    _window: bytes
    _deflated: bytes | None
    _length: int

    def __init__(self, compressed: int, uncompressed: int, bits: int = 0, window: bytes = b""):
        set_ = object.__setattr__
        set_(self, "compressed", compressed)
        set_(self, "uncompressed", uncompressed)
        set_(self, "bits", bits)
        set_(self, "_window", window)
        set_(self, "_deflated", None)
        set_(self, "_length", len(window))

    @classmethod
    def stored(
        cls, compressed: int, uncompressed: int, bits: int, deflated: bytes, length: int
    ) -> SeekPoint:
        """A point whose `length`-byte window is `deflated` (zlib), inflated on first use."""
        p = cls(compressed, uncompressed, bits)
        object.__setattr__(p, "_deflated", deflated)
        object.__setattr__(p, "_length", length)
        return p

    @property
    def window_length(self) -> int:
        return self._length

    @property
    def window(self) -> bytes:
        if self._deflated is not None:
            d = zlib.decompressobj()
            try:
                window = d.decompress(self._deflated, self._length + 1)
            except zlib.error as e:
                raise LayerFormatError(f"seek index: a window does not inflate: {e}") from None
            if len(window) != self._length or not d.eof:
                raise LayerFormatError("seek index: a window's length does not match")
            object.__setattr__(self, "_window", window)
            object.__setattr__(self, "_deflated", None)
        return self._window

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"SeekPoint is immutable ({name})")

    def _key(self) -> tuple[int, int, int, bytes]:
        return (self.compressed, self.uncompressed, self.bits, self.window)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SeekPoint) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"SeekPoint(compressed={self.compressed}, uncompressed={self.uncompressed}, "
            f"bits={self.bits}, window=<{self._length} bytes>)"
        )


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
    _piece_names: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_uncompressed_keys", tuple(p.uncompressed for p in self.points))
        # Hex once per index, not once per read (a warm read names the piece it preads).
        object.__setattr__(self, "_piece_names", tuple(d.hex() for d in self.raw_digests))

    @property
    def span_starts(self) -> tuple[int, ...]:
        """Uncompressed offset where each span starts (its point's)."""
        return self._uncompressed_keys

    @property
    def piece_names(self) -> tuple[str, ...]:
        """Each span's piece name in the piece cache: its `raw_digests` entry in hex."""
        return self._piece_names

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
        """Versioned, compact serialisation (format 3).

        Layout: ``MAGIC | u8 version | u64 table length | u64 deflated table length |
        zlib(table) | the windows, each deflated on its own | u64 xxh3_64``; the checksum
        covers everything before it, so a torn or rotted file is detected. The table holds
        the point records (with each window's length and deflated length) and the span
        digests; windows are inflated only when a span is first inflated (`SeekPoint`).
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
        deflated = [zlib.compress(p.window, 6) if p.window else b"" for p in self.points]
        for p, z in zip(self.points, deflated, strict=True):
            body.write(
                struct.pack("<QQBII", p.compressed, p.uncompressed, p.bits, len(p.window), len(z))
            )
        for d in self.span_digests:
            body.write(d)
        for d in self.raw_digests:
            body.write(d)
        table = body.getvalue()
        ztable = zlib.compress(table, 6)
        head = b"".join(
            [
                _INDEX_MAGIC,
                struct.pack("<BQQ", _INDEX_VERSION, len(table), len(ztable)),
                ztable,
                *deflated,
            ]
        )
        return head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head))

    @classmethod
    def from_bytes(cls, data: bytes) -> SeekIndex:
        """Parse `to_bytes` output (format 3, or 2 as earlier versions wrote it); any damage
        or inconsistency raises `LayerFormatError`."""
        fixed = len(_INDEX_MAGIC) + 9
        if len(data) < fixed + 8 or not data.startswith(_INDEX_MAGIC):
            raise LayerFormatError("seek index: not an imagefs seek index")
        (checksum,) = struct.unpack_from("<Q", data, len(data) - 8)
        if xxhash.xxh3_64_intdigest(memoryview(data)[:-8]) != checksum:
            raise LayerFormatError("seek index: checksum mismatch (torn or corrupt index)")
        version, body_len = struct.unpack_from("<BQ", data, len(_INDEX_MAGIC))
        limit = _MAX_BODY_V2 if version == 2 else _MAX_TABLE
        if body_len > limit:  # declared by the index itself: bound it before inflating
            raise LayerFormatError(
                f"seek index: declares a {body_len}-byte body, over the {limit}-byte limit"
            )
        if version == 2:
            raw = _inflate(data[fixed:-8], body_len)
            return _parsed(lambda: cls._parse_body(raw, None))
        if version != _INDEX_VERSION or len(data) < fixed + 16:
            raise LayerFormatError(f"seek index: unsupported version {version}")
        (ztable_len,) = struct.unpack_from("<Q", data, fixed)
        start = fixed + 8
        if start + ztable_len > len(data) - 8:
            raise LayerFormatError("seek index: table runs past the end")
        table = _inflate(data[start : start + ztable_len], body_len)
        windows = memoryview(data)[start + ztable_len : -8]
        return _parsed(lambda: cls._parse_body(table, windows))

    @classmethod
    def _parse_body(cls, raw: bytes, windows: memoryview | None) -> SeekIndex:
        """Format 2 (`windows` None): the windows follow the table in `raw`. Format 3: the
        records also give each window's deflated length, and `windows` holds them."""
        code, csize, usize, n = struct.unpack_from("<BQQI", raw, 0)
        pos = struct.calcsize("<BQQI")
        compression = _COMPRESSION_NAMES.get(code)
        if compression is None:
            raise LayerFormatError(f"seek index: unknown compression code {code}")
        (dlen,) = struct.unpack_from("<H", raw, pos)
        pos += 2
        blob_digest = raw[pos : pos + dlen].decode("ascii", "replace")
        pos += dlen
        record = struct.Struct("<QQBI" if windows is None else "<QQBII")
        heads = []
        for _ in range(n):
            heads.append(record.unpack_from(raw, pos))
            pos += record.size
        digests = tuple(raw[pos + 32 * i : pos + 32 * (i + 1)] for i in range(n))
        pos += 32 * n
        raw_digests = tuple(raw[pos + 32 * i : pos + 32 * (i + 1)] for i in range(n))
        pos += 32 * n
        points = []
        if windows is None:
            for c, u, bits, wlen in heads:
                window = raw[pos : pos + wlen]
                if len(window) != wlen:
                    raise LayerFormatError("seek index: truncated window data")
                pos += wlen
                points.append(SeekPoint(c, u, bits, window))
            end = len(raw)
        else:
            wpos = 0
            for c, u, bits, wlen, zlen in heads:
                deflated = bytes(windows[wpos : wpos + zlen])
                if len(deflated) != zlen or (wlen == 0) != (zlen == 0):
                    raise LayerFormatError("seek index: truncated window data")
                wpos += zlen
                points.append(
                    SeekPoint.stored(c, u, bits, deflated, wlen) if wlen else SeekPoint(c, u, bits)
                )
            if wpos != len(windows):
                raise LayerFormatError("seek index: window data does not match its table")
            end = pos
        if pos != end or any(len(x) != 32 for x in digests + raw_digests):
            raise LayerFormatError("seek index: body size does not match its point table")
        index = cls(compression, csize, usize, tuple(points), digests, blob_digest, raw_digests)
        _check_index(index)
        return index


def _inflate(deflated: bytes, length: int) -> bytes:
    try:
        d = zlib.decompressobj()
        raw = d.decompress(deflated, length + 1)
    except zlib.error as e:
        raise LayerFormatError(f"seek index: body does not inflate: {e}") from None
    if len(raw) != length or not d.eof:
        raise LayerFormatError("seek index: body length mismatch")
    return raw


def _parsed(parse: Callable[[], SeekIndex]) -> SeekIndex:
    try:
        return parse()
    except struct.error:
        raise LayerFormatError("seek index: truncated body") from None


_INDEX_MAGIC = b"IFSEEKIX"

# The most an index's table may inflate to (format 3: a point's record and digests take 93
# bytes, so ~700k points, a 700 GB layer at 1 MiB spacing), and a format 2 body, windows
# inside (the store's own record limit). An index is verified only as bytes (a digest): a
# table that inflates beyond these is a bomb, refused before a byte is inflated.
_MAX_TABLE = 64 << 20
_MAX_BODY_V2 = 1 << 30


# 2 added raw_digests (a version 1 index is not used: rebuilt or fetched); 3 deflates each
# window on its own, inflated on first use. Version 2 (published by earlier versions) is read.
_INDEX_VERSION = 3


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
        if p.window_length > WINDOW_SIZE:
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
