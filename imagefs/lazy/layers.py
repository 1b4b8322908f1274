"""The layers of one mounted image, made available on first need.

`LayerSet.ensure(i)` makes layer i's index available: from the index store if some earlier
mount built it, else by fetching the blob (verified against its digest, kept in the store)
and indexing it once. Concurrent callers share one attempt (single flight); a failed attempt
leaves nothing behind, so the next access simply tries again.

`LayerSet.read(i, offset, length)` serves bytes of layer i's tar stream from the compressed
blob through the seek points, never from an extracted tree. Inflated spans are kept in a small
LRU so that sequential reads of a file inflate each span once; single-frame zstd layers (no
seek points inside) are decompressed once into a cache file, as the design allows.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio
import zstandard

from imagefs.errors import ImageFSError, LayerFormatError
from imagefs.image import Layer
from imagefs.layers.index import IndexStore, LayerIndex, build_from_blob
from imagefs.layers.seekindex import read_at
from imagefs.oci import mediatypes
from imagefs.store import Store, fsutil

log = logging.getLogger("imagefs.lazy")

FetchBlob = Callable[[Layer], Awaitable[None]]

SPAN_CACHE_BYTES = 48 << 20
# A single-frame zstd layer bigger than this gets decompressed to a cache file once.
ZSTD_FLAT_THRESHOLD = 8 << 20


@dataclass
class _Span:
    data: bytes
    complete: bool


@dataclass
class LayerStats:
    fetched_bytes: int = 0
    index_built: bool = False
    ready: bool = False


@dataclass
class LayerSet:
    store: Store
    layers: list[Layer]
    fetch_blob: FetchBlob
    cpu: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(2))
    span_cache_bytes: int = SPAN_CACHE_BYTES

    def __post_init__(self) -> None:
        self.indexes = IndexStore(self.store.root)
        self._ready: list[LayerIndex | None] = [None] * len(self.layers)
        self._inflight: dict[int, trio.Event] = {}
        self._spans: OrderedDict[tuple[int, int], _Span] = OrderedDict()
        self._span_bytes = 0
        self._span_inflight: dict[tuple[int, int], trio.Event] = {}
        self._flat: dict[int, Path] = {}
        self._fds: dict[int, int] = {}
        self.stats = [LayerStats() for _ in self.layers]

    # -- making layers available ------------------------------------------------------------

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
                if self._ready[i] is None:  # that attempt failed; ours reports our error
                    continue
                continue
            event = self._inflight[i] = trio.Event()
            try:
                self._ready[i] = await self._load(i)
            finally:
                del self._inflight[i]
                event.set()

    async def _load(self, i: int) -> LayerIndex:
        layer = self.layers[i]
        idx = await trio.to_thread.run_sync(self.indexes.load, layer.digest)
        if idx is not None:
            log.info("layer %d (%s): index loaded from the store", i, layer.digest.short)
        else:
            if not self.store.blobs.has(layer.digest):
                log.info("layer %d (%s): fetching %d bytes", i, layer.digest.short, layer.size)
                await self.fetch_blob(layer)
                self.stats[i].fetched_bytes += layer.size
            compression = mediatypes.layer_compression(layer.descriptor.media_type)
            blob = self.store.blobs.path(layer.digest)
            idx = await trio.to_thread.run_sync(
                build_from_blob, blob, layer.digest, compression, limiter=self.cpu
            )
            await trio.to_thread.run_sync(self.indexes.save, idx)
            self.stats[i].index_built = True
            for w in idx.warnings:
                log.warning("layer %d (%s): %s", i, layer.digest.short, w)
            log.info("layer %d (%s): indexed, %d entries", i, layer.digest.short, len(idx.toc))
        self.stats[i].ready = True
        return idx

    # -- reading ----------------------------------------------------------------------------

    def _fd(self, i: int) -> int:
        fd = self._fds.get(i)
        if fd is None:
            path = self._flat.get(i) or self.store.blobs.path(self.layers[i].digest)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise ImageFSError(
                    f"layer {self.layers[i].digest.short} vanished from the store"
                ) from None
            self._fds[i] = fd
        return fd

    def _pread(self, i: int, start: int, end: int) -> bytes:
        return os.pread(self._fd(i), end - start, start)

    async def read(self, i: int, offset: int, length: int) -> bytes:
        """`length` bytes of layer i's uncompressed tar stream at `offset`."""
        idx = await self.ensure(i)
        seek = idx.seek
        end = min(offset + length, seek.uncompressed_size)
        if end <= offset:
            return b""
        if seek.compression == "none" or i in self._flat:
            return await trio.to_thread.run_sync(self._pread, i, offset, end)
        if (
            seek.compression == "zstd"
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
            # Big reads are sequential reads: inflate the whole span once for the next ones.
            whole = length >= 64 * 1024
            data = await self._span(i, k, want_end - span_start, whole)
            out.append(data[pos - span_start : want_end - span_start])
            pos = want_end
        return b"".join(out)

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
            start = seek.points[k].uncompressed
            span_len = seek.span_uncompressed_end(k) - start
            # A second read further into a span it already partly inflated: take all of it.
            complete = whole or cached is not None or need >= span_len
            n = span_len if complete else need
            data = await trio.to_thread.run_sync(
                read_at, seek, lambda a, b: self._pread(i, a, b), start, n, limiter=self.cpu
            )
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
        idx = self.index(i)

        def work() -> None:
            if target.exists() and target.stat().st_size == idx.seek.uncompressed_size:
                return
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{fsutil.TEMP_PREFIX}{layer.digest.hex}.{os.getpid()}")
            try:
                with open(self.store.blobs.path(layer.digest), "rb") as src, open(tmp, "wb") as dst:
                    zstandard.ZstdDecompressor().copy_stream(src, dst)
                    dst.flush()
                    os.fsync(dst.fileno())
                if tmp.stat().st_size != idx.seek.uncompressed_size:
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
