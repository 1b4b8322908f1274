"""Images straight from a registry repository: a reference resolved to a `ResolvedImage`.

The registry's half of the image interface (the store's half is `store.lookup.load_resolved`):
the index is resolved to the platform's manifest, the config fetched with a bound.
"""

from __future__ import annotations

from imagefs.errors import ImageFSError, UnsupportedMediaType
from imagefs.oci.digest import Digest
from imagefs.oci.image import ResolvedImage, check_image_manifest
from imagefs.oci.manifest import ImageConfig, Index, Manifest, parse_manifest
from imagefs.oci.platform import Platform
from imagefs.oci.reference import Reference
from imagefs.registry.client import RegistryClient

__all__ = ["MAX_CONFIG_BYTES", "RegistrySource"]

MAX_CONFIG_BYTES = 8 << 20


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
