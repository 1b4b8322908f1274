"""Random access into compressed layer blobs through seek points.

A layer blob is a gzip, zstd or uncompressed tar stream. The tar scanner records where each
file's bytes sit in the *uncompressed* stream; this module maps "N bytes at uncompressed
offset X" onto a range of the *compressed* blob, so a read costs one Range GET of at most a
span (~1 MiB of output) instead of the whole layer.

gzip seek points are zran style (compressed offset, uncompressed offset, bit offset, 32 KiB
window). Finding deflate block boundaries needs a C inflater that reports them; we build
with ``rapidgzip`` (parallel, ~2.5x faster than ``indexed_gzip`` on two cores, measured) and
translate its exported ``GZIDX`` index. Reading needs only a zlib-compatible inflater
(``isal.isal_zlib`` when present, else stdlib ``zlib``).

Resuming mid-byte: Python's zlib has no ``inflatePrime``. We splice a tiny, hand-built,
non-final *empty dynamic-Huffman deflate block* in front of the point, sized so that it ends
exactly where the point's ``bits`` leftover bits of byte ``compressed - 1`` begin. The
inflater decodes the empty block (no output), then continues at the right bit, and every
later byte of the blob is fed unchanged, so stored blocks and gzip member ends stay byte
aligned. (Shifting the whole tail right by ``8 - bits`` bits, the other obvious trick, breaks
on the first stored block, whose padding is measured from the real byte boundary.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import struct
import tempfile
import zlib
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal, Protocol, cast

import xxhash
import zstandard

from imagefs.errors import IntegrityError, LayerFormatError

_fast_zlib: Any
try:  # ISA-L inflates ~2x faster than zlib and supports raw streams with a dictionary.
    from isal import isal_zlib as _fast_zlib
except ImportError:  # pragma: no cover - isal is a declared dependency
    _fast_zlib = None

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


class _Decompressor(Protocol):
    """What we need from zlib/isal/zstandard decompressor objects."""

    @property
    def eof(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes, max_length: int = ...) -> bytes: ...


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


# --------------------------------------------------------------------------- resuming mid-byte

_CL_ORDER = (16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15)


def _empty_dynamic_block(hclen: int, single_zeros: int) -> list[int]:
    """Bits (LSB-first stream order) of a non-final dynamic block that decodes to nothing.

    Its codes are all complete (lit/len: literal 0 and end-of-block, 1 bit each; distance:
    two 1-bit codes; code-length code: 18 -> 1 bit, 0 and 1 -> 2 bits), so strict inflaters
    (zlib, ISA-L) accept it. Its length is 42 + 3*hclen + 2*single_zeros bits; varying the
    two knobs reaches every residue mod 8, which is all the splice needs.
    """
    bits: list[int] = []

    def put(value: int, n: int) -> None:  # plain fields are packed LSB first
        bits.extend((value >> i) & 1 for i in range(n))

    def code(value: int, n: int) -> None:  # Huffman codes are packed MSB first
        bits.extend((value >> i) & 1 for i in range(n - 1, -1, -1))

    cl_len = {18: 1, 0: 2, 1: 2}
    cl_code = {18: (0b0, 1), 0: (0b10, 2), 1: (0b11, 2)}
    put(0, 1)  # BFINAL = 0: the real data follows
    put(2, 2)  # BTYPE = dynamic Huffman
    put(0, 5)  # HLIT: 257 literal/length codes
    put(1, 5)  # HDIST: 2 distance codes
    put(hclen - 4, 4)
    for sym in _CL_ORDER[:hclen]:
        put(cl_len.get(sym, 0), 3)
    code(*cl_code[1])  # literal 0: length 1
    for _ in range(single_zeros):
        code(*cl_code[0])
    rest = 255 - single_zeros  # literals 1..255 unused, as runs of "repeat zero 11-138"
    first = min(138, rest - 11)
    for run in (first, rest - first):
        code(*cl_code[18])
        put(run - 11, 7)
    for _ in range(3):  # end-of-block and both distance codes: length 1
        code(*cl_code[1])
    code(0b1, 1)  # the block's only symbol: end-of-block
    return bits


def _make_prefixes() -> dict[int, bytes]:
    """For each residue r in 1..7, an empty block of length = r (mod 8), packed to bytes."""
    found: dict[int, list[int]] = {}
    for hclen in (18, 19):
        for zeros in range(4):
            b = _empty_dynamic_block(hclen, zeros)
            found.setdefault(len(b) % 8, b)
    out: dict[int, bytes] = {}
    for r in range(1, 8):
        b = found[r]
        packed = bytearray((len(b) + 7) // 8)
        for i, bit in enumerate(b):
            packed[i // 8] |= bit << (i % 8)
        out[r] = bytes(packed)
    return out


_PREFIXES = _make_prefixes()


def primed_start(previous_byte: int, bits: int) -> bytes:
    """Bytes to feed a raw inflater *instead of* byte ``compressed - 1`` of a point.

    The empty block fills the low ``8 - bits`` bits of its last byte; the high ``bits`` bits
    are taken from ``previous_byte``, where the resumed stream begins. Feed the blob from
    ``compressed`` on, unchanged, after these bytes.
    """
    if not 1 <= bits <= 7:
        raise ValueError("bits must be 1..7")
    r = 8 - bits
    prefix = bytearray(_PREFIXES[r])
    low = (1 << r) - 1
    prefix[-1] = (prefix[-1] & low) | (previous_byte & ~low & 0xFF)
    return bytes(prefix)


def _inflater(window: bytes) -> _Decompressor:
    mod: Any = _fast_zlib if _fast_zlib is not None else zlib
    if window:
        return cast(_Decompressor, mod.decompressobj(-15, zdict=window))
    return cast(_Decompressor, mod.decompressobj(-15))


def _gzip_header_length(buf: bytes) -> int | None:
    """Length of the gzip member header at the start of ``buf``; None if ``buf`` is short."""
    if len(buf) < 10:
        return None
    if buf[:2] != _GZIP_MAGIC or buf[2] != 8:
        raise LayerFormatError("gzip: bad member header")
    flags = buf[3]
    if flags & 0xE0:
        raise LayerFormatError("gzip: reserved header flags set")
    pos = 10
    if flags & 0x04:  # FEXTRA
        if len(buf) < pos + 2:
            return None
        pos += 2 + int.from_bytes(buf[pos : pos + 2], "little")
    for flag in (0x08, 0x10):  # FNAME, FCOMMENT: zero-terminated
        if flags & flag:
            end = buf.find(b"\x00", pos)
            if end < 0:
                return None
            pos = end + 1
    if flags & 0x02:  # FHCRC
        pos += 2
    return pos if len(buf) >= pos else None


# --------------------------------------------------------------------------- reading


class _Fetcher:
    """Hands out the compressed bytes of [start, cap) in pieces that double in size.

    The first piece is sized from the span's compression ratio so that a small read usually
    costs one request, and the cap keeps requests inside the spans the read needs.
    """

    def __init__(self, read_range: ReadRange, start: int, cap: int, first: int) -> None:
        self._read_range = read_range
        self.pos = start
        self._cap = cap
        self._piece = max(first, 4096)

    def more(self) -> bytes:
        if self.pos >= self._cap:
            return b""
        end = min(self._cap, self.pos + self._piece)
        data = self._read_range(self.pos, end)
        if len(data) != end - self.pos:
            raise LayerFormatError(
                f"short read of compressed bytes [{self.pos}, {end}): got {len(data)}"
            )
        self.pos = end
        self._piece *= 2
        return data


def read_at(
    index: SeekIndex,
    read_compressed_range: ReadRange,
    offset: int,
    length: int,
    *,
    verify: bool = False,
) -> bytes:
    """Return ``length`` bytes of the uncompressed stream at ``offset`` (fewer only at EOF).

    ``read_compressed_range(start, end)`` returns blob bytes [start, end). With ``verify``
    the whole spans the read touches are fetched and checked against ``span_digests`` before
    anything is inflated (use it for bytes from the network); without it, compressed bytes
    are fetched in growing pieces from the nearest point and never past the spans needed.
    """
    if offset < 0 or length < 0:
        raise ValueError("offset and length must be non-negative")
    end = min(offset + length, index.uncompressed_size)
    if end <= offset:
        return b""
    if index.compression == "none" and not verify:
        data = read_compressed_range(offset, end)
        if len(data) != end - offset:
            raise LayerFormatError("short read of uncompressed blob")
        return data
    i = index.point_for(offset)
    j = index.point_for(end - 1)
    start, _ = index.span_range(i)
    _, cap = index.span_range(j)
    if verify:
        pieces = []
        for k in range(i, j + 1):
            s, e = index.span_range(k)
            data = read_compressed_range(s, e)
            verify_span(index, k, data)
            # Spans overlap by the one byte a non-aligned point shares with its predecessor.
            pieces.append(data if k == i or not index.points[k].bits else data[1:])
        blob = b"".join(pieces)
        if index.compression == "none":
            return blob[offset - start : end - start]
        fetcher = _Fetcher(lambda a, b: blob[a - start : b - start], start, cap, cap - start)
    else:
        p = index.points[i]
        s_start, s_end = index.span_range(i)
        span_out = max(1, index.span_uncompressed_end(i) - p.uncompressed)
        need = end - p.uncompressed
        estimate = (s_end - s_start) * min(need, span_out) // span_out
        fetcher = _Fetcher(read_compressed_range, start, cap, estimate + estimate // 8 + 16384)
    point = index.points[i]
    if index.compression == "gzip":
        out = _inflate_gzip(point, fetcher, offset - point.uncompressed, end - offset)
    else:
        out = _inflate_zstd(fetcher, offset - point.uncompressed, end - offset)
    if len(out) != end - offset:
        raise LayerFormatError(
            f"compressed stream ended early: wanted {end - offset} bytes at {offset}, "
            f"got {len(out)}"
        )
    return out


class _Output:
    """Collects inflated bytes, dropping the first ``skip`` and stopping at ``want``."""

    def __init__(self, skip: int, want: int) -> None:
        self.skip = skip
        self.want = want
        self.parts: list[bytes] = []
        self.have = 0

    @property
    def remaining(self) -> int:
        """Bytes still to inflate, counting those to be skipped."""
        return self.skip + self.want - self.have

    def add(self, data: bytes) -> None:
        if self.skip:
            cut = min(self.skip, len(data))
            self.skip -= cut
            data = data[cut:]
        self.parts.append(data)
        self.have += len(data)

    def result(self) -> bytes:
        return b"".join(self.parts)


def _inflate_gzip(point: SeekPoint, fetcher: _Fetcher, skip: int, want: int) -> bytes:
    out = _Output(skip, want)
    pending = fetcher.more()
    dec: _Decompressor | None
    after_member = False
    if point.bits:
        if not pending:
            raise LayerFormatError("gzip: no data at seek point")
        pending = primed_start(pending[0], point.bits) + pending[1:]
        dec = _inflater(point.window)
    elif not point.window and pending.startswith(_GZIP_MAGIC):
        # A point at a member's header (a valid deflate stream never starts with 0x1f).
        dec = None
    else:
        dec = _inflater(point.window)
    while out.remaining > 0:
        if dec is None:
            need = 8 if after_member else 0
            while len(pending) < need + 18:  # trailer + a minimal header, if there is more
                more = fetcher.more()
                if not more:
                    break
                pending += more
            pending = pending[need:] if len(pending) >= need else b""
            after_member = False
            if not pending.startswith(_GZIP_MAGIC):
                break  # end of the gzip stream (or zero padding after it)
            while (hlen := _gzip_header_length(pending)) is None:
                more = fetcher.more()
                if not more:
                    raise LayerFormatError("gzip: truncated member header")
                pending += more
            pending = pending[hlen:]
            dec = _inflater(b"")
            continue
        if not pending:
            pending = fetcher.more()
            if not pending:
                break
        try:
            chunk = dec.decompress(pending, out.remaining)
        except zlib.error as e:
            raise LayerFormatError(f"gzip: corrupt deflate data: {e}") from None
        except Exception as e:  # isal raises its own error type
            raise LayerFormatError(f"gzip: corrupt deflate data: {e}") from None
        out.add(chunk)
        if dec.eof:
            pending = dec.unused_data
            dec = None
            after_member = True
        else:
            pending = cast(Any, dec).unconsumed_tail
    return out.result()


def _inflate_zstd(fetcher: _Fetcher, skip: int, want: int) -> bytes:
    out = _Output(skip, want)
    buf = _Buffer(fetcher.more)
    dec: Any = None
    while out.remaining > 0:
        if dec is None:
            if not buf.fill(8):
                break
            magic, size = struct.unpack_from("<II", buf.data, buf.off)
            if _ZSTD_SKIPPABLE_LO <= magic <= _ZSTD_SKIPPABLE_HI:
                if not buf.fill(8 + size):
                    raise LayerFormatError("zstd: truncated skippable frame")
                buf.consume(8 + size)
                continue
            if magic != _ZSTD_MAGIC:
                raise LayerFormatError(f"zstd: bad frame magic {magic:#x}")
            dec = zstandard.ZstdDecompressor().decompressobj()
        if not buf.fill(1):
            break
        piece = buf.view()[:_ZSTD_FEED]  # bounded output per call, as in _build_zstd
        try:
            out.add(dec.decompress(piece))
        except zstandard.ZstdError as e:
            raise LayerFormatError(f"zstd: corrupt frame: {e}") from None
        if dec.eof:
            buf.consume(len(piece) - len(dec.unused_data))
            dec = None
        else:
            buf.consume(len(piece))
    return out.result()[: out.want]


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


def inflate_span(index: SeekIndex, k: int, compressed: bytes) -> bytes:
    """Span ``k``'s uncompressed bytes from its compressed bytes (`span_range`), inflating
    no more than the span's uncompressed length (a lying stream cannot make it a bomb)."""
    start, end = index.span_range(k)
    if len(compressed) != end - start:
        raise LayerFormatError(f"span {k}: got {len(compressed)} compressed bytes")
    p = index.points[k]
    n = index.span_uncompressed_end(k) - p.uncompressed
    if index.compression == "none":
        return compressed
    if index.compression == "gzip":
        fetcher = _Fetcher(lambda a, b: compressed[a - start : b - start], start, end, end - start)
        out = _inflate_gzip(p, fetcher, 0, n)  # each call asks for at most what is left
    else:
        out = zstd_capped(compressed, n)
    if len(out) != n:
        raise LayerFormatError(f"span {k} inflates to {len(out)} bytes, not {n}")
    return out


