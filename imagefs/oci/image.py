"""An image as plain values: the manifest, config and layers a reference resolved to.

Like go-containerregistry's `v1.Image`, where the bytes came from (a registry, the local
store) is not part of the value: `registry.source.RegistrySource` and
`store.lookup.load_resolved` both hand out a `ResolvedImage`. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from imagefs.errors import ImageFSError, UnsupportedMediaType
from imagefs.oci import mediatypes
from imagefs.oci.digest import Digest
from imagefs.oci.manifest import Descriptor, ImageConfig, Index, Manifest

__all__ = ["Layer", "ResolvedImage", "check_image_manifest"]


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


def check_image_manifest(manifest: Manifest, where: str) -> None:
    """Refuse what is not a container image (artifacts, foreign layers) with a clear word."""
    if manifest.config.media_type not in (mediatypes.OCI_CONFIG, mediatypes.DOCKER_CONFIG):
        raise UnsupportedMediaType(
            f"{where} is not a container image (config media type {manifest.config.media_type!r})"
        )
    for layer in manifest.layers:
        mediatypes.layer_compression(layer.media_type)  # raises on unknown types
