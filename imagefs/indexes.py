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
listing the referrers.

Trust: the index blob is verified against its digest; it is used only for the layer whose
digest it names (its seek index records the blob digest it was built from), and every
compressed span it leads a read to is checked against the span's sha256 before use, so an
index can never make imagefs serve bytes that are not in the verified layer. What the index
itself asserts (where each file starts) is as trustworthy as the repository that serves it,
like the tag that named the image; `imagefs pull --full` and a mount without published
indexes do not depend on it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import trio

from imagefs.artifacts import Payload, find_artifacts, push_artifact
from imagefs.errors import ImageFSError, IntegrityError
from imagefs.image import Layer, ResolvedImage
from imagefs.layers.index import IndexStore, LayerIndex, build_from_blob
from imagefs.oci.digest import Digest
from imagefs.oci.manifest import Descriptor
from imagefs.oci.mediatypes import layer_compression
from imagefs.registry.client import RegistryClient

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


async def fetch_published(
    client: RegistryClient, repository: str, desc: Descriptor, layer: Layer
) -> LayerIndex:
    data = await client.get_blob(repository, desc.digest, desc.size, max_bytes=MAX_INDEX_BYTES)

    def parse() -> LayerIndex:
        idx = LayerIndex.from_bytes(layer.digest, data)
        if idx.seek is None or idx.seek.blob_digest != str(layer.digest):
            raise IntegrityError(
                f"published index {desc.digest.short} is not for layer {layer.digest.short}"
            )
        if idx.seek.compressed_size != layer.size:
            raise IntegrityError(f"published index {desc.digest.short}: blob size mismatch")
        return idx

    return await trio.to_thread.run_sync(parse)


class RemoteIndexes:
    """What a mount asks when a layer has no local index: one lookup per mount."""

    def __init__(self, client: RegistryClient, repository: str, manifest_digest: Digest) -> None:
        self.client = client
        self.repository = repository
        self.manifest_digest = manifest_digest
        self._found: dict[str, Descriptor] | None = None
        self._lock = trio.Lock()

    async def __call__(self, layer: Layer) -> LayerIndex | None:
        if not needs_index(layer):
            return None
        async with self._lock:
            if self._found is None:
                try:
                    self._found = await find_published(
                        self.client, self.repository, self.manifest_digest
                    )
                except ImageFSError as exc:
                    log.info("no published indexes (%s)", exc)
                    self._found = {}
        desc = self._found.get(str(layer.digest))
        if desc is None:
            return None
        return await fetch_published(self.client, self.repository, desc, layer)


def build_local(store_root: Path, blob: Path, layer: Layer) -> LayerIndex:
    """Load a layer's seek-point index, or build it from the local blob; run in a thread."""
    indexes = IndexStore(store_root)
    idx = indexes.load(layer.digest)
    if idx is None or idx.seek is None:
        idx = build_from_blob(blob, layer.digest, layer_compression(layer.descriptor.media_type))
        indexes.save(idx)
    return idx
