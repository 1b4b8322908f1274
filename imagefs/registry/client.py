"""The registry client: the only code in imagefs that speaks HTTP (OCI distribution spec v1.1).

One `RegistryClient` per registry host holds one keep-alive connection pool (an
`httpx.AsyncClient`) per endpoint: the registry itself, and its mirrors for reads. It does the
auth dance (anonymous, Basic, Bearer token flow with tokens reused until expiry), retries
transient failures with backoff, follows redirects without ever sending our Authorization
header to another host, and checks every manifest and blob against its digest and size before
handing it on.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import logging
import math
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlencode, urljoin, urlsplit

import httpx
import trio

from imagefs.errors import (
    IntegrityError,
    ManifestUnknown,
    NotFound,
    RegistryError,
    RegistryUnreachable,
    Unauthorized,
)
from imagefs.oci import mediatypes
from imagefs.oci.digest import Digest
from imagefs.registry import bodies, challenge, credentials
from imagefs.registry.netem import EmulatedTransport
from imagefs.registry.transport import (
    TransportOptions,
    effective_timeouts,
    mirrors_for,
    origin_text,
    plain_http_allowed,
    same_origin,
    ssl_context,
)

log = logging.getLogger("imagefs.registry")

MAX_MANIFEST_BYTES = 4 << 20
MONOLITHIC_UPLOAD_MAX = 16 << 20
UPLOAD_CHUNK = 16 << 20
_RETRY_STATUSES = frozenset({429, 502, 503, 504})
_UPLOAD_RETRY = _RETRY_STATUSES | {500}  # an upload session is restarted, not replayed
_MAX_REDIRECTS = 5
USER_AGENT = "imagefs/0.1"
REDIRECT_TTL = 300.0  # signed storage URLs usually live 10-20 minutes; stay well inside

CredentialLookup = Callable[[str], credentials.Credentials | None]
# Takes a whole blob's body (a server answered a Range request with 200), e.g. into the store.
WholeBlobSink = Callable[[AsyncIterator[bytes]], Awaitable[None]]


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


@dataclass(frozen=True)
class ManifestResponse:
    raw: bytes
    media_type: str | None
    digest: Digest


@dataclass(frozen=True)
class WholeBlob:
    """`get_blob_range`'s answer when the server sent the whole blob instead of the range
    (a registry ignoring Range, a pull-through mirror that has not cached the blob yet): the
    body went to the caller's sink, which verifies and keeps it."""

    nbytes: int  # what came over the wire (and the sink took)


