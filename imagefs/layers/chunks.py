"""Chunk tables: how to read files of eStargz and zstd:chunked layers by byte ranges.

Both formats carry a CRFS table of contents naming, for every regular file, the compressed
pieces ("chunks") that hold its data — each an independent gzip member (eStargz) or zstd
frame (zstd:chunked) — and the sha256 of each piece's *uncompressed* bytes. So a file can be
read by fetching just its pieces, each verified before use.

This module turns such a TOC into (a) an ordinary `Toc` for the overlay, where each regular
file's `offset` is a position in a *virtual* uncompressed address space (files laid end to
end in TOC order), and (b) a `ChunkTable` mapping virtual ranges to compressed ranges and
digests. Pure: values in, values out.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import struct
import threading
import zlib
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import xxhash
import zstandard
from isal import isal_zlib  # ISA-L: inflates ~2x faster than zlib

from imagefs.errors import ImageFSError, IntegrityError, LayerFormatError
from imagefs.layers.seekindex import zstd_capped
from imagefs.layers.tarscan import EntryType
from imagefs.layers.toc import Toc

if TYPE_CHECKING:  # the builders import them: reading a stored table needs none of them
    from imagefs.layers import estargz, lostnames

MAGIC = b"IFSCHNK2"
ZERO_DIGEST = b"\0" * 32
# The largest chunk imagefs fetches and inflates in one piece (writers use 4 MiB; ctr-remote
# and containers/storage stay far below this). A TOC is verified by its annotation, but
# that only proves the manifest's author wrote it: a declared 20 GiB chunk would otherwise be
# one 20 GiB range buffered and a 20 GiB inflate. "zeros" chunks carry no data and are never
# held whole (reads and `tocverify` make their zeros piece by piece), so they are not capped.
MAX_CHUNK = 64 << 20
MAX_CHUNK_SPAN = MAX_CHUNK + (MAX_CHUNK >> 4)  # compressed: deflate/zstd overhead included
_INFLATE_ERRORS: tuple[type[Exception], ...] = (
    zlib.error,
    cast("type[Exception]", isal_zlib.error),  # a class (its stub says an instance)
    zstandard.ZstdError,
    LayerFormatError,
)
_thread = threading.local()  # per worker thread: its zstd context


@dataclass(frozen=True)
class Chunk:
    voffset: int  # where the chunk's data starts in the virtual uncompressed space
    size: int  # uncompressed bytes
    start: int  # compressed byte range [start, end) in the blob
    end: int
    inner: int  # where the chunk's data starts in its decompressed member
    digest: bytes  # sha256 of the uncompressed chunk; all zero for a "zeros" chunk
    zeros: bool = False


@dataclass(frozen=True)
class ChunkTable:
    """Chunks sorted by virtual offset. Compact: parallel arrays, not objects."""

    codec: str  # "gzip" | "zstd"
    voffsets: array[int]
    sizes: array[int]
    starts: array[int]
    ends: array[int]
    inners: array[int]
    digests: bytes  # 32 bytes per chunk
    zeros: bytes  # one byte per chunk
    # eStargz `.prefetch.landmark`: chunks stored before this blob offset are what the image
    # builder wants fetched first; 0 when there is no landmark.
    prefetch_until: int = 0

    def __len__(self) -> int:
        return len(self.voffsets)

    def chunk(self, k: int) -> Chunk:
        return Chunk(
            self.voffsets[k],
            self.sizes[k],
            self.starts[k],
            self.ends[k],
            self.inners[k],
            self.digests[32 * k : 32 * k + 32],
            bool(self.zeros[k]),
        )

    def covering(self, offset: int, length: int) -> range:
        """Indices of the chunks holding virtual bytes [offset, offset+length)."""
        if length <= 0 or not len(self):
            return range(0)
        first = max(0, bisect.bisect_right(self.voffsets, offset) - 1)
        last = bisect.bisect_right(self.voffsets, offset + length - 1)
        return range(first, last)

    def decode(self, k: int, compressed: bytes) -> bytes:
        """Inflate chunk k from its compressed bytes and check its digest (see
        `decode_many`); raises the chunk's error."""
        (got,) = self.decode_many((k,), compressed, self.starts[k])
        if isinstance(got, ImageFSError):
            raise got
        return got

    def decode_many(
        self, ks: Iterable[int], blob: bytes | memoryview, base: int
    ) -> list[bytes | ImageFSError]:
        """Inflate and verify chunks `ks` from `blob` (compressed blob bytes from offset
        `base` on, holding every chunk's [start, end)): per chunk its verified bytes, or
        the error that refuses it (one bad chunk costs only itself).

        Output is capped at what the verified TOC declares (`inner + size` bytes), so a
        member that inflates far beyond its declared size (a bomb) costs no more memory
        than an honest chunk; a zstd frame (one per chunk) producing more is refused.
        Many chunks are small (a file each), so this loop is kept tight: per chunk one
        inflate (ISA-L for gzip, ~2x zlib; one zstd context per thread), one sha256, no
        objects or copies beyond the output; both release the GIL inside their C calls.
        """
        view = memoryview(blob)
        sizes, starts, ends, inners = self.sizes, self.starts, self.ends, self.inners
        digests, zeros, sha256 = self.digests, self.zeros, hashlib.sha256
        gzip = self.codec == "gzip"
        dctx = None if gzip else _zstd_context()
        out: list[bytes | ImageFSError] = []
        for k in ks:
            size = sizes[k]
            if zeros[k]:
                out.append(bytes(size))
                continue
            inner = inners[k]
            cap = inner + size
            data = view[starts[k] - base : ends[k] - base]
            try:
                if dctx is None:
                    raw = isal_zlib.decompressobj(31).decompress(data, cap)
                else:
                    zraw = _zstd_frame(dctx, data, cap)
                    if zraw is None:
                        out.append(
                            LayerFormatError(
                                f"chunk at {starts[k]}: inflates beyond its declared {size} bytes"
                            )
                        )
                        continue
                    raw = zraw
            except _INFLATE_ERRORS as exc:
                out.append(LayerFormatError(f"chunk at {starts[k]}: does not inflate: {exc}"))
                continue
            if inner or len(raw) != size:
                raw = raw[inner : inner + size]
            if len(raw) != size or sha256(raw).digest() != digests[32 * k : 32 * k + 32]:
                out.append(
                    IntegrityError(f"chunk at blob offset {starts[k]} fails its sha256 digest")
                )
                continue
            out.append(raw)
        return out

    def piece(self, k: int) -> str:
        """Chunk k's piece name in the piece cache: its chunkDigest in hex."""
        return self.digests[32 * k : 32 * k + 32].hex()

    def to_bytes(self) -> bytes:
        parts = [
            MAGIC,
            struct.pack(
                "<4sQQ", self.codec.encode().ljust(4, b"\0"), len(self), self.prefetch_until
            ),
            self.voffsets.tobytes(),
            self.sizes.tobytes(),
            self.starts.tobytes(),
            self.ends.tobytes(),
            self.inners.tobytes(),
            self.digests,
            self.zeros,
        ]
        body = b"".join(parts)
        return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))

    @classmethod
    def from_bytes(cls, data: bytes) -> ChunkTable:
        if len(data) < 36 or not data.startswith(MAGIC):
            raise LayerFormatError("not an imagefs chunk table")
        body, (check,) = data[:-8], struct.unpack("<Q", data[-8:])
        if xxhash.xxh3_64_intdigest(body) != check:
            raise LayerFormatError("chunk table checksum mismatch (torn)")
        codec_b, n, prefetch_until = struct.unpack_from("<4sQQ", body, len(MAGIC))
        pos = len(MAGIC) + 20
        arrays = []
        for _ in range(5):
            a = array("Q")
            a.frombytes(body[pos : pos + 8 * n])
            pos += 8 * n
            arrays.append(a)
        digests = body[pos : pos + 32 * n]
        zeros = body[pos + 32 * n : pos + 33 * n]
        if len(zeros) != n:
            raise LayerFormatError("chunk table is truncated")
        voffsets, sizes, starts, ends, inners = arrays
        codec = codec_b.rstrip(b"\0").decode()
        return cls(codec, voffsets, sizes, starts, ends, inners, digests, zeros, prefetch_until)


