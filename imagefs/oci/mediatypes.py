"""Media types imagefs knows, and what each one implies for reading a layer.

Docker schema 2 and OCI types are accepted side by side: registries serve both, and an image
copied by skopeo may switch from one to the other without changing its content.
"""

from __future__ import annotations

from typing import Literal

from imagefs.errors import UnsupportedMediaType

# OCI image-spec
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDISTRIBUTABLE = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDISTRIBUTABLE_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_NONDISTRIBUTABLE_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"

# Docker image manifest v2, schema 2
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
# Not in the schema 2 spec, but written by buildkit/containerd for uncompressed and zstd
# layers; containerd reads them, so we do too.
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar"
DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"

# Docker schema 1: recognised only so that we can refuse it with a useful message.
DOCKER_SCHEMA1_MANIFEST = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED_MANIFEST = "application/vnd.docker.distribution.manifest.v1+prettyjws"

IMAGE_MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = IMAGE_MANIFEST_TYPES | INDEX_TYPES
SCHEMA1_TYPES = frozenset({DOCKER_SCHEMA1_MANIFEST, DOCKER_SCHEMA1_SIGNED_MANIFEST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})

# The Accept header for manifest requests. Schema 1 is left out on purpose: a registry that
# can convert will then send schema 2, and one that cannot sends something we refuse anyway.
MANIFEST_ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST))

Compression = Literal["gzip", "zstd", "none"]

_LAYER_COMPRESSION: dict[str, Compression] = {
    OCI_LAYER: "none",
    OCI_LAYER_GZIP: "gzip",
    OCI_LAYER_ZSTD: "zstd",
    OCI_LAYER_NONDISTRIBUTABLE: "none",
    OCI_LAYER_NONDISTRIBUTABLE_GZIP: "gzip",
    OCI_LAYER_NONDISTRIBUTABLE_ZSTD: "zstd",
    DOCKER_LAYER: "none",
    DOCKER_LAYER_GZIP: "gzip",
    DOCKER_LAYER_ZSTD: "zstd",
    DOCKER_FOREIGN_LAYER: "none",
    DOCKER_FOREIGN_LAYER_GZIP: "gzip",
}

_FOREIGN = frozenset(
    {
        OCI_LAYER_NONDISTRIBUTABLE,
        OCI_LAYER_NONDISTRIBUTABLE_GZIP,
        OCI_LAYER_NONDISTRIBUTABLE_ZSTD,
        DOCKER_FOREIGN_LAYER,
        DOCKER_FOREIGN_LAYER_GZIP,
    }
)

LAYER_TYPES = frozenset(_LAYER_COMPRESSION)


def layer_compression(media_type: str) -> Compression:
    """How a layer blob of this type is compressed; `UnsupportedMediaType` if not a layer."""
    try:
        return _LAYER_COMPRESSION[media_type]
    except KeyError:
        raise UnsupportedMediaType(f'unsupported layer media type "{media_type}"') from None


def is_foreign(media_type: str) -> bool:
    """Whether the layer may live outside the registry (its descriptor's `urls`).

    Such layers are often not pushable by licence, which is why `push` must skip them.
    """
    return media_type in _FOREIGN
