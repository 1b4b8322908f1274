"""zstd:chunked: manifest position, footer and TOC. Pure: bytes and strings in, values out.

A zstd:chunked layer is an ordinary ``tar+zstd`` blob in which every file (and every chunk
of a large file) is its own zstd frame, followed by zstd *skippable* frames that a plain
decompressor ignores: the TOC ("manifest", CRFS-style JSON, itself zstd-compressed), then
(newer writers) the tar-split data, then the footer.

Where the TOC is:

* layer annotations ``io.github.containers.zstd-chunked.manifest-position`` =
  ``offset:length:uncompressedLength:type`` (decimal; type 1 = CRFS) and
  ``...manifest-checksum`` = sha256 of the *compressed* TOC bytes. Older writers (e.g.
  skopeo 1.9) use the ``io.containers.zstd-chunked.*`` keys with the same values.
* the footer, the payload of the blob's last skippable frame, little-endian u64s:
  - 64 bytes (current): offset, length, uncompressedLength, type, tarSplitOffset,
    tarSplitLength, tarSplitUncompressedLength, then magic ``GNUlInUx``;
  - 40 bytes (older): offset, length, uncompressedLength, type, then magic ``GnUlInUx``.

``offset`` is where the compressed TOC bytes start (just past its skippable-frame header).
The annotation is the trusted source (it is covered by the manifest digest); the footer
only makes a blob self-describing.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from imagefs.errors import IntegrityError, LayerFormatError
from imagefs.layers import tocjson
from imagefs.layers.estargz import TOC, TOCEntry, parse_entry
from imagefs.layers.seekindex import zstd_capped

POSITION_KEY = "io.github.containers.zstd-chunked.manifest-position"
CHECKSUM_KEY = "io.github.containers.zstd-chunked.manifest-checksum"
TARSPLIT_POSITION_KEY = "io.github.containers.zstd-chunked.tarsplit-position"
LEGACY_POSITION_KEY = "io.containers.zstd-chunked.manifest-position"
LEGACY_CHECKSUM_KEY = "io.containers.zstd-chunked.manifest-checksum"
MANIFEST_TYPE_CRFS = 1
FOOTER_SIZE = 64
LEGACY_FOOTER_SIZE = 40
FOOTER_MAGIC = b"GNUlInUx"
LEGACY_FOOTER_MAGIC = b"GnUlInUx"
SKIPPABLE_FRAME_MAGIC = b"\x50\x2a\x4d\x18"
MAX_TOC_SIZE = 512 * 1024 * 1024


@dataclass(frozen=True)
class ManifestPosition:
    """Where the compressed TOC sits in the blob, and how big it is inflated."""

    offset: int
    length: int
    uncompressed_length: int
    manifest_type: int = MANIFEST_TYPE_CRFS


@dataclass(frozen=True)
class Footer:
    """The decoded footer; the tar-split fields are 0 in the older 40-byte form."""

    manifest: ManifestPosition
    tar_split_offset: int = 0
    tar_split_length: int = 0
    tar_split_uncompressed_length: int = 0
    size: int = FOOTER_SIZE


@dataclass(frozen=True)
class ChunkRef:
    """One independently fetchable piece of a regular file.

    Compressed bytes [``start``, ``end``) of the blob inflate to ``size`` bytes of the file
    at ``file_offset``; ``zeros`` chunks are all zero bytes (still stored as a frame).
    """

    name: str
    start: int
    end: int
    file_offset: int
    size: int
    digest: str
    zeros: bool = False


def parse_position(value: str) -> ManifestPosition:
    """Parse ``offset:length:uncompressedLength:type`` from a layer annotation."""
    parts = value.strip().split(":")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        raise LayerFormatError(f"zstd:chunked: bad manifest position {value!r}")
    offset, length, uncompressed, mtype = (int(p) for p in parts)
    if mtype != MANIFEST_TYPE_CRFS:
        raise LayerFormatError(f"zstd:chunked: unsupported manifest type {mtype}")
    return ManifestPosition(offset, length, uncompressed, mtype)


def position_from_annotations(
    annotations: Mapping[str, str],
) -> tuple[ManifestPosition, str] | None:
    """(position, checksum) from layer annotations, current keys first; None if absent."""
    for pos_key, sum_key in (
        (POSITION_KEY, CHECKSUM_KEY),
        (LEGACY_POSITION_KEY, LEGACY_CHECKSUM_KEY),
    ):
        if pos_key in annotations:
            checksum = annotations.get(sum_key)
            if not checksum:
                raise LayerFormatError(f"zstd:chunked: {pos_key} without {sum_key}")
            return parse_position(annotations[pos_key]), checksum
    return None


def parse_footer(tail: bytes) -> Footer:
    """Decode the footer from the blob's last bytes (pass at least the last 64)."""
    if len(tail) >= FOOTER_SIZE and tail[-8:] == FOOTER_MAGIC:
        f = tail[-FOOTER_SIZE:]
        o, n, u, t, tso, tsn, tsu = struct.unpack_from("<7Q", f)
        footer = Footer(ManifestPosition(o, n, u, t), tso, tsn, tsu, FOOTER_SIZE)
    elif len(tail) >= LEGACY_FOOTER_SIZE and tail[-8:] == LEGACY_FOOTER_MAGIC:
        o, n, u, t = struct.unpack_from("<4Q", tail[-LEGACY_FOOTER_SIZE:])
        footer = Footer(ManifestPosition(o, n, u, t), size=LEGACY_FOOTER_SIZE)
    else:
        raise LayerFormatError("zstd:chunked: no footer magic at the end of the blob")
    if footer.manifest.manifest_type != MANIFEST_TYPE_CRFS:
        raise LayerFormatError(
            f"zstd:chunked: unsupported manifest type {footer.manifest.manifest_type}"
        )
    return footer