class RegistryClient:
    """Talks to one registry. Use as `async with RegistryClient(...) as client:`."""

    def __init__(
        self,
        registry: str,
        *,
        endpoint_host: str | None = None,
        options: TransportOptions | None = None,
        credential_lookup: CredentialLookup | None = None,
    ) -> None:
        self.registry = registry
        self.options = options or TransportOptions()
        self._lookup = credential_lookup or credentials.lookup
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
        self.requests_sent = 0
        self.ignores_range = False
        self._blob_urls: dict[tuple[str, str], tuple[str, float]] = {}

    def _make_client(self, host: str) -> httpx.AsyncClient:
        connect, read = effective_timeouts(self.options)
        timeout = httpx.Timeout(read, connect=connect, pool=None)
        limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
        transport: httpx.AsyncBaseTransport | None = None
        if self.options.link is not None:
            transport = EmulatedTransport(
                httpx.AsyncHTTPTransport(verify=ssl_context(host, self.options), limits=limits),
                self.options.link,
            )
        return httpx.AsyncClient(
            verify=ssl_context(host, self.options),
            transport=transport,
            timeout=timeout,
            follow_redirects=False,
            # Digests are over the bytes as stored: no transfer compression, ever.
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
            limits=limits,
            trust_env=True,  # HTTP(S)_PROXY / NO_PROXY as every other tool honours them
        )

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for ep in [self._upstream, *self._mirrors]:
            await ep.client.aclose()

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
        """HTTPS unless the registry may be plain HTTP and does not speak TLS."""
        https = f"https://{ep.netloc}"
        if not plain_http_allowed(ep.host, self.options):
            return https
        try:
            probe = ep.client.build_request(
                "GET", f"{https}/v2/", timeout=effective_timeouts(self.options)[0]
            )
            resp = await ep.client.send(probe, stream=True)
            await resp.aclose()  # the answer is that TLS worked; its body is of no interest
            return https
        except httpx.ConnectError as exc:
            if _is_certificate_error(exc):
                raise RegistryUnreachable(
                    f"{ep.host}: TLS certificate not trusted ({_root_cause(exc)}); put its CA "
                    f"in certs.d/{ep.host}/ca.crt or name it with --insecure-registry",
                    host=ep.host,
                ) from None
            if _is_refused(exc) and not _is_tls_mismatch(exc):
                raise RegistryUnreachable(
                    f"{ep.host}: cannot connect ({_root_cause(exc)})", host=ep.host
                ) from None
            return f"http://{ep.netloc}"
        except httpx.TransportError:
            return f"http://{ep.netloc}"

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
        raise _timed_out(ep.host, method, path_or_url, limit)

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
        policy = self.options.retry
        auth_retried = False
        attempt = 0
        # Credentials are for the registry as it is addressed (scheme, host, port), and for
        # nothing else a Location header may name: an upload URL on another host gets none.
        home = same_origin(url, base)
        while True:
            req_headers = dict(headers or {})
            auth = await self._auth_header(ep, scopes) if home else None
            if auth:
                req_headers["Authorization"] = auth
            try:
                resp = await self._send_following_redirects(
                    ep, method, url, req_headers, content, stream
                )
            except httpx.TransportError as exc:
                attempt += 1
                if attempt >= policy.attempts or not retry_body:
                    raise RegistryUnreachable(
                        f"{ep.host}: {method} {urlsplit(url).path}: {_root_cause(exc)}"
                        f" (after {attempt} attempt{'s' if attempt > 1 else ''})",
                        host=ep.host,
                    ) from None
                await trio.sleep(_jitter(policy.delay(attempt - 1)))
                continue
            self.requests_sent += 1
            if resp.status_code == 401:
                www = resp.headers.get("WWW-Authenticate", "")
                resp = await bodies.loaded(resp, None, "401")
                if not same_origin(str(resp.url), base):
                    # A redirect target asking for credentials is a stranger asking for ours
                    # (the class of CVE-2020-15157): they never leave the registry they are
                    # for, not even to fetch a token from a realm the stranger names.
                    raise Unauthorized(
                        f"{ep.host}: {method} {urlsplit(url).path}: redirected to "
                        f"{origin_text(str(resp.url))}, which asks for credentials; "
                        f"credentials for {ep.host} are never sent to another host",
                        host=ep.host,
                        status=401,
                    )
                if not auth_retried and await self._learn_auth(ep, www, scopes):
                    auth_retried = True
                    continue
                raise await self._unauthorized(ep, resp, scopes)
            if resp.status_code in _RETRY_STATUSES and retry_body:
                attempt += 1
                if attempt < policy.attempts:
                    delay = _retry_after(resp) or policy.delay(attempt - 1)
                    await resp.aclose()
                    log.info("%s: HTTP %d, retrying in %.2fs", ep.host, resp.status_code, delay)
                    await trio.sleep(min(delay, policy.max_delay))
                    continue
            return resp

    async def _send_following_redirects(
        self,
        ep: _Endpoint,
        method: str,
        url: str,
        headers: dict[str, str],
        content: bytes | AsyncIterator[bytes] | None,
        stream: bool,
    ) -> httpx.Response:
        """The final answer, streamed (unread): the caller reads it with a bound."""
        origin = url
        for _ in range(_MAX_REDIRECTS + 1):
            request = ep.client.build_request(method, url, headers=headers, content=content)
            resp = await ep.client.send(request, stream=True)
            if resp.status_code in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                await resp.aclose()  # a redirect's body is never read
                url = urljoin(url, resp.headers["Location"])
                if not same_origin(url, origin):
                    # Object storage behind a redirect must never see our registry token:
                    # another scheme, host or port is another origin (and stays one, even
                    # if a later hop comes back).
                    headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
                if resp.status_code == 303:
                    method, content = "GET", None
                continue
            return resp
        raise RegistryError(f"{ep.host}: too many redirects for {method} {url}", host=ep.host)

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
        try:
            if creds is not None and creds.identity_token:
                form = {
                    "grant_type": "refresh_token",
                    "refresh_token": creds.password,
                    "client_id": "imagefs",
                    "service": ch.params.get("service", ""),
                    "scope": " ".join(s for k, s in params if k == "scope"),
                }
                request = ep.client.build_request("POST", realm, data=form)
            else:
                if creds is not None:
                    headers["Authorization"] = _basic(creds)
                request = ep.client.build_request(
                    "GET", f"{realm}?{urlencode(params)}", headers=headers
                )
            resp = await ep.client.send(request, stream=True)
            resp = await bodies.loaded(
                resp, bodies.TOKEN_BODY_CAP, f"{ep.host}: token server {urlsplit(realm).netloc}"
            )
        except httpx.TransportError as exc:
            raise RegistryUnreachable(
                f"{ep.host}: token server {urlsplit(realm).netloc}: {_root_cause(exc)}",
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

    async def check_login(self) -> None:
        """GET /v2/ with our credentials; raises Unauthorized when they are refused."""
        resp = await self._request("GET", "/v2/", scopes=[])
        if resp.status_code != 200:
            raise self._error(resp, "GET /v2/")

    # -- manifests --------------------------------------------------------------------------

    async def get_manifest(
        self, repository: str, reference: str, *, expected_size: int | None = None
    ) -> ManifestResponse:
        """GET a manifest by tag or digest; the body is checked before it is returned."""
        path = f"/v2/{repository}/manifests/{reference}"
        scopes = [challenge.scope_for(repository, ["pull"])]
        resp, ep = await self._read(
            "GET", path, scopes=scopes, headers={"Accept": mediatypes.MANIFEST_ACCEPT}, stream=True
        )
        try:
            if not resp.is_success:
                resp = await bodies.loaded(resp, None, "manifest")
                if resp.status_code == 404:
                    raise ManifestUnknown(
                        f"{ep.host}: manifest for {repository}:{reference} not found"
                        + _detail(resp),
                        host=ep.host,
                        status=404,
                        code=bodies.error_code(resp)[0],
                    )
                raise self._error(resp, f"GET manifest {repository}:{reference}", ep)
            raw = await bodies.read_capped(resp, MAX_MANIFEST_BYTES, f"manifest {reference}")
        finally:
            await resp.aclose()
        if reference.startswith(("sha256:", "sha512:")):
            digest = Digest.parse(reference)
            digest.verify(raw, expected_size)
        else:
            digest = Digest.of(raw)
            if expected_size is not None and len(raw) != expected_size:
                raise IntegrityError(f"manifest {reference}: size {len(raw)} != {expected_size}")
            header = resp.headers.get("Docker-Content-Digest")
            if header and header.startswith("sha256:") and header != str(digest):
                raise IntegrityError(
                    f"{ep.host}: manifest {repository}:{reference} has digest {digest} but the "
                    f"registry says {header}; nothing was stored"
                )
        content_type = resp.headers.get("Content-Type")
        return ManifestResponse(raw=raw, media_type=content_type, digest=digest)

    async def head_manifest(self, repository: str, reference: str) -> Digest | None:
        path = f"/v2/{repository}/manifests/{reference}"
        scopes = [challenge.scope_for(repository, ["pull"])]
        resp = await self._request(
            "HEAD", path, scopes=scopes, headers={"Accept": mediatypes.MANIFEST_ACCEPT}
        )
        if resp.status_code == 404:
            return None
        if not resp.is_success:
            raise self._error(resp, f"HEAD manifest {repository}:{reference}")
        header = resp.headers.get("Docker-Content-Digest")
        return Digest.parse(header) if header else None

    async def put_manifest(
        self, repository: str, reference: str, raw: bytes, media_type: str
    ) -> Digest:
        path = f"/v2/{repository}/manifests/{reference}"
        scopes = [challenge.scope_for(repository, ["pull", "push"])]
        resp = await self._request(
            "PUT", path, scopes=scopes, headers={"Content-Type": media_type}, content=raw
        )
        if resp.status_code != 201:
            raise self._error(resp, f"PUT manifest {repository}:{reference}")
        digest = Digest.of(raw)
        header = resp.headers.get("Docker-Content-Digest")
        if header and header != str(digest):
            raise IntegrityError(f"registry stored manifest as {header}, we sent {digest}")
        return digest

    async def get_referrers(self, repository: str, digest: Digest) -> bytes | None:
        """The referrers API's image index for `digest`, or None where the registry lacks the
        API (distribution 2.8 answers 404; callers then try the `sha256-<hex>` tag)."""
        path = f"/v2/{repository}/referrers/{digest}"
        scopes = [challenge.scope_for(repository, ["pull"])]
        resp, ep = await self._read(
            "GET", path, scopes=scopes, headers={"Accept": mediatypes.OCI_INDEX}, stream=True
        )
        resp = await bodies.loaded(
            resp, bodies.REFERRERS_BODY_CAP, f"{ep.host}: referrers of {digest.short}"
        )
        if resp.status_code in (404, 405, 400):
            return None
        if not resp.is_success:
            raise self._error(resp, f"GET referrers of {digest.short}", ep)
        return resp.content

    # -- blobs: reads -----------------------------------------------------------------------

    async def blob_size(self, repository: str, digest: Digest) -> int | None:
        """HEAD a blob: its size, or None when the repository does not have it."""
        path = f"/v2/{repository}/blobs/{digest}"
        scopes = [challenge.scope_for(repository, ["pull"])]
        resp = await self._request("HEAD", path, scopes=scopes)
        if resp.status_code == 404:
            return None
        if not resp.is_success:
            raise self._error(resp, f"HEAD blob {digest.short}")
        length = resp.headers.get("Content-Length")
        return int(length) if length and length.isdigit() else -1

    async def get_blob(
        self, repository: str, digest: Digest, size: int, *, max_bytes: int = MAX_MANIFEST_BYTES
    ) -> bytes:
        """A small blob (a config) in memory, verified."""
        if size > max_bytes:
            raise IntegrityError(f"blob {digest} declares {size} bytes, over the {max_bytes} cap")
        chunks = []
        async for chunk in self.stream_blob(repository, digest, size):
            chunks.append(chunk)
        data = b"".join(chunks)
        digest.verify(data, size)
        return data

    async def stream_blob(
        self,
        repository: str,
        digest: Digest,
        size: int,
        *,
        offset: int = 0,
        on_restart: Callable[[int], Awaitable[None]] | None = None,
    ) -> AsyncIterator[bytes]:
        """Yield the blob's bytes from `offset`, resuming with Range after a broken connection.

        The caller hashes what it receives (digest checking happens where the bytes land).
        If the registry ignores Range, `on_restart(0)` is awaited and the stream starts over
        from byte 0 — the caller must then discard what it has.
        """
        path = f"/v2/{repository}/blobs/{digest}"
        scopes = [challenge.scope_for(repository, ["pull"])]
        policy = self.options.retry
        failures = 0
        pos = offset
        while pos < size or (size == 0 and pos == 0):
            headers = {"Range": f"bytes={pos}-"} if pos else {}
            resp, ep = await self._read("GET", path, scopes=scopes, headers=headers, stream=True)
            try:
                if not resp.is_success:
                    raise self._error(
                        await bodies.loaded(resp, None, "blob"), f"GET blob {digest}", ep
                    )
                if pos and resp.status_code == 200:
                    pos = 0  # Range ignored: we get the whole blob again
                    if on_restart is not None:
                        await on_restart(0)
                elif resp.status_code == 206:
                    first, last, total = bodies.content_range(resp)
                    if first != pos or last != size - 1 or total not in (None, size):
                        raise IntegrityError(
                            f"{ep.host}: asked for blob {digest.short} from byte {pos}, "
                            f"got bytes {first}-{last}/{total}"
                        )
                async for chunk in resp.aiter_raw():  # as it arrives: a break loses nothing
                    if pos + len(chunk) > size:
                        raise IntegrityError(
                            f"{ep.host}: blob {digest} is longer than the declared {size} bytes"
                        )
                    pos += len(chunk)
                    yield chunk
                if size == 0:
                    return
                if pos < size:
                    raise httpx.RemoteProtocolError("body ended early")
            except (httpx.TransportError, httpx.StreamError) as exc:
                failures += 1
                if failures >= policy.attempts:
                    raise RegistryUnreachable(
                        f"{ep.host}: blob {digest.short} broke off at byte {pos} of {size}: "
                        f"{_root_cause(exc)} (after {failures} attempts)",
                        host=ep.host,
                    ) from None
                log.info("blob %s: %s at %d; resuming", digest.short, exc, pos)
                await trio.sleep(_jitter(policy.delay(failures - 1)))
            finally:
                await resp.aclose()

    async def get_blob_range(
        self,
        repository: str,
        digest: Digest,
        start: int,
        end: int,
        *,
        size: int | None = None,
        on_whole_blob: WholeBlobSink | None = None,
    ) -> bytes | WholeBlob:
        """Bytes [start, end) of a blob. The caller verifies them against its own digests.

        A 206 must say (`Content-Range`) that it carries exactly the bytes asked for, and at
        most that many are read. A 200 is the whole blob (`size` bytes, when known): with
        `on_whole_blob` its body is streamed to that sink (which verifies and keeps it) and
        `WholeBlob` is returned — the caller takes its range from what the sink kept, and the
        blob never needs fetching again; without a sink, the body is read up to `end` and the
        connection dropped. Nothing is buffered beyond the range.

        Registries usually redirect blob GETs to object storage with a signed URL; the URL is
        remembered and reused for the next ranges of the same blob (no auth, no registry
        round trip) until it stops working or `REDIRECT_TTL` passes.
        """
        if end <= start:
            return b""
        limit = self.options.timeout
        # The range (request and body) within `--registry-timeout`; a whole blob's body is a
        # download: once its headers came, it is bounded by the read timeout between pieces.
        answer: bytes | tuple[httpx.Response, str] | None = None
        with trio.move_on_after(math.inf if limit is None else limit):
            answer = await self._get_blob_range(repository, digest, start, end)
        if answer is None:
            assert limit is not None
            raise _timed_out(self._upstream.host, "GET", f"blob {digest.short} range", limit)
        if isinstance(answer, bytes):
            return answer
        resp, host = answer
        try:
            return await self._whole_blob(resp, host, digest, start, end, size, on_whole_blob)
        finally:
            await resp.aclose()

    async def _get_blob_range(
        self, repository: str, digest: Digest, start: int, end: int
    ) -> bytes | tuple[httpx.Response, str] | None:
        """The range's bytes, or an open 200 answer (the whole blob) and who sent it."""
        headers = {"Range": f"bytes={start}-{end - 1}"}
        key = (repository, str(digest))
        cached = self._blob_urls.get(key)
        if cached is not None and cached[1] > time.monotonic():
            resp = None
            with contextlib.suppress(httpx.TransportError):
                request = self._upstream.client.build_request("GET", cached[0], headers=headers)
                resp = await self._upstream.client.send(request, stream=True)
            if resp is not None:
                if resp.status_code in (200, 206):
                    return await self._range_answer(resp, urlsplit(cached[0]).netloc, start, end)
                await resp.aclose()
            self._blob_urls.pop(key, None)  # expired or gone: ask again
        path = f"/v2/{repository}/blobs/{digest}"
        scopes = [challenge.scope_for(repository, ["pull"])]
        resp, ep = await self._read("GET", path, scopes=scopes, headers=headers, stream=True)
        if resp.status_code in (200, 206):
            final = str(resp.url)
            if urlsplit(final).netloc != urlsplit(ep.base_url or "").netloc:
                self._blob_urls[key] = (final, time.monotonic() + REDIRECT_TTL)
            return await self._range_answer(resp, ep.host, start, end)
        resp = await bodies.loaded(resp, None, "blob range")
        raise self._error(resp, f"GET blob {digest.short} range {start}-{end - 1}", ep)

    async def _range_answer(
        self, resp: httpx.Response, host: str, start: int, end: int
    ) -> bytes | tuple[httpx.Response, str]:
        if resp.status_code == 200:
            return resp, host
        try:
            first, last, _ = bodies.content_range(resp)
        except IntegrityError as exc:
            await resp.aclose()
            raise IntegrityError(f"{host}: range {start}-{end - 1}: {exc}") from None
        if (first, last) != (start, end - 1):
            await resp.aclose()
            raise IntegrityError(
                f"{host}: asked for bytes {start}-{end - 1}, the answer says {first}-{last}"
            )
        return await bodies.read_capped(resp, end - start, f"{host}: range {start}-{end - 1}")

    async def _whole_blob(
        self,
        resp: httpx.Response,
        host: str,
        digest: Digest,
        start: int,
        end: int,
        size: int | None,
        sink: WholeBlobSink | None,
    ) -> bytes | WholeBlob:
        """A 200 to a Range request: the whole blob, never more than `size` bytes of it."""
        if not self.ignores_range:
            log.info("%s answered a Range request with the whole blob %s", host, digest.short)
        self.ignores_range = True
        length = resp.headers.get("Content-Length")
        if size is not None and length and length.isdigit() and int(length) != size:
            raise IntegrityError(
                f"{host}: blob {digest.short} is {size} bytes, the answer to a range request "
                f"declares {length}"
            )
        taken = 0

        async def body() -> AsyncIterator[bytes]:
            nonlocal taken
            async for chunk in resp.aiter_raw():
                if size is not None and taken + len(chunk) > size:
                    raise IntegrityError(
                        f"{host}: blob {digest.short} is longer than the declared {size} bytes"
                    )
                taken += len(chunk)
                yield chunk

        if sink is not None:
            await sink(body())
            return WholeBlob(taken)
        piece = bytearray()
        async for chunk in body():  # no sink: keep [start, end), hang up at `end`
            at = taken - len(chunk)  # where this chunk starts in the blob
            piece += chunk[max(0, start - at) : max(0, end - at)]
            if taken >= end:
                break
        return bytes(piece)

    # -- blobs: writes ----------------------------------------------------------------------

    async def mount_blob(self, repository: str, digest: Digest, from_repository: str) -> bool:
        """Cross-repository mount; True when the registry linked the blob without an upload."""
        scopes = [
            challenge.scope_for(repository, ["pull", "push"]),
            challenge.scope_for(from_repository, ["pull"]),
        ]
        query = urlencode({"mount": str(digest), "from": from_repository})
        resp = await self._request(
            "POST", f"/v2/{repository}/blobs/uploads/?{query}", scopes=scopes
        )
        if resp.status_code == 201:
            return True
        if resp.status_code == 202:  # registry opened a normal upload instead; cancel it
            location = resp.headers.get("Location")
            if location:
                url = urljoin(await self._base_url(self._upstream) + "/", location)
                cancel = await self._request("DELETE", url, scopes=scopes[:1], retry_body=False)
                await cancel.aclose()
            return False
        if resp.status_code in (401, 403, 404):
            return False
        raise self._error(resp, f"mount blob {digest.short} from {from_repository}")

    async def upload_blob(
        self,
        repository: str,
        digest: Digest,
        size: int,
        open_source: Callable[[], AsyncIterator[bytes]],
    ) -> None:
        """Upload a blob: monolithic PUT when small, chunked PATCHes when large.

        `open_source()` yields the blob's bytes from the start; it is called again when an
        upload has to start over after a failure.
        """
        scopes = [challenge.scope_for(repository, ["pull", "push"])]
        policy = self.options.retry
        for attempt in range(policy.attempts):
            try:
                await self._upload_once(repository, digest, size, open_source, scopes)
                return
            except RegistryError as exc:
                # A broken connection or a server error in the middle of an upload session
                # (whose PATCH/PUT bodies are not replayed): start a new session from byte 0.
                transient = isinstance(exc, RegistryUnreachable) or exc.status in _UPLOAD_RETRY
                if not transient or attempt + 1 >= policy.attempts:
                    raise
                log.info("upload of %s: %s; starting over", digest.short, exc)
                await trio.sleep(_jitter(policy.delay(attempt)))

    async def _upload_once(
        self,
        repository: str,
        digest: Digest,
        size: int,
        open_source: Callable[[], AsyncIterator[bytes]],
        scopes: Sequence[str],
    ) -> None:
        base = await self._base_url(self._upstream)
        resp = await self._request("POST", f"/v2/{repository}/blobs/uploads/", scopes=scopes)
        if resp.status_code != 202 or "Location" not in resp.headers:
            raise self._error(resp, f"start upload of {digest.short}")
        location = urljoin(base + "/", resp.headers["Location"])
        if size <= MONOLITHIC_UPLOAD_MAX:
            body = b"".join([c async for c in open_source()])
            if len(body) != size:
                raise IntegrityError(f"blob {digest.short}: source gave {len(body)} of {size}")
            resp = await self._request(
                "PUT",
                _with_query(location, {"digest": str(digest)}),
                scopes=scopes,
                headers={"Content-Type": "application/octet-stream"},
                content=body,
                retry_body=False,
            )
        else:
            sent = 0
            buf = bytearray()

            async def flush(data: bytes) -> str:
                nonlocal sent
                r = await self._request(
                    "PATCH",
                    location,
                    scopes=scopes,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{sent}-{sent + len(data) - 1}",
                    },
                    content=data,
                    retry_body=False,
                )
                if r.status_code != 202 or "Location" not in r.headers:
                    raise self._error(r, f"upload chunk of {digest.short} at {sent}")
                sent += len(data)
                return urljoin(base + "/", r.headers["Location"])

            async for chunk in open_source():
                buf += chunk
                while len(buf) >= UPLOAD_CHUNK:
                    location = await flush(bytes(buf[:UPLOAD_CHUNK]))
                    del buf[:UPLOAD_CHUNK]
            if buf:
                location = await flush(bytes(buf))
            if sent != size:
                raise IntegrityError(f"blob {digest.short}: source gave {sent} of {size} bytes")
            resp = await self._request(
                "PUT",
                _with_query(location, {"digest": str(digest)}),
                scopes=scopes,
                retry_body=False,
            )
        if resp.status_code != 201:
            raise self._error(resp, f"finish upload of {digest.short}")


