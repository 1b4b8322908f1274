"""`imagefs login` / `logout`: credentials checked against the registry, kept in docker's
config.json."""

from __future__ import annotations

import getpass

import trio

from imagefs.errors import Unauthorized
from imagefs.oci.reference import Reference
from imagefs.registry import credentials
from imagefs.registry.client import RegistryClient
from imagefs.session import Session


async def login(session: Session, registry: str, username: str, password: str) -> None:
    """Check the credentials against the registry, then store them (docker's config.json)."""
    host = normalize_registry_host(registry)
    creds = credentials.Credentials(username=username, password=password)
    probe = RegistryClient(
        host,
        endpoint_host=Reference.parse(f"{host}/x").endpoint_host,
        options=session.options,
        credential_lookup=lambda _h: creds,
    )
    async with probe:
        try:
            await probe.check_login()
        except Unauthorized as exc:
            raise Unauthorized(
                f"{host}: login failed: username or password refused (unauthorized, "
                f"HTTP {exc.status or 401})",
                host=host,
                status=exc.status,
            ) from None
    await trio.to_thread.run_sync(credentials.store, host, creds)


async def logout(session: Session, registry: str) -> bool:
    host = normalize_registry_host(registry)
    erased: bool = await trio.to_thread.run_sync(credentials.erase, host)
    return erased


def normalize_registry_host(value: str) -> str:
    host = value.removeprefix("https://").removeprefix("http://").split("/", 1)[0]
    if host in ("index.docker.io", "registry-1.docker.io", "docker.io", ""):
        return "docker.io"
    return host


def read_password_interactively(prompt: str = "Password: ") -> str:
    return getpass.getpass(prompt)
