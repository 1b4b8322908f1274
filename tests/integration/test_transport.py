"""Redirects, retries, resumes and corruption, injected by a proxy in front of the registry."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagefs import api
from imagefs.errors import IntegrityError, RegistryError
from imagefs.oci.digest import Digest
from imagefs.registry import wire
from imagefs.registry.credentials import Credentials
from imagefs.registry.transport import RetryPolicy, TransportOptions
from imagefs.testing.images import (
    SampleImage,
    build_umoci_image,
    push,
    skopeo_inspect,
)
from imagefs.testing.proxy import FaultProxy, Rule
from imagefs.testing.registry import LocalRegistry

FAST = TransportOptions(retry=RetryPolicy(attempts=4, base_delay=0.01, max_delay=2.0))


@pytest.fixture
def proxy(registry: LocalRegistry) -> Iterator[FaultProxy]:
    with FaultProxy(registry.url) as p:
        yield p


def via(proxy: FaultProxy, image: SampleImage) -> str:
    return f"{proxy.host}/{image.pushed.repo_tag}"


async def test_redirect_to_another_host_never_carries_authorization(
    tmp_path: Path, sample_image: SampleImage, registry: LocalRegistry
) -> None:
    storage = FaultProxy(registry.url).start()
    front = FaultProxy(registry.url, require_basic=("alice", "wonderland")).start()
    try:
        front.add(Rule("GET", r"/blobs/sha256:", "redirect", redirect_to=storage.url))
        creds = Credentials("alice", "wonderland")
        session = api.Session(
            root=tmp_path / "root", options=FAST, credential_lookup=lambda host: creds
        )
        async with session as s:
            result = await api.pull(s, f"{front.host}/{sample_image.pushed.repo_tag}", full=True)
        assert str(result.image.repo_digest) == sample_image.digest
        blob_gets = [r for r in storage.recorded if "/blobs/" in r.path]
        assert len(blob_gets) == sample_image.layer_count + 1  # config + layers
        assert all("Authorization" not in r.headers for r in blob_gets)
        assert any("Authorization" in r.headers for r in front.recorded if r.status == 307)
    finally:
        front.stop()
        storage.stop()


async def test_transient_5xx_and_429_are_retried(
    tmp_path: Path, sample_image: SampleImage, proxy: FaultProxy
) -> None:
    proxy.add(Rule("GET", r"/manifests/", "status", times=2, status=503))
    proxy.add(Rule("GET", r"/blobs/", "status", times=1, status=502))
    proxy.add(Rule("GET", r"/blobs/", "status", times=1, status=429, retry_after="1"))
    async with api.Session(root=tmp_path / "root", options=FAST) as s:
        result = await api.pull(s, via(proxy, sample_image), full=True)
    assert str(result.image.repo_digest) == sample_image.digest
    # that Retry-After is waited for is tested on trio's virtual clock (test_client_bounds.py)
    statuses = [r.status for r in proxy.recorded]
    assert statuses.count(503) == 2 and statuses.count(502) == 1 and statuses.count(429) == 1


async def test_permanent_failure_is_one_clear_error(
    tmp_path: Path, sample_image: SampleImage, proxy: FaultProxy
) -> None:
    proxy.add(Rule("GET", r"/manifests/", "status", status=503))
    async with api.Session(root=tmp_path / "root", options=FAST) as s:
        with pytest.raises(RegistryError) as info:
            await api.pull(s, via(proxy, sample_image))
    text = str(info.value)
    assert proxy.host in text and "503" in text and "UNAVAILABLE" in text
    assert len([r for r in proxy.recorded if "/manifests/" in r.path]) == FAST.retry.attempts


async def test_broken_body_resumes_with_range(
    tmp_path: Path, sample_image: SampleImage, proxy: FaultProxy
) -> None:
    big = max(sample_image.layout.layers(), key=lambda layer: int(layer["size"]))
    proxy.add(Rule("GET", big["digest"], "truncate", times=1, truncate_to=100_000))
    async with api.Session(root=tmp_path / "root", options=FAST) as s:
        await api.pull(s, via(proxy, sample_image), full=True)
        stored = s.store.blobs.path(Digest.parse(big["digest"])).read_bytes()
    assert stored == sample_image.layout.blob(big["digest"])
    gets = [r for r in proxy.recorded if big["digest"] in r.path and r.method == "GET"]
    assert len(gets) == 2 and gets[1].headers.get("Range") == "bytes=100000-"


async def test_registry_ignoring_range_still_yields_the_right_blob(
    tmp_path: Path, sample_image: SampleImage, proxy: FaultProxy
) -> None:
    big = max(sample_image.layout.layers(), key=lambda layer: int(layer["size"]))
    proxy.add(Rule("GET", big["digest"], "truncate", times=1, truncate_to=50_000))
    proxy.add(Rule("GET", big["digest"], "ignore_range", times=1))
    async with api.Session(root=tmp_path / "root", options=FAST) as s:
        await api.pull(s, via(proxy, sample_image), full=True)
        stored = s.store.blobs.path(Digest.parse(big["digest"])).read_bytes()
    assert stored == sample_image.layout.blob(big["digest"])


@pytest.mark.parametrize("resume", ["range", "range ignored"])
async def test_a_resumed_blob_counts_what_came_over_the_wire_once(
    tmp_path: Path, sample_image: SampleImage, proxy: FaultProxy, resume: str
) -> None:
    """Counting at the wire (registry/wire.py): the cut-off body counts what it carried, the
    resume what it carried — a resume the registry answers with the whole blob again costs
    the whole blob again, and the count says so."""
    big = max(sample_image.layout.layers(), key=lambda layer: int(layer["size"]))
    size = int(big["size"])
    proxy.add(Rule("GET", big["digest"], "truncate", times=1, truncate_to=100_000))
    if resume == "range ignored":
        proxy.add(Rule("GET", big["digest"], "ignore_range", times=1))
    async with api.Session(root=tmp_path / "root", options=FAST) as s:
        seen: list[wire.Fetch] = []
        s.wire.listen(seen.append)
        await api.pull(s, via(proxy, sample_image), full=True)
    gets = [r for r in proxy.recorded if big["digest"] in r.path and r.method == "GET"]
    assert len(gets) == 2
    layers = sum(int(layer["size"]) for layer in sample_image.layout.layers())
    again = 100_000 if resume == "range ignored" else 0  # the cut-off part, fetched twice
    whole = [f.nbytes for f in seen if f.cause == "whole layer"]
    assert sum(whole) == layers + again
    assert 100_000 in whole and size - 100_000 + again in whole
    assert {f.cause for f in seen} <= {"manifest", "config", "whole layer", "other"}


async def test_corrupted_bytes_on_the_wire_are_never_stored(
    tmp_path: Path, sample_image: SampleImage, proxy: FaultProxy
) -> None:
    big = max(sample_image.layout.layers(), key=lambda layer: int(layer["size"]))
    proxy.add(Rule("GET", big["digest"], "flip", flip_at=12345))
    async with api.Session(root=tmp_path / "root", options=FAST) as s:
        with pytest.raises(IntegrityError, match=big["digest"].split(":")[1]):
            await api.pull(s, via(proxy, sample_image), full=True)
        assert not s.store.blobs.has(Digest.parse(big["digest"]))


async def test_large_blob_is_pushed_in_chunks(
    tmp_path: Path, fresh_registry: LocalRegistry, registry: LocalRegistry, repo_name: str
) -> None:
    payload = random.Random(7).randbytes(20 << 20)  # incompressible: a > 16 MiB layer blob

    def layer(rootfs: Path) -> None:
        (rootfs / "big.bin").write_bytes(payload)

    image = build_umoci_image(tmp_path / "layout", [layer], tag="big")
    pushed = push(image, registry, f"{repo_name}:big")
    with FaultProxy(fresh_registry.url) as target:
        ref = f"{target.host}/chunked/app:v1"
        async with api.Session(root=tmp_path / "root", options=FAST) as s:
            await api.pull(s, pushed.ref)  # lazy: the push streams the layer from `registry`
            await api.tag(s, pushed.ref, ref)
            await api.push(s, ref)
        patches = [r for r in target.recorded if r.method == "PATCH"]
        assert len(patches) >= 2 and all("Content-Range" in r.headers for r in patches)
    assert skopeo_inspect(fresh_registry, "chunked/app:v1")["Digest"] == pushed.digest


async def test_network_emulation_adds_latency_and_caps_bandwidth(
    tmp_path: Path, sample_image: SampleImage
) -> None:
    from imagefs.registry.netem import Link

    total = sum(int(layer["size"]) for layer in sample_image.layout.layers())
    link = Link(latency=0.05, bandwidth=1_000_000)  # 50 ms per request, 8 Mbit/s
    options = TransportOptions(link=link)
    async with api.Session(root=tmp_path / "root", options=options) as s:
        await api.pull(s, sample_image.ref, full=True)
        requests = sum(c.requests_sent for c in s._clients.values())
    # every request and every layer byte went through the link; what the link then waits
    # (50 ms a request, 1 MB/s) is tested on trio's virtual clock (test_client_bounds.py)
    assert requests >= 3 and link.requests >= requests
    assert link.sent >= total
