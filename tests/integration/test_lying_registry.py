"""A registry that lies where the real one cannot: endless bodies, shifted ranges, strangers
asking for credentials (docs/faults.md, issue 9 items 3 and 4).

The fault proxy (`imagefs/testing/proxy.py`) sits in front of the real registry and answers
the matched requests itself. For an endless body it counts what it managed to write before
the client hung up: that count is the bound on what the client read (plus what the kernel's
socket buffers held), and it must stay far below `ENDLESS_MAX`, where the old client was
still reading.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from imagefs import api
from imagefs.errors import ImageFSError, IntegrityError, Unauthorized
from imagefs.oci.digest import Digest
from imagefs.registry.client import RegistryClient, WholeBlob
from imagefs.registry.credentials import Credentials
from imagefs.registry.transport import RetryPolicy, TransportOptions
from imagefs.testing.images import SampleImage
from imagefs.testing.mounts import mounted
from imagefs.testing.proxy import FaultProxy, Rule
from imagefs.testing.registry import LocalRegistry
from tests.integration.lazy_content import BIG, SMALL, Published

FAST = TransportOptions(retry=RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.1))
ENDLESS_MAX = 256 << 20  # where the proxy gives up; an unbounded client reads all of it
BOUND = 32 << 20  # a bounded client hangs up after its cap plus the socket buffers


@pytest.fixture
def proxy(registry: LocalRegistry) -> Iterator[FaultProxy]:
    with FaultProxy(registry.url) as p:
        yield p


def endless(method: str, path: str, status: int, declared: int = -1) -> Rule:
    return Rule(
        method, path, "endless_body", status=status, declared=declared, endless_max=ENDLESS_MAX
    )


def biggest(image: SampleImage) -> tuple[Digest, int]:
    layer = max(image.layout.layers(), key=lambda x: int(x["size"]))
    return Digest.parse(layer["digest"]), int(layer["size"])


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text and "Traceback" not in text
    return text


def client_for(proxy: FaultProxy, creds: Credentials | None = None) -> RegistryClient:
    return RegistryClient(proxy.host, options=FAST, credential_lookup=lambda host: creds)


# -- endless bodies ----------------------------------------------------------------------------


@pytest.mark.parametrize("declared", [-1, 1 << 40], ids=["read-to-close", "content-length-1TiB"])
async def test_endless_body_on_a_manifest_404_is_cut(
    tmp_path: Path, sample_image: SampleImage, proxy: FaultProxy, declared: int
) -> None:
    rule = proxy.add(endless("GET", r"/manifests/", 404, declared))
    async with api.Session(root=tmp_path / "root", options=FAST) as s:
        with pytest.raises(ImageFSError) as info:
            await api.pull(s, f"{proxy.host}/{sample_image.pushed.repo_tag}")
    assert "not found" in one_line(info.value)
    assert 0 < rule.sent < BOUND


async def test_endless_body_on_a_blob_500_is_cut(
    tmp_path: Path, sample_image: SampleImage, proxy: FaultProxy
) -> None:
    digest, _ = biggest(sample_image)
    rule = proxy.add(endless("GET", digest.hex, 500, declared=1 << 40))
    async with api.Session(root=tmp_path / "root", options=FAST) as s:
        with pytest.raises(ImageFSError) as info:
            await api.pull(s, f"{proxy.host}/{sample_image.pushed.repo_tag}", full=True)
        assert not s.store.blobs.has(digest)
    assert "HTTP 500" in one_line(info.value)
    assert 0 < rule.sent < BOUND


async def test_endless_token_response_is_refused(
    sample_image: SampleImage, proxy: FaultProxy
) -> None:
    # The registry's own challenge names a realm on itself; the token answer never ends.
    proxy.add(Rule("GET", r"/manifests/", "challenge", times=1))
    rule = proxy.add(endless("GET", r"^/token", 200))
    async with client_for(proxy) as client:
        with pytest.raises(IntegrityError) as info:
            await client.get_manifest(sample_image.pushed.repository, "v1")
    assert "token server" in one_line(info.value) and "limit" in str(info.value)
    assert 0 < rule.sent < BOUND


async def test_endless_referrers_answer_is_refused(
    sample_image: SampleImage, proxy: FaultProxy
) -> None:
    rule = proxy.add(endless("GET", r"/referrers/", 200))
    async with client_for(proxy) as client:
        with pytest.raises(IntegrityError) as info:
            await client.get_referrers(
                sample_image.pushed.repository, Digest.parse(sample_image.digest)
            )
    assert "referrers" in one_line(info.value) and "limit" in str(info.value)
    assert 0 < rule.sent < BOUND


async def test_endless_206_to_a_range_request_is_refused(
    sample_image: SampleImage, proxy: FaultProxy
) -> None:
    digest, _ = biggest(sample_image)
    rule = proxy.add(endless("GET", digest.hex, 206))
    async with client_for(proxy) as client:
        with pytest.raises(IntegrityError) as info:
            await client.get_blob_range(sample_image.pushed.repository, digest, 100, 4196)
    assert "limit" in one_line(info.value)
    assert 0 < rule.sent < BOUND


@pytest.mark.parametrize("declared", [-1, 1 << 40], ids=["read-to-close", "content-length-1TiB"])
async def test_endless_200_to_a_range_request_is_refused(
    tmp_path: Path, sample_image: SampleImage, proxy: FaultProxy, declared: int
) -> None:
    """A 200 is the whole blob: more bytes than the blob has is a lie, and nothing is kept."""
    digest, size = biggest(sample_image)
    rule = proxy.add(endless("GET", digest.hex, 200, declared))
    kept: list[int] = []

    async def sink(chunks: AsyncIterator[bytes]) -> None:
        kept.append(sum([len(c) async for c in chunks]))

    async with client_for(proxy) as client:
        with pytest.raises(IntegrityError) as info:
            await client.get_blob_range(
                sample_image.pushed.repository, digest, 100, 4196, size=size, on_whole_blob=sink
            )
    assert str(digest.short) in one_line(info.value)
    assert not kept  # the sink saw the error, never a "complete" blob
    assert rule.hits == 1 and rule.sent < BOUND
    if declared < 0:  # read to close: only the body's length can give the lie away
        assert rule.sent > 0
    # A 1 TiB Content-Length is refused on the header; whether the fake's first body
    # write lands before the client hangs up is a race, so `sent` may be 0 or more.


# -- ranges that are not what was asked --------------------------------------------------------


async def test_shifted_content_range_is_an_integrity_error(
    sample_image: SampleImage, proxy: FaultProxy
) -> None:
    digest, _ = biggest(sample_image)
    proxy.add(Rule("GET", digest.hex, "shift_content_range", shift=512))
    async with client_for(proxy) as client:
        with pytest.raises(IntegrityError) as info:
            await client.get_blob_range(sample_image.pushed.repository, digest, 1000, 2000)
    assert "asked for bytes 1000-1999" in one_line(info.value)


async def test_whole_blob_for_a_range_goes_to_the_sink_once(
    tmp_path: Path, sample_image: SampleImage, proxy: FaultProxy
) -> None:
    """A registry ignoring Range: the 200's body is streamed to the sink (the store), not
    buffered and cut; the range is then read from what the sink kept."""
    digest, size = biggest(sample_image)
    async with api.Session(root=tmp_path / "root", options=FAST) as s:
        pulled = await api.pull(s, f"{proxy.host}/{sample_image.pushed.repo_tag}")
        layer = next(x for x in pulled.image.layers if x.digest == digest)
        proxy.add(Rule("GET", digest.hex, "ignore_range"))

        async def keep(chunks: AsyncIterator[bytes]) -> None:
            await api.keep_whole_blob(s, layer.descriptor, chunks)

        client = s.client(pulled.reference)
        answer = await client.get_blob_range(
            pulled.reference.repository, digest, 100, 4196, size=size, on_whole_blob=keep
        )
        assert answer == WholeBlob(size)
        assert s.store.blobs.read(digest) == sample_image.layout.blob(str(digest))
    gets = [r for r in proxy.recorded if digest.hex in r.path and r.method == "GET"]
    assert len(gets) == 1


def test_shifted_content_range_in_a_mount_is_eio_and_the_mount_stays(
    tmp_path: Path, estargz_image: Published, registry: LocalRegistry
) -> None:
    """Issue 9.8's trigger: a range that is not the one asked for is an IntegrityError, so
    the read that needed it gets EIO; the mount stays up and serves what it can."""
    with FaultProxy(registry.url) as proxy:
        ref = estargz_image.ref.replace(estargz_image.ref.split("/")[0], proxy.host, 1)
        with mounted(tmp_path / "root", ref, tmp_path / "mnt") as mnt:
            assert (mnt / "etc" / "motd").read_bytes() == SMALL["etc/motd"]
            proxy.add(Rule("GET", r"/blobs/sha256:", "shift_content_range", shift=4096))
            with pytest.raises(OSError) as info:
                (mnt / "data" / "big3.bin").read_bytes()
            assert info.value.errno == errno.EIO
            proxy.clear()
            assert (mnt / "data" / "big3.bin").read_bytes() == BIG["data/big3.bin"]


@pytest.mark.parametrize("status", [200, 206])
def test_endless_range_answer_in_a_mount_is_eio_in_bounded_memory(
    tmp_path: Path, estargz_image: Published, registry: LocalRegistry, status: int
) -> None:
    """The daemon asks for the eStargz TOC by range; the answer never ends. The read gets
    EIO, nothing is kept, the daemon read a bounded amount, and it recovers."""
    layer = estargz_image.layer_digests[-1]
    with FaultProxy(registry.url) as proxy:
        rule = proxy.add(endless("GET", layer.split(":")[1], status))
        ref = estargz_image.ref.replace(estargz_image.ref.split("/")[0], proxy.host, 1)
        root = tmp_path / "root"
        with mounted(root, ref, tmp_path / "mnt") as mnt:
            with pytest.raises(OSError) as info:
                (mnt / "etc" / "motd").read_bytes()
            assert info.value.errno == errno.EIO
            # per answer: a 206 is read up to the range asked; a 200 is the whole blob, read
            # up to its declared size and not a byte further (old: all 256 MiB, each time)
            limit = BOUND if status == 206 else estargz_image.layer_size + BOUND
            assert rule.hits and 0 < rule.sent / rule.hits < limit
            assert not (root / "blobs" / "sha256" / layer.split(":")[1]).exists()
            proxy.clear()
            assert (mnt / "etc" / "motd").read_bytes() == SMALL["etc/motd"]


# -- credentials never leave their registry ----------------------------------------------------


async def test_a_redirect_targets_challenge_never_gets_the_registrys_credentials(
    tmp_path: Path, sample_image: SampleImage, registry: LocalRegistry
) -> None:
    """CVE-2020-15157's class: A redirects a blob GET to B; B answers 401 with a Bearer realm
    on itself. Neither B nor its token endpoint may see A's credentials (basic or as the
    token request's auth): one clear error instead."""
    with (
        FaultProxy(registry.url) as stranger,
        FaultProxy(registry.url, require_basic=("alice", "wonderland")) as front,
    ):
        stranger.add(Rule("*", r".", "challenge"))
        front.add(Rule("GET", r"/blobs/sha256:", "redirect", redirect_to=stranger.url))
        creds = Credentials("alice", "wonderland")
        session = api.Session(
            root=tmp_path / "root", options=FAST, credential_lookup=lambda host: creds
        )
        async with session as s:
            with pytest.raises(Unauthorized) as info:
                await api.pull(s, f"{front.host}/{sample_image.pushed.repo_tag}", full=True)
        text = one_line(info.value)
        assert stranger.host in text and "never sent to another host" in text
        assert stranger.recorded, "the redirect was followed"
        assert all("Authorization" not in r.headers for r in stranger.recorded)
        assert not [r for r in stranger.recorded if r.path.startswith("/token")]
        assert any("Authorization" in r.headers for r in front.recorded)