def zstd_capped(compressed: bytes, cap: int, *, across_frames: bool = True) -> bytes:
    """Inflate zstd frames (skippable ones skipped), never holding more than ``cap + 1``
    bytes of output: whatever inflates past its declared length is refused by the
    caller's length check without the bomb ever being in memory."""
    out = bytearray()
    try:
        dctx = zstandard.ZstdDecompressor()
        with dctx.stream_reader(compressed, read_across_frames=across_frames) as reader:
            while len(out) <= cap:
                piece = reader.read(cap + 1 - len(out))
                if not piece:
                    break
                out += piece
    except zstandard.ZstdError as e:
        raise LayerFormatError(f"zstd: corrupt frame: {e}") from None
    return bytes(out)


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


# --------------------------------------------------------------------------- building


def _as_reader(source: ReadCompressed | BinaryIO) -> ReadCompressed:
    if callable(source):
        return source
    return cast(ReadCompressed, source.read)


def build_index(
    source: ReadCompressed | BinaryIO,
    compression: Compression,
    *,
    spacing: int = DEFAULT_SPACING,
    on_uncompressed: Callable[[bytes], None] | None = None,
    spool_dir: str | None = None,
    blob_digest: str | None = None,
) -> SeekIndex:
    """Index a blob in one sequential pass, handing its uncompressed bytes on in order.

    ``source`` is a ``read(n)`` callable or a binary file object. For gzip, rapidgzip needs
    a seekable file: a real, seekable file object is used in place; anything else is spooled
    to a temporary file in ``spool_dir`` first (one pass over the source all the same). The
    sha256 of every span is computed on the way, and so is the blob's own sha256 unless
    ``blob_digest`` says what it is: pass it for a gzip blob the content store has already
    verified, since hashing the blob again costs ~10% of the build.
    """
    if spacing <= 0:
        raise ValueError("spacing must be positive")
    sink = on_uncompressed if on_uncompressed is not None else _discard
    if compression == "none":
        return _build_plain(_as_reader(source), spacing, sink)
    if compression == "zstd":
        return _build_zstd(_as_reader(source), spacing, sink)
    if compression == "gzip":
        return _build_gzip(source, spacing, sink, spool_dir, blob_digest)
    raise ValueError(f"unknown compression {compression!r}")


