"""Prefetch profiles as verbs: record one from a workload, publish it next to its image,
fetch the published one (`imagefs profile record|push|pull`).

The profile format is `imagefs.profiles` (pure); recording runs a real mount daemon
(`imagefs.profiling`); publishing is an OCI artifact (`imagefs.artifacts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from imagefs.errors import NotFound, UsageError
from imagefs.oci.digest import Digest
from imagefs.oci.image import ResolvedImage
from imagefs.oci.platform import Platform
from imagefs.oci.reference import Reference
from imagefs.profiles import ARTIFACT_TYPE, MEDIA_TYPE, Profile
from imagefs.store.lookup import find_record, load_resolved

if TYPE_CHECKING:
    from imagefs.profiling import Recorded
    from imagefs.registry.client import RegistryClient
    from imagefs.session import Session
    from imagefs.store import ImageRecord


def load_profile(path: Path) -> Profile:
    """A profile file, or a one-line UsageError saying why it is not one."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read profile {path}: {exc.strerror}") from None
    return Profile.from_json(data, str(path))


async def record_profile(
    session: Session,
    reference: str,
    output: Path,
    command: Sequence[str],
    *,
    global_argv: Sequence[str],
    platform: Platform | None = None,
) -> Recorded:
    """Mount `reference` (pulled if not local) with a trace, run `command` with
    `$IMAGEFS_MOUNT` set, write what it read to `output`. `global_argv` are the global
    options the mount daemon is started with."""
    from imagefs.profiling import record_profile as run_recording
    from imagefs.pulling import find_or_pull

    await find_or_pull(session, reference, platform)
    record, image = await _stored_image(session, reference)
    return await trio.to_thread.run_sync(
        run_recording,
        session.root.absolute(),
        global_argv,
        reference,
        str(record.manifest.digest),
        [str(layer.digest) for layer in image.layers],
        output.absolute(),
        command,
    )


async def push_profile(session: Session, reference: str, path: Path) -> Digest:
    """Publish the profile file `path` next to the stored image `reference`; returns the
    artifact manifest's digest."""
    from imagefs.artifacts import Payload, push_artifact

    record, image = await _stored_image(session, reference)
    ref, client = _repository(session, reference, record)
    await session.disk(load_profile, path)  # refuse what is not a profile before uploading
    data = await trio.Path(path).read_bytes()
    pushed = await push_artifact(
        client,
        ref.repository,
        image.manifest_descriptor,
        ARTIFACT_TYPE,
        [Payload(MEDIA_TYPE, data, {})],
    )
    return pushed.manifest_digest


async def pull_profile(session: Session, reference: str, output: Path) -> None:
    """Write the newest profile published for the stored image `reference` to `output`."""
    from imagefs.artifacts import find_artifacts
    from imagefs.store import fsutil

    record, image = await _stored_image(session, reference)
    ref, client = _repository(session, reference, record)
    found = await find_artifacts(client, ref.repository, image.manifest_digest, ARTIFACT_TYPE)
    if not found or not found[-1].layers:
        raise NotFound(f"no prefetch profile is published for {reference}")
    blob = found[-1].layers[0]
    data = await client.get_blob(ref.repository, blob.digest, blob.size)
    await session.disk(fsutil.atomic_write, output, data)


async def _stored_image(session: Session, reference: str) -> tuple[ImageRecord, ResolvedImage]:
    record: ImageRecord = await session.disk(find_record, session.store, reference)
    image: ResolvedImage = await session.disk(
        load_resolved, session.store, record.manifest.digest, record.index_digest
    )
    return record, image


def _repository(
    session: Session, reference: str, record: ImageRecord
) -> tuple[Reference, RegistryClient]:
    """Where the image's profiles are kept: its repository (by name, else where it came from)."""
    ref = record.name or record.source
    if ref is None:
        raise NotFound(f"{reference}: no repository to keep the profile in")
    return ref, session.client(ref)
