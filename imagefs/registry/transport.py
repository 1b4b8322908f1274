"""Transport policy: which scheme, which certificates, which mirrors, how often to retry.

Docker's rules: credentials and the Authorization header belong to one origin (scheme, host,
port as the registry is addressed; `same_origin`); plain HTTP only for loopback registries
(`localhost`, `127.0.0.0/8`, `::1`) and registries named with `--insecure-registry`;
everything else is TLS, verified against the
system roots (or `SSL_CERT_FILE` / `SSL_CERT_DIR`) plus a per-registry CA in
`certs.d/HOST[:PORT]/*.crt` (client certificates as `*.cert` + `*.key`), looked up under the
imagefs config directory and under `/etc/docker/certs.d`. A loopback registry that speaks TLS is
still verified: "insecure" only ever allows plain HTTP, except for registries named explicitly
with `--insecure-registry`, where TLS certificates are not checked (docker's behaviour).
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import certifi

from imagefs.errors import RegistryUnreachable

if TYPE_CHECKING:
    from imagefs.registry.netem import Link

DOCKER_CERTS_D = Path("/etc/docker/certs.d")


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff; `Retry-After` is honoured up to `max_delay`."""

    attempts: int = 5
    base_delay: float = 0.25
    max_delay: float = 10.0

    def delay(self, attempt: int) -> float:
        return float(min(self.max_delay, self.base_delay * (2**attempt)))


@dataclass(frozen=True)
class TransportOptions:
    insecure_registries: frozenset[str] = frozenset()
    # registry -> mirror base URLs tried before it, for reads only ("docker.io" for Hub mirrors)
    mirrors: Mapping[str, Sequence[str]] = field(default_factory=dict)
    config_dir: Path | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    # `--registry-timeout`: give up on a registry request that has not answered within this
    # many seconds, retries included (a range read: the whole body; a streamed download: its
    # headers, then no more than this between two pieces of the body). None: only the
    # connect/read timeouts and the retry policy bound a request.
    timeout: float | None = None
    link: Link | None = None  # network emulation (experiments); None: the real network


def effective_timeouts(options: TransportOptions) -> tuple[float, float]:
    """(connect, read) socket timeouts, never longer than the overall `timeout`."""
    if options.timeout is None:
        return options.connect_timeout, options.read_timeout
    return (
        min(options.connect_timeout, options.timeout),
        min(options.read_timeout, options.timeout),
    )


def is_loopback(host: str) -> bool:
    """`host` is a registry name: `localhost:5000`, `127.0.0.1`, `[::1]:5000`."""
    name = host
    if name.startswith("["):
        name = name[1 : name.find("]")]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _named_insecure(host: str, insecure: frozenset[str]) -> bool:
    if host in insecure:
        return True
    bare = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return bare in insecure


def plain_http_allowed(host: str, options: TransportOptions) -> bool:
    return is_loopback(host) or _named_insecure(host, options.insecure_registries)


def certs_dirs(host: str, options: TransportOptions) -> list[Path]:
    roots = [options.config_dir / "certs.d"] if options.config_dir else []
    roots.append(DOCKER_CERTS_D)
    return [r / host for r in roots if (r / host).is_dir()]


def ssl_context(host: str, options: TransportOptions) -> ssl.SSLContext:
    """The TLS context for one registry (see module docstring for the rules).

    Its certificates (the CA bundle, `SSL_CERT_DIR`, certs.d) are loaded at its first TLS
    connection, not here: parsing the CA bundle costs ~50 ms, and every client is made with
    a context, so every command and every mount of a plain-HTTP registry paid it (twice for
    a mount: the command and its daemon) without ever speaking TLS."""
    ctx = _DeferredCertsContext(ssl.PROTOCOL_TLS_CLIENT)  # what create_default_context makes
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True

    def load(c: ssl.SSLContext) -> None:
        where = os.environ.get("SSL_CERT_FILE") or certifi.where()
        try:
            c.load_verify_locations(cafile=where)
            capath = os.environ.get("SSL_CERT_DIR")
            if capath and os.path.isdir(capath):
                where = capath
                c.load_verify_locations(capath=capath)
            for d in certs_dirs(host, options):
                for crt in sorted(d.glob("*.crt")):
                    where = str(crt)
                    c.load_verify_locations(cafile=where)
                for cert in sorted(d.glob("*.cert")):
                    key = cert.with_suffix(".key")
                    if key.exists():
                        where = f"{cert} and {key}"
                        c.load_cert_chain(str(cert), str(key))
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
            raise RegistryUnreachable(
                f"{host}: cannot load TLS certificates from {where}: {reason}", host=host
            ) from None

    ctx.loader = load
    if _named_insecure(host, options.insecure_registries):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def sniffing_context() -> ssl.SSLContext:
    """A TLS context that loads and checks no certificate: only for asking whether a peer
    speaks TLS at all (`RegistryClient`'s scheme probe, which sends no credentials)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class _DeferredCertsContext(ssl.SSLContext):
    """An SSLContext that runs `loader` (loading its certificates) once, just before its
    first connection: `wrap_bio` is what trio's and asyncio's TLS streams call, `wrap_socket`
    what blocking code calls. A failure to load is raised there (`RegistryUnreachable`,
    naming the file), at every connection."""

    loader: Callable[[ssl.SSLContext], None] | None = None
    _lock = threading.Lock()  # one for all: loads are rare, and a second one waits for the first

    def _load(self) -> None:
        if self.loader is None:
            return
        with self._lock:
            if self.loader is not None:
                # On failure the loader stays: every connection fails the same way, none
                # goes ahead with part of the certificates.
                self.loader(self)
                self.loader = None

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        self._load()
        return super().wrap_bio(*args, **kwargs)

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        self._load()
        return super().wrap_socket(*args, **kwargs)


def mirrors_for(registry: str, options: TransportOptions) -> list[str]:
    return [m.rstrip("/") for m in options.mirrors.get(registry, ())]


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port filled in: what credentials and
    an Authorization header are bound to, as the registry is addressed."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = -1  # a malformed port is nobody's origin
    if port is None:
        port = {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


def same_origin(a: str, b: str) -> bool:
    return _origin(a) == _origin(b)


def origin_text(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"
