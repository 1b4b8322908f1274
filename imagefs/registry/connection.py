"""One registry as an HTTP peer: the part of the client below the distribution API's verbs.

A `Connection` holds one keep-alive connection pool (an `httpx.AsyncClient`) per endpoint:
the registry itself, and its mirrors for reads. It probes the scheme, does the auth dance
(anonymous, Basic, Bearer token flow with tokens reused until expiry) around the layered
policy of roundtrip.py (retries of transient failures with backoff, redirects), composed in
`_sender`. Credentials go to the registry's own origin and
the token realm its own challenge names, never to a redirect target or an upload location
elsewhere. No body is read here without a bound (`bodies`). `RegistryClient` (client.py)
builds manifests, blobs, ranges and uploads on it.
"""

from __future__ import annotations

import base64
import logging
import math
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Self
from urllib.parse import urlencode, urlsplit

import httpx
import trio

from imagefs.errors import (
    ManifestUnknown,
    RegistryError,
    RegistryUnreachable,
    Unauthorized,
)
from imagefs.registry import bodies, challenge
from imagefs.registry.roundtrip import MAX_REDIRECTS as MAX_REDIRECTS  # tests name it here
from imagefs.registry.roundtrip import (
    Authenticate,
    FollowRedirects,
    Retry,
    Send,
    client_send,
    exception_chain,
    root_cause,
)
from imagefs.registry.transport import (
    TransportOptions,
    effective_timeouts,
    mirrors_for,
    plain_http_allowed,
    sniffing_context,
    ssl_context,
)
from imagefs.registry.wire import Wire
from imagefs.registry.wire import cause as fetch_cause

if TYPE_CHECKING:
    from imagefs.registry import credentials

log = logging.getLogger("imagefs.registry")

# httpcore reads a response 64 KiB at a time, and each read costs the event loop the same
# Python work whatever it brings (h11's event, httpcore's and httpx's stream layers, the
# wire meter). Blob ranges are up to 1 MiB (`making.MAX_FETCH`): read up to that at once.
# 64 MB of 1 MiB ranges from the loopback registry, 4 alternating pairs: 0.245-0.274 s of
# CPU -> 0.165-0.196 s. Set on httpcore's connection class (its only knob) when a client is
# made: commands that never make one do not import httpcore.
READ_SIZE = 1 << 20

USER_AGENT = "imagefs/0.1"

CredentialLookup = Callable[[str], "credentials.Credentials | None"]


@dataclass
class _AuthState:
    scheme: str | None = None  # "basic" | "bearer" once a 401 told us
    last_challenge: challenge.Challenge | None = None
    tokens: dict[tuple[str, ...], challenge.Token] = field(default_factory=dict)


@dataclass
class _Endpoint:
    """One base URL we can send requests to, with its own pool and auth state."""

    host: str  # for credentials and messages: "127.0.0.1:5000", "docker.io"
    netloc: str  # what goes in URLs: "registry-1.docker.io"
    base_url: str | None  # "https://registry-1.docker.io"; None until the scheme is probed
    client: httpx.AsyncClient
    auth: _AuthState = field(default_factory=_AuthState)
    mirror: bool = False


