"""Reading through a seek index: bytes at an uncompressed offset from the compressed
blob (`read_at`), one span's bytes (`inflate_span`), capped zstd inflating, and a whole
blob decompressed to a file.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable
from typing import Any, BinaryIO, cast

import zstandard

from imagefs.errors import LayerFormatError
from imagefs.layers.seekindex.format import (
    _GZIP_MAGIC,
    _ZSTD_FEED,
    _ZSTD_MAGIC,
    _ZSTD_SKIPPABLE_HI,
    _ZSTD_SKIPPABLE_LO,
    ReadRange,
    SeekIndex,
    SeekPoint,
    verify_span,
)
from imagefs.layers.seekindex.priming import (
    _Decompressor,
    _gzip_header_length,
    _inflater,
    primed_start,
)


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


def file_range_reader(f: BinaryIO) -> ReadRange:
    """A ``read_compressed_range`` over a local file (pread; safe across threads)."""
    fd = f.fileno()

    def read_range(start: int, end: int) -> bytes:
        return os.pread(fd, end - start, start)

    return read_range
