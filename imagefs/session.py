"""What one command or one mount works with: the store, one registry client per host, a
limiter for disk work, and verified blob downloads into the store.

Below the verbs and the lazy machinery alike: `imagefs.api`, `imagefs.lazy.wiring`, the
mount daemon and `imagefs build` all take a `Session`. `async with Session(root) as s:`
closes the HTTP pools.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from imagefs.oci.digest import Digest
from imagefs.oci.manifest import Descriptor
from imagefs.oci.reference import Reference
from imagefs.registry.client import RegistryClient
from imagefs.registry.connection import lookup_credentials
from imagefs.registry.transport import TransportOptions
from imagefs.registry.wire import Wire
from imagefs.store import Ingest, Store

if TYPE_CHECKING:
    from imagefs.registry.credentials import Credentials

__all__ = ["Session", "fetch_blob", "keep_whole_blob"]

log = logging.getLogger("imagefs")


@dataclass
class Session:
    """What every verb needs. `async with Session(root) as s:` closes the HTTP pools."""

    root: Path
    options: TransportOptions = field(default_factory=TransportOptions)
    credential_lookup: Callable[[str], Credentials | None] = lookup_credentials
    disk_limiter: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(4))
    # Where docker-style warnings go (the CLI prints them on stderr).
    warn: Callable[[str], None] = field(default=lambda text: log.warning("%s", text))
    _store: Store | None = None
    _clients: dict[str, RegistryClient] = field(default_factory=dict)
    # What every client of the session fetched, and why (a mount's stats and trace listen).
    wire: Wire = field(default_factory=Wire)

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.root)
        return self._store

    def client(self, ref: Reference) -> RegistryClient:
        """One client (one connection pool) per registry for the life of the session."""
        if ref.registry not in self._clients:
            self._clients[ref.registry] = RegistryClient(
                ref.registry,
                endpoint_host=ref.endpoint_host,
                options=self.options,
                credential_lookup=self.credential_lookup,
                wire=self.wire,
            )
        return self._clients[ref.registry]

    async def disk(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.disk_limiter)

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


@contextlib.asynccontextmanager
async def _ingesting(session: Session, digest: Digest, size: int) -> AsyncIterator[Ingest | None]:
    cm = session.store.blobs.ingest(digest, size)
    ingest = await trio.to_thread.run_sync(cm.__enter__)
    try:
        yield ingest
    except BaseException as exc:
        await trio.to_thread.run_sync(cm.__exit__, type(exc), exc, exc.__traceback__)
        raise
    else:
        await trio.to_thread.run_sync(cm.__exit__, None, None, None)


async def fetch_blob(
    session: Session,
    client: RegistryClient,
    repository: str,
    descriptor: Descriptor,
    on_bytes: Callable[[int], None] | None = None,
) -> bool:
    """Download one blob into the store, resuming a partial one. False if already stored."""
    async with _ingesting(session, descriptor.digest, descriptor.size) as ingest:
        if ingest is None:
            return False
        if ingest.offset and on_bytes:
            on_bytes(ingest.offset)
        out = _Batches(session, ingest)
        async for chunk in client.stream_blob(
            repository,
            descriptor.digest,
            descriptor.size,
            offset=ingest.offset,
            on_restart=out.restart,  # the source ignored Range: start over
        ):
            await out.add(chunk)
            if on_bytes:
                on_bytes(len(chunk))
        await out.commit()
        return True


async def keep_whole_blob(
    session: Session, descriptor: Descriptor, chunks: AsyncIterator[bytes]
) -> bool:
    """Store a blob that arrives whole, from byte 0 (a registry answered a Range request
    with all of it), through the same verified ingest as a pull. False, with `chunks` left
    unread, when the blob is stored already."""
    async with _ingesting(session, descriptor.digest, descriptor.size) as ingest:
        if ingest is None:
            return False
        out = _Batches(session, ingest)
        if ingest.offset:  # an earlier partial download: this body starts at 0
            await out.restart(0)
        async for chunk in chunks:
            await out.add(chunk)
        await out.commit()
        return True


@dataclass
class _Batches:
    """Hashing and writing an ingest in 4 MiB batches: one thread hop per batch."""

    session: Session
    ingest: Ingest
    buf: bytearray = field(default_factory=bytearray)

    async def add(self, chunk: bytes) -> None:
        self.buf += chunk
        if len(self.buf) >= 4 << 20:
            await self.session.disk(self.ingest.write, bytes(self.buf))
            self.buf.clear()

    async def restart(self, _offset: int) -> None:
        self.buf.clear()
        await self.session.disk(self.ingest.reset)

    async def commit(self) -> None:
        if self.buf:
            await self.session.disk(self.ingest.write, bytes(self.buf))
            self.buf.clear()
        await self.session.disk(self.ingest.commit)
