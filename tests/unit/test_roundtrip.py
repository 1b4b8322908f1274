"""The registry client's policy layers (roundtrip.py), each alone on `httpx.MockTransport`.

No sockets and no clock: the fake server is a function that sees every request the layer
sends, `Retry` sleeps through a recorder instead of trio, and `Authenticate` asks a small
Basic-only authority (the Bearer token flow is `Connection`'s: test_client_bounds). The real
registry's side of the same policy is tests/integration (test_transport, test_auth, ...).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest

from imagefs.errors import RegistryError, RegistryUnreachable, Unauthorized
from imagefs.registry.roundtrip import (
    MAX_REDIRECTS,
    Authenticate,
    FollowRedirects,
    Retry,
    Send,
    client_send,
    retry_after,
)
from imagefs.registry.transport import RetryPolicy

Handler = Callable[[httpx.Request], httpx.Response]
REGISTRY = "https://registry.example"
TOKEN = "Bearer secret"


class Sleeps:
    """Stands in for `trio.sleep`: records what a layer waited for, waits for nothing."""

    def __init__(self) -> None:
        self.waited: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waited.append(seconds)


def server(answers: Iterator[httpx.Response | Exception], seen: list[httpx.Request]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        # as it was sent: a layer may send the same request object again, changed
        body = httpx.ByteStream(request.read())
        seen.append(
            httpx.Request(request.method, request.url, headers=request.headers, stream=body)
        )
        seen[-1].read()
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return handler


def sender(handler: Handler) -> tuple[httpx.AsyncClient, Send]:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler), follow_redirects=False)
    return client, client_send(client)


def get(
    client: httpx.AsyncClient, url: str = f"{REGISTRY}/v2/r/blobs/x", **kw: object
) -> httpx.Request:
    return client.build_request("GET", url, headers={"Authorization": TOKEN}, **kw)  # type: ignore[arg-type]


# -- Retry ------------------------------------------------------------------------------------


async def test_retry_resends_transient_statuses_until_an_answer() -> None:
    seen: list[httpx.Request] = []
    answers = iter([httpx.Response(503), httpx.Response(502), httpx.Response(200, text="ok")])
    client, send = sender(server(answers, seen))
    sleeps = Sleeps()
    retry = Retry(send, "registry.example", RetryPolicy(base_delay=1.0), sleep=sleeps)
    async with client:
        resp = await retry(get(client))
        assert resp.status_code == 200 and await resp.aread() == b"ok"
    assert len(seen) == 3
    assert sleeps.waited == [1.0, 2.0]  # the policy's backoff, doubling
    assert all(r.headers["Authorization"] == TOKEN for r in seen)


@pytest.mark.parametrize(("header", "waited"), [("3", 3.0), ("3600", 10.0)])
async def test_retry_after_is_the_wait_up_to_the_policys_cap(header: str, waited: float) -> None:
    seen: list[httpx.Request] = []
    answers = iter([httpx.Response(429, headers={"Retry-After": header}), httpx.Response(200)])
    client, send = sender(server(answers, seen))
    sleeps = Sleeps()
    async with client:
        resp = await Retry(send, "r", RetryPolicy(max_delay=10.0), sleep=sleeps)(get(client))
    assert resp.status_code == 200
    assert sleeps.waited == [waited]


async def test_retry_gives_back_the_last_answer_when_the_policy_is_spent() -> None:
    seen: list[httpx.Request] = []
    client, send = sender(server(iter([httpx.Response(503)] * 10), seen))
    sleeps = Sleeps()
    async with client:
        resp = await Retry(send, "r", RetryPolicy(attempts=3), sleep=sleeps)(get(client))
    assert resp.status_code == 503  # the caller reports it; the policy only bounds the tries
    assert len(seen) == 3 and len(sleeps.waited) == 2


@pytest.mark.parametrize("status", [400, 401, 404, 500])
async def test_retry_leaves_answers_that_will_not_change(status: int) -> None:
    seen: list[httpx.Request] = []
    client, send = sender(server(iter([httpx.Response(status)] * 5), seen))
    async with client:
        resp = await Retry(send, "r", sleep=Sleeps())(get(client))
    assert resp.status_code == status and len(seen) == 1


async def test_transport_errors_are_retried_then_named() -> None:
    seen: list[httpx.Request] = []
    refused = httpx.ConnectError("[Errno 111] Connect call failed")
    client, send = sender(server(iter([refused] * 10), seen))
    sleeps = Sleeps()
    async with client:
        with pytest.raises(RegistryUnreachable) as info:
            await Retry(send, "registry.example", RetryPolicy(attempts=4), sleep=sleeps)(
                get(client)
            )
    assert str(info.value) == (
        "registry.example: GET /v2/r/blobs/x: [Errno 111] Connect call failed (after 4 attempts)"
    )
    assert len(seen) == 4 and len(sleeps.waited) == 3
    # jittered: between half and all of the policy's backoff
    assert all(0.125 * 2**i <= w <= 0.25 * 2**i for i, w in enumerate(sleeps.waited))


async def test_a_body_that_cannot_be_sent_again_gets_one_try() -> None:
    seen: list[httpx.Request] = []
    answers: Iterator[httpx.Response | Exception] = iter(
        [httpx.Response(503), httpx.ReadError("reset by peer")]
    )
    client, send = sender(server(answers, seen))
    once = Retry(send, "r", enabled=False, sleep=Sleeps())
    async with client:
        assert (await once(get(client))).status_code == 503
        with pytest.raises(RegistryUnreachable, match=r"reset by peer \(after 1 attempt\)$"):
            await once(get(client))
    assert len(seen) == 2


def test_retry_after_reads_seconds_and_dates() -> None:
    assert retry_after(httpx.Response(429, headers={"Retry-After": "7"})) == 7.0
    past = "Wed, 21 Oct 2015 07:28:00 GMT"
    assert retry_after(httpx.Response(429, headers={"Retry-After": past})) == 0.0
    assert retry_after(httpx.Response(429, headers={"Retry-After": "soon"})) is None
    assert retry_after(httpx.Response(429)) is None


# -- FollowRedirects --------------------------------------------------------------------------


def redirect(to: str, status: int = 307) -> httpx.Response:
    return httpx.Response(status, headers={"Location": to}, text="a body nobody reads")


async def test_authorization_stays_home_across_redirects() -> None:
    seen: list[httpx.Request] = []
    answers = iter(
        [
            redirect("/v2/r/blobs/moved"),  # same origin: still ours
            redirect("http://registry.example/blob"),  # another scheme: another origin
            redirect(f"{REGISTRY}/back-home"),  # once gone, it stays gone
            httpx.Response(200, text="blob"),
        ]
    )
    client, send = sender(server(answers, seen))
    async with client:
        resp = await FollowRedirects(send, "registry.example")(get(client))
        assert await resp.aread() == b"blob"
    assert [str(r.url) for r in seen] == [
        f"{REGISTRY}/v2/r/blobs/x",
        f"{REGISTRY}/v2/r/blobs/moved",
        "http://registry.example/blob",
        f"{REGISTRY}/back-home",
    ]
    assert [r.headers.get("Authorization") for r in seen] == [TOKEN, TOKEN, None, None]
    assert [r.headers["Host"] for r in seen] == ["registry.example"] * 4


async def test_storage_on_another_host_never_sees_the_token() -> None:
    seen: list[httpx.Request] = []
    answers = iter([redirect("https://storage.example:8443/signed?x=1"), httpx.Response(200)])
    client, send = sender(server(answers, seen))
    async with client:
        await FollowRedirects(send, "registry.example")(get(client))
    assert (
        seen[1].url.host == "storage.example" and seen[1].headers["Host"] == "storage.example:8443"
    )
    assert "Authorization" not in seen[1].headers


async def test_303_turns_an_upload_into_a_get_without_its_body() -> None:
    seen: list[httpx.Request] = []
    answers = iter([redirect("/v2/r/blobs/uploads/1", 303), httpx.Response(200)])
    client, send = sender(server(answers, seen))
    put = client.build_request("PUT", f"{REGISTRY}/v2/r/blobs/uploads/", content=b"layer")
    async with client:
        await FollowRedirects(send, "registry.example")(put)
    assert [(r.method, r.content) for r in seen] == [("PUT", b"layer"), ("GET", b"")]
    assert "Content-Length" not in seen[1].headers


async def test_307_resends_the_same_method_and_body() -> None:
    seen: list[httpx.Request] = []
    answers = iter([redirect("/elsewhere"), httpx.Response(201)])
    client, send = sender(server(answers, seen))
    put = client.build_request("PUT", f"{REGISTRY}/v2/r/manifests/t", content=b"{}")
    async with client:
        assert (await FollowRedirects(send, "registry.example")(put)).status_code == 201
    assert [(r.method, r.content) for r in seen] == [("PUT", b"{}"), ("PUT", b"{}")]


async def test_a_redirect_loop_is_a_clear_error_after_a_few_hops() -> None:
    seen: list[httpx.Request] = []
    client, send = sender(server(iter([redirect("/v2/r/blobs/x")] * 20), seen))
    async with client:
        with pytest.raises(RegistryError, match=r"^registry\.example: too many redirects for GET"):
            await FollowRedirects(send, "registry.example")(get(client))
    assert len(seen) == MAX_REDIRECTS + 1


async def test_a_redirect_without_location_is_the_answer() -> None:
    seen: list[httpx.Request] = []
    client, send = sender(server(iter([httpx.Response(302)]), seen))
    async with client:
        assert (await FollowRedirects(send, "r")(get(client))).status_code == 302


# -- composed, as Connection._sender does -----------------------------------------------------


async def test_a_retry_starts_again_at_the_registry_with_its_token() -> None:
    """Storage behind a redirect failing for a moment: the retry goes back to the registry
    (which may hand out a fresh signed URL), the token to it and never to storage."""
    seen: list[httpx.Request] = []
    storage = "https://storage.example/signed"
    answers = iter([redirect(storage), httpx.Response(503), redirect(storage), httpx.Response(200)])
    client, send = sender(server(answers, seen))
    sleeps = Sleeps()
    layered = Retry(FollowRedirects(send, "registry.example"), "registry.example", sleep=sleeps)
    async with client:
        assert (await layered(get(client))).status_code == 200
    assert [(r.url.host, r.headers.get("Authorization")) for r in seen] == [
        ("registry.example", TOKEN),
        ("storage.example", None),
        ("registry.example", TOKEN),
        ("storage.example", None),
    ]
    assert len(sleeps.waited) == 1


# -- Authenticate -----------------------------------------------------------------------------


class BasicAuthority:
    """One registry's credentials, as `Connection` keeps them: nothing sent until a 401
    names Basic, then the user's password; `refused` is the error a second 401 becomes."""

    def __init__(self, known: bool = True) -> None:
        self.scheme: str | None = None
        self.known = known
        self.challenges: list[str] = []

    async def header(self) -> str | None:
        return "Basic YWxpY2U6d29uZGVybGFuZA==" if self.scheme == "basic" else None

    async def learn(self, www_authenticate: str) -> bool:
        self.challenges.append(www_authenticate)
        if www_authenticate.lower().startswith("basic"):
            self.scheme = "basic"
        return self.known and self.scheme is not None

    async def refused(self, resp: httpx.Response) -> Exception:
        return Unauthorized(f"refused: HTTP {resp.status_code}")


