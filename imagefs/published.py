"""imagefs layer indexes published next to an image, as an OCI artifact.

Plain gzip (and zstd, and uncompressed) layers carry no table of contents, so a lazy mount
would have to read a whole layer once to index it. `imagefs index REF --push` does that work
once and publishes the result: an OCI image manifest with

- `artifactType: application/vnd.imagefs.layer-index.v1`,
- the empty config (`application/vnd.oci.empty.v1+json`, `{}`),
- one blob per indexed layer (media type `application/vnd.imagefs.layer-index.v1`,
  annotation `dev.imagefs.layer.digest`), the `LayerIndex` bytes,
- `subject`: the image manifest it describes,

found by a later mount through the referrers API, or, where the registry lacks it
(distribution 2.8 does), the OCI 1.1 tag fallback: an image index tagged `sha256-<hex>`
listing the referrers — only when the user asks for it (`--trust-published-index` on mount,
ls and cat): the referrers list is not reached from the manifest the user named, so whoever
can push to the repository, or runs the mirror, can attach an index whose names, modes,
owners and offsets would be served over the genuine layer bytes.

Trust: the index blob is verified against its digest; it is used only for the layer whose
digest it names (its seek index records the blob digest it was built from), and every span
it leads a read to is checked against the span's sha256 (compressed, then uncompressed)
before use. What the index asserts about where each file starts is only as trustworthy as
the manifest whose referrers led to it, so it is kept bound to that manifest (see
`store.layerindexes`) and used by no other image; `imagefs pull --full` and `imagefs index`
never use it, and `imagefs index --push` publishes only indexes built here from the blob.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from imagefs.artifacts import Payload, find_artifacts, push_artifact
from imagefs.errors import ImageFSError
from imagefs.layers.layerindex import LayerIndex, build_from_blob
from imagefs.oci.digest import Digest
from imagefs.oci.image import Layer, ResolvedImage
from imagefs.oci.manifest import Descriptor
from imagefs.oci.mediatypes import layer_compression
from imagefs.registry import wire
from imagefs.registry.client import RegistryClient
from imagefs.store import fsutil
from imagefs.store.layerindexes import PUBLISHED, Bound, LayerIndexStore, derive

log = logging.getLogger("imagefs.indexes")

ARTIFACT_TYPE = "application/vnd.imagefs.layer-index.v1"
INDEX_MEDIA_TYPE = "application/vnd.imagefs.layer-index.v1"
LAYER_ANNOTATION = "dev.imagefs.layer.digest"
MAX_INDEX_BYTES = 256 << 20


def needs_index(layer: Layer) -> bool:
    """eStargz and zstd:chunked layers bring their own TOC; the others need ours."""
    ann = layer.descriptor.annotations
    if "containerd.io/snapshot/stargz/toc.digest" in ann:
        return False
    return not any(k.endswith("zstd-chunked.manifest-position") for k in ann)


@dataclass(frozen=True)
class PushedIndexes:
    manifest_digest: Digest
    layers: int
    via_tag: bool


async def push_indexes(
    client: RegistryClient,
    repository: str,
    image: ResolvedImage,
    indexes: list[LayerIndex],
) -> PushedIndexes:
    """Upload the index blobs and the artifact manifest (see imagefs.artifacts)."""
    payloads = [
        Payload(INDEX_MEDIA_TYPE, idx.to_bytes(), {LAYER_ANNOTATION: str(idx.digest)})
        for idx in indexes
    ]
    pushed = await push_artifact(
        client, repository, image.manifest_descriptor, ARTIFACT_TYPE, payloads
    )
    return PushedIndexes(pushed.manifest_digest, pushed.blobs, pushed.via_tag)


async def find_published(
    client: RegistryClient, repository: str, manifest_digest: Digest
) -> dict[str, Descriptor]:
    """Layer digest -> descriptor of its published index blob (empty when there is none)."""
    found: dict[str, Descriptor] = {}
    for artifact in await find_artifacts(client, repository, manifest_digest, ARTIFACT_TYPE):
        for blob in artifact.layers:
            layer = blob.annotations.get(LAYER_ANNOTATION)
            if blob.media_type == INDEX_MEDIA_TYPE and layer:
                found.setdefault(layer, blob)
    return found


class RemoteIndexes:
    """The published indexes of one manifest M, as a mount asks for them layer by layer.

    Only what M's own referrers lead to is used. The first lookup asks the registry once per
    mount and remembers, under M, which index blob each layer's referrer named
    (`LayerIndexStore.remember_referrers`); the verified blob is kept bound to (layer, its
    digest). An offline remount of M finds them again through that record; another
    image sharing the layer never does.
    """

    def __init__(
        self,
        client: RegistryClient | None,
        repository: str,
        manifest_digest: Digest,
        store: LayerIndexStore,
    ) -> None:
        self.client = client
        self.repository = repository
        self.manifest_digest = manifest_digest
        self.store = store
        self._found: dict[str, Descriptor] | None = None
        self._lock = trio.Lock()

    async def __call__(
        self, layer: Layer, keep: Callable[[Callable[[], None]], Awaitable[None]]
    ) -> LayerIndex | None:
        """Layer's published index, if M's referrers name one; `keep` runs the store's
        write of a fetched one (`LayerSet.keep`: in the background, for a mount)."""
        if not needs_index(layer):
            return None
        known = await trio.to_thread.run_sync(self.store.referrers, self.manifest_digest)
        if str(layer.digest) in known:
            bound = Bound(layer.digest, PUBLISHED, Digest.parse(known[str(layer.digest)]))
            if await trio.to_thread.run_sync(self.store.refused, bound):
                return None  # it disagreed with the layer's own tar stream once
            idx = await trio.to_thread.run_sync(self.store.load_bound, bound)
            if idx is not None:
                return idx
        if self.client is None:
            return None
        async with self._lock:
            if self._found is None:
                try:
                    with wire.cause("referrers", layer=None):  # for the image, not one layer
                        self._found = await find_published(
                            self.client, self.repository, self.manifest_digest
                        )
                except ImageFSError as exc:
                    log.info("no published indexes (%s)", exc)
                    self._found = {}
                if self._found:
                    # What an offline remount finds them by; this mount has `_found`, so the
                    # (durable) write need not hold up the first request (`keep`).
                    record = {k: str(v.digest) for k, v in self._found.items()}
                    await keep(
                        functools.partial(
                            self.store.remember_referrers, self.manifest_digest, record
                        )
                    )
        desc = self._found.get(str(layer.digest))
        if desc is None:
            return None
        bound = Bound(layer.digest, PUBLISHED, desc.digest)
        if await trio.to_thread.run_sync(self.store.refused, bound):
            return None
        idx = await trio.to_thread.run_sync(self.store.load_bound, bound)
        if idx is not None:
            return idx
        with wire.cause("index"):
            data = await self.client.get_blob(
                self.repository, desc.digest, desc.size, max_bytes=MAX_INDEX_BYTES
            )
        params = {"layer_size": layer.size}
        idx = await trio.to_thread.run_sync(derive, bound, params, data)
        await keep(functools.partial(self.store.save_bound, bound, params, data, idx))
        return idx


def build_local(store_root: Path, blob: Path, layer: Layer) -> LayerIndex:
    """The layer-bound index of a local, verified blob: kept, or built and kept; run in a
    thread. Never a TOC-derived or published index: those are not bound to the layer."""
    indexes = LayerIndexStore(store_root)
    idx = indexes.load_layer(layer.digest)
    if idx is None:
        compression = layer_compression(layer.descriptor.media_type)
        fd = fsutil.safe_open(blob.parent, blob.name, os.O_RDONLY, root=store_root)
        idx = build_from_blob(fd, layer.digest, compression)  # no link followed to the blob
        indexes.save_layer(idx)
    return idx
