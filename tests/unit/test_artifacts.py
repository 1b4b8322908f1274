"""Finding an image's artifacts (`imagefs.artifacts.find_artifacts`) with a client that
answers from memory, on trio's mock clock: the referrers' manifests are fetched a few at a
time, the answer keeps the listing's order whatever order they arrive in, and one that fails
fails the search with its own error."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import trio
import trio.testing

from imagefs import artifacts
from imagefs.errors import IntegrityError
from imagefs.oci import mediatypes
from imagefs.oci.digest import Digest
from imagefs.registry.client import ManifestResponse, RegistryClient

KIND = "application/vnd.example.index"
SUBJECT = Digest.of(b"the image manifest")
EMPTY = {
    "mediaType": "application/vnd.oci.empty.v1+json",
    "digest": str(Digest.of(b"{}")),
    "size": 2,
}


def _artifact(n: int, kind: str = KIND, subject: Digest = SUBJECT) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mediatypes.OCI_MANIFEST,
            "artifactType": kind,
            "config": EMPTY,
            "layers": [EMPTY],
            "subject": {"mediaType": mediatypes.OCI_MANIFEST, "digest": str(subject), "size": 9},
            "annotations": {"n": str(n)},
        }
    ).encode()


class FakeClient:
    """Referrers of SUBJECT and their manifests; manifest k answers after `delays[k]` s."""

    def __init__(self, bodies: list[bytes], kinds: list[str], delays: list[float]) -> None:
        self.bodies = {str(Digest.of(b)): (b, d) for b, d in zip(bodies, delays, strict=True)}
        self.index = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": mediatypes.OCI_INDEX,
                "manifests": [
                    {
                        "mediaType": mediatypes.OCI_MANIFEST,
                        "digest": str(Digest.of(b)),
                        "size": len(b),
                        "artifactType": kind,
                    }
                    for b, kind in zip(bodies, kinds, strict=True)
                ],
            }
        ).encode()
        self.in_flight = 0
        self.most_in_flight = 0
        self.fetched: list[str] = []
        self.fail: str | None = None

    async def get_referrers(self, repository: str, subject: Digest) -> bytes:
        return self.index

    async def get_manifest(
        self, repository: str, reference: str, *, expected_size: int | None = None
    ) -> ManifestResponse:
        body, delay = self.bodies[reference]
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await trio.sleep(delay)
        finally:
            self.in_flight -= 1
        self.fetched.append(reference)
        if reference == self.fail:
            raise IntegrityError(f"manifest {reference} is not what it says")
        return ManifestResponse(body, mediatypes.OCI_MANIFEST, Digest.of(body))


def _find(client: FakeClient) -> list[Any]:
    async def main() -> list[Any]:
        return await artifacts.find_artifacts(cast(RegistryClient, client), "repo", SUBJECT, KIND)

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_referrers_are_fetched_a_few_at_a_time_and_kept_in_listing_order() -> None:
    n = 10
    bodies = [_artifact(k) for k in range(n)]
    bodies[3] = _artifact(3, subject=Digest.of(b"another image"))  # not this image's
    kinds = [KIND] * n
    kinds[5] = "application/vnd.example.other"  # another kind: never fetched
    client = FakeClient(bodies, kinds, delays=[1.0 / (k + 1) for k in range(n)])
    found = _find(client)
    assert [m.annotations["n"] for m in found] == [str(k) for k in range(n) if k not in (3, 5)]
    assert client.most_in_flight == artifacts.REFERRER_FETCHES
    assert len(client.fetched) == n - 1
    assert client.fetched != sorted(client.fetched, key=list(client.bodies).index)  # out of order


def test_a_listing_of_thousands_costs_only_the_newest_few_fetches(
    caplog: pytest.LogCaptureFixture,
) -> None:
    n = artifacts.MAX_ARTIFACTS + 200  # anyone who can push may attach as many
    kinds = [KIND] * n
    client = FakeClient([_artifact(k) for k in range(n)], kinds, delays=[0.001] * n)
    found = _find(client)
    newest = range(n - artifacts.MAX_ARTIFACTS, n)  # listed last
    assert [m.annotations["n"] for m in found] == [str(k) for k in newest]
    assert len(client.fetched) == artifacts.MAX_ARTIFACTS
    assert f"lists {n} artifacts of kind {KIND}" in caplog.text


def test_a_failing_referrer_fails_the_search_with_its_own_error() -> None:
    bodies = [_artifact(k) for k in range(6)]
    client = FakeClient(bodies, [KIND] * 6, delays=[0.1] * 6)
    client.fail = str(Digest.of(bodies[4]))
    with pytest.raises(IntegrityError, match="is not what it says"):
        _find(client)


def test_no_referrer_of_the_kind_fetches_nothing() -> None:
    client = FakeClient([_artifact(0)], ["application/vnd.example.other"], delays=[0.1])
    assert _find(client) == []
    assert client.fetched == []


def test_a_mount_does_not_wait_for_the_referrers_record_to_be_written(tmp_path: Path) -> None:
    """`RemoteIndexes` hands both store writes of a first lookup to `keep` (a mount's
    nursery): the record of which index each layer's referrer named, and the index itself.
    The index is answered before either is written; an offline remount finds it by the record
    once they have run."""
    from imagefs.oci.image import Layer
    from imagefs.oci.manifest import Descriptor
    from imagefs.published import (
        ARTIFACT_TYPE,
        INDEX_MEDIA_TYPE,
        LAYER_ANNOTATION,
        RemoteIndexes,
    )
    from imagefs.store.layerindexes import LayerIndexStore
    from tests.unit.test_layerindexes_published import _published

    bound, params, raw = _published(tmp_path)
    layer = Layer(
        Descriptor(mediatypes.OCI_LAYER_GZIP, bound.layer, params["layer_size"]),
        bound.layer,
    )
    blob_desc = {
        "mediaType": INDEX_MEDIA_TYPE,
        "digest": str(Digest.of(raw)),
        "size": len(raw),
        "annotations": {LAYER_ANNOTATION: str(layer.digest)},
    }
    manifest = json.loads(_artifact(0, kind=ARTIFACT_TYPE))
    manifest["layers"] = [blob_desc]
    body = json.dumps(manifest).encode()
    client = FakeClient([body], [ARTIFACT_TYPE], delays=[0.0])

    async def get_blob(repository: str, digest: Digest, size: int, **_: Any) -> bytes:
        assert digest == Digest.of(raw)
        return raw

    client.get_blob = get_blob  # type: ignore[attr-defined]
    store = LayerIndexStore(tmp_path / "root")
    kept: list[Callable[[], None]] = []

    async def keep(write: Callable[[], None]) -> None:
        kept.append(write)  # not run: as a mount's nursery would, later

    async def main() -> Any:
        remote = RemoteIndexes(cast(RegistryClient, client), "repo", SUBJECT, store)
        return await remote(layer, keep)

    idx = trio.run(main)
    assert idx is not None and len(idx.toc) > 0
    assert store.referrers(SUBJECT) == {} and len(kept) == 2  # answered, nothing written yet
    for write in kept:
        write()
    assert store.referrers(SUBJECT) == {str(layer.digest): str(Digest.of(raw))}
    offline = RemoteIndexes(None, "repo", SUBJECT, store)
    assert trio.run(offline, layer, keep) is not None
