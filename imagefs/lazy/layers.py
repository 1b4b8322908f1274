"""The layers of one mounted image: indexes on first need, bytes from verified pieces.

`LayerSet.ensure(i)` makes layer i's index available (`lazy.loading`: layer-bound index,
this manifest's TOC, this manifest's published index, else the whole blob).

`LayerSet.read(i, offset, length)` serves bytes of a layer's (virtual) uncompressed stream:

- a plain tar blob in the store (or a flattened single-frame zstd layer): `pread`;
- everything else from *pieces* (`lazy.cache.PieceCache`): verified uncompressed eStargz /
  zstd:chunked chunks (named by their `chunkDigest`) or seek-index spans (named by their
  uncompressed span digest). A warm read is a `pread` of an open piece, on the event loop
  (a worker-thread hop costs ~50-100 µs, more than the pread of a small file).
- a missing piece is made once (single flight per piece name): its compressed range comes
  from the local blob or by a Range GET (grouped with neighbours, see `making.plan`), is verified
  (span: compressed sha256; chunk: digest after inflating), inflated with output capped at
  the declared size, checked against the piece name, kept, and served. Decoding all the
  pieces of one request is one worker-thread hop.

Pieces are made by `lazy.making` (fetch planning, verification, single flight); a reader
going on where it left off gets read-ahead and `prefetch*` bring pieces in ahead of need
(`lazy.prefetch`).
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import trio
import zstandard

from imagefs.errors import ImageFSError, IntegrityError, LayerFormatError
from imagefs.layers import chunks as chunk_tables
from imagefs.layers.layerindex import LayerIndex
from imagefs.layers.seekindex import SeekIndex, inflate_span, verify_raw_span, verify_span
from imagefs.lazy import loading, telemetry
from imagefs.lazy import prefetch as prefetching
from imagefs.lazy.cache import PieceCache
from imagefs.lazy.loading import ESTARGZ_TOC_DIGEST, RemoteIndex
from imagefs.lazy.making import MIN_FETCH, Job, PieceMaker
from imagefs.lazy.prefetch import READ_AHEAD, ReadAhead
from imagefs.oci.image import Layer
from imagefs.registry import wire
from imagefs.store import Store, fsutil
from imagefs.store.layerindexes import LayerIndexStore

log = logging.getLogger("imagefs.lazy")

FetchBlob = Callable[[Layer], Awaitable[None]]
FetchRange = Callable[[Layer, int, int], Awaitable[bytes]]
ZSTD_FLAT_THRESHOLD = 8 << 20  # single-frame zstd bigger than this: decompress once to a file
_HELD_LAYERS = 16  # layers whose TOC tail fetch's chunk bytes are held (`LayerSet.hold`)

__all__ = ["ESTARGZ_TOC_DIGEST", "READ_AHEAD", "LayerSet", "LayerStats"]


@dataclass
class LayerStats:
    fetched_bytes: int = 0
    fetches: int = 0
    source: str = ""  # where the index came from
    ready: bool = False


@dataclass
class LayerSet:
    store: Store
    layers: list[Layer]
    fetch_blob: FetchBlob
    fetch_range: FetchRange | None = None
    remote_index: RemoteIndex | None = None
    cache: PieceCache | None = None
    cpu: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(2))
    net: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(8))
    min_fetch: int = MIN_FETCH
    nursery: trio.Nursery | None = None
    on_fetch: Callable[[int, int, int, float], None] | None = None  # layer, start, n, seconds

    def __post_init__(self) -> None:
        self.indexes = LayerIndexStore(self.store.root)
        if self.cache is None:
            self.cache = PieceCache(self.store.root)
        self.pieces: PieceCache = self.cache
        self._ready: list[LayerIndex | None] = [None] * len(self.layers)
        self._inflight: dict[int, trio.Event] = {}
        self._flat: dict[int, Path] = {}
        self._flattening: dict[int, trio.Event] = {}  # single flight per layer
        # Layer fds, opened from worker threads (piece making) and the event loop: guarded.
        # An fd replaced (the blob's, once the flat file exists) may still be in a worker's
        # pread: it is retired, closed with the LayerSet, never closed under a reader.
        self._fds: dict[int, int] = {}
        self._retired: list[int] = []
        self._fds_lock = threading.Lock()
        self._local: dict[int, bool] = {}
        self._local_checked: dict[int, float] = {}
        self._held: OrderedDict[int, tuple[int, bytes]] = OrderedDict()
        self.read_ahead = ReadAhead(self)
        self.stats = [LayerStats() for _ in self.layers]
        self.maker = PieceMaker(
            self.pieces,
            self.fetch,
            self.is_local,
            self._pread,
            self.cpu,
            self.min_fetch,
            describe=lambda i: self.layers[i].digest.short,
        )
        # Background fetches (prefetch profiles, landmarks, --background-fetch) take at most
        # 2 of the 8 network slots, so on-demand reads always find room; 2 rather than 1
        # because one piece at a time pays a full round trip per piece on a WAN.
        self.background = trio.CapacityLimiter(2)

    @property
    def inflations(self) -> int:
        """Pieces decoded by this process (a warm read decodes none)."""
        return self.maker.inflations

    # -- indexes ----------------------------------------------------------------------------

    def index(self, i: int) -> LayerIndex:
        idx = self._ready[i]
        if idx is None:
            raise LayerFormatError(f"layer {i} is not loaded")
        return idx

    def loaded(self, i: int) -> bool:
        return self._ready[i] is not None

    async def ensure(self, i: int) -> LayerIndex:
        while True:
            ready = self._ready[i]
            if ready is not None:
                return ready
            event = self._inflight.get(i)
            if event is not None:
                await event.wait()
                continue  # loaded, or failed: then this caller tries (and reports) itself
            event = self._inflight[i] = trio.Event()
            try:
                self._set_ready(i, await loading.load(self, i))
            finally:
                del self._inflight[i]
                event.set()

    async def ensure_ahead(self, i: int, ahead: loading.Ahead) -> None:
        """Load layer i's index ahead of need, as far as `ahead` allows: "kept", only what
        this machine keeps; "metadata", also the TOC the manifest names or its published
        index, fetched. Never the layer's data: a layer with neither TOC nor published
        index is left for the request that needs it (its whole blob).

        A load of the layer already in flight is waited for, unless this one is "kept":
        an early "kept" load (nothing found, in a cold store) must not stand for the
        "metadata" load started while it ran (the layers then loaded one after another,
        as the request reached each: ~100 ms of a cold first stat)."""
        while (event := self._inflight.get(i)) is not None and ahead == "metadata":
            await event.wait()
        if self._ready[i] is not None or i in self._inflight:
            return
        event = self._inflight[i] = trio.Event()
        try:
            idx = await loading.load(self, i, ahead=ahead)
            if idx is not None:
                self._set_ready(i, idx)
        finally:
            del self._inflight[i]
            event.set()  # a waiter finding no index loads it itself, as after a failure

    async def keep(self, write: Callable[[], None]) -> None:
        """Run a store write in a worker thread; with a nursery (a mount), in the background.

        For an index just loaded (`loading.Keep`): the caller has it in memory, so a request
        need not wait for it to reach the disk (the 40k-entry layer's published index: ~20
        ms of a cold first stat). A failure is the nursery's to log; without a nursery (a
        browse) the write is awaited and its failure raised."""
        if self.nursery is None:
            await trio.to_thread.run_sync(write)
        else:
            self.nursery.start_soon(trio.to_thread.run_sync, write, name="keeping an index")

    def _set_ready(self, i: int, idx: LayerIndex) -> None:
        # The same blob at other places of the stack (empty layers repeat in real images; a
        # hostile manifest may list one blob 10,000 times): same index.
        for j, layer in enumerate(self.layers):
            if layer.digest == self.layers[i].digest and self._ready[j] is None:
                self._ready[j] = idx
                self.stats[j].ready = True
                self.stats[j].source = self.stats[j].source or self.stats[i].source

    # -- where compressed bytes come from ---------------------------------------------------

    def hold(self, i: int, start: int, data: bytes) -> None:
        """Keep blob bytes at `start` that came with another fetch (an eStargz TOC's tail
        fetch brings the last chunks along), so that no request fetches them again. A few
        layers' worth at most (`_HELD_LAYERS` x the 64 KiB tail guess)."""
        if data:
            self._held[i] = (start, data)
            self._held.move_to_end(i)
            while len(self._held) > _HELD_LAYERS:
                self._held.popitem(last=False)

    async def fetch(self, i: int, start: int, end: int) -> bytes:
        """Blob bytes [start, end) by a Range GET (not verified: callers verify); the part
        of them held from an earlier fetch (`hold`) is not asked for again."""
        held = self._held.get(i)
        if held is not None:
            hs, data = held
            if hs < end <= hs + len(data):
                head = await self._fetch(i, start, hs) if start < hs else b""
                return head + data[max(start, hs) - hs : end - hs]
        return await self._fetch(i, start, end)

    async def _fetch(self, i: int, start: int, end: int) -> bytes:
        assert self.fetch_range is not None
        began = time.monotonic()
        async with self.net:
            with wire.for_layer(i):  # the cause is the caller's (read, read-ahead, toc, ...)
                data = await self.fetch_range(self.layers[i], start, end)
        if len(data) != end - start:
            raise IntegrityError(f"asked for {end - start} bytes at {start}, got {len(data)}")
        self.account(i, start, len(data), time.monotonic() - began)
        self._local_checked.pop(i, None)  # a fetch may have stored the whole blob: look again
        return data

    def account(self, i: int, start: int, nbytes: int, seconds: float) -> None:
        """Every fetch from the registry, counted once: layer stats, trace, telemetry."""
        self.stats[i].fetched_bytes += nbytes
        self.stats[i].fetches += 1
        telemetry.note_fetch(nbytes, seconds)
        if self.on_fetch:
            self.on_fetch(i, start, nbytes, seconds)

    def is_local(self, i: int) -> bool:
        """Whether the whole blob is in the store. A "no" is asked again at most once a
        second (a `pull --full` may land meanwhile), not on every read of a lazy layer."""
        if self._local.get(i):
            return True  # once local, always: every warm read of a pulled layer asks
        now = time.monotonic()
        if now - self._local_checked.get(i, -1.0) >= 1.0:
            self._local_checked[i] = now
            self._local[i] = self.store.blobs.has(self.layers[i].digest)
        return self._local.get(i, False)

    def mark_local(self, i: int) -> None:
        self._local[i] = True

    def _fd(self, i: int) -> int:
        with self._fds_lock:
            fd = self._fds.get(i)
        if fd is not None:
            return fd
        path = self._flat.get(i) or self.store.blobs.path(self.layers[i].digest)
        try:  # every component from the store root checked: O_NOFOLLOW guards the last
            fd = fsutil.safe_open(path.parent, path.name, os.O_RDONLY, root=self.store.root)
        except FileNotFoundError:
            self._local[i] = False
            raise ImageFSError(
                f"layer {self.layers[i].digest.short} vanished from the store"
            ) from None
        with self._fds_lock:
            kept = self._fds.setdefault(i, fd)
        if kept != fd:  # another thread opened it meanwhile: one fd per layer
            os.close(fd)
        return kept

    def _pread(self, i: int, start: int, end: int) -> bytes:
        return os.pread(self._fd(i), end - start, start)

    # -- pieces -----------------------------------------------------------------------------

    def chunk_job(self, table: chunk_tables.ChunkTable, k: int) -> Job:
        def decode(data: bytes) -> bytes:
            return table.decode(k, data)  # capped at the declared size, digest checked

        # `batch`: a request's chunks are decoded in one tight loop (`decode_many`)
        return Job(table.piece(k), table.starts[k], table.ends[k], decode, table, k)

    def _span_job(self, i: int, seek: SeekIndex, k: int) -> Job:
        local = self.is_local(i)

        def decode(data: bytes) -> bytes:
            if not local:
                verify_span(seek, k, data)  # compressed bytes from the network, first
            raw = inflate_span(seek, k, data)  # output capped at the span's length
            verify_raw_span(seek, k, raw)
            return raw

        start, end = seek.span_range(k)
        return Job(seek.piece_names[k], start, end, decode)

    async def _assemble(
        self,
        i: int,
        parts: Sequence[_Part],
        jobs: Callable[[], list[Job]],
        neighbours: Callable[[], list[Job]],
    ) -> bytes:
        """Bytes from pieces (see `_preads`), the pieces missing made first."""
        fresh: dict[str, bytes] = {}
        for _attempt in range(3):
            data = self._preads(parts, fresh)
            if data is not None:
                if not fresh:
                    telemetry.note_source("cache")
                return data
            all_jobs = jobs()
            need = [all_jobs[p[3]] for p in parts if p[0] is not None]
            fresh = await self.maker.make(i, need, neighbours)
        raise ImageFSError("cache pieces keep vanishing under this read (cache cap too small?)")

    def _preads(
        self, parts: Sequence[_Part], fresh: dict[str, bytes] | None = None
    ) -> bytes | None:
        """Bytes from pieces: `parts` are (piece name or None for zeros, offset in the
        piece, length, piece index in the caller's jobs, the piece's declared size); a piece
        is taken from `fresh` (just made) or read with a pread of its open file, on the event
        loop, only at its declared size. None when a piece is missing (or was evicted
        meanwhile): the caller makes it."""
        cache = self.pieces
        out = []
        for name, off, n, _, size in parts:
            if name is None:
                out.append(bytes(n))
            elif fresh and name in fresh:
                out.append(fresh[name][off : off + n])
            else:
                got = cache.pread(name, off, n, expect=size)
                if got is None and cache.open(name, count_miss=False):
                    # On disk but not open in this process (a new mount, or its fd fell
                    # out of the LRU): open it here. Opening checks the pack's table and
                    # the pread the blocks it touches (`PieceCache`), microseconds from
                    # the page cache, less than a worker-thread hop costs on a busy
                    # machine (milliseconds of scheduling); an absent piece is one failed
                    # openat before the maker goes to a thread.
                    got = cache.pread(name, off, n, expect=size)
                if got is None or len(got) != n:
                    return None
                out.append(got)
        return out[0] if len(out) == 1 else b"".join(out)

    # -- reading ----------------------------------------------------------------------------

    async def read(
        self, i: int, offset: int, length: int, *, read_ahead_until: int | None = None
    ) -> bytes:
        """`length` bytes of layer i's (virtual) uncompressed stream at `offset`.

        A reader that goes on where it left off gets read-ahead (`prefetch.ReadAhead`): up
        to `read_ahead_until` (the end of the file being read), or past it once the reader
        moves on through the layer's files in the order they are stored.
        """
        with wire.cause("read"):  # what a read waits for (an index load says its own cause)
            return await self._read(i, offset, length, read_ahead_until)

    def read_warm(
        self, i: int, offset: int, length: int, *, read_ahead_until: int | None = None
    ) -> bytes | None:
        """What `read` answers, if it can be had right now: the layer's index is loaded and
        the bytes are in pieces of the cache (opened and checked here on first use, as
        `read` would) or in a plain local file. None otherwise, and `read` does the rest.

        The FUSE adapter's warm path: preads and nothing else, no coroutine, no context
        variable, no thread hop (a warm read used to pay for all of them)."""
        idx = self._ready[i]
        if idx is None:
            return None
        local = self.is_local(i)
        if idx.chunks is not None:
            parts = _chunk_parts(idx.chunks, offset, length)[1]
        else:
            seek = idx.seek
            assert seek is not None
            end = min(offset + length, seek.uncompressed_size)
            if end <= offset:
                return b""
            if local:
                if seek.compression == "none" or i in self._flat:
                    return self._pread(i, offset, end)  # page cache: no thread hop
                if _flattens(seek):
                    return None  # `read` decompresses it to a file first
            parts = _span_parts(seek, offset, end)[1]
        data = self._preads(parts)
        if data is not None and not local:
            self.read_ahead.note(i, offset, length, read_ahead_until)
        return data

    async def _read(self, i: int, offset: int, length: int, read_ahead_until: int | None) -> bytes:
        idx = await self.ensure(i)
        if idx.chunks is not None:
            data = await self._read_chunks(i, idx.chunks, offset, length)
        else:
            assert idx.seek is not None
            seek = idx.seek
            end = min(offset + length, seek.uncompressed_size)
            if end <= offset:
                return b""
            if self.is_local(i):
                if seek.compression == "none" or i in self._flat:
                    telemetry.note_source("cache")
                    return self._pread(i, offset, end)  # page cache: no thread hop
                if _flattens(seek):
                    await self._flatten(i)
                    return self._pread(i, offset, end)
            data = await self._read_spans(i, seek, offset, end)
        if not self.is_local(i):
            self.read_ahead.note(i, offset, length, read_ahead_until)
        return data

    async def _read_chunks(
        self, i: int, table: chunk_tables.ChunkTable, offset: int, length: int
    ) -> bytes:
        ks, parts = _chunk_parts(table, offset, length)

        def jobs() -> list[Job]:
            return [self.chunk_job(table, k) for k in ks]

        def neighbours() -> list[Job]:
            last = ks[-1] if ks else 0
            return [
                self.chunk_job(table, k)
                for k in range(last + 1, min(len(table), last + 64))
                if not table.zeros[k]
            ]

        return await self._assemble(i, parts, jobs, neighbours)

    async def _read_spans(self, i: int, seek: SeekIndex, offset: int, end: int) -> bytes:
        ks, parts = _span_parts(seek, offset, end)

        def jobs() -> list[Job]:
            return [self._span_job(i, seek, k) for k in ks]

        return await self._assemble(i, parts, jobs, list)

    def _jobs_for(self, i: int, idx: LayerIndex, offset: int, length: int) -> list[Job]:
        if idx.chunks is not None:
            table = idx.chunks
            return [
                self.chunk_job(table, k)
                for k in table.covering(offset, length)
                if not table.zeros[k]
            ]
        seek = idx.seek
        assert seek is not None
        end = min(offset + length, seek.uncompressed_size)
        if end <= offset:
            return []
        ks = range(seek.point_for(offset), seek.point_for(end - 1) + 1)
        return [self._span_job(i, seek, k) for k in ks]

    async def prefetch(self, i: int, offset: int, length: int) -> None:
        """Bring the pieces holding [offset, offset+length) into the cache."""
        idx = await self.ensure(i)
        if self.is_local(i):
            return  # reads make pieces from the local blob as they need them
        await self.maker.make(i, self._jobs_for(i, idx, offset, length), payloads=False)

    async def fetch_everything(self) -> None:
        with wire.cause("prefetch"):
            await prefetching.fetch_everything(self)

    async def prefetch_ranges(self, plan: Sequence[tuple[int, int, int]]) -> int:
        with wire.cause("prefetch"):
            return await prefetching.prefetch_ranges(self, plan)

    async def prefetch_landmarks(self) -> None:
        with wire.cause("prefetch"):
            await prefetching.prefetch_landmarks(self)

    def stream_size(self, i: int) -> int:
        """The length of loaded layer i's (virtual) uncompressed stream."""
        idx = self.index(i)
        return idx.seek.uncompressed_size if idx.seek is not None else _virtual_size(idx)

    async def _flatten(self, i: int) -> None:
        """Decompress a single-frame zstd layer once into `ROOT/cache/flat/<hex>` (one
        flight per layer: concurrent readers wait for it)."""
        while i not in self._flat:
            flight = self._flattening.get(i)
            if flight is None:
                self._flattening[i] = flight = trio.Event()
                try:
                    await self._flatten_once(i)
                finally:
                    del self._flattening[i]
                    flight.set()
                return
            await flight.wait()  # a failed flight: the loop tries again itself

    async def _flatten_once(self, i: int) -> None:
        layer = self.layers[i]
        target = self.store.paths.flat / layer.digest.hex
        seek = self.index(i).seek
        assert seek is not None

        root = self.store.root

        def work() -> None:
            # Under the store nothing is reached through a link: the directory is opened
            # from the root without following any, the temp file is O_EXCL|O_NOFOLLOW, and
            # the rename is relative to that directory.
            with fsutil.dir_fd(target.parent, root=root, create=True) as d:
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(target.name, dir_fd=d, follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode) and st.st_size == seek.uncompressed_size:
                        return
                fd, tmp = fsutil.create_temp(d)
                try:
                    with self.store.blobs.open(layer.digest) as src, os.fdopen(fd, "wb") as dst:
                        _inflate_capped(src, dst, seek.uncompressed_size, layer.digest.short)
                    os.replace(tmp, target.name, src_dir_fd=d, dst_dir_fd=d)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp, dir_fd=d)

        await trio.to_thread.run_sync(work, limiter=self.cpu)
        with self._fds_lock:
            self._flat[i] = target
            old = self._fds.pop(i, None)
            if old is not None:
                self._retired.append(old)

    def close(self) -> None:
        with self._fds_lock:
            fds = [*self._fds.values(), *self._retired]
            self._fds.clear()
            self._retired.clear()
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pieces.close()


