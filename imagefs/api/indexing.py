"""`imagefs index`: build each layer's imagefs index (and `--push` publish them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from imagefs.errors import NotFound
from imagefs.oci.image import Layer, ResolvedImage
from imagefs.oci.platform import Platform
from imagefs.oci.reference import Reference
from imagefs.pulling import find_or_pull
from imagefs.session import Session, fetch_blob
from imagefs.store.lookup import load_resolved

if TYPE_CHECKING:  # imported lazily: `imagefs mount` and friends start faster without it
    from imagefs.published import PushedIndexes


@dataclass(frozen=True)
class LayerIndexed:
    layer: Layer
    entries: int
    spans: int
    uncompressed: int
    seconds: float
    built: bool  # False when it was already in the index store


@dataclass(frozen=True)
class IndexResult:
    reference: Reference
    layers: list[LayerIndexed]
    skipped: list[Layer]  # eStargz / zstd:chunked: they carry their own TOC
    pushed: PushedIndexes | None


async def index(
    session: Session, reference: str, *, push: bool = False, platform: Platform | None = None
) -> IndexResult:
    """Build the imagefs layer index of each layer that needs one; `push` publishes them."""
    import time

    from imagefs.published import build_local, needs_index, push_indexes
    from imagefs.store.layerindexes import LayerIndexStore

    store = session.store
    record = await find_or_pull(session, reference, platform)
    image: ResolvedImage = await session.disk(
        load_resolved, store, record.manifest.digest, record.index_digest
    )
    source = record.source
    done: list[LayerIndexed] = []
    skipped: list[Layer] = []
    indexes = LayerIndexStore(store.root)
    built = []
    for layer in image.layers:
        if not needs_index(layer):
            skipped.append(layer)
            continue
        # Only the layer-bound index (built here from the verified blob) is ever published:
        # never a TOC or a published index this store was handed for some image.
        existing = await session.disk(indexes.load_layer, layer.digest)
        began = time.monotonic()
        if existing is None or existing.seek is None:
            if not store.blobs.has(layer.digest):
                if source is None:
                    raise NotFound(f"layer {layer.digest.short} is not local and has no source")
                await fetch_blob(
                    session, session.client(source), source.repository, layer.descriptor
                )
            began = time.monotonic()
            existing = await trio.to_thread.run_sync(
                build_local, store.root, store.blobs.path(layer.digest), layer
            )
            was_built = True
        else:
            was_built = False
        assert existing.seek is not None
        built.append(existing)
        done.append(
            LayerIndexed(
                layer,
                len(existing.toc),
                len(existing.seek.points),
                existing.seek.uncompressed_size,
                time.monotonic() - began,
                was_built,
            )
        )
    pushed = None
    ref = record.name or record.source
    if push:
        if ref is None:
            raise NotFound(f"{reference}: no repository to push the index to")
        pushed = await push_indexes(session.client(ref), ref.repository, image, built)
    return IndexResult(ref or Reference.parse(reference), done, skipped, pushed)