def _zstd_context() -> zstandard.ZstdDecompressor:
    """This thread's zstd context (creating one per chunk cost more than inflating a small
    chunk; a context must not be shared between threads)."""
    dctx: zstandard.ZstdDecompressor | None = getattr(_thread, "zstd", None)
    if dctx is None:
        dctx = _thread.zstd = zstandard.ZstdDecompressor()
    return dctx


def _zstd_frame(dctx: zstandard.ZstdDecompressor, data: memoryview, cap: int) -> bytes | None:
    """One zstd frame's output, never more than `cap` + 1 bytes held; None if it declares
    or makes more than `cap`. One call into zstd: a frame that declares its size gets that
    buffer (checked against `cap` first), one that does not (containers/storage writes
    none) a `cap`-byte one; only a frame that does not fit goes through the capped stream,
    to tell "too big" from "corrupt"."""
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError:
        declared = -2  # a skippable frame first, or not zstd: the stream reader says
    if declared > cap:
        return None
    if declared != -2:
        with contextlib.suppress(zstandard.ZstdError):
            # a declared size is checked by zstd against the output; else at most `cap`
            return dctx.decompress(data, max_output_size=max(cap, 1))
    raw = zstd_capped(data, cap, across_frames=False)  # type: ignore[arg-type]
    return None if len(raw) > cap else raw