def decode_manifest(
    compressed: bytes,
    position: ManifestPosition,
    *,
    expected_checksum: str | None = None,
) -> TOC:
    """Verify (when a checksum is given) and decode the compressed TOC bytes.

    ``compressed`` is blob[offset : offset + length]. The checksum is over exactly these
    bytes, so nothing is inflated before it matches.
    """
    if len(compressed) != position.length:
        raise LayerFormatError(
            f"zstd:chunked: TOC is {len(compressed)} bytes, position says {position.length}"
        )
    if expected_checksum is not None:
        algo, _, hexd = expected_checksum.partition(":")
        actual = hashlib.sha256(compressed).hexdigest()
        if algo != "sha256" or actual != hexd.lower():
            raise IntegrityError(
                f"zstd:chunked: TOC checksum is sha256:{actual}, expected {expected_checksum}"
            )
    if position.uncompressed_length > MAX_TOC_SIZE:
        raise LayerFormatError("zstd:chunked: TOC too large")
    # Output capped at the declared length (+1 to see a lie): a checksum only proves the
    # compressed bytes are the ones the manifest names, not that they inflate to a sane size.
    try:
        raw = zstd_capped(compressed, position.uncompressed_length)
    except LayerFormatError as e:
        raise LayerFormatError(f"zstd:chunked: TOC does not decompress: {e}") from None
    if len(raw) > position.uncompressed_length:
        raise LayerFormatError(
            f"zstd:chunked: TOC inflates to more than the {position.uncompressed_length} "
            "bytes its position declares"
        )
    if len(raw) != position.uncompressed_length:
        raise LayerFormatError(
            f"zstd:chunked: TOC inflates to {len(raw)} bytes, "
            f"position says {position.uncompressed_length}"
        )
    return parse_toc_json(raw)


def parse_toc_json(raw: bytes) -> TOC:
    """The uncompressed TOC JSON into a `TOC` (same entry form as eStargz)."""
    doc, entries = tocjson.load_streaming(raw, "zstd:chunked", "entries", parse_entry)
    if entries is None and "entries" in doc:
        raise LayerFormatError("zstd:chunked: TOC is not a JSON object with entries")
    version = doc.get("version", 0)
    if not isinstance(version, int):
        raise LayerFormatError("zstd:chunked: TOC version is not an integer")
    tsd = doc.get("tarSplitDigest", "")
    return TOC(
        version=version,
        entries=tuple(entries or ()),
        raw=raw,
        tar_split_digest=tsd if isinstance(tsd, str) else "",
    )


def chunks(toc: TOC) -> list[ChunkRef]:
    """Every stored piece of every regular file, with its compressed byte range.

    A file's first piece is its ``reg`` entry; following ``chunk`` entries continue it.
    Each piece ends where the next one starts; the last ends at the file's ``endOffset``.
    An unchunked file is one piece covering [offset, endOffset).
    """
    out: list[ChunkRef] = []
    entries = toc.entries
    i = 0
    while i < len(entries):
        head = entries[i]
        i += 1
        if head.type != "reg" or head.size == 0:
            continue
        pieces: list[TOCEntry] = [head]
        while i < len(entries) and entries[i].type == "chunk" and entries[i].name == head.name:
            pieces.append(entries[i])
            i += 1
        if head.end_offset <= head.offset:
            raise LayerFormatError(f"zstd:chunked: {head.name} has no endOffset")
        for k, piece in enumerate(pieces):
            end = pieces[k + 1].offset if k + 1 < len(pieces) else head.end_offset
            if len(pieces) == 1:
                size = head.size
            elif piece.chunk_size:
                size = piece.chunk_size
            else:
                size = head.size - piece.chunk_offset
            digest = piece.chunk_digest or (head.digest if len(pieces) == 1 else "")
            if end <= piece.offset or piece.chunk_offset + size > head.size:
                raise LayerFormatError(f"zstd:chunked: {head.name} has inconsistent chunks")
            out.append(
                ChunkRef(
                    name=head.name,
                    start=piece.offset,
                    end=end,
                    file_offset=piece.chunk_offset,
                    size=size,
                    digest=digest,
                    zeros=piece.chunk_type == "zeros",
                )
            )
    return out


def read_chunk(ref: ChunkRef, compressed: bytes) -> bytes:
    """Inflate one chunk's frame(s) (blob[start:end]) and check its size and digest."""
    if len(compressed) != ref.end - ref.start:
        raise LayerFormatError(f"zstd:chunked: {ref.name}: short chunk data")
    try:
        data = zstd_capped(compressed, ref.size, across_frames=False)  # a frame a chunk
    except LayerFormatError as e:
        raise LayerFormatError(f"zstd:chunked: {ref.name}: corrupt frame: {e}") from None
    if len(data) != ref.size:
        raise LayerFormatError(
            f"zstd:chunked: {ref.name}: chunk at {ref.file_offset} is {len(data)} bytes, "
            f"expected {ref.size}"
        )
    algo, _, hexd = ref.digest.partition(":")
    if algo != "sha256" or hashlib.sha256(data).hexdigest() != hexd:
        raise IntegrityError(f"{ref.name}: chunk at {ref.file_offset} fails its digest")
    return data
