"""The registry client's bounds and origins, against `httpx.MockTransport` fakes.

Waits (Retry-After, `--registry-timeout`, the emulated link) are measured on trio's virtual
clock (`autojump_clock`): exact, and independent of how loaded the machine is.

The real registry cannot redirect to another scheme on the same host and port, or name an
upload location on another host; a mock transport can, and it sees every header the client
sends. Bodies here are async generators that never end: a bounded read stops on its own.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from imagefs.errors import IntegrityError, RegistryUnreachable, Unauthorized
from imagefs.oci.digest import Digest
from imagefs.registry import bodies
from imagefs.registry.client import RegistryClient
from imagefs.registry.credentials import Credentials
from imagefs.registry.netem import EmulatedTransport, Link
from imagefs.registry.transport import TransportOptions

ALICE = Credentials("alice", "wonderland")
BLOB = b"x" * 1000
DIGEST = Digest.of(BLOB)


class Endless(httpx.AsyncByteStream):
    """A body that never ends; counts what was taken from it."""

    def __init__(self) -> None:
        self.given = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in itertools.count():
            self.given += 64 << 10
            yield b"e" * (64 << 10)


class Once(httpx.AsyncByteStream):
    """A body as a network transport yields it (`content=` would be read in advance)."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.data:
            yield self.data


def client_with(
    handler: Callable[[httpx.Request], Any], options: TransportOptions | None = None
) -> RegistryClient:
    client = RegistryClient(
        "reg.example:5000",
        credential_lookup=lambda host: ALICE,
        options=options or TransportOptions(),
    )
    fake = httpx.AsyncClient(transport=httpx.MockTransport(handler), follow_redirects=False)
    client._upstream.client = fake
    client._upstream.base_url = "https://reg.example:5000"
    # the pools made later (a token realm on another host) reach the same fake network
    client._make_client = lambda host, tls=None: fake  # type: ignore[method-assign]
    return client


async def test_error_body_is_cut_and_connection_dropped() -> None:
    body = Endless()
    resp = httpx.Response(500, stream=body, request=httpx.Request("GET", "https://x/"))
    loaded = await bodies.loaded(resp, 1 << 20, "x")
    assert len(loaded.content) == bodies.ERROR_BODY_CAP
    assert body.given <= bodies.ERROR_BODY_CAP + (64 << 10)


async def test_success_body_over_its_cap_is_refused() -> None:
    body = Endless()
    resp = httpx.Response(200, stream=body, request=httpx.Request("GET", "https://x/"))
    with pytest.raises(IntegrityError, match="over the 1048576-byte limit"):
        await bodies.loaded(resp, 1 << 20, "x")
    assert body.given <= (1 << 20) + (64 << 10)


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        ("bytes 10-19/1000", True),
        ("bytes 10-19/*", True),
        ("bytes 11-20/1000", False),  # shifted
        ("bytes 10-29/1000", False),  # longer than asked
        ("bytes 10-19", False),
        ("", False),
    ],
)
async def test_a_206_must_carry_exactly_the_range_asked_for(header: str, ok: bool) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["Range"] == "bytes=10-19"
        headers = {"Content-Range": header} if header else {}
        return httpx.Response(206, headers=headers, stream=Once(BLOB[10:20]))

    async with client_with(handler) as client:
        if ok:
            assert await client.get_blob_range("r", DIGEST, 10, 20) == BLOB[10:20]
        else:
            with pytest.raises(IntegrityError):
                await client.get_blob_range("r", DIGEST, 10, 20)


async def test_a_200_without_a_sink_is_read_only_up_to_the_range() -> None:
    body = Endless()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=body)

    async with client_with(handler) as client:
        data = await client.get_blob_range("r", DIGEST, 100, 200)
    assert data == b"e" * 100
    assert body.given <= 128 << 10