@functools.lru_cache(maxsize=1024)  # a TOC's entries mostly share a few timestamps
def _mtime(modtime: str) -> tuple[int, int]:
    if not modtime:
        return 0, 0
    try:
        when = dt.datetime.fromisoformat(modtime.replace("Z", "+00:00"))
    except ValueError:
        return 0, 0
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    seconds = int(when.timestamp())
    # fromisoformat keeps microseconds only; the TOC may carry nanoseconds.
    frac = (
        modtime.split(".", 1)[1].rstrip("Z").split("+")[0].split("-")[0] if "." in modtime else ""
    )
    ns = int((frac + "000000000")[:9]) if frac.isdigit() else when.microsecond * 1000
    return seconds, ns  # TocBuilder takes the nanosecond fraction


def _name(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def build_chunked(
    entries: Sequence[estargz.TOCEntry],
    pieces: Sequence[tuple[str, int, int, int, int, int, str, bool]],
    codec: str,
    *,
    estargz_layer: bool = False,
    names: lostnames.Names | None = None,
) -> tuple[Toc, ChunkTable, list[str]]:
    """A Toc and a ChunkTable from CRFS entries and each file's pieces.

    `pieces` are (name, file_offset, size, start, end, inner, digest, zeros) in file order.
    JSON cannot carry names that are not UTF-8: writers put U+FFFD there. `names` holds the
    true bytes of such entries (TOC entry index -> (name, link target), read back from their
    tar headers by `lostnames`); a lossy entry without one raises `LostNames`, so the
    caller can recover them (or read the layer's tar stream instead).
    """
    from imagefs.layers import lostnames
    from imagefs.layers.toc import TocBuilder

    names = names or {}
    lost = [k for k in lostnames.lost_entries(entries) if k not in names]
    if lost:
        raise lostnames.LostNames(entries, lost)
    builder = TocBuilder(estargz=estargz_layer)
    # Straight into compact arrays (no tuple per chunk, no dict by name: a big TOC's peak).
    voffsets, sizes, starts, ends, inners = (array("Q") for _ in range(5))
    digests, zero_flags = bytearray(), bytearray()
    voff = 0
    next_piece = 0  # pieces are in file order: each file's run follows the last one's
    warnings: list[str] = []
    types = lostnames.TYPES
    for k, e in enumerate(entries):
        kind = types.get(e.type)
        if kind is None:
            continue  # "chunk" continuation entries, or types we do not show
        mtime, mtime_ns = _mtime(e.modtime)
        offset = 0
        if kind is EntryType.REG and e.size:
            offset = voff
            covered = 0
            while next_piece < len(pieces) and pieces[next_piece][0] == e.name:
                _, file_off, size, start, end, inner, digest, zeros = pieces[next_piece]
                next_piece += 1
                if file_off != covered:
                    raise LayerFormatError(f"{e.name}: chunks do not cover the file in order")
                algo, _, hexd = digest.partition(":")
                if not zeros and (algo != "sha256" or len(hexd) != 64):
                    raise LayerFormatError(f"{e.name}: chunk without a sha256 digest")
                _check_bounds(e.name, size, start, end, inner, zeros)
                voffsets.append(voff + file_off)
                sizes.append(size)
                starts.append(start)
                ends.append(end)
                inners.append(inner)
                digests += bytes.fromhex(hexd) if not zeros else ZERO_DIGEST
                zero_flags.append(1 if zeros else 0)
                covered += size
            if covered != e.size:
                raise LayerFormatError(f"{e.name}: chunks hold {covered} of {e.size} bytes")
            voff += e.size
        name, link = names.get(k) or (_name(e.name), _name(e.link_name) if e.link_name else b"")
        builder.add(
            name,
            kind,
            mode=e.mode & 0o7777,
            uid=e.uid,
            gid=e.gid,
            size=e.size if kind is EntryType.REG else 0,
            mtime=mtime,
            mtime_ns=mtime_ns,
            devmajor=e.dev_major,
            devminor=e.dev_minor,
            offset=offset,
            linkname=link,
            xattrs=[(k.encode(), v) for k, v in e.xattrs.items()] if e.xattrs else (),
        )
    toc = builder.build()
    warnings.extend(builder.warnings)
    table = ChunkTable(
        codec, voffsets, sizes, starts, ends, inners, bytes(digests), bytes(zero_flags)
    )
    return toc, table, warnings


def _check_bounds(name: str, size: int, start: int, end: int, inner: int, zeros: bool) -> None:
    """A chunk's declared sizes, before anything is fetched for it (see MAX_CHUNK)."""
    if size < 0 or inner < 0 or end < start:
        raise LayerFormatError(f"{name}: chunk at {start} has negative sizes")
    if zeros:
        return
    if size > MAX_CHUNK or inner > MAX_CHUNK or end - start > MAX_CHUNK_SPAN:
        raise LayerFormatError(
            f"{name}: chunk at {start} declares {size} bytes ({end - start} compressed, "
            f"{inner} before it in its member), more than the {MAX_CHUNK} imagefs reads at once"
        )


def from_estargz(
    toc: estargz.TOC, toc_offset: int, names: lostnames.Names | None = None
) -> tuple[Toc, ChunkTable, list[str]]:
    """eStargz: a chunk ends where the next member starts (or at the TOC member)."""
    from imagefs.layers import estargz

    member_starts = {
        e.offset for e in toc.entries if e.type == "chunk" or (e.type == "reg" and e.size)
    }
    starts = sorted(member_starts | {toc_offset})
    pieces: list[tuple[str, int, int, int, int, int, str, bool]] = []
    current: estargz.TOCEntry | None = None
    for e in toc.entries:
        if e.type == "reg":
            current = e
            if not e.size:
                continue
        elif e.type != "chunk" or current is None or e.name != current.name:
            continue
        assert current is not None
        size = e.chunk_size or (current.size - e.chunk_offset)
        i = bisect.bisect_right(starts, e.offset)
        end = starts[i] if i < len(starts) else toc_offset
        pieces.append(
            (
                current.name,
                e.chunk_offset,
                size,
                e.offset,
                end,
                e.inner_offset,
                e.chunk_digest,
                False,
            )
        )
    t, table, warnings = build_chunked(toc.entries, pieces, "gzip", estargz_layer=True, names=names)
    landmark = next((e.offset for e in toc.entries if e.name == estargz.PREFETCH_LANDMARK), 0)
    if landmark:
        table = dataclasses.replace(table, prefetch_until=landmark)
    return t, table, warnings


def from_zstd_chunked(
    toc: estargz.TOC, names: lostnames.Names | None = None
) -> tuple[Toc, ChunkTable, list[str]]:
    from imagefs.layers import zstdchunked

    refs = zstdchunked.chunks(toc)
    pieces = [(r.name, r.file_offset, r.size, r.start, r.end, 0, r.digest, r.zeros) for r in refs]
    return build_chunked(toc.entries, pieces, "zstd", names=names)
