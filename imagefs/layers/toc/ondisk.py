"""A layer TOC on disk: one checksummed file of length-prefixed sections.

Layout: a header (magic, version, entry count, body length, xxh3_64 of the body), then each
array or blob of `TocParts` as `u64 length` + bytes, in field order. Arrays are stored
little-endian whatever the host, so cache files can move between machines. `decode` checks
everything a torn or foreign file could get wrong before a `Toc` is made of it.
"""

from __future__ import annotations

import struct
import sys
from array import array
from typing import NamedTuple

import xxhash

from imagefs.errors import LayerFormatError
from imagefs.layers.toc.packed import Strings

MAGIC = b"IMGFSTOC"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ")  # magic, version, entry count, body length, xxh3_64(body)
SECTION_LEN = struct.Struct("<Q")


class TocParts(NamedTuple):
    """Everything a `Toc` is made of, in the order the sections are stored."""

    types: array[int]
    modes: array[int]
    uids: array[int]
    gids: array[int]
    sizes: array[int]
    offsets: array[int]
    mtimes: array[int]
    nsecs: array[int]
    path_offs: array[int]
    paths: bytes
    extra_offs: array[int]
    extras: bytes
    order: array[int]
    links: array[int]
    whiteouts: Strings
    opaque: Strings


def encode(parts: TocParts) -> bytes:
    """Serialize: a header (magic, version, count, body length, xxh3_64) and the body."""
    body = bytearray()
    sections: list[bytes | array[int]] = [*parts[:-2]]
    for strings in (parts.whiteouts, parts.opaque):
        sections += (strings.offs, strings.blob)
    for section in sections:
        if isinstance(section, array):
            if sys.byteorder == "big":  # pragma: no cover - no big-endian CI
                section = array(section.typecode, section)
                section.byteswap()
            raw: bytes = section.tobytes()
        else:
            raw = section
        body += SECTION_LEN.pack(len(raw))
        body += raw
    header = HEADER.pack(
        MAGIC, VERSION, len(parts.types), len(body), xxhash.xxh3_64_intdigest(body)
    )
    return header + bytes(body)


def decode(data: bytes | bytearray | memoryview) -> TocParts:
    """Read what `encode` wrote; raise `LayerFormatError` if it is torn or foreign."""
    view = memoryview(data).cast("B")
    if len(view) < HEADER.size:
        raise LayerFormatError("layer TOC: file too short for its header")
    magic, version, count, body_len, digest = HEADER.unpack_from(view)
    if magic != MAGIC:
        raise LayerFormatError("layer TOC: not an imagefs TOC (bad magic)")
    if version != VERSION:
        raise LayerFormatError(f"layer TOC: unsupported version {version}")
    body = view[HEADER.size :]
    if len(body) != body_len:
        raise LayerFormatError(
            f"layer TOC: body is {len(body)} bytes, header says {body_len} (torn write?)"
        )
    if xxhash.xxh3_64_intdigest(body) != digest:
        raise LayerFormatError("layer TOC: checksum mismatch (torn or corrupted file)")

    pos = 0

    def section() -> memoryview:
        nonlocal pos
        if pos + SECTION_LEN.size > len(body):
            raise LayerFormatError("layer TOC: truncated section table")
        (length,) = SECTION_LEN.unpack_from(body, pos)
        pos += SECTION_LEN.size
        if pos + length > len(body):
            raise LayerFormatError("layer TOC: section runs past the end")
        raw = body[pos : pos + length]
        pos += length
        return raw

    def arr(code: str) -> array[int]:
        raw = section()
        out = array(code)
        if len(raw) % out.itemsize:
            raise LayerFormatError("layer TOC: section size is not a whole number of items")
        out.frombytes(raw)
        if sys.byteorder == "big":  # pragma: no cover
            out.byteswap()
        return out

    types, modes, uids, gids = arr("B"), arr("H"), arr("I"), arr("I")
    sizes, offsets, mtimes, nsecs = arr("Q"), arr("Q"), arr("q"), arr("I")
    path_offs, paths = arr("I"), bytes(section())
    extra_offs, extras = arr("I"), bytes(section())
    order, links = arr("I"), arr("I")
    wh_offs, wh_blob = arr("I"), bytes(section())
    op_offs, op_blob = arr("I"), bytes(section())
    if pos != len(body):
        raise LayerFormatError("layer TOC: trailing bytes after the last section")

    def check(ok: bool, what: str) -> None:
        if not ok:
            raise LayerFormatError(f"layer TOC: inconsistent {what}")

    for a in (types, modes, uids, gids, sizes, offsets, mtimes, nsecs):
        check(len(a) == count, "entry arrays")
    for offs, blob, what in (
        (path_offs, paths, "paths"),
        (extra_offs, extras, "extras"),
        (wh_offs, wh_blob, "whiteouts"),
        (op_offs, op_blob, "opaque dirs"),
    ):
        check(len(offs) >= 1 and offs[0] == 0 and offs[-1] == len(blob), what)
    check(len(path_offs) == count + 1 and len(extra_offs) == count + 1, "offset arrays")
    check(not order or max(order) < count, "sorted index")
    check(not links or max(links) < count, "hard-link index")
    return TocParts(
        types=types,
        modes=modes,
        uids=uids,
        gids=gids,
        sizes=sizes,
        offsets=offsets,
        mtimes=mtimes,
        nsecs=nsecs,
        path_offs=path_offs,
        paths=paths,
        extra_offs=extra_offs,
        extras=extras,
        order=order,
        links=links,
        whiteouts=Strings(wh_blob, wh_offs),
        opaque=Strings(op_blob, op_offs),
    )