@pytest.mark.parametrize("target", ["another-port", "another-host"])
async def test_redirect_to_another_origin_carries_no_authorization(
    tmp_path: Path, sample_image: SampleImage, registry: LocalRegistry, target: str
) -> None:
    with (
        FaultProxy(registry.url) as storage,
        FaultProxy(registry.url, require_basic=("alice", "wonderland")) as front,
    ):
        # 127.0.0.1 vs localhost: the same machine, another host name (another origin)
        port = front.host.rsplit(":", 1)[1]
        where = storage.url if target == "another-port" else f"http://localhost:{port}"
        front.add(Rule("GET", r"/blobs/sha256:", "redirect", redirect_to=where))
        creds = Credentials("alice", "wonderland")
        session = api.Session(
            root=tmp_path / "root", options=FAST, credential_lookup=lambda host: creds
        )
        async with session as s:
            if target == "another-port":
                await api.pull(s, f"{front.host}/{sample_image.pushed.repo_tag}", full=True)
                seen = [r for r in storage.recorded if "/blobs/" in r.path]
            else:
                # `localhost:PORT` is the front proxy again, reached under another name: it
                # asks for basic auth, and that is a stranger asking.
                with pytest.raises(Unauthorized, match="never sent to another host"):
                    await api.pull(s, f"{front.host}/{sample_image.pushed.repo_tag}", full=True)
                seen = [r for r in front.recorded if r.status == 401]
        assert seen and all("Authorization" not in r.headers for r in seen)
