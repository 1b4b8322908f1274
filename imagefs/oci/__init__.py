"""Pure OCI data: digests, references, media types, platforms, manifests and configs."""

from imagefs.oci import mediatypes
from imagefs.oci.digest import Digest
from imagefs.oci.manifest import (
    MAX_MANIFEST_SIZE,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    parse_manifest,
)
from imagefs.oci.platform import Platform
from imagefs.oci.reference import Reference

__all__ = [
    "MAX_MANIFEST_SIZE",
    "Descriptor",
    "Digest",
    "ImageConfig",
    "Index",
    "Manifest",
    "Platform",
    "Reference",
    "mediatypes",
    "parse_manifest",
]
