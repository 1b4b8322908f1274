"""OCI artifacts that describe an image: stored next to it, found from it.

imagefs publishes two kinds — layer indexes (`imagefs index --push`) and prefetch profiles
(`imagefs profile push`) — the same way: an OCI image manifest with an `artifactType`, the
empty config, the payload as layer blobs, and `subject` = the image manifest. A registry with
the referrers API lists it under the image; one without (distribution 2.8) gets the OCI 1.1
fallback: an image index tagged `sha256-<hex of the image manifest digest>` listing it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

import trio

from imagefs.errors import ManifestUnknown, unwrap_groups
from imagefs.oci import mediatypes
from imagefs.oci.digest import Digest
from imagefs.oci.manifest import Descriptor, Index, Manifest, parse_manifest
from imagefs.registry.client import RegistryClient

log = logging.getLogger("imagefs.artifacts")

EMPTY_JSON = b"{}"
# Referrer manifests fetched at once: a mount waits for them before its first read, and a
# repository may list several artifacts (one round trip each, one after another, before).
# Bounded: a registry may list thousands, each up to a manifest's size limit.
REFERRER_FETCHES = 4
# Artifacts of one kind looked at, the newest (listed last): each costs a round trip before
# a mount's first read, and a repository anyone can push to may list thousands.
MAX_ARTIFACTS = 64


def fallback_tag(digest: Digest) -> str:
    return f"{digest.algorithm}-{digest.hex}"


@dataclass(frozen=True)
class Payload:
    media_type: str
    data: bytes
    annotations: Mapping[str, str]


@dataclass(frozen=True)
class PushedArtifact:
    manifest_digest: Digest
    blobs: int
    via_tag: bool  # found through the sha256-<hex> tag (no referrers API)


async def _bytes(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def push_artifact(
    client: RegistryClient,
    repository: str,
    subject: Descriptor,
    artifact_type: str,
    payloads: Sequence[Payload],
) -> PushedArtifact:
    empty = Digest.of(EMPTY_JSON)
    blobs = [(Digest.of(p.data), p) for p in payloads]
    for digest, data in [(empty, EMPTY_JSON), *((d, p.data) for d, p in blobs)]:
        if await client.blob_size(repository, digest) is None:
            await client.upload_blob(repository, digest, len(data), lambda data=data: _bytes(data))  # type: ignore[misc]
    manifest = {
        "schemaVersion": 2,
        "mediaType": mediatypes.OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": mediatypes.OCI_EMPTY, "digest": str(empty), "size": 2},
        "layers": [
            {
                "mediaType": p.media_type,
                "digest": str(digest),
                "size": len(p.data),
                **({"annotations": dict(p.annotations)} if p.annotations else {}),
            }
            for digest, p in blobs
        ],
        "subject": subject.to_json(),
    }
    raw = json.dumps(manifest, separators=(",", ":")).encode()
    digest = await client.put_manifest(
        repository, str(Digest.of(raw)), raw, mediatypes.OCI_MANIFEST
    )
    via_tag = await client.get_referrers(repository, subject.digest) is None
    if via_tag:
        desc = Descriptor(mediatypes.OCI_MANIFEST, digest, len(raw), artifact_type=artifact_type)
        await _add_to_fallback_tag(client, repository, subject.digest, desc)
    return PushedArtifact(digest, len(blobs), via_tag)


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


async def find_artifacts(
    client: RegistryClient, repository: str, subject: Digest, artifact_type: str
) -> list[Manifest]:
    """Artifacts of `artifact_type` whose subject is `subject`, newest listed last."""
    raw = await client.get_referrers(repository, subject)
    referrers: list[Descriptor] = []
    if raw is not None:
        parsed = parse_manifest(raw, mediatypes.OCI_INDEX)
        if isinstance(parsed, Index):
            referrers = list(parsed.manifests)
    if not referrers:
        try:
            got = await client.get_manifest(repository, fallback_tag(subject))
        except ManifestUnknown:
            return []
        parsed = parse_manifest(got.raw, got.media_type)
        if isinstance(parsed, Index):
            referrers = list(parsed.manifests)
    wanted = [ref for ref in referrers if ref.artifact_type == artifact_type]
    if len(wanted) > MAX_ARTIFACTS:
        log.warning(
            "%s lists %d artifacts of kind %s for %s; looking at the newest %d",
            repository,
            len(wanted),
            artifact_type,
            subject.short,
            MAX_ARTIFACTS,
        )
        wanted = wanted[-MAX_ARTIFACTS:]
    found: list[Manifest | None] = [None] * len(wanted)
    pending = iter(enumerate(wanted))  # shared by the fetchers: each referrer to one of them

    async def fetcher() -> None:
        for k, ref in pending:
            answer = await client.get_manifest(repository, str(ref.digest), expected_size=ref.size)
            artifact = parse_manifest(answer.raw, answer.media_type)
            if (
                isinstance(artifact, Manifest)
                and artifact.subject is not None
                and (artifact.subject.digest == subject)
            ):
                found[k] = artifact

    with unwrap_groups():
        async with trio.open_nursery() as nursery:
            for _ in range(min(REFERRER_FETCHES, len(wanted))):
                nursery.start_soon(fetcher)
    return [artifact for artifact in found if artifact is not None]  # in the listing's order