def _discard(_: bytes) -> None:
    return None


class _SpanHasher:
    """sha256 of consecutive, contiguous spans plus the whole blob, fed in stream order."""

    def __init__(self) -> None:
        self.whole = hashlib.sha256()
        self.digests: list[bytes] = []
        self._current: Any = None

    def start_span(self) -> None:
        if self._current is not None:
            self.digests.append(self._current.digest())
        self._current = hashlib.sha256()

    def feed(self, data: bytes | memoryview) -> None:
        self.whole.update(data)
        self._current.update(data)

    def finish(self) -> tuple[tuple[bytes, ...], str]:
        self.start_span()
        return tuple(self.digests), "sha256:" + self.whole.hexdigest()


def _build_plain(read: ReadCompressed, spacing: int, sink: Callable[[bytes], None]) -> SeekIndex:
    hasher = _SpanHasher()
    points: list[SeekPoint] = []
    pos = 0
    while True:
        data = read(_READ_CHUNK)
        if not data:
            break
        view = memoryview(data)
        while view:
            if pos % spacing == 0:
                points.append(SeekPoint(pos, pos))
                hasher.start_span()
            take = min(len(view), spacing - pos % spacing)
            hasher.feed(view[:take])
            pos += take
            view = view[take:]
        sink(data)
    if not points:
        points.append(SeekPoint(0, 0))
        hasher.start_span()
    digests, whole = hasher.finish()
    return SeekIndex("none", pos, pos, tuple(points), digests, whole, digests)


