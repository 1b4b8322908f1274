"""`imagefs push`: a local image to the registry its name points at; blobs not in the store
(lazy pulls) stream from the image's source registry, verified on the way."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import trio

from imagefs.errors import IntegrityError, NotFound, Unauthorized, unwrap_groups
from imagefs.oci.digest import Digest
from imagefs.oci.image import ResolvedImage
from imagefs.oci.manifest import Descriptor
from imagefs.oci.reference import Reference
from imagefs.session import Session
from imagefs.store import ImageRecord
from imagefs.store.lookup import find_record, load_resolved, put_record


@dataclass(frozen=True)
class PushResult:
    reference: Reference
    digest: Digest
    size: int
    uploaded: list[Digest]
    mounted: list[Digest]
    existed: list[Digest]


async def push(
    session: Session, reference: str, *, progress: Callable[[Digest, str], None] | None = None
) -> PushResult:
    """Push a local image to the registry its name points at.

    Blobs not in the local store (lazy pulls) are streamed from the registry the image came
    from and verified on the way; a blob already in the target registry is skipped, and one in
    another repository of the same registry is mounted instead of uploaded.
    """
    ref = Reference.parse(reference)
    store = session.store
    record = await session.disk(find_record, store, reference)
    image: ResolvedImage = await session.disk(
        load_resolved, store, record.manifest.digest, record.index_digest
    )
    client = session.client(ref)
    source_ref = record.source
    uploaded: list[Digest] = []
    mounted: list[Digest] = []
    existed: list[Digest] = []
    blobs = [image.manifest.config, *(layer.descriptor for layer in image.layers)]

    async def one(desc: Descriptor) -> None:
        if await client.blob_size(ref.repository, desc.digest) is not None:
            existed.append(desc.digest)
            if progress:
                progress(desc.digest, "Layer already exists")
            return
        if (
            source_ref is not None
            and source_ref.registry == ref.registry
            and source_ref.repository != ref.repository
            and await client.mount_blob(ref.repository, desc.digest, source_ref.repository)
        ):
            mounted.append(desc.digest)
            if progress:
                progress(desc.digest, f"Mounted from {source_ref.familiar_name}")
            return
        await client.upload_blob(
            ref.repository, desc.digest, desc.size, lambda: _blob_source(session, record, desc)
        )
        uploaded.append(desc.digest)
        if progress:
            progress(desc.digest, "Pushed")

    limit = trio.CapacityLimiter(3)

    async def limited(desc: Descriptor) -> None:
        async with limit:
            await one(desc)

    tag_or_digest = ref.tag or str(image.manifest_digest)
    try:
        with unwrap_groups():
            async with trio.open_nursery() as nursery:
                for desc in blobs:
                    nursery.start_soon(limited, desc)
        digest = await client.put_manifest(
            ref.repository, tag_or_digest, image.manifest.raw, image.manifest.media_type
        )
    except Unauthorized as exc:
        # A push starts with reads (does the registry have this blob?), so the registry's
        # refusal may name a pull scope; the user asked to push, and must hear that.
        hint = str(exc).rpartition("; ")[2] if "; " in str(exc) else ""
        code = f" ({exc.code})" if exc.code else ""
        raise Unauthorized(
            f"{ref.registry}: unauthorized to push to {ref.repository}{code}"
            + (f"; {hint}" if hint else ""),
            host=exc.host,
            status=exc.status,
            code=exc.code,
        ) from None
    if ref.tag is not None:
        new = ImageRecord(
            manifest=record.manifest,
            name=ref.without_digest(),
            repo_digest=Reference.parse(f"{ref.name}@{digest}"),
            source=record.source,
            index_digest=record.index_digest,
            created=record.created,
            extra=record.extra,
        )
        await session.disk(put_record, store, new)
    return PushResult(ref, digest, len(image.manifest.raw), uploaded, mounted, existed)


async def _blob_source(
    session: Session, record: ImageRecord, desc: Descriptor
) -> AsyncIterator[bytes]:
    """The blob's bytes: from the store if present, else from the source registry, verified."""
    if await session.disk(session.store.blobs.has, desc.digest):
        raw = await session.disk(session.store.blobs.open, desc.digest)  # never through a link
        async with trio.wrap_file(raw) as f:
            while chunk := await f.read(1 << 20):
                yield chunk
        return
    src = record.source
    if src is None:
        raise NotFound(f"blob {desc.digest} is not local and the image has no known source")
    hasher = desc.digest.new_hasher()
    total = 0
    async for chunk in session.client(src).stream_blob(src.repository, desc.digest, desc.size):
        hasher.update(chunk)
        total += len(chunk)
        if total == desc.size and f"{desc.digest.algorithm}:{hasher.hexdigest()}" != str(
            desc.digest
        ):
            # Withhold the last bytes so the upload can never complete with wrong content.
            raise IntegrityError(f"blob {desc.digest} from {src.registry} failed verification")
        yield chunk
