"""The registry client: the only code in imagefs that speaks HTTP (OCI distribution spec v1.1).

`RegistryClient` is the distribution API's verbs — manifests, referrers, blobs whole and by
range, uploads — on a `Connection` (connection.py: pools, auth, retries, redirects). Every
manifest and blob is checked against its digest and size before it is handed on, and every
body is read with a bound known before its first byte (`bodies`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlencode, urljoin, urlsplit

import httpx
import trio

from imagefs.errors import (
    IntegrityError,
    ManifestUnknown,
    NotFound,
    RegistryError,
    RegistryUnreachable,
)
from imagefs.oci import mediatypes
from imagefs.oci.digest import Digest
from imagefs.registry import bodies, challenge, wire
from imagefs.registry.connection import Connection, timed_out
from imagefs.registry.roundtrip import RETRY_STATUSES, jitter, root_cause

log = logging.getLogger("imagefs.registry")

MAX_MANIFEST_BYTES = 4 << 20
MONOLITHIC_UPLOAD_MAX = 16 << 20
UPLOAD_CHUNK = 16 << 20
_UPLOAD_RETRY = RETRY_STATUSES | {500}  # an upload session is restarted, not replayed
REDIRECT_TTL = 300.0  # signed storage URLs usually live 10-20 minutes; stay well inside

# Takes a whole blob's body (a server answered a Range request with 200), e.g. into the store.
WholeBlobSink = Callable[[AsyncIterator[bytes]], Awaitable[None]]


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


class RegistryClient(Connection):
    """Talks to one registry. Use as `async with RegistryClient(...) as client:`."""

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
        with wire.default_cause("manifest"):
            resp, ep = await self._read(
                "GET",
                path,
                scopes=scopes,
                headers={"Accept": mediatypes.MANIFEST_ACCEPT},
                stream=True,
            )
        try:
            if not resp.is_success:
                resp = await bodies.loaded(resp, None, "manifest")
                sep = "@" if ":" in reference else ":"  # repo@sha256:…, repo:tag
                if resp.status_code == 404:
                    raise ManifestUnknown(
                        f"{ep.host}: manifest for {repository}{sep}{reference} not found"
                        + _detail(resp),
                        host=ep.host,
                        status=404,
                        code=bodies.error_code(resp)[0],
                    )
                raise self._error(resp, f"GET manifest {repository}{sep}{reference}", ep)
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
        with wire.default_cause("referrers"):
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
        chunks: list[bytes] = []

        async def restart(_: int) -> None:  # Range ignored on a resume: the whole blob again
            chunks.clear()

        with wire.default_cause("config"):
            async for chunk in self.stream_blob(repository, digest, size, on_restart=restart):
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
            with wire.default_cause("whole layer"):
                resp, ep = await self._read(
                    "GET", path, scopes=scopes, headers=headers, stream=True
                )
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
                        f"{root_cause(exc)} (after {failures} attempts)",
                        host=ep.host,
                    ) from None
                log.info("blob %s: %s at %d; resuming", digest.short, exc, pos)
                await trio.sleep(jitter(policy.delay(failures - 1)))
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
        with trio.move_on_after(math.inf if limit is None else limit), wire.default_cause("read"):
            answer = await self._get_blob_range(repository, digest, start, end)
        if answer is None:
            assert limit is not None
            raise timed_out(self._upstream.host, "GET", f"blob {digest.short} range", limit)
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
                await trio.sleep(jitter(policy.delay(attempt)))

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


def _with_query(url: str, params: Mapping[str, str]) -> str:
    return url + ("&" if "?" in url else "?") + urlencode(params)


def _detail(resp: httpx.Response) -> str:
    code, message = bodies.error_code(resp)
    return f" ({code}: {message})" if code else ""


__all__ = ["ManifestResponse", "NotFound", "RegistryClient", "WholeBlob", "WholeBlobSink"]