class Unread(httpx.AsyncByteStream):
    """A body as a network transport yields it (`content=` would count as read already)."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'{"errors": []}'


def challenge(www: str = 'Basic realm="r"') -> httpx.Response:
    return httpx.Response(401, headers={"WWW-Authenticate": www}, stream=Unread())


async def test_a_challenge_is_learnt_and_the_request_sent_again() -> None:
    seen: list[httpx.Request] = []
    client, send = sender(server(iter([challenge(), httpx.Response(200, text="m")]), seen))
    authority = BasicAuthority()
    auth = Authenticate(send, "registry.example", REGISTRY, authority)
    async with client:
        resp = await auth(client.build_request("GET", f"{REGISTRY}/v2/r/manifests/t"))
        assert await resp.aread() == b"m"
    assert [r.headers.get("Authorization") for r in seen] == [None, await authority.header()]
    assert authority.challenges == ['Basic realm="r"']


async def test_a_second_401_is_the_authoritys_error() -> None:
    seen: list[httpx.Request] = []
    client, send = sender(server((challenge() for _ in range(5)), seen))
    auth = Authenticate(send, "registry.example", REGISTRY, BasicAuthority())
    async with client:
        with pytest.raises(Unauthorized, match=r"^refused: HTTP 401$"):
            await auth(client.build_request("GET", f"{REGISTRY}/v2/r/manifests/t"))
    assert len(seen) == 2  # learnt once, never looped


async def test_no_credentials_means_no_second_try() -> None:
    seen: list[httpx.Request] = []
    client, send = sender(server((challenge() for _ in range(5)), seen))
    auth = Authenticate(send, "registry.example", REGISTRY, BasicAuthority(known=False))
    async with client:
        with pytest.raises(Unauthorized, match=r"^refused"):
            await auth(client.build_request("GET", f"{REGISTRY}/v2/r/manifests/t"))
    assert len(seen) == 1


@pytest.mark.parametrize(
    "elsewhere", ["https://uploads.example/v2/r/blobs/uploads/1", "http://registry.example/x"]
)
async def test_credentials_only_to_the_registrys_own_origin(elsewhere: str) -> None:
    seen: list[httpx.Request] = []
    client, send = sender(server(iter([httpx.Response(202)]), seen))
    authority = BasicAuthority()
    authority.scheme = "basic"  # learnt earlier, from the registry itself
    auth = Authenticate(send, "registry.example", REGISTRY, authority)
    async with client:
        await auth(client.build_request("PUT", elsewhere, content=b"x"))
    assert "Authorization" not in seen[0].headers


async def test_a_redirect_target_asking_for_credentials_gets_an_error_not_ours() -> None:
    seen: list[httpx.Request] = []
    stranger = challenge('Bearer realm="https://evil.example/token"')
    answers = iter([redirect("https://evil.example/blob"), stranger])
    client, send = sender(server(answers, seen))
    authority = BasicAuthority()
    auth = Authenticate(
        FollowRedirects(send, "registry.example"), "registry.example", REGISTRY, authority
    )
    async with client:
        with pytest.raises(Unauthorized) as info:
            await auth(client.build_request("GET", f"{REGISTRY}/v2/r/blobs/x"))
    assert str(info.value) == (
        "registry.example: GET /v2/r/blobs/x: redirected to https://evil.example, which asks "
        "for credentials; credentials for registry.example are never sent to another host"
    )
    assert authority.challenges == [] and len(seen) == 2  # nothing learnt from a stranger
