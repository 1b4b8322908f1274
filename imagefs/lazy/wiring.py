"""How a stored image's layers are made lazily available: store, registry, cache, indexes."""

from __future__ import annotations

from collections.abc import Callable

from imagefs import api
from imagefs.errors import ImageFSError
from imagefs.image import Layer
from imagefs.indexes import RemoteIndexes
from imagefs.lazy.cache import DEFAULT_CACHE_SIZE, ChunkCache
from imagefs.lazy.layers import LayerSet
from imagefs.oci.reference import Reference
from imagefs.store import ImageRecord


def lazy_layer_set(
    session: api.Session,
    record: ImageRecord,
    layers: list[Layer],
    *,
    cache_size: int = DEFAULT_CACHE_SIZE,
    on_fetch: Callable[[int, int, int, float], None] | None = None,
) -> LayerSet:
    """The `LayerSet` of a stored image, wired exactly as `imagefs mount` wires it.

    One function for the daemon and for `imagefs ls`/`cat`: a browse must fetch the same
    pieces, through the same cache and index store, as a mount would.
    """
    store = session.store
    source = Reference.parse(record.source) if record.source else None

    def no_source(layer: Layer) -> ImageFSError:
        return ImageFSError(
            f"layer {layer.digest.short} is not local and the image has no known source registry"
        )

    async def fetch(layer: Layer) -> None:
        if source is None:
            raise no_source(layer)
        await api.fetch_blob(session, session.client(source), source.repository, layer.descriptor)

    async def fetch_range(layer: Layer, start: int, end: int) -> bytes:
        if source is None:
            raise no_source(layer)
        client = session.client(source)
        data = await client.get_blob_range(source.repository, layer.digest, start, end)
        if client.ignores_range:  # every range costs the whole blob: take it once, keep it
            await fetch(layer)
        return data

    remote = (
        RemoteIndexes(session.client(source), source.repository, record.manifest.digest)
        if source is not None
        else None
    )
    return LayerSet(
        store,
        layers,
        fetch,
        fetch_range=fetch_range,
        remote_index=remote,
        cache=ChunkCache(store.root, cache_size),
        on_fetch=on_fetch,
    )
