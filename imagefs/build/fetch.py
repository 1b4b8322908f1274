"""ADD of an http(s) URL: stream the body to a file (bounded memory), mode 0600, and the
mtime from `Last-Modified` (docker's rules). Plain HTTP is allowed: ADD has always fetched
any URL the Dockerfile names; the cache keys on the downloaded bytes."""

from __future__ import annotations

import email.utils
import os
import uuid
from pathlib import Path

import httpx
import trio

from imagefs.build.context import Source
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
    except OSError as exc:
        # A full disk (or a quota) while writing the body: one line, like every build error.
        # The size is not capped, as in docker and BuildKit: ADD fetches what the file names.
        raise BuildError(f"writing {path.name}: {exc.strerror or exc}") from None
    os.chmod(path, 0o600)
    if modified:
        try:
            when = email.utils.parsedate_to_datetime(modified).timestamp()
        except (TypeError, ValueError):
            return
        os.utime(path, (when, when))


async def fetch_source(
    work: Path, line: int, url: str, dest: str, options: TransportOptions
) -> list[Source]:
    """ADD URL (Dockerfile line `line`): fetched into `work`, named after the URL's last path
    segment unless the destination names the file."""
    name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    if not dest.endswith("/") and not name:
        name = os.path.basename(dest)
    if not name:
        raise BuildError(f"Dockerfile:{line}: cannot name the file of ADD {url}")
    path = work / f"download-{uuid.uuid4().hex[:8]}" / name
    path.parent.mkdir(parents=True)
    try:
        await download(url, path, options)
    except BuildError as exc:
        raise BuildError(f"Dockerfile:{line}: ADD {url}: {exc}") from None
    return [Source(path, "")]
