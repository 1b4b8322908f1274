"""The registry client's HTTP policy as layered senders, each with one job.

The shape is ggcr's `transport` package, where each policy wraps an `http.RoundTripper`: a
`Send` takes an `httpx.Request` and returns its response with the body not yet read (the
caller reads it with a bound, `bodies`). The innermost `Send` is an `httpx.AsyncClient`'s
own `send` (`client_send`), so the client's response hooks (wire.py) still see every hop and
every attempt, each counted for what it carried; wrapping below the client, as an
`httpx.AsyncBaseTransport`, would hide retries and redirect hops from that count.

From the inside out, as `Connection._sender` composes them (in that one place):
`FollowRedirects` (redirects; Authorization never goes to another origin), `Retry`
(transient failures, with backoff and `Retry-After`), `Authenticate` (credentials for the
registry's own origin; a 401's challenge learnt and the request sent once more). What the
credentials and tokens are is an `Authority`'s business: the endpoint's learnt scheme,
tokens and credential lookup live in connection.py.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urljoin, urlsplit

import httpx
import trio

from imagefs.errors import RegistryError, RegistryUnreachable, Unauthorized
from imagefs.registry import bodies
from imagefs.registry.transport import RetryPolicy, origin_text, same_origin

log = logging.getLogger("imagefs.registry")

RETRY_STATUSES = frozenset({429, 502, 503, 504})
MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

Send = Callable[[httpx.Request], Awaitable[httpx.Response]]
Sleep = Callable[[float], Awaitable[None]]


def client_send(client: httpx.AsyncClient) -> Send:
    """The innermost layer: one request on `client`'s pool, the body left unread. The
    client must not follow redirects itself (`FollowRedirects` does, with our rules)."""

    async def send(request: httpx.Request) -> httpx.Response:
        return await client.send(request, stream=True)

    return send


@dataclass
class FollowRedirects:
    """Follows up to `max_redirects` redirects; the final answer comes back unread.

    Object storage behind a redirect must never see our registry token: once a hop leaves
    the request's origin (another scheme, host or port), the Authorization header is gone,
    and stays gone even if a later hop comes back. A 303 turns the request into a GET
    without a body. A redirect's own body is never read."""

    inner: Send
    host: str  # the registry, for messages
    max_redirects: int = MAX_REDIRECTS

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        origin = str(request.url)
        for _ in range(self.max_redirects + 1):
            resp = await self.inner(request)
            if resp.status_code not in REDIRECT_STATUSES or "Location" not in resp.headers:
                return resp
            await resp.aclose()
            request = _next_hop(request, resp, origin)
        raise RegistryError(
            f"{self.host}: too many redirects for {request.method} {request.url}", host=self.host
        )


def _next_hop(request: httpx.Request, resp: httpx.Response, origin: str) -> httpx.Request:
    url = httpx.URL(urljoin(str(request.url), resp.headers["Location"]))
    headers = httpx.Headers(request.headers)
    # httpx fills in Host only for a request it encodes the body of; this one reuses a body.
    headers["Host"] = url.netloc.decode("ascii")
    if not same_origin(str(url), origin):
        headers.pop("Authorization", None)
        headers.pop("Cookie", None)  # the registry's cookies are the registry's, like its token
    method, stream = request.method, request.stream
    if resp.status_code == 303:
        method, stream = "GET", httpx.ByteStream(b"")
        for name in ("Content-Length", "Content-Type", "Transfer-Encoding"):
            headers.pop(name, None)
    return httpx.Request(method, url, headers=headers, stream=stream, extensions=request.extensions)


