"""The imagefs layer index: one layer's table of contents plus its random-access points.

Built once per layer digest, in a single sequential pass over the compressed blob (the
decompressor hands the tar stream to the scanner while the seek points are recorded). Where
indexes are kept, and who may use which, is `store.layerindexes`'s business.

For eStargz and zstd:chunked layers the index holds a `ChunkTable` instead of seek points:
those formats bring their own table of contents (verified against the manifest's layer
annotations), so no pass over the blob is needed to build it.

File format (all integers little-endian):

    magic "IFSLIDX2" | u8 kind (1 = seek points, 2 = chunk table) | u64 len(toc) | toc |
    u64 len(access) | access bytes | xxh3_64 of all preceding bytes

The parts carry their own versions and checksums too; the outer checksum makes a torn write
of the whole file detectable before either part is parsed.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import xxhash

from imagefs.errors import LayerFormatError
from imagefs.layers.chunks import ChunkTable
from imagefs.layers.seekindex import SeekIndex
from imagefs.layers.toc import Toc
from imagefs.oci.digest import Digest
from imagefs.oci.mediatypes import Compression

MAGIC = b"IFSLIDX2"
_SEEK, _CHUNKS = 1, 2
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class LayerIndex:
    """A layer's TOC plus how to reach file bytes: seek points or a chunk table."""

    digest: Digest
    toc: Toc
    seek: SeekIndex | None = None
    chunks: ChunkTable | None = None
    warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.seek is None) == (self.chunks is None):
            raise ValueError("a layer index has seek points or a chunk table, not both")

    def to_bytes(self) -> bytes:
        toc = self.toc.to_bytes()
        if self.seek is not None:
            kind, access = _SEEK, self.seek.to_bytes()
        else:
            assert self.chunks is not None
            kind, access = _CHUNKS, self.chunks.to_bytes()
        body = b"".join(
            [MAGIC, bytes([kind]), _U64.pack(len(toc)), toc, _U64.pack(len(access)), access]
        )
        return body + _U64.pack(xxhash.xxh3_64_intdigest(body))

    @classmethod
    def from_bytes(cls, digest: Digest, data: bytes) -> LayerIndex:
        if len(data) < len(MAGIC) + 25 or not data.startswith(MAGIC):
            raise LayerFormatError(f"layer index for {digest.short}: not an imagefs index")
        # Views, not copies: a fresh daemon's first copies of a 4.6 MB record cost ~2.5 ms
        # each in page faults (the 40k-entry layer: 10 ms to load, 5.5 without them).
        body, (check,) = memoryview(data)[:-8], _U64.unpack(data[-8:])
        if xxhash.xxh3_64_intdigest(body) != check:
            raise LayerFormatError(f"layer index for {digest.short}: checksum mismatch (torn)")
        pos = len(MAGIC)
        kind = body[pos]
        pos += 1
        (n,) = _U64.unpack_from(body, pos)
        pos += 8
        toc = Toc.from_bytes(body[pos : pos + n])
        pos += n
        (m,) = _U64.unpack_from(body, pos)
        pos += 8
        access = bytes(body[pos : pos + m])
        if kind == _CHUNKS:
            return cls(digest, toc, chunks=ChunkTable.from_bytes(access))
        if kind != _SEEK:
            raise LayerFormatError(f"layer index for {digest.short}: unknown kind {kind}")
        seek = SeekIndex.from_bytes(access)
        if seek.blob_digest and seek.blob_digest != str(digest):
            raise LayerFormatError(f"layer index for {digest.short} was built from another blob")
        return cls(digest, toc, seek=seek)


# A layer may inflate to at most this many times its compressed size (beyond a floor that
# every honest small layer stays under). Real layers inflate 2-10x; a gzip bomb ~1000x and a
# zstd one far more. Beyond the CPU time, indexing holds memory in proportion to the
# uncompressed size (rapidgzip's chunk bookkeeping), so the bound matters for the daemon.
MAX_INFLATE_RATIO = 100
INFLATE_FLOOR = 1 << 30


def inflate_limit(compressed_size: int) -> int:
    return max(INFLATE_FLOOR, MAX_INFLATE_RATIO * compressed_size)


def build_from_blob(
    blob: Path | int,
    digest: Digest,
    compression: Compression,
    *,
    spool_dir: Path | None = None,
    estargz: bool = False,
) -> LayerIndex:
    """Scan a verified, local layer blob into a LayerIndex (CPU-bound: run in a thread).

    `blob`: a path, or a file descriptor the caller opened (and this closes). A blob in the
    store is opened by its shell (`store.fsutil.safe_open`: no link followed); this module
    stays pure of the store's rules."""
    with _open_blob(blob) as f:
        return _build(f, digest, compression, spool_dir, estargz)


def _open_blob(blob: Path | int) -> BinaryIO:
    fd = blob if isinstance(blob, int) else os.open(blob, os.O_RDONLY | os.O_CLOEXEC)
    return os.fdopen(fd, "rb")


def _build(
    f: BinaryIO,
    digest: Digest,
    compression: Compression,
    spool_dir: Path | None,
    estargz: bool,
) -> LayerIndex:
    # Here, not at the top: a mount reading a stored or published index never builds one.
    from imagefs.layers.seekindex import build_index
    from imagefs.layers.tarscan import TarScanner
    from imagefs.layers.toc import TocBuilder

    scanner = TarScanner()
    builder = TocBuilder(estargz=estargz)
    size = os.fstat(f.fileno()).st_size
    limit = inflate_limit(size)
    inflated = 0

    def feed(data: bytes) -> None:
        nonlocal inflated
        inflated += len(data)
        if inflated > limit:
            raise LayerFormatError(
                f"layer {digest.short} inflates to more than {limit} bytes from "
                f"{size}: refused as a decompression bomb"
            )
        for entry in scanner.feed(data):
            builder.add_tar_entry(entry)

    seek = build_index(
        f,
        compression,
        on_uncompressed=feed,
        spool_dir=str(spool_dir) if spool_dir else None,
        blob_digest=str(digest),
    )
    for entry in scanner.close():
        builder.add_tar_entry(entry)
    toc = builder.build()
    return LayerIndex(digest, toc, seek=seek, warnings=tuple(scanner.warnings + builder.warnings))
