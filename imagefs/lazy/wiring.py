"""How a stored image's layers are made lazily available: store, registry, cache, indexes."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable

import trio

from imagefs.errors import ImageFSError, IntegrityError
from imagefs.lazy.cache import DEFAULT_CACHE_SIZE, PieceCache
from imagefs.lazy.layers import LayerSet
from imagefs.lazy.memory import keep_big_buffers_unmapped
from imagefs.oci.digest import Digest
from imagefs.oci.image import Layer
from imagefs.oci.reference import Reference
from imagefs.session import Session, fetch_blob, keep_whole_blob
from imagefs.store import ImageRecord, Store, fsutil
from imagefs.store.layerindexes import LayerIndexStore


def lazy_layer_set(
    session: Session,
    record: ImageRecord,
    layers: list[Layer],
    *,
    cache_size: int = DEFAULT_CACHE_SIZE,
    on_fetch: Callable[[int, int, int, float], None] | None = None,
    trust_published_index: bool = False,
) -> LayerSet:
    """The `LayerSet` of a stored image, wired exactly as `imagefs mount` wires it.

    One function for the daemon and for `imagefs ls`/`cat`: a browse must fetch the same
    pieces, through the same cache and index store, as a mount would.

    `trust_published_index` (`--trust-published-index`): use an imagefs index found through
    the manifest's referrers (or its `sha256-<hex>` tag). Off by default: the referrers list
    is not part of the manifest chain, so whoever can push to the repository (or runs a
    pull-through mirror) can attach an index whose names, modes, owners and offsets are
    served over genuine layer bytes. Without it a plain layer is indexed from its verified
    blob, and eStargz/zstd:chunked layers use the TOC their own manifest annotates.
    """
    keep_big_buffers_unmapped()  # the process reads layers: keep freed buffers out of RSS
    store = session.store
    source = record.source

    def no_source(layer: Layer) -> ImageFSError:
        return ImageFSError(
            f"layer {layer.digest.short} is not local and the image has no known source registry"
        )

    async def fetch(layer: Layer) -> None:
        if source is None:
            raise no_source(layer)
        await fetch_blob(session, session.client(source), source.repository, layer.descriptor)

    # The first range of a blob goes alone: if the answer is the whole blob (a registry that
    # ignores Range, a pull-through mirror that has not cached it yet), it is stored, and
    # every range of it from then on is read from the store, never fetched a second time.
    first_answer: dict[Digest, trio.Event] = {}
    kept: set[Digest] = set()

    async def fetch_range(layer: Layer, start: int, end: int) -> bytes:
        if source is None:
            raise no_source(layer)
        gate = first_answer.get(layer.digest)
        if gate is None:
            first_answer[layer.digest] = gate = trio.Event()
            try:
                return await fetch_or_keep(source, layer, start, end)
            finally:
                gate.set()
        await gate.wait()
        return await fetch_or_keep(source, layer, start, end)

    async def fetch_or_keep(source: Reference, layer: Layer, start: int, end: int) -> bytes:
        if layer.digest in kept:  # an earlier answer was the whole blob
            stored: bytes = await session.disk(_read_stored, store, layer.digest, start, end)
            return stored
        began = time.monotonic()

        async def keep(chunks: AsyncIterator[bytes]) -> None:
            await keep_whole_blob(session, layer.descriptor, chunks)

        answer = await session.client(source).get_blob_range(
            source.repository, layer.digest, start, end, size=layer.size, on_whole_blob=keep
        )
        if isinstance(answer, bytes):
            return answer
        kept.add(layer.digest)
        # LayerSet counts the `end - start` it asked for; the rest of the blob came too, and
        # stats must show what crossed the wire (LayerSet's one accounting path).
        extra = answer.nbytes - (end - start)
        if extra > 0:
            layer_set.account(positions[layer.digest], 0, extra, time.monotonic() - began)
        data: bytes = await session.disk(_read_stored, store, layer.digest, start, end)
        return data

    # Published indexes (opted into) are looked up for this manifest only, also without a
    # source (an offline remount finds what this manifest's referrers led to before).
    remote = None
    if trust_published_index:
        from imagefs.published import RemoteIndexes  # imported by the mounts that opt in

        remote = RemoteIndexes(
            session.client(source) if source is not None else None,
            source.repository if source is not None else "",
            record.manifest.digest,
            LayerIndexStore(store.root),
        )
    positions: dict[Digest, int] = {}
    for i, layer in enumerate(layers):
        positions.setdefault(layer.digest, i)
    layer_set = LayerSet(
        store,
        layers,
        fetch,
        fetch_range=fetch_range,
        remote_index=remote,
        cache=PieceCache(store.root, cache_size),
        on_fetch=on_fetch,
    )
    return layer_set


def _read_stored(store: Store, digest: Digest, start: int, end: int) -> bytes:
    """Bytes [start, end) of a stored (verified) blob, reached from the store root (a link
    planted on the way since the store was opened is LinkInStore, never followed)."""
    path = store.blobs.path(digest)
    fd = fsutil.safe_open(path.parent, path.name, os.O_RDONLY, root=store.root)
    with os.fdopen(fd, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    if len(data) != end - start:
        raise IntegrityError(f"stored blob {digest.short} is shorter than {end} bytes")
    return data
