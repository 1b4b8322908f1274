"""Reading HTTP response bodies with a bound known before the first byte.

A registry (or anything a redirect or a mirror puts in front of one) can answer with a body
that never ends. No body is read whole: an answer we want (a manifest, a token, a referrers
index) is refused once it passes its cap; an error body is cut at `ERROR_BODY_CAP` (enough for
the distribution spec's `{"errors": [...]}`) and the connection is dropped; a range is read
up to the bytes asked for. Responses are always opened with `stream=True`; these helpers read
them and close them.
"""

from __future__ import annotations

import re
from typing import Any

import httpx

from imagefs.errors import IntegrityError

ERROR_BODY_CAP = 64 << 10  # the registry's error code and message, and nothing more
TOKEN_BODY_CAP = 1 << 20  # a JWT with a long access list is a few KiB
REFERRERS_BODY_CAP = 4 << 20  # an OCI image index, as large as a manifest may be
SMALL_BODY_CAP = 64 << 10  # answers whose body we do not use (uploads, /v2/, PUT manifest)

_FRAMING = frozenset({"content-encoding", "content-length", "transfer-encoding"})
_CONTENT_RANGE = re.compile(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


async def read_capped(resp: httpx.Response, cap: int, what: str) -> bytes:
    """The whole body, refused (`IntegrityError`) as soon as it passes `cap` bytes."""
    length = resp.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > cap:
        await resp.aclose()
        raise IntegrityError(f"{what}: {length} bytes is over the {cap}-byte limit")
    buf = bytearray()
    try:
        async for chunk in resp.aiter_raw():
            buf += chunk
            if len(buf) > cap:
                raise IntegrityError(f"{what}: over the {cap}-byte limit")
    finally:
        await resp.aclose()
    return bytes(buf)


async def read_prefix(resp: httpx.Response, cap: int) -> bytes:
    """At most `cap` bytes of the body; then the connection is dropped (never drained)."""
    buf = bytearray()
    try:
        async for chunk in resp.aiter_raw():
            buf += chunk
            if len(buf) >= cap:
                break
    finally:
        await resp.aclose()
    return bytes(buf[:cap])


async def loaded(resp: httpx.Response, cap: int | None, what: str) -> httpx.Response:
    """`resp` read into memory and closed: `.content` and `.json()` then work.

    A success body over `cap` is refused (`cap=None`: the body is not used, its first
    `ERROR_BODY_CAP` bytes are kept); an error body is cut at `ERROR_BODY_CAP` (only its first
    error code and message are ever shown). HEAD answers have no body.
    """
    if resp.request.method == "HEAD":
        data = b""
        await resp.aclose()
    elif resp.is_success and cap is not None:
        data = await read_capped(resp, cap, what)
    else:
        data = await read_prefix(resp, ERROR_BODY_CAP)
    # The raw bytes are kept as they came: no Content-Encoding is applied a second time.
    headers = [(k, v) for k, v in resp.headers.multi_items() if k.lower() not in _FRAMING]
    return httpx.Response(resp.status_code, headers=headers, content=data, request=resp.request)


def error_code(resp: httpx.Response) -> tuple[str | None, str | None]:
    """The distribution spec's `{"errors": [{"code", "message"}]}`, if that is what came.

    Only for loaded responses (`loaded`, `read_prefix`): a cut body is simply not JSON.
    """
    try:
        obj: Any = resp.json()
        err = obj["errors"][0]
        return str(err.get("code"))[:100], str(err.get("message", ""))[:300]
    except Exception:
        return None, None


def content_range(resp: httpx.Response) -> tuple[int, int, int | None]:
    """(first, last, total) of a 206's `Content-Range: bytes first-last/total`."""
    value = resp.headers.get("Content-Range", "")
    match = _CONTENT_RANGE.match(value)
    if match is None:
        raise IntegrityError(f"bad Content-Range header {value[:100]!r}")
    total = match.group(3)
    return int(match.group(1)), int(match.group(2)), None if total == "*" else int(total)
