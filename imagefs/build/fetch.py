"""ADD of an http(s) URL: stream the body to a file (bounded memory), mode 0600, and the
mtime from `Last-Modified` (docker's rules). Plain HTTP is allowed: ADD has always fetched
any URL the Dockerfile names; the cache keys on the downloaded bytes."""

from __future__ import annotations

import email.utils
import os
from pathlib import Path

import httpx
import trio

from imagefs.errors import BuildError
from imagefs.registry.transport import TransportOptions, effective_timeouts


async def download(url: str, path: Path, options: TransportOptions) -> None:
    connect, read = effective_timeouts(options)
    timeout = httpx.Timeout(read, connect=connect)
    try:
        async with (
            httpx.AsyncClient(follow_redirects=True, timeout=timeout) as client,
            client.stream("GET", url) as resp,
        ):
            if resp.status_code != 200:
                raise BuildError(f"HTTP {resp.status_code}")
            async with await trio.open_file(path, "xb") as out:
                async for chunk in resp.aiter_bytes(1 << 20):
                    await out.write(chunk)
            modified = resp.headers.get("last-modified")
    except httpx.HTTPError as exc:
        raise BuildError(f"{type(exc).__name__}: {exc}") from None
    os.chmod(path, 0o600)
    if modified:
        try:
            when = email.utils.parsedate_to_datetime(modified).timestamp()
        except (TypeError, ValueError):
            return
        os.utime(path, (when, when))