@dataclass
class Retry:
    """Resends a request that failed for a reason that may pass: a transport error, or one
    of `RETRY_STATUSES`. At most `policy.attempts` tries, with jittered exponential backoff,
    or the server's `Retry-After` when it gives one (never longer than `policy.max_delay`).
    The last answer comes back as it is (a 503 is the caller's to report); a transport
    error that outlasts the policy is `RegistryUnreachable`, naming its root cause.

    `enabled=False` is for a body that cannot be sent again (a streamed upload): one try,
    whatever comes back."""

    inner: Send
    host: str  # the registry, for messages
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    enabled: bool = True
    sleep: Sleep = trio.sleep

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        attempt = 0
        while True:
            try:
                resp = await self.inner(request)
            except httpx.TransportError as exc:
                attempt += 1
                if attempt >= self.policy.attempts or not self.enabled:
                    path = urlsplit(str(request.url)).path
                    raise RegistryUnreachable(
                        f"{self.host}: {request.method} {path}: {root_cause(exc)}"
                        f" (after {attempt} attempt{'s' if attempt > 1 else ''})",
                        host=self.host,
                    ) from None
                await self.sleep(jitter(self.policy.delay(attempt - 1)))
                continue
            if resp.status_code in RETRY_STATUSES and self.enabled:
                attempt += 1
                if attempt < self.policy.attempts:
                    delay = retry_after(resp) or self.policy.delay(attempt - 1)
                    await resp.aclose()
                    log.info("%s: HTTP %d, retrying in %.2fs", self.host, resp.status_code, delay)
                    await self.sleep(min(delay, self.policy.max_delay))
                    continue
            return resp


class Authority(Protocol):
    """What `Authenticate` asks of one registry endpoint, for one request's scopes."""

    async def header(self) -> str | None:
        """The Authorization value to send now (fetching a token if need be); None: none."""
        ...

    async def learn(self, www_authenticate: str) -> bool:
        """A 401 named how to authenticate; True when sending again may help."""
        ...

    async def refused(self, resp: httpx.Response) -> Exception:
        """The error for a 401 that learning did not cure (`resp` is loaded)."""
        ...


@dataclass
class Authenticate:
    """Sends the registry's credentials to the registry's own origin (`home`: scheme, host
    and port as it is addressed) and to nothing else a URL may name (an upload location on
    another host gets none). A 401 is learnt from once and the request sent again; a second
    401 is the `Authority`'s error. A 401 from a redirect target is a stranger asking for our
    credentials (the class of CVE-2020-15157): `Unauthorized`, and nothing is learnt from it,
    not even a token realm the stranger names."""

    inner: Send
    host: str  # the registry, for messages
    home: str  # the registry's base URL
    authority: Authority

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        home = same_origin(str(request.url), self.home)
        learnt = False
        while True:
            auth = await self.authority.header() if home else None
            if auth:
                request.headers["Authorization"] = auth
            resp = await self.inner(request)
            if resp.status_code != 401:
                return resp
            www = resp.headers.get("WWW-Authenticate", "")
            resp = await bodies.loaded(resp, None, "401")
            if not same_origin(str(resp.url), self.home):
                raise Unauthorized(
                    f"{self.host}: {request.method} {urlsplit(str(request.url)).path}: "
                    f"redirected to {origin_text(str(resp.url))}, which asks for credentials; "
                    f"credentials for {self.host} are never sent to another host",
                    host=self.host,
                    status=401,
                )
            if not learnt and await self.authority.learn(www):
                learnt = True
                continue
            raise await self.authority.refused(resp)


# -- helpers ----------------------------------------------------------------------------------


def retry_after(resp: httpx.Response) -> float | None:
    """`Retry-After` in seconds from now (delta-seconds or an HTTP date); None if absent
    or unreadable."""
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def jitter(delay: float) -> float:
    """Between half and all of `delay`: clients that failed together do not retry together."""
    return delay * (0.5 + random.random() / 2)


def root_cause(exc: BaseException) -> str:
    """The innermost cause, in one line: "[Errno 111] Connect call failed", not a wrapper."""
    exc = exception_chain(exc)[-1]
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    return text.splitlines()[0][:200]


def exception_chain(exc: BaseException) -> list[BaseException]:
    """`exc` and what caused it (first member of a group), outermost first; at most 20."""
    out = [exc]
    while len(out) < 20:
        cur = out[-1]
        if isinstance(cur, BaseExceptionGroup) and cur.exceptions:
            out.append(cur.exceptions[0])
        elif (nxt := cur.__cause__ or cur.__context__) is not None:
            out.append(nxt)
        else:
            break
    return out