class Connection:
    """One registry (and its mirrors); `RegistryClient` is what callers use."""

    def __init__(
        self,
        registry: str,
        *,
        endpoint_host: str | None = None,
        options: TransportOptions | None = None,
        credential_lookup: CredentialLookup | None = None,
        wire: Wire | None = None,
    ) -> None:
        self.registry = registry
        # Every response body is counted where it arrives, with why it was fetched (wire.py).
        self.wire = wire or Wire()
        self.options = options or TransportOptions()
        self._lookup = credential_lookup or lookup_credentials
        self._creds_cache: dict[str, credentials.Credentials | None] = {}
        netloc = endpoint_host or registry
        self._upstream = _Endpoint(
            host=registry,
            netloc=netloc,
            base_url=None,
            client=self._make_client(registry),
        )
        self._mirrors = [
            _Endpoint(
                host=urlsplit(m).netloc,
                netloc=urlsplit(m).netloc,
                base_url=m if "://" in m else None,
                client=self._make_client(urlsplit(m).netloc or m),
                mirror=True,
            )
            for m in mirrors_for(registry, self.options)
        ]
        self._scheme_lock = trio.Lock()
        # Token servers on hosts other than their registry's: a pool each, with that host's
        # own TLS rules (--insecure-registry names a registry, not its token server).
        self._token_clients: dict[str, httpx.AsyncClient] = {}
        self.requests_sent = 0
        # What the server showed about blob reads: Range ignored at least once; signed storage
        # URLs that blob GETs were redirected to, reused (without auth) until they expire.
        self.ignores_range = False
        self._blob_urls: dict[tuple[str, str], tuple[str, float]] = {}

    def _make_client(self, host: str, tls: ssl.SSLContext | None = None) -> httpx.AsyncClient:
        """A pool for `host`, with its TLS rules (`tls`: another context, for the probe)."""
        import httpcore  # httpx imports it for the transport made below anyway

        httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = READ_SIZE
        connect, read = effective_timeouts(self.options)
        timeout = httpx.Timeout(read, connect=connect, pool=None)
        limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
        verify = tls or ssl_context(host, self.options)
        transport: httpx.AsyncBaseTransport | None = None
        if self.options.link is not None:
            from imagefs.registry.netem import EmulatedTransport  # only when emulating a WAN

            transport = EmulatedTransport(
                httpx.AsyncHTTPTransport(verify=verify, limits=limits), self.options.link
            )
        return httpx.AsyncClient(
            verify=verify,
            transport=transport,
            timeout=timeout,
            follow_redirects=False,
            event_hooks=self.wire.event_hooks(),
            # Digests are over the bytes as stored: no transfer compression, ever.
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
            limits=limits,
            trust_env=True,  # HTTP(S)_PROXY / NO_PROXY as every other tool honours them
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for ep in [self._upstream, *self._mirrors]:
            await ep.client.aclose()
        for client in self._token_clients.values():
            await client.aclose()

    def _token_client(self, ep: _Endpoint, realm_host: str) -> httpx.AsyncClient:
        """The registry's own pool for a realm on the registry's host; otherwise one made
        for the realm's host, whose certificate is verified unless that host itself is
        named insecure (credentials go there)."""
        if realm_host.lower() in (ep.netloc.lower(), ep.host.lower()):
            return ep.client
        client = self._token_clients.get(realm_host)
        if client is None:
            client = self._token_clients[realm_host] = self._make_client(realm_host)
        return client

    # -- credentials ------------------------------------------------------------------------

    async def _credentials(self, host: str) -> credentials.Credentials | None:
        """Looked up once per client, in a thread: a credential helper may take its time."""
        if host not in self._creds_cache:
            self._creds_cache[host] = await trio.to_thread.run_sync(self._lookup, host)
        return self._creds_cache[host]

    # -- scheme -----------------------------------------------------------------------------

    async def _base_url(self, ep: _Endpoint) -> str:
        if ep.base_url is not None:
            return ep.base_url
        async with self._scheme_lock:
            if ep.base_url is None:
                ep.base_url = await self._probe_scheme(ep)
        return ep.base_url

    async def _probe_scheme(self, ep: _Endpoint) -> str:
        """HTTPS unless the registry may be plain HTTP and does not speak TLS.

        Whether it speaks TLS at all is asked first over a context that loads and checks
        no certificate (`sniffing_context`; the probe carries no credentials): loading the
        CA bundle costs ~35 ms, and a loopback registry is nearly always plain HTTP, so a
        mount of one paid that on its way to the first byte for nothing. Anything but a
        plain-HTTP answer to that (TLS spoken, a refusal, a TLS server wanting a client
        certificate) leaves the decision to the probe with the registry's own context, as
        before: an untrusted certificate is refused there."""
        https = f"https://{ep.netloc}"
        if not plain_http_allowed(ep.host, self.options):
            return https
        sniffer = self._make_client(ep.host, tls=sniffing_context())
        try:
            await self._get_v2(sniffer, https)
        except httpx.ConnectError as exc:
            if _is_tls_mismatch(exc):
                return f"http://{ep.netloc}"  # no certificate was needed to learn that
        except httpx.TransportError:
            pass  # e.g. a TLS 1.3 server's alert after the handshake: the real probe decides
        finally:
            await sniffer.aclose()
        try:
            await self._get_v2(ep.client, https)
            return https
        except httpx.ConnectError as exc:
            if _is_certificate_error(exc):
                raise RegistryUnreachable(
                    f"{ep.host}: TLS certificate not trusted ({root_cause(exc)}); put its CA "
                    f"in certs.d/{ep.host}/ca.crt or name it with --insecure-registry",
                    host=ep.host,
                ) from None
            if _is_refused(exc) and not _is_tls_mismatch(exc):
                raise RegistryUnreachable(
                    f"{ep.host}: cannot connect ({root_cause(exc)})", host=ep.host
                ) from None
            return f"http://{ep.netloc}"
        except httpx.TransportError:
            return f"http://{ep.netloc}"

    async def _get_v2(self, client: httpx.AsyncClient, https: str) -> None:
        """GET /v2/ over TLS; returning is the answer that TLS worked (the body is of no
        interest)."""
        probe = client.build_request(
            "GET", f"{https}/v2/", timeout=effective_timeouts(self.options)[0]
        )
        resp = await client.send(probe, stream=True)
        await resp.aclose()

    # -- the request loop -------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path_or_url: str,
        *,
        scopes: Sequence[str],
        headers: Mapping[str, str] | None = None,
        content: bytes | AsyncIterator[bytes] | None = None,
        stream: bool = False,
        endpoint: _Endpoint | None = None,
        retry_body: bool = True,
        body_cap: int | None = None,
    ) -> httpx.Response:
        """Send with auth, retries and redirects. The caller closes streamed responses.

        Returns any final response, error statuses included: the caller decides what an
        error means (a 404 on HEAD is an answer, not a failure). Unless `stream`, the body is
        read into memory with a bound: a success body over `body_cap` is refused (None: it is
        not used, only its first 64 KiB are read), an error body is cut at 64 KiB. With
        `options.timeout`, the whole exchange (retries included) gives up after that many
        seconds.
        """
        ep = endpoint or self._upstream
        limit = self.options.timeout
        with trio.move_on_after(math.inf if limit is None else limit):
            resp = await self._request_retrying(
                method, path_or_url, scopes, headers, content, stream, ep, retry_body
            )
            if not stream:
                resp = await bodies.loaded(resp, body_cap, f"{ep.host}: {method} {path_or_url}")
            return resp
        assert limit is not None
        raise timed_out(ep.host, method, path_or_url, limit)

    def _sender(self, ep: _Endpoint, base: str, scopes: Sequence[str], retry_body: bool) -> Send:
        """The policy layers (roundtrip.py), composed in this one place: redirects on the
        endpoint's pool, each final answer counted, retries around that, auth outermost."""
        redirects = FollowRedirects(client_send(ep.client), ep.host)

        async def counted(request: httpx.Request) -> httpx.Response:
            resp = await redirects(request)
            self.requests_sent += 1
            return resp

        retry = Retry(counted, ep.host, self.options.retry, enabled=retry_body)
        return Authenticate(retry, ep.host, base, _EndpointAuthority(self, ep, scopes))

    async def _request_retrying(
        self,
        method: str,
        path_or_url: str,
        scopes: Sequence[str],
        headers: Mapping[str, str] | None,
        content: bytes | AsyncIterator[bytes] | None,
        stream: bool,
        ep: _Endpoint,
        retry_body: bool,
    ) -> httpx.Response:
        base = await self._base_url(ep)
        url = path_or_url if "://" in path_or_url else base + path_or_url
        request = ep.client.build_request(method, url, headers=headers, content=content)
        return await self._sender(ep, base, scopes, retry_body)(request)

    # -- auth -------------------------------------------------------------------------------

    async def _auth_header(self, ep: _Endpoint, scopes: Sequence[str]) -> str | None:
        state = ep.auth
        if state.scheme == "basic":
            creds = await self._credentials(ep.host)
            return _basic(creds) if creds else None
        if state.scheme == "bearer":
            token = state.tokens.get(tuple(sorted(scopes)))
            if token is None or token.expires_at <= time.time() + 5:
                token = await self._fetch_token(ep, scopes)
            return f"Bearer {token.value}"
        return None

    async def _learn_auth(self, ep: _Endpoint, www: str, scopes: Sequence[str]) -> bool:
        """A 401 told us how to authenticate; True when retrying may help."""
        for ch in challenge.parse_challenges(www):
            if ch.scheme == "bearer" and "realm" in ch.params:
                ep.auth.scheme, ep.auth.last_challenge = "bearer", ch
                ep.auth.tokens.pop(tuple(sorted(scopes)), None)
                return True
            if ch.scheme == "basic":
                ep.auth.scheme, ep.auth.last_challenge = "basic", ch
                return await self._credentials(ep.host) is not None
        return False

    async def _fetch_token(self, ep: _Endpoint, scopes: Sequence[str]) -> challenge.Token:
        ch = ep.auth.last_challenge
        assert ch is not None
        realm = ch.params["realm"]
        params = challenge.token_request_params(ch, scopes)
        creds = await self._credentials(ep.host)
        realm_host = urlsplit(realm).netloc
        if (
            creds is not None
            and urlsplit(realm).scheme.lower() != "https"
            and not plain_http_allowed(realm_host, self.options)
        ):
            # Credentials in clear text to a non-local host: plain HTTP is for loopback and
            # --insecure-registry hosts only, for a token realm as for a registry.
            raise Unauthorized(
                f"{ep.host}: its token realm {realm[:200]} is not HTTPS; credentials are not "
                f"sent over plain HTTP (name {realm_host} with --insecure-registry to allow it)",
                host=ep.host,
            )
        headers: dict[str, str] = {}
        client = self._token_client(ep, realm_host)
        try:
            if creds is not None and creds.identity_token:
                form = {
                    "grant_type": "refresh_token",
                    "refresh_token": creds.password,
                    "client_id": "imagefs",
                    "service": ch.params.get("service", ""),
                    "scope": " ".join(s for k, s in params if k == "scope"),
                }
                request = client.build_request("POST", realm, data=form)
            else:
                if creds is not None:
                    headers["Authorization"] = _basic(creds)
                request = client.build_request(
                    "GET", f"{realm}?{urlencode(params)}", headers=headers
                )
            with fetch_cause("auth", layer=None):  # not the bytes of what needed the token
                resp = await client.send(request, stream=True)
                resp = await bodies.loaded(
                    resp, bodies.TOKEN_BODY_CAP, f"{ep.host}: token server {urlsplit(realm).netloc}"
                )
        except httpx.TransportError as exc:
            raise RegistryUnreachable(
                f"{ep.host}: token server {urlsplit(realm).netloc}: {root_cause(exc)}",
                host=ep.host,
            ) from None
        if resp.status_code in (401, 403):
            who = f"as {creds.username}" if creds else "anonymously"
            raise Unauthorized(
                f"{ep.host}: token server refused {who} for {' '.join(scopes)} "
                f"(HTTP {resp.status_code}); check `imagefs login {ep.host}`",
                host=ep.host,
                status=resp.status_code,
            )
        if resp.status_code != 200:
            raise RegistryError(
                f"{ep.host}: token server answered HTTP {resp.status_code}",
                host=ep.host,
                status=resp.status_code,
            )
        token = challenge.parse_token_response(resp.content, time.time())
        ep.auth.tokens[tuple(sorted(scopes))] = token
        return token

    async def _unauthorized(
        self, ep: _Endpoint, resp: httpx.Response, scopes: Sequence[str]
    ) -> Unauthorized:
        code, message = bodies.error_code(resp)
        detail = f" ({code}: {message})" if code else ""
        has_creds = await self._credentials(ep.host) is not None
        hint = (
            "the stored credentials were refused" if has_creds else f"run `imagefs login {ep.host}`"
        )
        what = " ".join(scopes) or "login"
        return Unauthorized(
            f"{ep.host}: unauthorized for {what}{detail}; {hint}",
            host=ep.host,
            status=resp.status_code,
            code=code,
        )

    # -- errors -----------------------------------------------------------------------------

    def _error(self, resp: httpx.Response, what: str, ep: _Endpoint | None = None) -> RegistryError:
        """The error for a loaded (`bodies.loaded`) response."""
        host = (ep or self._upstream).host
        code, message = bodies.error_code(resp)
        detail = f": {code}: {message}" if code else ""
        text = f"{host}: {what}: HTTP {resp.status_code}{detail}"
        if resp.status_code in (401, 403):
            return Unauthorized(text, host=host, status=resp.status_code, code=code)
        if resp.status_code == 404 or code in ("MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN"):
            return ManifestUnknown(text, host=host, status=resp.status_code, code=code)
        return RegistryError(text, host=host, status=resp.status_code, code=code)

    # -- reads, mirror first ----------------------------------------------------------------

    async def _read(
        self,
        method: str,
        path: str,
        *,
        scopes: Sequence[str],
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        accept: Callable[[httpx.Response], bool] = lambda r: r.is_success,
    ) -> tuple[httpx.Response, _Endpoint]:
        """GET/HEAD from the first mirror that answers well, else from the registry."""
        for mirror in self._mirrors:
            try:
                resp = await self._request(
                    method, path, scopes=scopes, headers=headers, stream=stream, endpoint=mirror
                )
            except RegistryError as exc:
                log.info("mirror %s failed (%s); trying the next source", mirror.host, exc)
                continue
            if accept(resp):
                return resp, mirror
            log.info("mirror %s: HTTP %d; trying the next source", mirror.host, resp.status_code)
            await resp.aclose()
        resp = await self._request(method, path, scopes=scopes, headers=headers, stream=stream)
        return resp, self._upstream


