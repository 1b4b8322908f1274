"""Getting an image into the store: `pull` (metadata, and layers when full) and
`find_or_pull` (the stored image a reference names, pulled when it is not local).

Below the verbs: `imagefs ls`/`cat`, `mount`, `build` and `index` all start from
`find_or_pull`, so they find, pull and warn alike. `imagefs.api` re-exports both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import trio

from imagefs.errors import InvalidReference, NotFound, UsageError, unwrap_groups
from imagefs.oci.image import Layer, ResolvedImage
from imagefs.oci.platform import Platform
from imagefs.oci.reference import Reference
from imagefs.registry.client import RegistryClient
from imagefs.registry.source import RegistrySource
from imagefs.session import Session, fetch_blob
from imagefs.store import ImageRecord, Store
from imagefs.store.lookup import (
    find_record,
    image_platform,
    is_dangling,
    platform_warning,
    put_record,
    same_as_stored,
)
from imagefs.store.refs import now_rfc3339

__all__ = ["ProgressFn", "PullResult", "find_or_pull", "is_reference", "pull"]

ProgressFn = Callable[[Layer, int], None]  # (layer, bytes just received)


@dataclass(frozen=True)
class PullResult:
    reference: Reference
    image: ResolvedImage
    record: ImageRecord
    up_to_date: bool
    layers_downloaded: int


async def pull(
    session: Session,
    reference: str,
    *,
    platform: Platform | None = None,
    full: bool = False,
    progress: ProgressFn | None = None,
    on_resolved: Callable[[ResolvedImage], None] | None = None,
) -> PullResult:
    """Resolve `reference` and store its manifest(s) and config; layers too when `full`.

    Lazy by default: the layers are what a mount fetches on demand.
    """
    ref = Reference.parse(reference)
    requested = platform
    platform = platform or Platform.host()
    client = session.client(ref)
    image = await RegistrySource(client, ref.repository).resolve(ref, platform)
    if on_resolved:
        on_resolved(image)
    cfg = image.config
    if requested is None and (
        text := platform_warning(Platform(cfg.os, cfg.architecture, cfg.variant))
    ):
        session.warn(text)
    store = session.store
    downloaded = 0
    with store.lease() as lease:
        lease.add(image.manifest_digest, image.id, *(layer.digest for layer in image.layers))
        if image.index_digest is not None:
            lease.add(image.index_digest)
        had_manifest = store.blobs.has(image.manifest_digest)
        if image.index is not None and image.index_digest is not None:
            await session.disk(store.blobs.put, image.index.raw, image.index_digest)
        await session.disk(store.blobs.put, image.manifest.raw, image.manifest_digest)
        await session.disk(store.blobs.put, image.config.raw, image.id)
        if full:
            downloaded = await _fetch_layers(session, client, ref.repository, image, progress)
        record = ImageRecord(
            manifest=image.manifest_descriptor,
            name=ref.without_digest() if ref.tag is not None else None,
            repo_digest=Reference.parse(f"{ref.name}@{image.repo_digest}"),
            source=Reference.parse(ref.name, default_tag=None),
            index_digest=image.index_digest,
            created=now_rfc3339(),
        )
        # Nothing new: the manifest was local and, for a tag, the tag already named it.
        up_to_date = had_manifest and (
            ref.digest is not None or await session.disk(same_as_stored, store, record)
        )
        await session.disk(put_record, store, record)
    return PullResult(ref, image, record, up_to_date and not downloaded, downloaded)


async def find_or_pull(
    session: Session, reference: str, platform: Platform | None = None
) -> ImageRecord:
    """The stored image `reference` names, as docker's run finds it: pulled (metadata only)
    when it is not local, or when `platform` is given and the local one is for another
    platform (docker keeps one image per tag and resolves it again). Used without `platform`,
    an image of another platform than this machine's gets docker's warning."""
    store: Store = session.store
    try:
        record: ImageRecord = await session.disk(find_record, store, reference)
    except NotFound:
        return (await pull(session, reference, platform=platform)).record
    have: Platform = await session.disk(image_platform, store, record)
    if platform is not None and platform.match_rank(have) is None:
        if is_dangling(record) or not is_reference(reference):
            raise UsageError(
                f"{reference} is a local image for {have}; name it by reference to get it "
                f"for {platform}"
            )
        return (await pull(session, reference, platform=platform)).record
    if platform is None and (text := platform_warning(have)):
        session.warn(text)
    return record


def is_reference(query: str) -> bool:
    """A name (`repo[:tag]`, `repo@digest`), not an image ID (hex, `sha256:` or short)."""
    hex_part = query.removeprefix("sha256:")
    if len(hex_part) >= 4 and all(c in "0123456789abcdef" for c in hex_part):
        return False
    try:
        Reference.parse(query)
    except InvalidReference:
        return False
    return True


async def _fetch_layers(
    session: Session,
    client: RegistryClient,
    repository: str,
    image: ResolvedImage,
    progress: ProgressFn | None,
) -> int:
    count = 0
    limit = trio.CapacityLimiter(3)

    async def one(layer: Layer) -> None:
        nonlocal count
        async with limit:
            cb = (lambda n: progress(layer, n)) if progress else None
            if await fetch_blob(session, client, repository, layer.descriptor, cb):
                count += 1

    with unwrap_groups():
        async with trio.open_nursery() as nursery:
            for layer in image.layers:
                nursery.start_soon(one, layer)
    return count