def _build_zstd(read: ReadCompressed, spacing: int, sink: Callable[[bytes], None]) -> SeekIndex:
    """Points go at frame starts at least ``spacing`` apart; frames cannot be entered."""
    hasher = _SpanHasher()
    hasher.start_span()
    raw_hasher = _SpanHasher()  # the same spans, uncompressed
    raw_hasher.start_span()
    points = [SeekPoint(0, 0)]
    buf = _Buffer(lambda: read(_READ_CHUNK))
    out = 0
    dec: Any = None
    while True:
        if dec is None:
            if not buf.fill(8):
                if buf.available:
                    raise LayerFormatError("zstd: trailing garbage after the last frame")
                break
            magic, size = struct.unpack_from("<II", buf.data, buf.off)
            if _ZSTD_SKIPPABLE_LO <= magic <= _ZSTD_SKIPPABLE_HI:
                left = 8 + size
                while left:
                    if not buf.fill(1):
                        raise LayerFormatError("zstd: truncated skippable frame")
                    n = min(left, buf.available)
                    hasher.feed(buf.consume(n))
                    left -= n
                continue
            if magic != _ZSTD_MAGIC:
                raise LayerFormatError(f"zstd: bad frame magic {magic:#x} at {buf.pos}")
            if buf.pos > 0 and out - points[-1].uncompressed >= spacing:
                points.append(SeekPoint(buf.pos, out))
                hasher.start_span()
                raw_hasher.start_span()
            dec = zstandard.ZstdDecompressor().decompressobj()
        if not buf.fill(1):
            raise LayerFormatError("zstd: truncated frame")
        # Small input pieces: one zstd block of 4 bytes can stand for 128 KiB of output, so
        # a whole read chunk at once could inflate to gigabytes in one call (a zstd bomb).
        piece = buf.view()[:_ZSTD_FEED]
        try:
            data = dec.decompress(piece)
        except zstandard.ZstdError as e:
            raise LayerFormatError(f"zstd: corrupt frame at {buf.pos}: {e}") from None
        if data:
            sink(data)
            raw_hasher.feed(data)
            out += len(data)
        if dec.eof:
            hasher.feed(buf.consume(len(piece) - len(dec.unused_data)))
            dec = None
        else:
            hasher.feed(buf.consume(len(piece)))
    digests, whole = hasher.finish()
    raw_digests, _ = raw_hasher.finish()
    return SeekIndex("zstd", buf.pos, out, tuple(points), digests, whole, raw_digests)