# -- helpers ----------------------------------------------------------------------------------


def _basic(creds: credentials.Credentials) -> str:
    raw = f"{creds.username}:{creds.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()


def _with_query(url: str, params: Mapping[str, str]) -> str:
    return url + ("&" if "?" in url else "?") + urlencode(params)


def _detail(resp: httpx.Response) -> str:
    code, message = bodies.error_code(resp)
    return f" ({code}: {message})" if code else ""


def _retry_after(resp: httpx.Response) -> float | None:
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


def _timed_out(host: str, method: str, what: str, limit: float) -> RegistryUnreachable:
    path = urlsplit(what).path if "://" in what else what
    return RegistryUnreachable(
        f"{host}: {method} {path}: no answer within {limit:g}s (--registry-timeout)", host=host
    )


def _jitter(delay: float) -> float:
    return delay * (0.5 + random.random() / 2)


def _root_cause(exc: BaseException) -> str:
    """The innermost cause, in one line: "[Errno 111] Connect call failed", not a wrapper."""
    for _ in range(20):
        if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]
            continue
        nxt = exc.__cause__ or exc.__context__
        if nxt is None:
            break
        exc = nxt
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    return text.splitlines()[0][:200]


def _chain(exc: BaseException) -> list[BaseException]:
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


def _is_certificate_error(exc: BaseException) -> bool:
    return any(isinstance(e, ssl.SSLCertVerificationError) for e in _chain(exc)) or (
        "CERTIFICATE_VERIFY_FAILED" in str(exc)
    )


def _is_tls_mismatch(exc: BaseException) -> bool:
    text = " ".join(str(e) for e in _chain(exc))
    return any(s in text for s in ("WRONG_VERSION_NUMBER", "wrong version number", "record layer"))


def _is_refused(exc: BaseException) -> bool:
    return any(isinstance(e, (ConnectionRefusedError, OSError)) for e in _chain(exc)) and not (
        _is_tls_mismatch(exc)
    )


__all__ = ["ManifestResponse", "NotFound", "RegistryClient", "WholeBlob", "WholeBlobSink"]
