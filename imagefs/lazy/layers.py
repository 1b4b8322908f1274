"""The layers of one mounted image: tables of contents on first need, bytes by ranges.

`LayerSet.ensure(i)` makes layer i's index (TOC + how to reach file bytes) available, cheapest
source first:

1. the index store (`ROOT/indexes`), where an earlier mount or `imagefs index` left it;
2. eStargz: the footer and TOC fetched by ranges, verified against the layer's
   `containerd.io/snapshot/stargz/toc.digest` annotation;
3. zstd:chunked: the TOC frame located and verified by the layer's annotations;
4. an imagefs layer index published in the registry next to the image (`remote_index`);
5. otherwise the whole blob, fetched once (verified against its digest) and indexed.

`LayerSet.read(i, offset, length)` serves bytes of a layer from, in order: the whole blob if
it is in the store; verified pieces in the chunk cache; otherwise Range GETs of just the
pieces needed (gzip spans or eStargz/zstd:chunked chunks), each verified — span sha256 from
the index, chunk sha256 from the TOC — before it is cached or served. Concurrent needs of one
piece cause one fetch (single flight); fetches run in parallel up to a limit; a sequential
reader gets read-ahead. Inflated spans are kept in a small LRU so sequential reads inflate
each span once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio
import zstandard

from imagefs.errors import ImageFSError, IntegrityError, LayerFormatError, unwrap_groups
from imagefs.image import Layer
from imagefs.layers import chunks as chunk_tables
from imagefs.layers import estargz, zstdchunked
from imagefs.layers.index import IndexStore, LayerIndex, build_from_blob
from imagefs.layers.seekindex import SeekIndex, read_at, verify_span
from imagefs.lazy import telemetry
from imagefs.lazy.cache import ChunkCache
from imagefs.oci import mediatypes
from imagefs.store import Store, fsutil

log = logging.getLogger("imagefs.lazy")

FetchBlob = Callable[[Layer], Awaitable[None]]
FetchRange = Callable[[Layer, int, int], Awaitable[bytes]]
RemoteIndex = Callable[[Layer], Awaitable[LayerIndex | None]]

ESTARGZ_TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
SPAN_CACHE_BYTES = 24 << 20  # inflated spans kept in memory (the RSS budget is ~150 MB)
ZSTD_FLAT_THRESHOLD = 8 << 20  # single-frame zstd bigger than this: decompress once to a file
TAIL_FETCH = 64 << 10  # first guess at footer + TOC size for eStargz
# Chunks smaller than this are fetched together with their neighbours in one request: a round
# trip costs far more than the few extra KiB (see docs/bench.md for the measurement).
MIN_FETCH = 256 << 10
READ_AHEAD = 4 << 20


class _Gone(Exception):
    """A cache piece disappeared between checking for it and reading it."""


@dataclass
class _Span:
    data: bytes
    complete: bool


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
    cache: ChunkCache | None = None
    cpu: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(2))
    net: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(8))
    span_cache_bytes: int = SPAN_CACHE_BYTES
    min_fetch: int = MIN_FETCH
    nursery: trio.Nursery | None = None
    on_fetch: Callable[[int, int, int, float], None] | None = None  # layer, start, n, seconds

    def __post_init__(self) -> None:
        self.indexes = IndexStore(self.store.root)
        if self.cache is None:
            self.cache = ChunkCache(self.store.root)
        self._ready: list[LayerIndex | None] = [None] * len(self.layers)
        self._inflight: dict[int, trio.Event] = {}
        self._spans: OrderedDict[tuple[int, int], _Span] = OrderedDict()
        self._span_bytes = 0
        self._span_inflight: dict[tuple[int, int], trio.Event] = {}
        self._unit_inflight: dict[tuple[int, int], trio.Event] = {}
        self._flat: dict[int, Path] = {}
        self._fds: dict[int, int] = {}
        self._local: dict[int, bool] = {}
        self._local_checked: dict[int, float] = {}
        self._last_end: dict[int, int] = {}
        self.stats = [LayerStats() for _ in self.layers]
        # Background fetches (prefetch profiles, landmarks, --background-fetch) take at most
        # 2 of the 8 network slots, so on-demand reads always find room; 2 rather than 1
        # because one piece at a time pays a full round trip per piece on a WAN.
        self._background = trio.CapacityLimiter(2)
        self._verifier_maps: dict[int, dict[tuple[int, int], int]] = {}

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
                idx = await self._load(i)
                # The same blob at other places of the stack (empty layers repeat in real
                # images; a hostile manifest may list one blob 10,000 times): same index.
                for j, layer in enumerate(self.layers):
                    if layer.digest == self.layers[i].digest and self._ready[j] is None:
                        self._ready[j] = idx
                        self.stats[j].ready = True
                        self.stats[j].source = self.stats[j].source or self.stats[i].source
            finally:
                del self._inflight[i]
                event.set()

    async def _load(self, i: int) -> LayerIndex:
        layer = self.layers[i]
        idx = await trio.to_thread.run_sync(self.indexes.load, layer.digest)
        if idx is not None:
            self.stats[i].source = "index store"
            return idx
        idx = await self._load_lazy_format(i)
        if idx is None and self.remote_index is not None and not self._is_local(i):
            try:
                idx = await self.remote_index(layer)
            except ImageFSError as exc:
                log.warning("layer %d: no usable index in the registry (%s)", i, exc)
            if idx is not None:
                self.stats[i].source = "registry index"
        if idx is None:
            idx = await self._index_whole_blob(i)
        await trio.to_thread.run_sync(self.indexes.save, idx)
        for w in idx.warnings:
            log.warning("layer %d (%s): %s", i, layer.digest.short, w)
        log.info(
            "layer %d (%s): %d entries (%s)",
            i,
            layer.digest.short,
            len(idx.toc),
            self.stats[i].source,
        )
        return idx

    async def _load_lazy_format(self, i: int) -> LayerIndex | None:
        """eStargz or zstd:chunked: the TOC by ranges, verified by a manifest annotation."""
        layer = self.layers[i]
        ann = layer.descriptor.annotations
        if self.fetch_range is None or self._is_local(i):
            return None
        try:
            if ESTARGZ_TOC_DIGEST in ann:
                idx = await self._load_estargz(i, ann[ESTARGZ_TOC_DIGEST])
                self.stats[i].source = "eStargz TOC"
                return idx
            position = zstdchunked.position_from_annotations(ann)
            if position is not None:
                idx = await self._load_zstd_chunked(i, *position)
                self.stats[i].source = "zstd:chunked TOC"
                return idx
        except (LayerFormatError, IntegrityError) as exc:
            log.warning(
                "layer %d (%s): lazy TOC unusable (%s); fetching the whole layer",
                i,
                layer.digest.short,
                exc,
            )
        return None

    async def _fetch(self, i: int, start: int, end: int) -> bytes:
        assert self.fetch_range is not None
        began = time.monotonic()
        async with self.net:
            data = await self.fetch_range(self.layers[i], start, end)
        if len(data) != end - start:
            raise IntegrityError(f"asked for {end - start} bytes at {start}, got {len(data)}")
        self._account(i, start, len(data), time.monotonic() - began)
        self._local_checked.pop(i, None)  # a fetch may have stored the whole blob: look again
        return data

    def _account(self, i: int, start: int, nbytes: int, seconds: float) -> None:
        """Every fetch from the registry, counted once: layer stats, trace, telemetry."""
        self.stats[i].fetched_bytes += nbytes
        self.stats[i].fetches += 1
        telemetry.note_fetch(nbytes, seconds)
        if self.on_fetch:
            self.on_fetch(i, start, nbytes, seconds)

    async def _load_estargz(self, i: int, toc_digest: str) -> LayerIndex:
        layer = self.layers[i]
        size = layer.size
        tail_start = max(0, size - TAIL_FETCH)
        tail = await self._fetch(i, tail_start, size)
        toc_offset = estargz.parse_footer(tail)
        footer = estargz.footer_size(tail)
        if not 0 <= toc_offset < size - footer:
            raise LayerFormatError(f"eStargz footer points outside the blob ({toc_offset})")
        if toc_offset >= tail_start:
            member = tail[toc_offset - tail_start : len(tail) - footer]
        else:
            member = await self._fetch(i, toc_offset, size - footer)

        def build() -> LayerIndex:
            toc_json = estargz.toc_json_from_member(member)
            toc = estargz.parse_toc(toc_json, expected_digest=toc_digest)
            t, table, warnings = chunk_tables.from_estargz(toc, toc_offset)
            return LayerIndex(layer.digest, t, chunks=table, warnings=tuple(warnings))

        return await trio.to_thread.run_sync(build, limiter=self.cpu)

    async def _load_zstd_chunked(
        self, i: int, position: zstdchunked.ManifestPosition, checksum: str
    ) -> LayerIndex:
        layer = self.layers[i]
        end = position.offset + position.length
        if position.length <= 0 or end > layer.size:
            raise LayerFormatError("zstd:chunked TOC position outside the blob")
        compressed = await self._fetch(i, position.offset, end)

        def build() -> LayerIndex:
            toc = zstdchunked.decode_manifest(compressed, position, expected_checksum=checksum)
            t, table, warnings = chunk_tables.from_zstd_chunked(toc)
            return LayerIndex(layer.digest, t, chunks=table, warnings=tuple(warnings))

        return await trio.to_thread.run_sync(build, limiter=self.cpu)

    async def _index_whole_blob(self, i: int) -> LayerIndex:
        layer = self.layers[i]
        if not self._is_local(i):
            log.info(
                "layer %d (%s): fetching the whole blob, %d bytes",
                i,
                layer.digest.short,
                layer.size,
            )
            began = time.monotonic()
            await self.fetch_blob(layer)
            self._account(i, 0, layer.size, time.monotonic() - began)
            self._local[i] = True
        compression = mediatypes.layer_compression(layer.descriptor.media_type)
        blob = self.store.blobs.path(layer.digest)
        self.stats[i].source = "built from the blob"
        is_estargz = ESTARGZ_TOC_DIGEST in layer.descriptor.annotations
        return await trio.to_thread.run_sync(
            functools.partial(build_from_blob, blob, layer.digest, compression, estargz=is_estargz),
            limiter=self.cpu,
        )

    # -- where compressed bytes come from ---------------------------------------------------

    def _is_local(self, i: int) -> bool:
        """Whether the whole blob is in the store. A "no" is asked again at most once a
        second (a `pull --full` may land meanwhile), not on every read of a lazy layer."""
        if not self._local.get(i):
            now = time.monotonic()
            if now - self._local_checked.get(i, -1.0) >= 1.0:
                self._local_checked[i] = now
                self._local[i] = self.store.blobs.has(self.layers[i].digest)
        return self._local.get(i, False)

    def _fd(self, i: int) -> int:
        fd = self._fds.get(i)
        if fd is None:
            path = self._flat.get(i) or self.store.blobs.path(self.layers[i].digest)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                self._local[i] = False
                raise ImageFSError(
                    f"layer {self.layers[i].digest.short} vanished from the store"
                ) from None
            self._fds[i] = fd
        return fd

    def _pread(self, i: int, start: int, end: int) -> bytes:
        telemetry.note_source("cache")
        return os.pread(self._fd(i), end - start, start)

    def _reader(self, i: int, fresh: dict[int, bytes]) -> Callable[[int, int], bytes]:
        """Compressed bytes [a, b): from pieces this read just fetched, else the cache.

        Just-fetched pieces are handed over in memory because a small cache cap may evict
        them again at once; a piece evicted (here or by another process) between the check
        and the read raises `_Gone`, and the caller fetches again.
        """
        assert self.cache is not None
        cache = self.cache
        digest = self.layers[i].digest

        def read(a: int, b: int) -> bytes:
            for start, data in fresh.items():
                if start <= a and b <= start + len(data):
                    return data[a - start : b - start]
            got = cache.read(digest, a, b)
            if got is None:
                raise _Gone(a, b)
            telemetry.note_source("cache")
            return got

        return read

    async def _ensure_units(
        self,
        i: int,
        units: Sequence[tuple[int, int]],
        verify: Callable[[int, int, bytes], None],
        neighbours: Sequence[tuple[int, int]] = (),
    ) -> dict[int, bytes]:
        """Make the verified compressed ranges `units` present; returns what this call fetched
        (run start -> bytes), everything else is in the chunk cache."""
        assert self.cache is not None
        digest = self.layers[i].digest
        fresh: dict[int, bytes] = {}
        cache = self.cache

        def absent(pieces: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
            return [u for u in pieces if cache.covering(digest, *u) is None]

        while True:
            # Neighbours come along only if not cached: checked here, before the in-flight
            # check below, so that no await separates that check from registering our fetches.
            missing, company = await trio.to_thread.run_sync(
                lambda: (absent(units), absent(neighbours))
            )
            if not missing:
                return fresh
            waiting = [
                self._unit_inflight[(i, u[0])] for u in missing if (i, u[0]) in self._unit_inflight
            ]
            if waiting:
                await waiting[0].wait()
                continue
            break
        company = [n for n in company if (i, n[0]) not in self._unit_inflight]
        plan = _plan(missing, company, self.min_fetch)
        events = {u: trio.Event() for group in plan for u in group}
        for u, ev in events.items():
            self._unit_inflight[(i, u[0])] = ev
        try:
            with unwrap_groups():
                async with trio.open_nursery() as nursery:
                    for group in plan:
                        nursery.start_soon(self._fetch_group, i, group, verify, fresh)
        finally:
            for u, ev in events.items():
                self._unit_inflight.pop((i, u[0]), None)
                ev.set()
        return fresh

    async def _fetch_group(
        self,
        i: int,
        group: list[tuple[int, int]],
        verify: Callable[[int, int, bytes], None],
        fresh: dict[int, bytes],
    ) -> None:
        assert self.cache is not None
        start, end = group[0][0], max(e for _, e in group)
        data = await self._fetch(i, start, end)

        def check_and_keep() -> None:
            for s, e in group:
                verify(s, e, data[s - start : e - start])
            # Keep only verified bytes: runs of pieces that touch, never the gaps between.
            for run_start, run_end in _runs(group):
                run = data[run_start - start : run_end - start]
                fresh[run_start] = run
                self.cache.put(self.layers[i].digest, run_start, run)  # type: ignore[union-attr]

        try:
            await trio.to_thread.run_sync(check_and_keep, limiter=self.cpu)
        except (IntegrityError, LayerFormatError) as exc:
            log.error(
                "layer %d (%s): bytes %d-%d from the registry failed verification (%s);"
                " not served, not kept",
                i,
                self.layers[i].digest.short,
                start,
                end,
                exc,
            )
            raise IntegrityError(str(exc)) from None

    # -- reading ----------------------------------------------------------------------------

    async def read(
        self, i: int, offset: int, length: int, *, read_ahead_until: int | None = None
    ) -> bytes:
        """`length` bytes of layer i's (virtual) uncompressed stream at `offset`.

        A read that continues the previous one is sequential: the pieces of the next
        `READ_AHEAD` bytes are fetched in the background, up to `read_ahead_until` (the end
        of the file being read, so that read-ahead does not run into the next file).
        """
        idx = await self.ensure(i)
        sequential = self._last_end.get(i) == offset
        self._last_end[i] = offset + length
        ahead = READ_AHEAD
        if read_ahead_until is not None:
            ahead = min(ahead, read_ahead_until - (offset + length))
        if idx.chunks is not None:
            data = await self._read_chunks(i, idx.chunks, offset, length)
            if sequential and ahead > 0:
                self._read_ahead(i, offset + length, ahead)
            return data
        assert idx.seek is not None
        seek = idx.seek
        end = min(offset + length, seek.uncompressed_size)
        if end <= offset:
            return b""
        local = self._is_local(i)
        if local and (seek.compression == "none" or i in self._flat):
            return await trio.to_thread.run_sync(self._pread, i, offset, end)
        if (
            local
            and seek.compression == "zstd"
            and len(seek.points) == 1
            and (seek.uncompressed_size > ZSTD_FLAT_THRESHOLD)
        ):
            await self._flatten(i)
            return await trio.to_thread.run_sync(self._pread, i, offset, end)
        out = []
        pos = offset
        while pos < end:
            k = seek.point_for(pos)
            span_start = seek.points[k].uncompressed
            span_end = seek.span_uncompressed_end(k)
            want_end = min(end, span_end)
            whole = length >= 64 * 1024  # big reads are sequential reads: inflate it all
            data = await self._span(i, k, want_end - span_start, whole)
            out.append(data[pos - span_start : want_end - span_start])
            pos = want_end
        if sequential and not local and ahead > 0:
            self._read_ahead(i, end, ahead)
        return b"".join(out)

    def _read_ahead(self, i: int, offset: int, length: int) -> None:
        if self.nursery is None:
            return

        async def prefetch() -> None:
            telemetry.current.set(None)  # read-ahead is nobody's read in a trace
            with contextlib.suppress(ImageFSError):
                await self.prefetch(i, offset, length)

        self.nursery.start_soon(prefetch)

    async def prefetch(self, i: int, offset: int, length: int) -> None:
        """Bring the pieces holding [offset, offset+length) into the cache; no decoding."""
        idx = await self.ensure(i)
        if self._is_local(i):
            return
        if idx.chunks is not None:
            table = idx.chunks
            ks = table.covering(offset, length)
            units = [(table.starts[k], table.ends[k]) for k in ks if not table.zeros[k]]
            await self._ensure_units(i, units, self._chunk_verifier(i, table))
        elif idx.seek is not None:
            seek = idx.seek
            end = min(offset + length, seek.uncompressed_size)
            if end <= offset:
                return
            ks = range(seek.point_for(offset), seek.point_for(end - 1) + 1)
            await self._ensure_units(i, [seek.span_range(k) for k in ks], self._span_verifier(seek))

    async def fetch_everything(self) -> None:
        """Make the whole image local, a piece at a time, one fetch at a time, so that
        on-demand reads (which may run several fetches at once) always get ahead."""
        for i, layer in enumerate(self.layers):
            try:
                idx = await self.ensure(i)
                size = idx.seek.uncompressed_size if idx.seek is not None else _virtual_size(idx)
                for offset in range(0, size, READ_AHEAD):
                    async with self._background:
                        await self.prefetch(i, offset, READ_AHEAD)
            except ImageFSError as exc:
                log.warning("background fetch of layer %d (%s): %s", i, layer.digest.short, exc)
        log.info("background fetch finished")

    async def prefetch_ranges(self, plan: Sequence[tuple[int, int, int]]) -> int:
        """Fetch (layer, stream offset, length) ranges in order, in the background.

        Through the background limiter (first come, first served, so the order of the plan
        is kept): on-demand reads always find network slots free. Returns the ranges done.
        """
        done = 0

        async def one(i: int, offset: int, length: int) -> None:
            nonlocal done
            try:
                async with self._background:
                    await self.prefetch(i, offset, length)
                done += 1
            except ImageFSError as exc:
                log.warning("prefetch of layer %d at %d: %s", i, offset, exc)

        async with trio.open_nursery() as nursery:
            for i, offset, length in plan:
                if 0 <= i < len(self.layers):
                    nursery.start_soon(one, i, offset, length)
                    await trio.lowlevel.checkpoint()  # tasks queue on the limiter in order
        return done

    async def prefetch_landmarks(self) -> None:
        """eStargz: fetch the chunks stored before `.prefetch.landmark`, as the image's
        builder asked. Costs the TOC of each eStargz layer up front."""
        for i, layer in enumerate(self.layers):
            if ESTARGZ_TOC_DIGEST not in layer.descriptor.annotations or self._is_local(i):
                continue
            try:
                async with self._background:
                    idx = await self.ensure(i)
                table = idx.chunks
                if table is None or not table.prefetch_until:
                    continue
                ks = [
                    k
                    for k in range(len(table))
                    if table.starts[k] < table.prefetch_until and not table.zeros[k]
                ]
                units = [(table.starts[k], table.ends[k]) for k in ks]
                async with self._background:
                    await self._ensure_units(i, units, self._chunk_verifier(i, table))
                log.info("layer %d: prefetched %d chunks before the landmark", i, len(units))
            except ImageFSError as exc:
                log.warning("landmark prefetch of layer %d: %s", i, exc)

    def _span_verifier(self, seek: SeekIndex) -> Callable[[int, int, bytes], None]:
        by_start = self._verifier_maps.get(id(seek))
        if by_start is None:  # built once per index: a layer may have thousands of pieces
            by_start = {seek.span_range(k): k for k in range(len(seek.points))}
            self._verifier_maps[id(seek)] = by_start
        pieces = by_start

        def verify(start: int, end: int, data: bytes) -> None:
            verify_span(seek, pieces[(start, end)], data)

        return verify

    def _chunk_verifier(
        self, i: int, table: chunk_tables.ChunkTable
    ) -> Callable[[int, int, bytes], None]:
        by_start = self._verifier_maps.get(id(table))
        if by_start is None:
            by_start = {}
            for k in range(len(table)):
                by_start.setdefault((table.starts[k], table.ends[k]), k)
            self._verifier_maps[id(table)] = by_start
        pieces = by_start

        def verify(start: int, end: int, data: bytes) -> None:
            k = pieces.get((start, end))
            if k is not None:
                table.decode(k, data)

        return verify

    async def _read_chunks(
        self, i: int, table: chunk_tables.ChunkTable, offset: int, length: int
    ) -> bytes:
        ks = list(table.covering(offset, length))
        # Inflated chunks live in the same LRU as inflated spans (keys (i, -1 - k)), so that
        # a file read in 128 KiB pieces inflates each of its multi-MiB chunks once.
        raws: dict[int, bytes] = {}
        for k in ks:
            hit = self._spans.get((i, -1 - k))
            if hit is not None:
                self._spans.move_to_end((i, -1 - k))
                raws[k] = hit.data
            elif table.zeros[k]:
                raws[k] = bytes(table.sizes[k])
        need = [k for k in ks if k not in raws]
        if need:
            raws.update(await self._decode_chunks(i, table, need))
        out = []
        for k in ks:
            voff, size = table.voffsets[k], table.sizes[k]
            lo = max(offset, voff) - voff
            hi = min(offset + length, voff + size) - voff
            out.append(raws[k][lo:hi])
        return b"".join(out)

    async def _decode_chunks(
        self, i: int, table: chunk_tables.ChunkTable, ks: list[int]
    ) -> dict[int, bytes]:
        units = [(table.starts[k], table.ends[k]) for k in ks]
        local = self._is_local(i)
        last = ks[-1]
        neighbours = [
            (table.starts[k], table.ends[k])
            for k in range(last + 1, min(len(table), last + 64))
            if not table.zeros[k]
        ]
        for _attempt in range(3):
            if local:
                reader: Callable[[int, int], bytes] = lambda a, b: self._pread(i, a, b)  # noqa: E731
            else:
                fresh = await self._ensure_units(
                    i, units, self._chunk_verifier(i, table), neighbours
                )
                reader = self._reader(i, fresh)

            def decode(reader: Callable[[int, int], bytes] = reader) -> dict[int, bytes]:
                return {k: table.decode(k, reader(table.starts[k], table.ends[k])) for k in ks}

            try:
                got = await trio.to_thread.run_sync(decode, limiter=self.cpu)
            except _Gone:
                continue
            for k, raw in got.items():
                self._remember((i, -1 - k), _Span(raw, True))
            return got
        raise ImageFSError("cache pieces keep vanishing under this read (cache cap too small?)")

    async def _span(self, i: int, k: int, need: int, whole: bool) -> bytes:
        key = (i, k)
        while True:
            cached = self._spans.get(key)
            if cached is not None and (cached.complete or len(cached.data) >= need):
                self._spans.move_to_end(key)
                return cached.data
            event = self._span_inflight.get(key)
            if event is None:
                break
            await event.wait()
        event = self._span_inflight[key] = trio.Event()
        try:
            seek = self.index(i).seek
            assert seek is not None
            start = seek.points[k].uncompressed
            span_len = seek.span_uncompressed_end(k) - start
            complete = whole or cached is not None or need >= span_len
            n = span_len if complete else need
            data = b""
            for _attempt in range(3):
                if self._is_local(i):
                    reader: Callable[[int, int], bytes] = lambda a, b: self._pread(i, a, b)  # noqa: E731
                    verify = False
                else:
                    fresh = await self._ensure_units(
                        i, [seek.span_range(k)], self._span_verifier(seek)
                    )
                    reader = self._reader(i, fresh)
                    verify = True
                try:
                    data = await trio.to_thread.run_sync(
                        functools.partial(read_at, seek, reader, start, n, verify=verify),
                        limiter=self.cpu,
                    )
                    break
                except _Gone:
                    continue
            else:
                raise ImageFSError("cache pieces keep vanishing under this read")
            self._remember(key, _Span(data, complete or len(data) >= span_len))
            return data
        finally:
            del self._span_inflight[key]
            event.set()

    def _remember(self, key: tuple[int, int], span: _Span) -> None:
        old = self._spans.pop(key, None)
        if old is not None:
            self._span_bytes -= len(old.data)
        self._spans[key] = span
        self._span_bytes += len(span.data)
        while self._span_bytes > self.span_cache_bytes and len(self._spans) > 1:
            _, dropped = self._spans.popitem(last=False)
            self._span_bytes -= len(dropped.data)

    async def _flatten(self, i: int) -> None:
        """Decompress a single-frame zstd layer once into `ROOT/cache/flat/<hex>`."""
        if i in self._flat:
            return
        layer = self.layers[i]
        target = self.store.root / "cache" / "flat" / layer.digest.hex
        seek = self.index(i).seek
        assert seek is not None

        def work() -> None:
            if target.exists() and target.stat().st_size == seek.uncompressed_size:
                return
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{fsutil.TEMP_PREFIX}{layer.digest.hex}.{os.getpid()}")
            try:
                with open(self.store.blobs.path(layer.digest), "rb") as src, open(tmp, "wb") as dst:
                    zstandard.ZstdDecompressor().copy_stream(src, dst)
                if tmp.stat().st_size != seek.uncompressed_size:
                    raise LayerFormatError(f"layer {layer.digest.short}: zstd size mismatch")
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)

        await trio.to_thread.run_sync(work, limiter=self.cpu)
        old = self._fds.pop(i, None)
        if old is not None:
            os.close(old)
        self._flat[i] = target

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


def _plan(
    missing: Sequence[tuple[int, int]], neighbours: Sequence[tuple[int, int]], min_fetch: int
) -> list[list[tuple[int, int]]]:
    """Group missing pieces into Range requests.

    Pieces that touch or nearly touch are fetched together; a request smaller than
    `min_fetch` takes the following neighbour pieces along (speculatively: files next to
    each other in a layer tend to be read together).
    """
    units = sorted(set(missing))
    groups: list[list[tuple[int, int]]] = []
    for u in units:
        if groups and u[0] - max(e for _, e in groups[-1]) <= min_fetch // 4:
            groups[-1].append(u)
        else:
            groups.append([u])
    if groups and neighbours:
        last = groups[-1]
        for n in neighbours:
            size = max(e for _, e in last) - last[0][0]
            if size >= min_fetch or n[0] < max(e for _, e in last):
                break
            if n[0] - max(e for _, e in last) > min_fetch // 4:
                break
            last.append(n)
    return groups


def _runs(units: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge pieces that touch or overlap into contiguous runs."""
    runs: list[tuple[int, int]] = []
    for s, e in sorted(units):
        if runs and s <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(runs[-1][1], e))
        else:
            runs.append((s, e))
    return runs


def _virtual_size(idx: LayerIndex) -> int:
    table = idx.chunks
    if table is None or not len(table):
        return 0
    return int(table.voffsets[-1] + table.sizes[-1])
