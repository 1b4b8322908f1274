"""The stored images: which one a query names (a reference, a digest, an image ID), its
platform, its `ResolvedImage`, and adding or replacing a record in `index.json`.

Synchronous and light (no registry client, no trio): `imagefs mount` checks the image here
before it starts its daemon, and the verbs build on it.
"""

from __future__ import annotations

from imagefs.errors import ImageFSError, InvalidReference, NotFound, UnsupportedMediaType
from imagefs.oci.digest import Digest
from imagefs.oci.image import ResolvedImage
from imagefs.oci.manifest import ImageConfig, Index, Manifest
from imagefs.oci.platform import Platform
from imagefs.oci.reference import Reference
from imagefs.store import ImageRecord, Store

__all__ = [
    "find_record",
    "find_records",
    "image_platform",
    "is_dangling",
    "load_resolved",
    "platform_warning",
    "put_record",
    "same_as_stored",
]


def _matches(record: ImageRecord, query: str, ref: Reference | None) -> bool:
    if ref is not None:
        if ref.digest is not None:
            digests = {record.manifest.digest}
            if record.repo_digest is not None and record.repo_digest.digest is not None:
                digests.add(record.repo_digest.digest)
            repo = record.repository
            return ref.digest in digests and (repo is None or repo == ref.name)
        return record.name is not None and str(record.name) == str(ref)
    return False


def _id_matches(store: Store, record: ImageRecord, query: str) -> bool:
    """Docker's image ID (config digest), full, `sha256:`-prefixed, or a short prefix."""
    hex_part = query.removeprefix("sha256:")
    if len(hex_part) < 4 or any(c not in "0123456789abcdef" for c in hex_part):
        return False
    try:
        config = store.read_manifest(record.manifest.digest)
    except ImageFSError:
        return False
    candidates = [record.manifest.digest.hex]
    if isinstance(config, Manifest):
        candidates.append(config.config.digest.hex)
    return any(c.startswith(hex_part) for c in candidates)


def find_records(store: Store, query: str) -> list[ImageRecord]:
    """Every stored record `query` names: a reference, a digest, or a (short) image ID."""
    records = store.records()
    by_id = [r for r in records if _id_matches(store, r, query)]
    if by_id and ":" not in query.removeprefix("sha256:") and "/" not in query:
        return by_id
    try:
        ref = Reference.parse(query)
    except InvalidReference:
        if by_id:
            return by_id
        raise
    found = [r for r in records if _matches(r, query, ref)]
    return found or by_id


def find_record(store: Store, query: str) -> ImageRecord:
    found = find_records(store, query)
    if not found:
        raise NotFound(f"no such image: {query}")
    return found[0]


def image_platform(store: Store, record: ImageRecord) -> Platform:
    """The platform the stored image's config declares."""
    manifest = store.read_manifest(record.manifest.digest)
    if not isinstance(manifest, Manifest):
        raise NotFound(f"{record.manifest.digest} is not an image manifest")
    config = ImageConfig.parse(store.blobs.read(manifest.config.digest))
    return Platform(config.os, config.architecture, config.variant)


def platform_warning(platform: Platform, host: Platform | None = None) -> str | None:
    """docker's warning for an image of another platform than this machine's, used without
    `--platform` (docker prints the same words for `pull` and `run`)."""
    host = host or Platform.host()
    if host.match_rank(platform) is not None:
        return None
    return (
        f"WARNING: The requested image's platform ({platform}) does not match the detected "
        f"host platform ({host}) and no specific platform was requested"
    )


def is_dangling(record: ImageRecord) -> bool:
    """docker's dangling image: no tag and no digest reference (untagged while mounted)."""
    return record.name is None and record.repo_digest is None


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


def same_as_stored(store: Store, record: ImageRecord) -> bool:
    """A record of that name already names that manifest (a pull found nothing new)."""
    return any(
        r.name == record.name and r.manifest.digest == record.manifest.digest
        for r in store.records()
    )


def put_record(store: Store, record: ImageRecord) -> None:
    """Add or replace a record: one per name; one unnamed record per repository+manifest.

    As docker lists them: a name makes the image's `<none>` rows of that repository (pulled
    by digest) and its dangling row (untagged while mounted) go away."""
    with store.locked():
        records = store.records()
        if record.name is not None:
            kept = [
                r
                for r in records
                if r.name != record.name
                and not (
                    r.name is None
                    and r.manifest.digest == record.manifest.digest
                    and r.repository in (None, record.repository)
                )
            ]
        else:
            kept = [
                r
                for r in records
                if not (
                    r.name is None
                    and r.manifest.digest == record.manifest.digest
                    and r.repository == record.repository
                )
            ]
            # An unnamed record is pointless when a named one already holds that manifest.
            if any(
                r.manifest.digest == record.manifest.digest and r.repository == record.repository
                for r in kept
            ):
                store.refs.save(kept)
                return
        kept.append(record)
        store.refs.save(kept)
