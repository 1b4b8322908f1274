"""`push` of a built image also publishes the layer indexes the build made (issue 12), so
the pushed image mounts lazily at once from any store (byte ranges, no whole-layer read)."""

from __future__ import annotations

from imagefs.build.builder import BUILT_ANNOTATION
from imagefs.layers.layerindex import LayerIndex
from imagefs.oci.reference import Reference
from imagefs.published import PushedIndexes, needs_index, push_indexes
from imagefs.session import Session
from imagefs.store.layerindexes import LayerIndexStore
from imagefs.store.lookup import find_record, load_resolved


async def publish_built_indexes(session: Session, reference: str) -> PushedIndexes | None:
    """After `push REF`: publish the stored indexes of a built image's layers (else None)."""
    store = session.store
    record = await session.disk(find_record, store, reference)
    if BUILT_ANNOTATION not in record.extra:
        return None
    image = await session.disk(load_resolved, store, record.manifest.digest, record.index_digest)
    indexes = LayerIndexStore(store.root)
    found: list[LayerIndex] = []
    for layer in image.layers:
        if needs_index(layer):
            idx = await session.disk(indexes.load_layer, layer.digest)
            if idx is not None and idx.seek is not None:
                found.append(idx)
    if not found:
        return None
    ref = Reference.parse(reference)
    return await push_indexes(session.client(ref), ref.repository, image, found)