@dataclass
class _EndpointAuthority:
    """roundtrip.Authority for one endpoint and one request's scopes: its learnt scheme,
    tokens and credentials, as `Connection` keeps them."""

    conn: Connection
    ep: _Endpoint
    scopes: Sequence[str]

    async def header(self) -> str | None:
        return await self.conn._auth_header(self.ep, self.scopes)

    async def learn(self, www_authenticate: str) -> bool:
        return await self.conn._learn_auth(self.ep, www_authenticate, self.scopes)

    async def refused(self, resp: httpx.Response) -> Exception:
        return await self.conn._unauthorized(self.ep, resp, self.scopes)


# -- helpers ----------------------------------------------------------------------------------


def lookup_credentials(host: str) -> credentials.Credentials | None:
    """`credentials.lookup`, imported when first asked (after a 401): most pulls need none,
    and a mount starts sooner without it."""
    from imagefs.registry import credentials

    return credentials.lookup(host)


def _basic(creds: credentials.Credentials) -> str:
    raw = f"{creds.username}:{creds.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()


def timed_out(host: str, method: str, what: str, limit: float) -> RegistryUnreachable:
    path = urlsplit(what).path if "://" in what else what
    return RegistryUnreachable(
        f"{host}: {method} {path}: no answer within {limit:g}s (--registry-timeout)", host=host
    )


def _is_certificate_error(exc: BaseException) -> bool:
    return any(isinstance(e, ssl.SSLCertVerificationError) for e in exception_chain(exc)) or (
        "CERTIFICATE_VERIFY_FAILED" in str(exc)
    )


def _is_tls_mismatch(exc: BaseException) -> bool:
    text = " ".join(str(e) for e in exception_chain(exc))
    return any(s in text for s in ("WRONG_VERSION_NUMBER", "wrong version number", "record layer"))


def _is_refused(exc: BaseException) -> bool:
    return any(
        isinstance(e, (ConnectionRefusedError, OSError)) for e in exception_chain(exc)
    ) and not (_is_tls_mismatch(exc))
