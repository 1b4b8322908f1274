"""Restarting a deflate stream at a seek point that is not byte aligned.

gzip seek points are zran style (compressed offset, uncompressed offset, bit offset, 32 KiB
window). Reading needs only a zlib-compatible inflater (``isal.isal_zlib`` when present,
else stdlib ``zlib``).

Resuming mid-byte: Python's zlib has no ``inflatePrime``. We splice a tiny, hand-built,
non-final *empty dynamic-Huffman deflate block* in front of the point, sized so that it ends
exactly where the point's ``bits`` leftover bits of byte ``compressed - 1`` begin. The
inflater decodes the empty block (no output), then continues at the right bit, and every
later byte of the blob is fed unchanged, so stored blocks and gzip member ends stay byte
aligned. (Shifting the whole tail right by ``8 - bits`` bits, the other obvious trick, breaks
on the first stored block, whose padding is measured from the real byte boundary.)
"""

from __future__ import annotations

import zlib
from typing import Any, Protocol, cast

from imagefs.errors import LayerFormatError
from imagefs.layers.seekindex.format import _GZIP_MAGIC

_fast_zlib: Any


try:  # ISA-L inflates ~2x faster than zlib and supports raw streams with a dictionary.
    from isal import isal_zlib as _fast_zlib
except ImportError:  # pragma: no cover - isal is a declared dependency
    _fast_zlib = None


class _Decompressor(Protocol):
    """What we need from zlib/isal/zstandard decompressor objects."""

    @property
    def eof(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes, max_length: int = ...) -> bytes: ...


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
