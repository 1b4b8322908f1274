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

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import trio

from imagefs.errors import ImageFSError, IntegrityError, ManifestUnknown
from imagefs.image import Layer, ResolvedImage
from imagefs.layers.index import IndexStore, LayerIndex, build_from_blob
from imagefs.oci import mediatypes
from imagefs.oci.digest import Digest
from imagefs.oci.manifest import Descriptor, Index, Manifest, parse_manifest
from imagefs.registry.client import RegistryClient

log = logging.getLogger("imagefs.indexes")

ARTIFACT_TYPE = "application/vnd.imagefs.layer-index.v1"
INDEX_MEDIA_TYPE = "application/vnd.imagefs.layer-index.v1"
LAYER_ANNOTATION = "dev.imagefs.layer.digest"
EMPTY_JSON = b"{}"
MAX_INDEX_BYTES = 256 << 20


def needs_index(layer: Layer) -> bool:
    """eStargz and zstd:chunked layers bring their own TOC; the others need ours."""
    ann = layer.descriptor.annotations
    if "containerd.io/snapshot/stargz/toc.digest" in ann:
        return False
    return not any(k.endswith("zstd-chunked.manifest-position") for k in ann)


def fallback_tag(digest: Digest) -> str:
    return f"{digest.algorithm}-{digest.hex}"


async def _bytes_source(data: bytes) -> AsyncIterator[bytes]:
    yield data


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
    """Upload the index blobs and the artifact manifest; update the fallback tag."""
    empty = Digest.of(EMPTY_JSON)
    blobs: list[tuple[Digest, bytes, Digest]] = []
    for idx in indexes:
        data = idx.to_bytes()
        blobs.append((Digest.of(data), data, idx.digest))
    for digest, data, _ in [(empty, EMPTY_JSON, empty), *blobs]:
        if await client.blob_size(repository, digest) is None:
            await client.upload_blob(repository, digest, len(data), lambda d=data: _bytes_source(d))  # type: ignore[misc]
    manifest = {
        "schemaVersion": 2,
        "mediaType": mediatypes.OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": mediatypes.OCI_EMPTY, "digest": str(empty), "size": 2},
        "layers": [
            {
                "mediaType": INDEX_MEDIA_TYPE,
                "digest": str(digest),
                "size": len(data),
                "annotations": {LAYER_ANNOTATION: str(layer)},
            }
            for digest, data, layer in blobs
        ],
        "subject": image.manifest_descriptor.to_json(),
    }
    raw = json.dumps(manifest, separators=(",", ":")).encode()
    digest = await client.put_manifest(
        repository, str(Digest.of(raw)), raw, mediatypes.OCI_MANIFEST
    )
    via_tag = await client.get_referrers(repository, image.manifest_digest) is None
    if via_tag:
        await _add_to_fallback_tag(
            client,
            repository,
            image.manifest_digest,
            Descriptor(mediatypes.OCI_MANIFEST, digest, len(raw), artifact_type=ARTIFACT_TYPE),
        )
    return PushedIndexes(digest, len(blobs), via_tag)


async def _add_to_fallback_tag(
    client: RegistryClient, repository: str, subject: Digest, desc: Descriptor
) -> None:
    tag = fallback_tag(subject)
    existing: list[dict[str, object]] = []
    try:
        got = await client.get_manifest(repository, tag)
        parsed = parse_manifest(got.raw, got.media_type)
        if isinstance(parsed, Index):
            existing = [d.to_json() for d in parsed.manifests if d.digest != desc.digest]
    except ManifestUnknown:
        pass
    index = {
        "schemaVersion": 2,
        "mediaType": mediatypes.OCI_INDEX,
        "manifests": [*existing, desc.to_json()],
    }
    raw = json.dumps(index, separators=(",", ":")).encode()
    await client.put_manifest(repository, tag, raw, mediatypes.OCI_INDEX)


async def find_published(
    client: RegistryClient, repository: str, manifest_digest: Digest
) -> dict[str, Descriptor]:
    """Layer digest -> descriptor of its published index blob (empty when there is none)."""
    raw = await client.get_referrers(repository, manifest_digest)
    referrers: list[Descriptor] = []
    if raw is not None:
        parsed = parse_manifest(raw, mediatypes.OCI_INDEX)
        if isinstance(parsed, Index):
            referrers = list(parsed.manifests)
    if not referrers:
        try:
            got = await client.get_manifest(repository, fallback_tag(manifest_digest))
        except ManifestUnknown:
            return {}
        parsed = parse_manifest(got.raw, got.media_type)
        if isinstance(parsed, Index):
            referrers = list(parsed.manifests)
    found: dict[str, Descriptor] = {}
    for ref in referrers:
        if ref.artifact_type != ARTIFACT_TYPE:
            continue
        got = await client.get_manifest(repository, str(ref.digest), expected_size=ref.size)
        artifact = parse_manifest(got.raw, got.media_type)
        if not isinstance(artifact, Manifest):
            continue
        if artifact.subject is None or artifact.subject.digest != manifest_digest:
            log.warning("index artifact %s names another subject; ignored", ref.digest.short)
            continue
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


def build_local(store_root: object, blob: object, layer: Layer) -> LayerIndex:
    """Build (or load) a layer's index from its local blob; run in a thread."""
    from pathlib import Path

    from imagefs.oci.mediatypes import layer_compression

    assert isinstance(store_root, Path) and isinstance(blob, Path)
    indexes = IndexStore(store_root)
    idx = indexes.load(layer.digest)
    if idx is None or idx.seek is None:
        idx = build_from_blob(blob, layer.digest, layer_compression(layer.descriptor.media_type))
        indexes.save(idx)
    return idx