# Where a read's bytes lie: (piece name or None for zeros, offset in the piece, length, the
# piece's place in the read's list of pieces, the piece's declared size).
_Part = tuple[str | None, int, int, int, int]


def _chunk_parts(
    table: chunk_tables.ChunkTable, offset: int, length: int
) -> tuple[list[int], list[_Part]]:
    ks = list(table.covering(offset, length))
    parts: list[_Part] = []
    for n, k in enumerate(ks):
        voff, size = table.voffsets[k], table.sizes[k]
        lo = max(offset, voff) - voff
        hi = min(offset + length, voff + size) - voff
        parts.append((None if table.zeros[k] else table.piece(k), lo, hi - lo, n, size))
    return ks, parts


def _span_parts(seek: SeekIndex, offset: int, end: int) -> tuple[list[int], list[_Part]]:
    """The spans [offset, end) lies in, and its part in each. On every warm read of a layer
    with a seek index: the span starts and piece names are the index's, computed once."""
    starts, names = seek.span_starts, seek.piece_names
    if not starts:
        seek.point_for(offset)  # raises: an index without points
    first = bisect.bisect_right(starts, offset) - 1
    if first < 0:
        first = 0
    count, total = len(starts), seek.uncompressed_size
    s = starts[first]
    span_end = starts[first + 1] if first + 1 < count else total
    if end <= span_end and offset >= s:  # within one span: nearly every read
        return [first], [(names[first], offset - s, end - offset, 0, span_end - s)]
    last = max(0, bisect.bisect_right(starts, end - 1) - 1)
    ks = list(range(first, last + 1))
    parts: list[_Part] = []
    for n, k in enumerate(ks):
        s = starts[k]
        span_end = starts[k + 1] if k + 1 < count else total
        lo = max(offset, s) - s
        parts.append((names[k], lo, min(end, span_end) - s - lo, n, span_end - s))
    return ks, parts


def _flattens(seek: SeekIndex) -> bool:
    """A single-frame zstd layer, too big to inflate per read: decompressed once to a file."""
    return (
        seek.compression == "zstd"
        and len(seek.points) == 1
        and seek.uncompressed_size > ZSTD_FLAT_THRESHOLD
    )


def _inflate_capped(src: BinaryIO, dst: BinaryIO, size: int, name: str) -> None:
    """Inflate a zstd stream into `dst`, refusing it as soon as it passes `size` bytes (the
    index's word): a bomb never fills the disk. Short is refused as well."""
    written = 0
    with zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=True) as r:
        while piece := r.read(min(1 << 20, size + 1 - written)):
            written += len(piece)
            if written > size:
                raise LayerFormatError(f"layer {name}: inflates beyond its {size} bytes")
            dst.write(piece)
    if written != size:
        raise LayerFormatError(f"layer {name}: inflates to {written} bytes, not {size}")


def _virtual_size(idx: LayerIndex) -> int:
    table = idx.chunks
    if table is None or not len(table):
        return 0
    return int(table.voffsets[-1] + table.sizes[-1])