class _Buffer:
    """A read-ahead buffer consumed by offset, so many tiny frames cost no re-copying."""

    def __init__(self, read: Callable[[], bytes]) -> None:
        self._read = read
        self.data = b""
        self.off = 0
        self.pos = 0  # stream offset of data[off]
        self._eof = False

    @property
    def available(self) -> int:
        return len(self.data) - self.off

    def fill(self, n: int) -> bool:
        """Try to have ``n`` bytes available; False if the stream ends first."""
        while self.available < n and not self._eof:
            more = self._read()
            if more:
                self.data = self.data[self.off :] + more
                self.off = 0
            else:
                self._eof = True
        return self.available >= n

    def view(self) -> memoryview:
        return memoryview(self.data)[self.off :]

    def consume(self, n: int) -> memoryview:
        chunk = memoryview(self.data)[self.off : self.off + n]
        self.off += n
        self.pos += n
        return chunk


def _parse_gzidx(data: bytes) -> tuple[int, int, list[SeekPoint]]:
    """Parse an indexed_gzip ``GZIDX`` v0/v1 export (rapidgzip writes the same format).

    Header: "GZIDX", u8 version, u8 reserved, u64 compressed size, u64 uncompressed size,
    u32 spacing, u32 window size, u32 point count; then per point u64 compressed offset,
    u64 uncompressed offset, u8 bits, u8 has-window (v1); then the windows of the points
    that have one, in order. Little-endian throughout.
    """
    head = "<5sBBQQIII"
    try:
        magic, version, _, csize, usize, _, wsize, n = struct.unpack_from(head, data, 0)
    except struct.error:
        raise LayerFormatError("gzip index export is truncated") from None
    if magic != b"GZIDX" or version > 1:
        raise LayerFormatError("gzip index export has an unknown format")
    pos = struct.calcsize(head)
    rec = 18 if version >= 1 else 17
    entries = []
    for i in range(n):
        if version >= 1:
            c, u, bits, has = struct.unpack_from("<QQBB", data, pos)
        else:
            c, u, bits = struct.unpack_from("<QQB", data, pos)
            has = 0 if i == 0 else 1
        entries.append((c, u, bits, has))
        pos += rec
    points = []
    for c, u, bits, has in entries:
        window = b""
        if has:
            window = data[pos : pos + wsize]
            if len(window) != wsize:
                raise LayerFormatError("gzip index export: truncated window")
            pos += wsize
            window = window[-WINDOW_SIZE:]
        points.append(SeekPoint(c, u, bits, window))
    return csize, usize, points


