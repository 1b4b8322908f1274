"""Names a CRFS table of contents could not carry, read back from the layer's own tar headers.

JSON carries only UTF-8. The writers of eStargz (ctr-remote) and zstd:chunked (skopeo, via
containers/storage) use Go's encoding/json, which puts U+FFFD for every byte that is not
UTF-8, so a file named `caf\\xe9` reaches the TOC as `caf\\ufffd`: its true name is lost. The
tar header that precedes the entry in the blob still holds the exact bytes, and both formats
lay the blob out so that the headers between two payloads can be fetched alone:

* eStargz: each payload piece starts a gzip member and the headers that follow a file are
  written into the member that holds its last piece, after its data and tar padding. The
  headers between payload A (last piece at offset p) and payload B are the tail of
  blob[p : B.offset]; before the first payload, blob[0 : first.offset].
* zstd:chunked: each payload is in frames [offset, endOffset); the headers between payload A
  and payload B are the frames blob[A.endOffset : B.offset].

After the last payload, the headers run up to the TOC (eStargz: its member; zstd:chunked:
its skippable frame).

Why the fetched header bytes can be trusted, although no digest covers them:

* which range is fetched, and what must be in it, comes from the verified TOC;
* an eStargz gap starts with the previous file's last piece, whose sha256 the TOC holds: the
  member must inflate to exactly those bytes first, which pins where the headers start;
* the headers must then parse as tar, one for each TOC entry the gap should hold (no more,
  no fewer), each with the TOC's type, size and link target, and its name equal to the TOC's
  wherever the TOC's is not lossy (and equal up to the U+FFFD where it is). So a lying
  registry can at most choose other bytes in the places the TOC itself lost;
* the entry's content is still only ever served through the TOC's chunk digests;
* whenever the whole blob is local, `layers.tocverify` compares the TOC-derived index,
  recovered names included, with the tar stream the diff_id covers, and refuses it if they
  differ.

Pure: values in, values out; the caller fetches the ranges.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from imagefs.errors import LayerFormatError
from imagefs.layers.estargz import TOCEntry
from imagefs.layers.seekindex import zstd_capped
from imagefs.layers.tarscan import BLOCK, EntryType, TarScanner, clean_path

LOST = "\ufffd"
# Room for the headers of the entries between two payloads: a few blocks each, more with
# PAX records (xattrs); bounded so that a bomb in a header range costs bounded memory.
_HEADER_ROOM = 1 << 20
_PER_HEADER = 16 << 10
_MAX_HEADERS = 64 << 20
# The most compressed bytes fetched for one gap: the chunk before the headers (eStargz keeps
# them in its member; `chunks.MAX_CHUNK` at most), the headers, and deflate's overhead on
# incompressible data (well under 1%). Checked before the fetch: the offsets are the TOC's.
MAX_GAP = 2 * _MAX_HEADERS + (4 << 20)
TYPES = {  # CRFS TOC entry types as tar entry types
    "reg": EntryType.REG,
    "dir": EntryType.DIR,
    "symlink": EntryType.SYMLINK,
    "hardlink": EntryType.HARDLINK,
    "char": EntryType.CHAR,
    "block": EntryType.BLOCK,
    "fifo": EntryType.FIFO,
}

# TOC entry index -> (true name bytes, true link target bytes)
Names = Mapping[int, tuple[bytes, bytes]]


class LostNames(LayerFormatError):
    """A TOC holds entries whose names it could not carry (and no recovered names for them)."""

    def __init__(self, entries: Sequence[TOCEntry], lost: Sequence[int]) -> None:
        first = entries[lost[0]].name
        super().__init__(f"TOC lost {len(lost)} non-UTF-8 name(s) (first: {first!r})")
        self.entries = tuple(entries)
        self.lost = tuple(lost)


@dataclass(frozen=True)
class Gap:
    """The compressed range holding the tar headers of TOC entries `expect` (in order)."""

    start: int
    end: int
    skip: int  # inflated bytes of the previous payload piece before them (eStargz)
    skip_digest: str  # that piece's chunkDigest ("" when skip is 0)
    pad: int  # tar padding after the previous payload
    expect: tuple[int, ...]


def is_lost(e: TOCEntry) -> bool:
    return LOST in e.name or LOST in e.link_name


def lost_entries(entries: Sequence[TOCEntry]) -> list[int]:
    return [i for i, e in enumerate(entries) if e.type != "chunk" and is_lost(e)]


def gaps(entries: Sequence[TOCEntry], codec: str, data_end: int) -> list[Gap]:
    """The header gaps that hold at least one lost name; `data_end` is where the TOC starts.

    `codec` is "gzip" (eStargz) or "zstd" (zstd:chunked).
    """
    out: list[Gap] = []
    start, skip, digest, pad = 0, 0, "", 0
    expect: list[int] = []
    file_size = 0

    def close(end: int) -> None:
        if any(is_lost(entries[k]) for k in expect):
            if not start <= end <= data_end:
                raise LayerFormatError("TOC offsets are out of order; lost names not recoverable")
            out.append(Gap(start, end, skip, digest, pad, tuple(expect)))
        expect.clear()

    for idx, e in enumerate(entries):
        if e.type == "chunk":
            if codec == "gzip" and e.offset:  # a further piece: its own member
                start = e.offset
                skip = e.inner_offset + (e.chunk_size or file_size - e.chunk_offset)
                digest = e.chunk_digest
            continue
        expect.append(idx)
        if e.type != "reg" or not e.size:
            continue
        close(e.offset)  # this file's header is the last one before its payload
        file_size = e.size
        pad = -e.size % BLOCK
        if codec == "gzip":
            start = e.offset
            skip = e.inner_offset + (e.chunk_size or e.size)
            digest = e.chunk_digest
        else:
            start, skip, digest = e.end_offset, 0, ""
    close(data_end)
    return out


def _inflate(codec: str, compressed: bytes, cap: int) -> bytes:
    if codec == "zstd":
        return zstd_capped(compressed, cap)
    out = bytearray()
    rest = compressed
    try:
        while rest and len(out) <= cap:
            d = zlib.decompressobj(31)
            out += d.decompress(rest, cap + 1 - len(out))
            if not d.eof:
                break  # capped, or cut short: the header count check below says which
            rest = d.unused_data
    except zlib.error as exc:
        raise LayerFormatError(f"tar headers do not inflate: {exc}") from None
    return bytes(out)


def _loose(name: bytes) -> str:
    """A name as a lossy JSON writer would show it, runs of U+FFFD made one (Go replaces
    each bad byte, Python each maximal bad sequence)."""
    return re.sub(f"{LOST}+", LOST, clean_path(name).decode("utf-8", "replace"))


def _toc_bytes(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def recover(gap: Gap, codec: str, compressed: bytes, entries: Sequence[TOCEntry]) -> Names:
    """The true names of the lost entries in `gap`, from its compressed bytes.

    Raises LayerFormatError when the bytes are not what the TOC says must be there.
    """
    if len(compressed) != gap.end - gap.start:
        raise LayerFormatError("tar header range came back short")
    room = min(_HEADER_ROOM + _PER_HEADER * len(gap.expect), _MAX_HEADERS)
    cap = gap.skip + gap.pad + room
    data = _inflate(codec, compressed, cap)
    if gap.skip:
        algo, _, hexd = gap.skip_digest.partition(":")
        if algo != "sha256" or hashlib.sha256(data[: gap.skip]).hexdigest() != hexd:
            raise LayerFormatError("the piece before the tar headers fails its chunk digest")
        data = data[gap.skip :]
    if gap.pad and data[: gap.pad] == bytes(gap.pad):
        data = data[gap.pad :]
    elif gap.pad and codec == "gzip":
        raise LayerFormatError("no tar padding after the payload before the headers")
    # (a zstd:chunked writer may keep the padding in the payload's own frame)
    scanner = TarScanner()
    try:
        found = scanner.feed(data)
    except LayerFormatError as exc:
        raise LayerFormatError(f"tar headers do not parse: {exc}") from None
    if len(found) < len(gap.expect) or scanner.warnings:
        raise LayerFormatError(
            f"tar headers: {len(found)} entries where the TOC places {len(gap.expect)}"
        )
    names: dict[int, tuple[bytes, bytes]] = {}
    for idx, t in zip(gap.expect, found, strict=False):
        e = entries[idx]
        want = TYPES.get(e.type)
        size_ok = t.size == e.size if want is EntryType.REG else True
        if (
            want is not t.type
            or not size_ok
            or _loose(t.path) != _loose(_toc_bytes(e.name))
            or _loose(t.linkname) != _loose(_toc_bytes(e.link_name))
        ):
            raise LayerFormatError(
                f"tar header for TOC entry {e.name!r} disagrees with the TOC "
                f"(type, size, name or link target)"
            )
        if is_lost(e):
            names[idx] = (t.path, t.linkname)
    if len(found) > len(gap.expect):
        # the last expected header is the next payload's; anything after it is payload, so
        # the scanner cannot have found more without the stream lying about sizes
        raise LayerFormatError("tar headers: more entries than the TOC places there")
    return names


def to_params(names: Names) -> dict[str, list[str]]:
    """JSON-safe form kept with the TOC's raw bytes (`layerindexes` params)."""
    return {str(k): [v[0].hex(), v[1].hex()] for k, v in sorted(names.items())}


def from_params(obj: object) -> dict[int, tuple[bytes, bytes]]:
    if not obj:
        return {}
    if not isinstance(obj, dict):
        raise LayerFormatError("kept TOC record: damaged recovered names")
    try:
        return {int(k): (bytes.fromhex(v[0]), bytes.fromhex(v[1])) for k, v in obj.items()}
    except (ValueError, TypeError, IndexError):
        raise LayerFormatError("kept TOC record: damaged recovered names") from None