def registry_a(
    status: int, location: str, elsewhere: Callable[[httpx.Request], httpx.Response]
) -> tuple[list[httpx.Request], Callable[[httpx.Request], httpx.Response]]:
    """Registry A (https://reg.example:5000, basic auth) answering `status` + `Location`;
    every other origin is answered by `elsewhere`. Returns the requests seen and the handler."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        url = request.url
        if (url.scheme, url.host, url.port) != ("https", "reg.example", 5000):
            return elsewhere(request)
        if "Authorization" not in request.headers:
            challenge = {"WWW-Authenticate": 'Basic realm="r"'}
            return httpx.Response(401, headers=challenge, stream=Once())
        return httpx.Response(status, headers={"Location": location}, stream=Once())

    return seen, handler


@pytest.mark.parametrize(
    "target",
    [
        "http://reg.example:5000/storage/blob",  # another scheme, same host and port
        "https://reg.example:5001/storage/blob",  # another port
        "https://storage.example:5000/blob",  # another host
    ],
)
async def test_redirect_to_another_origin_drops_authorization(target: str) -> None:
    seen, handler = registry_a(307, target, lambda r: httpx.Response(200, stream=Once(BLOB)))
    async with client_with(handler) as client:
        chunks = [c async for c in client.stream_blob("r", DIGEST, len(BLOB))]
    assert b"".join(chunks) == BLOB
    final = seen[-1]
    assert str(final.url) == target
    assert "Authorization" not in final.headers


async def test_upload_location_on_another_host_gets_no_credentials() -> None:
    def upload(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500 if "Authorization" in request.headers else 201, stream=Once())

    seen, handler = registry_a(202, "https://elsewhere.example/up/1", upload)

    async def source() -> AsyncIterator[bytes]:
        yield BLOB

    async with client_with(handler) as client:
        await client.upload_blob("r", DIGEST, len(BLOB), source)
    elsewhere = [r for r in seen if r.url.host == "elsewhere.example"]
    assert elsewhere and all("Authorization" not in r.headers for r in elsewhere)


async def test_a_strangers_challenge_after_a_redirect_is_refused() -> None:
    def stranger(request: httpx.Request) -> httpx.Response:
        realm = 'Bearer realm="https://b.example/token",service="b"'
        return httpx.Response(401, headers={"WWW-Authenticate": realm}, stream=Once())

    seen, handler = registry_a(307, "https://b.example/blob", stranger)
    async with client_with(handler) as client:
        with pytest.raises(Unauthorized, match="never sent to another host"):
            await client.get_blob_range("r", DIGEST, 0, 10)
    strangers = [r for r in seen if r.url.host == "b.example"]
    assert strangers and all("Authorization" not in r.headers for r in strangers)
    assert not [r for r in strangers if r.url.path == "/token"]


@pytest.mark.parametrize("creds", [True, False], ids=["with-credentials", "anonymous"])
async def test_credentials_never_go_to_a_plain_http_token_realm(creds: bool) -> None:
    """Registry A's own challenge names `http://auth.example/token`: a login would cross the
    network in clear text. Refused with credentials; an anonymous token is fine."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "auth.example":
            return httpx.Response(200, stream=Once(b'{"token": "t"}'))
        if request.headers.get("Authorization") != "Bearer t":
            realm = 'Bearer realm="http://auth.example/token",service="a"'
            return httpx.Response(401, headers={"WWW-Authenticate": realm}, stream=Once())
        return httpx.Response(200, stream=Once(BLOB))

    client = client_with(handler)
    if not creds:
        client._lookup = lambda host: None
    async with client:
        if creds:
            with pytest.raises(Unauthorized, match="not HTTPS"):
                await client.get_blob("r", DIGEST, len(BLOB))
            assert not [r for r in seen if r.url.host == "auth.example"]
        else:
            assert await client.get_blob("r", DIGEST, len(BLOB)) == BLOB


# -- waits, on the virtual clock --------------------------------------------------------------


async def test_retry_after_is_waited_for(autojump_clock: trio.testing.MockClock) -> None:
    answers = iter(
        [
            httpx.Response(429, headers={"Retry-After": "3"}, stream=Once()),
            httpx.Response(
                206, headers={"Content-Range": "bytes 10-19/1000"}, stream=Once(BLOB[10:20])
            ),
        ]
    )

    def handler(request: httpx.Request) -> httpx.Response:
        return next(answers)

    async with client_with(handler) as client:
        start = trio.current_time()
        assert await client.get_blob_range("r", DIGEST, 10, 20) == BLOB[10:20]
        # the server's 3 s, not the policy's 0.25 s first backoff
        assert trio.current_time() - start == pytest.approx(3.0)


async def test_registry_timeout_bounds_a_request_that_never_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    asked = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal asked
        asked += 1
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async with client_with(handler, TransportOptions(timeout=1.5)) as client:
        start = trio.current_time()
        with pytest.raises(RegistryUnreachable, match=r"no answer within 1\.5s"):
            await client.get_blob_range("r", DIGEST, 10, 20)
        assert trio.current_time() - start == pytest.approx(1.5)
    assert asked == 1


async def test_emulated_link_adds_latency_per_request_and_paces_bytes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Once(b"x" * 500))

    link = Link(latency=0.05, bandwidth=1000)  # 50 ms a request, 1000 bytes a second
    transport = EmulatedTransport(httpx.MockTransport(handler), link)
    async with httpx.AsyncClient(transport=transport) as http:
        start = trio.current_time()
        for _ in range(3):
            assert len((await http.get("http://reg.example/")).content) == 500
        assert trio.current_time() - start == pytest.approx(3 * 0.05 + 3 * 500 / 1000)
    assert (link.requests, link.sent) == (3, 1500)


class BreaksAfter(httpx.AsyncByteStream):
    """A body whose connection breaks after `data` (a reset mid-body)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data
        raise httpx.ReadError("connection reset by peer")


async def test_get_blob_starts_over_when_the_resume_ignores_range(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The connection breaks after 100 bytes; the resume asks `Range: bytes=100-` and the
    server answers 200 with the whole blob. Kept, the first 100 bytes made the blob 1,100
    bytes long: a spurious IntegrityError on an honest registry."""
    asked: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers.get("Range"))
        if len(asked) == 1:
            return httpx.Response(200, stream=BreaksAfter(BLOB[:100]))
        return httpx.Response(200, stream=Once(BLOB))  # Range ignored

    async with client_with(handler) as client:
        assert await client.get_blob("r", DIGEST, len(BLOB)) == BLOB
    assert asked == [None, "bytes=100-"]