def _thin(points: Sequence[SeekPoint], spacing: int, size: int) -> list[SeekPoint]:
    """Keep, greedily, the furthest point within ``spacing`` of the last kept one.

    The result has gaps of at most ``spacing`` wherever the input allows, and no more
    points (and 32 KiB windows) than needed for that.
    """
    pts = [p for p in points if p.uncompressed < size or p.uncompressed == 0]
    if not pts:
        return []
    kept = [pts[0]]
    for k in range(1, len(pts)):
        following = pts[k + 1].uncompressed if k + 1 < len(pts) else size
        if following > kept[-1].uncompressed + spacing:
            kept.append(pts[k])
    return kept


def _build_gzip(
    source: ReadCompressed | BinaryIO,
    spacing: int,
    sink: Callable[[bytes], None],
    spool_dir: str | None,
    blob_digest: str | None,
) -> SeekIndex:
    import rapidgzip

    spooled: BinaryIO | None = None
    f: BinaryIO
    if not callable(source) and _is_seekable_file(source):
        f = source
        f.seek(0)
    else:
        spooled = cast(BinaryIO, tempfile.TemporaryFile(dir=spool_dir))  # noqa: SIM115
        read = _as_reader(source)
        while data := read(_READ_CHUNK):
            spooled.write(data)
        spooled.seek(0)
        f = spooled
    try:
        head = f.read(2)
        if head != _GZIP_MAGIC:
            raise LayerFormatError("gzip: blob does not start with a gzip header")
        f.seek(0)
        exported = io.BytesIO()
        out = 0
        # rapidgzip's natural point gap is ~1.2x its chunk size; half the spacing leaves
        # enough candidates for _thin to keep gaps under `spacing`.
        chunk = max(64 * 1024, spacing // 2)
        try:
            with rapidgzip.RapidgzipFile(f, parallelization=2, chunk_size=chunk) as g:
                while data := g.read(_READ_CHUNK):
                    sink(data)
                    out += len(data)
                g.export_index(exported, rapidgzip.IndexFormat.INDEXED_GZIP)
        except (ValueError, RuntimeError, OSError) as e:
            raise LayerFormatError(f"gzip: cannot decompress layer: {e}") from None
        csize, usize, raw_points = _parse_gzidx(exported.getvalue())
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if usize != out or csize != size:
            raise LayerFormatError(
                f"gzip: index export disagrees with the stream ({csize}/{usize} vs {size}/{out})"
            )
        points = _normalise_gzip_points(f, raw_points)
        points = _thin(points, spacing, out)
        if not points or points[0].uncompressed != 0:
            raise LayerFormatError("gzip: index export has no point at the start")
        _check_gzip_tail(f, points[-1], size, out)
        digests, whole = _hash_spans(f, points, size, whole=blob_digest is None)
        index = SeekIndex("gzip", size, out, tuple(points), digests, blob_digest or whole)

        def read_range(a: int, b: int) -> bytes:
            f.seek(a)
            return f.read(b - a)

        return _with_raw_digests(index, read_range)
    finally:
        if spooled is not None:
            spooled.close()


def _check_gzip_tail(f: BinaryIO, point: SeekPoint, size: int, total: int) -> None:
    """Inflate the last span to the end: the stream must end cleanly, with its trailer.

    rapidgzip reports a blob truncated inside deflate data only on stderr and returns the
    bytes it had, so without this check a torn download would be indexed as a shorter layer.
    """
    start = point.compressed - (1 if point.bits else 0)
    f.seek(start)
    tail = f.read(size - start)
    pending = primed_start(tail[0], point.bits) + tail[1:] if point.bits else tail
    produced = 0
    dec: _Decompressor | None = None
    if not point.window and not point.bits and pending.startswith(_GZIP_MAGIC):
        hlen = _gzip_header_length(pending)
        if hlen is None:
            raise LayerFormatError("gzip: truncated member header")
        pending = pending[hlen:]
    dec = _inflater(point.window)
    while True:
        try:
            produced += len(dec.decompress(pending))
        except Exception as e:  # zlib.error or isal's error
            raise LayerFormatError(f"gzip: corrupt deflate data near the end: {e}") from None
        if not dec.eof:
            raise LayerFormatError("gzip: blob is truncated (deflate stream does not end)")
        rest = dec.unused_data
        if len(rest) < 8:
            raise LayerFormatError("gzip: blob is truncated (member trailer missing)")
        rest = rest[8:]
        if not rest.startswith(_GZIP_MAGIC):
            break  # end of stream; trailing bytes are ignored, as gzip(1) does
        hlen = _gzip_header_length(rest)
        if hlen is None:
            raise LayerFormatError("gzip: blob is truncated (member header)")
        pending = rest[hlen:]
        dec = _inflater(b"")
    if point.uncompressed + produced != total:
        raise LayerFormatError("gzip: stream length disagrees with the decompressor's")


def _with_raw_digests(index: SeekIndex, read_range: ReadRange) -> SeekIndex:
    """Add the uncompressed span digests of a gzip index: a second inflating pass.

    rapidgzip chooses the points only after the whole stream went by, so the spans cannot
    be hashed during the first pass. Each span is inflated once from its own point (ISA-L),
    about the cost of one more sequential decompression.
    """
    raw = []
    for k, p in enumerate(index.points):
        n = index.span_uncompressed_end(k) - p.uncompressed
        s, e = index.span_range(k)
        data = inflate_span(index, k, read_range(s, e))
        if len(data) != n:
            raise LayerFormatError(f"gzip: span {k} inflates to {len(data)} bytes, not {n}")
        raw.append(hashlib.sha256(data).digest())
    return dataclasses.replace(index, raw_digests=tuple(raw))


def _is_seekable_file(f: BinaryIO) -> bool:
    try:
        return f.seekable()
    except (AttributeError, ValueError):
        return False


def _normalise_gzip_points(f: BinaryIO, points: list[SeekPoint]) -> list[SeekPoint]:
    """Move window-less points sitting on a member header to its deflate start.

    Then every point is a place where a raw inflater can start, and no duplicates remain.
    """
    out: list[SeekPoint] = []
    for p in points:
        if not p.bits and not p.window:
            f.seek(p.compressed)
            buf = f.read(64 * 1024)
            if buf.startswith(_GZIP_MAGIC):
                hlen = _gzip_header_length(buf)
                if hlen is None:
                    raise LayerFormatError("gzip: member header too long or truncated")
                p = SeekPoint(p.compressed + hlen, p.uncompressed)
        if out and p.uncompressed == out[-1].uncompressed:
            continue
        out.append(p)
    return out


def _hash_spans(
    f: BinaryIO, points: Sequence[SeekPoint], size: int, *, whole: bool = True
) -> tuple[tuple[bytes, ...], str]:
    """sha256 of each (possibly 1-byte-overlapping) span, and of the blob if ``whole``."""
    ranges = []
    for i, p in enumerate(points):
        start = p.compressed - (1 if p.bits else 0)
        end = points[i + 1].compressed if i + 1 < len(points) else size
        ranges.append((start, end))
    hashers = [hashlib.sha256() for _ in ranges]
    whole_h = hashlib.sha256()
    f.seek(0)
    pos = 0
    first = 0  # first range that may still need bytes
    while data := f.read(_READ_CHUNK):
        if whole:
            whole_h.update(data)
        view = memoryview(data)
        end = pos + len(data)
        k = first
        while k < len(ranges) and ranges[k][0] < end:
            s, e = ranges[k]
            if e > pos:
                hashers[k].update(view[max(s, pos) - pos : min(e, end) - pos])
            k += 1
        while first < len(ranges) and ranges[first][1] <= end:
            first += 1
        pos = end
    if pos != size:
        raise LayerFormatError("gzip: blob changed size while being indexed")
    return tuple(h.digest() for h in hashers), ("sha256:" + whole_h.hexdigest()) if whole else ""


# --------------------------------------------------------------------------- local copies


def needs_local_copy(index: SeekIndex, *, max_span: int = 4 * DEFAULT_SPACING) -> bool:
    """Whether some span is too long to inflate per read (e.g. a single-frame zstd layer).

    Such a layer is better decompressed once into a cache file (`decompress_to_file`) and
    then served with an identity ("none") index of that file.
    """
    return any(
        index.span_uncompressed_end(i) - p.uncompressed > max_span
        for i, p in enumerate(index.points)
    )


def decompress_to_file(
    source: ReadCompressed | BinaryIO,
    compression: Compression,
    dest: BinaryIO,
    *,
    spacing: int = DEFAULT_SPACING,
    on_uncompressed: Callable[[bytes], None] | None = None,
) -> tuple[SeekIndex, SeekIndex]:
    """Decompress a blob into ``dest`` while indexing it; returns (blob index, file index).

    The blob index records the blob's digests (so the source is still verified); the file
    index is an identity index over ``dest`` for serving reads from the local copy.
    """
    sink = on_uncompressed

    def write(data: bytes) -> None:
        dest.write(data)
        if sink is not None:
            sink(data)

    blob_index = build_index(source, compression, spacing=spacing, on_uncompressed=write)
    dest.flush()
    dest.seek(0)
    file_index = build_index(dest, "none", spacing=spacing)
    return blob_index, file_index


def file_range_reader(f: BinaryIO) -> ReadRange:
    """A ``read_compressed_range`` over a local file (pread; safe across threads)."""
    fd = f.fileno()

    def read_range(start: int, end: int) -> bytes:
        return os.pread(fd, end - start, start)

    return read_range


__all__ = [
    "DEFAULT_SPACING",
    "WINDOW_SIZE",
    "Compression",
    "SeekIndex",
    "SeekPoint",
    "build_index",
    "decompress_to_file",
    "file_range_reader",
    "inflate_span",
    "needs_local_copy",
    "primed_start",
    "read_at",
    "verify_raw_span",
    "verify_span",
    "zstd_capped",
]
