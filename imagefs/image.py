"""An image as an interface: manifest, config, and layers by digest and diff id.

Like go-containerregistry's `v1.Image`, the registry and the local store are interchangeable
`ImageSource`s: the verbs and the mount ask a source to resolve a reference to a
`ResolvedImage` (a plain value) and to hand over blob bytes, and do not care where from.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import trio

from imagefs.errors import ImageFSError, NotFound, UnsupportedMediaType
from imagefs.oci import mediatypes
from imagefs.oci.digest import Digest
from imagefs.oci.manifest import Descriptor, ImageConfig, Index, Manifest, parse_manifest
from imagefs.oci.platform import Platform
from imagefs.oci.reference import Reference
from imagefs.registry.client import RegistryClient
from imagefs.store import Store

MAX_CONFIG_BYTES = 8 << 20


@dataclass(frozen=True)
class Layer:
    descriptor: Descriptor
    diff_id: Digest

    @property
    def digest(self) -> Digest:
        return self.descriptor.digest

    @property
    def size(self) -> int:
        return self.descriptor.size


@dataclass(frozen=True)
class ResolvedImage:
    """What a reference resolved to. Raw bytes are kept: digests are taken over them."""

    manifest: Manifest
    manifest_digest: Digest
    config: ImageConfig
    index: Index | None
    index_digest: Digest | None

    @property
    def repo_digest(self) -> Digest:
        """The digest the tag pointed at (the index for a multi-platform image)."""
        return self.index_digest or self.manifest_digest

    @property
    def id(self) -> Digest:
        """Docker's image ID: the config digest."""
        return self.manifest.config.digest

    @property
    def layers(self) -> list[Layer]:
        if len(self.manifest.layers) != len(self.config.diff_ids):
            raise ImageFSError(
                f"image {self.manifest_digest.short}: {len(self.manifest.layers)} layers but "
                f"{len(self.config.diff_ids)} diff ids in the config"
            )
        return [
            Layer(d, i) for d, i in zip(self.manifest.layers, self.config.diff_ids, strict=True)
        ]

    @property
    def manifest_descriptor(self) -> Descriptor:
        return Descriptor(
            media_type=self.manifest.media_type,
            digest=self.manifest_digest,
            size=len(self.manifest.raw),
        )


class ImageSource(Protocol):
    async def resolve(self, ref: Reference, platform: Platform) -> ResolvedImage: ...

    def open_blob(self, descriptor: Descriptor) -> AsyncIterator[bytes]: ...


def check_image_manifest(manifest: Manifest, where: str) -> None:
    """Refuse what is not a container image (artifacts, foreign layers) with a clear word."""
    if manifest.config.media_type not in (mediatypes.OCI_CONFIG, mediatypes.DOCKER_CONFIG):
        raise UnsupportedMediaType(
            f"{where} is not a container image (config media type {manifest.config.media_type!r})"
        )
    for layer in manifest.layers:
        mediatypes.layer_compression(layer.media_type)  # raises on unknown types


class RegistrySource:
    """Images and blobs straight from a registry repository."""

    def __init__(self, client: RegistryClient, repository: str) -> None:
        self.client = client
        self.repository = repository

    async def resolve(self, ref: Reference, platform: Platform) -> ResolvedImage:
        top = await self.client.get_manifest(self.repository, ref.api_reference)
        if ref.digest is not None and top.digest != ref.digest:
            raise ImageFSError(f"{ref}: registry returned {top.digest}")  # verify() covers it
        parsed = parse_manifest(top.raw, top.media_type)
        index: Index | None = None
        index_digest: Digest | None = None
        manifest_digest = top.digest
        if isinstance(parsed, Index):
            index, index_digest = parsed, top.digest
            chosen = parsed.select(platform)
            sub = await self.client.get_manifest(
                self.repository, str(chosen.digest), expected_size=chosen.size
            )
            inner = parse_manifest(sub.raw, sub.media_type)
            if not isinstance(inner, Manifest):
                raise UnsupportedMediaType(f"{ref}: nested image indexes are not supported")
            manifest, manifest_digest = inner, sub.digest
        else:
            manifest = parsed
        check_image_manifest(manifest, str(ref))
        raw_config = await self.client.get_blob(
            self.repository,
            manifest.config.digest,
            manifest.config.size,
            max_bytes=MAX_CONFIG_BYTES,
        )
        config = ImageConfig.parse(raw_config)
        return ResolvedImage(manifest, manifest_digest, config, index, index_digest)

    def open_blob(self, descriptor: Descriptor) -> AsyncIterator[bytes]:
        return self.client.stream_blob(self.repository, descriptor.digest, descriptor.size)


class StoreSource:
    """Images from the local store; blobs only if they are present."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def resolve(self, ref: Reference, platform: Platform) -> ResolvedImage:
        from imagefs.api import find_record  # the lookup rules live with the verbs

        record = find_record(self.store, str(ref))
        return await trio.to_thread.run_sync(
            load_resolved, self.store, record.manifest.digest, record.index_digest
        )

    async def open_blob(self, descriptor: Descriptor) -> AsyncIterator[bytes]:
        if not await trio.to_thread.run_sync(self.store.blobs.has, descriptor.digest):
            raise NotFound(f"blob {descriptor.digest} is not in the local store")
        # blobs.open never follows a link planted at the blob's name
        raw = await trio.to_thread.run_sync(self.store.blobs.open, descriptor.digest)
        async with trio.wrap_file(raw) as f:
            while chunk := await f.read(1 << 20):
                yield chunk


def load_resolved(
    store: Store, manifest_digest: Digest, index_digest: Digest | None
) -> ResolvedImage:
    """Rebuild a ResolvedImage from stored blobs (synchronous: disk only)."""
    manifest = store.read_manifest(manifest_digest)
    if not isinstance(manifest, Manifest):
        raise UnsupportedMediaType(f"{manifest_digest} is an index, not an image manifest")
    config = ImageConfig.parse(store.blobs.read(manifest.config.digest))
    index = None
    if index_digest is not None and store.blobs.has(index_digest):
        parsed = store.read_manifest(index_digest)
        index = parsed if isinstance(parsed, Index) else None
    return ResolvedImage(manifest, manifest_digest, config, index, index_digest)
