"""A real CNCF distribution registry (`docker-registry`, v2.8) on loopback, for tests and demos.

Why a real registry rather than a fake: the registry client must cope with what a real server
does (auth challenges, redirects-free blob serving, 206 answers, upload sessions, error
bodies), and a fake only ever agrees with our own reading of the spec.

Three modes:

* plain HTTP without auth (the default);
* htpasswd basic auth (usually over TLS with a throwaway `trustme` CA);
* token auth, with a small docker-token-protocol issuer (`TokenIssuer`) running in a thread.

Any of them may be a pull-through cache of another registry (`proxy_remote=URL`), the mirror
a `--registry-mirror` points at.

distribution 2.8 writes one JSON line per request to stderr when `log.formatter: json`; we
capture it to a file so tests can count what a client really fetched (`requests()`).

The token issuer is `imagefs.testing.tokens`; what the pieces share, `imagefs.testing.infra`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Literal, Self

# bcrypt and trustme are test-only dependencies (the `test` extra): they are
# imported where the TLS, htpasswd and token modes need them, so that `tools/demo` (a plain
# registry) runs on a fresh clone whose venv has only imagefs's own dependencies.
if TYPE_CHECKING:
    import trustme

from imagefs.testing.infra import InfraError, free_port, require_binary
from imagefs.testing.tokens import TokenAlgorithm, TokenIssuer, TokenRequest, libtrust_key_id

__all__ = [
    "AuthMode",
    "InfraError",
    "LocalRegistry",
    "LoggedRequest",
    "TokenAlgorithm",
    "TokenIssuer",
    "TokenRequest",
    "free_port",
    "libtrust_key_id",
    "require_binary",
]

AuthMode = Literal["none", "htpasswd", "token"]

REGISTRY_BINARY = "docker-registry"
_SYNC_MARKER = "imagefs-log-sync"
_START_TIMEOUT = 15.0


@dataclass(frozen=True)
class LoggedRequest:
    """One request as distribution logged it ("response completed" JSON line).

    distribution 2.8 does not log request headers, so there is no Range here: count ranged
    reads by `status == 206` and `bytes_written`. Requests refused by auth are logged only
    as "error authorizing context"; they appear here with status 401 and no byte count.
    """

    method: str
    uri: str
    """Path plus query string, as sent."""
    path: str
    status: int
    bytes_written: int | None
    user: str | None
    """`auth.user.name` when the request was authenticated (htpasswd or token subject)."""
    fields: Mapping[str, Any] = field(repr=False, compare=False)
    """The whole parsed log line, for anything not lifted into a field above."""

    @property
    def is_blob_get(self) -> bool:
        return self.method == "GET" and "/blobs/sha256:" in self.path


class LocalRegistry:
    """`docker-registry serve` on a free 127.0.0.1 port with filesystem storage under `root`.

    Use as a context manager or call `start()` / `stop()`. The port, the CA and the keys stay
    the same across a `stop()` / `start()` so a test can restart the registry on the same
    storage (e.g. to check a client's retry behaviour).
    """

    def __init__(
        self,
        root: Path,
        *,
        tls: bool = False,
        auth: AuthMode = "none",
        users: Mapping[str, str] | None = None,
        anonymous_pull: bool = True,
        delete_enabled: bool = False,
        token_algorithm: TokenAlgorithm = "ES256",
        token_key_hint: Literal["kid", "x5c"] = "kid",
        token_expires_in: int = 300,
        port: int | None = None,
        binary: str = REGISTRY_BINARY,
        proxy_remote: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.tls = tls
        self.auth: AuthMode = auth
        self.users: dict[str, str] = dict(users or {})
        self.anonymous_pull = anonymous_pull
        self.delete_enabled = delete_enabled
        # A pull-through cache (`proxy.remoteurl`) of that registry, as `--registry-mirror`
        # users run one: it answers reads itself, fetching from the remote what it lacks.
        self.proxy_remote = proxy_remote
        self._binary = binary
        self._port_fixed = port is not None
        self._port = port if port is not None else 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh: IO[bytes] | None = None
        self._log_offset = 0
        self.storage_dir = self.root / "storage"
        self.config_file = self.root / "config.yml"
        self.log_file = self.root / "registry.log"
        self.ca_file: Path | None = None
        self.cert_dir: Path | None = None
        """A containers-style cert dir (`ca.crt` inside) for skopeo's `--*-cert-dir`."""
        self._ca: trustme.CA | None = None
        self._leaf: trustme.LeafCert | None = None
        self.token_issuer: TokenIssuer | None = None
        self.service = "imagefs-test-registry"

        if auth != "none" and not self.users and not (auth == "token" and anonymous_pull):
            raise ValueError(f"auth={auth!r} needs users")
        self.root.mkdir(parents=True, exist_ok=True)
        self.storage_dir.mkdir(exist_ok=True)
        if tls:
            self._make_tls()
        if auth == "htpasswd":
            self._write_htpasswd()
        elif auth == "token":
            self.token_issuer = TokenIssuer(
                self.root / "token",
                users=self.users,
                service=self.service,
                algorithm=token_algorithm,
                key_hint=token_key_hint,
                anonymous_pull=anonymous_pull,
                expires_in=token_expires_in,
                tls_cert=self._leaf,
            )

    # -- what callers use --------------------------------------------------------------------

    @property
    def port(self) -> int:
        if not self._port:
            raise InfraError("registry not started")
        return self._port

    @property
    def host(self) -> str:
        """`127.0.0.1:PORT`, the registry part of an image reference."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def credentials(self, user: str | None = None) -> tuple[str, str]:
        """(user, password) of `user`, or of the first configured user."""
        if not self.users:
            raise InfraError("this registry has no users")
        name = user if user is not None else next(iter(self.users))
        return name, self.users[name]

    def ssl_context(self) -> ssl.SSLContext:
        """A client context trusting this registry's CA (default trust when plain HTTP)."""
        ctx = ssl.create_default_context()
        if self.ca_file is not None:
            ctx.load_verify_locations(cafile=str(self.ca_file))
        return ctx

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start the registry (and token issuer) and return once `GET /v2/` answers."""
        if self.running:
            return
        binary = require_binary(self._binary)
        if self.token_issuer is not None:
            self.token_issuer.start()
        attempts = 1 if self._port_fixed or self._port else 5
        last_error = ""
        for _ in range(attempts):
            port = self._port or free_port()
            self._write_config(port)
            self._log_fh = open(self.log_file, "ab")  # noqa: SIM115 - lives until stop()
            self._log_offset = self._log_fh.tell()
            self._proc = subprocess.Popen(
                [binary, "serve", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._log_fh,
                start_new_session=True,  # Ctrl-C in a terminal reaches us, we stop it
            )
            self._port = port
            try:
                self._wait_ready()
                return
            except InfraError as e:
                last_error = str(e)
                self._kill()
                if not self._port_fixed:
                    self._port = 0
        if self.token_issuer is not None:
            self.token_issuer.stop()
        raise InfraError(last_error)

    def stop(self) -> None:
        """Stop the registry cleanly (SIGTERM, then SIGKILL after 5 s) and the issuer."""
        self._kill()
        if self.token_issuer is not None:
            self.token_issuer.stop()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        ctx = self.ssl_context() if self.tls else None
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise InfraError(
                    f"docker-registry exited with {self._proc.returncode}: {self._log_tail()}"
                )
            status = _probe(f"{self.url}/v2/", ctx)
            if status in (200, 401):
                return
            if time.monotonic() > deadline:
                raise InfraError(
                    f"docker-registry on {self.host} did not answer /v2/ within "
                    f"{_START_TIMEOUT:.0f}s: {self._log_tail()}"
                )
            time.sleep(0.05)

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            lines = self.log_file.read_bytes()[self._log_offset :].decode(errors="replace")
            return " | ".join(lines.strip().splitlines()[-5:])
        return "(no log)"

    # -- files -------------------------------------------------------------------------------

    def _make_tls(self) -> None:
        tls_dir = self.root / "tls"
        import trustme

        tls_dir.mkdir(exist_ok=True)
        self._ca = trustme.CA(organization_name="imagefs test CA")
        self._leaf = self._ca.issue_cert("127.0.0.1", "localhost")
        self.ca_file = tls_dir / "ca.pem"
        self._ca.cert_pem.write_to_path(str(self.ca_file))
        self._leaf.cert_chain_pems[0].write_to_path(str(tls_dir / "server.pem"))
        for extra in self._leaf.cert_chain_pems[1:]:
            extra.write_to_path(str(tls_dir / "server.pem"), append=True)
        self._leaf.private_key_pem.write_to_path(str(tls_dir / "server-key.pem"))
        # containers/image (skopeo, podman) want a directory whose *.crt files are CAs.
        self.cert_dir = tls_dir / "certs.d"
        self.cert_dir.mkdir(exist_ok=True)
        shutil.copyfile(self.ca_file, self.cert_dir / "ca.crt")

    def _write_htpasswd(self) -> None:
        import bcrypt

        # distribution only accepts bcrypt entries; cost 4 keeps start-up fast.
        lines = [
            f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
            for user, pw in self.users.items()
        ]
        (self.root / "htpasswd").write_text("".join(lines))

    def _write_config(self, port: int) -> None:
        # JSON is valid YAML, and it spares us a YAML dependency and any quoting doubts.
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "json", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": self.delete_enabled},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": f"127.0.0.1:{port}",
                "secret": "imagefs-test-secret",
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
        }
        if self.proxy_remote is not None:
            config["proxy"] = {"remoteurl": self.proxy_remote}
        if self.tls:
            tls_dir = self.root / "tls"
            config["http"]["tls"] = {
                "certificate": str(tls_dir / "server.pem"),
                "key": str(tls_dir / "server-key.pem"),
            }
        if self.auth == "htpasswd":
            config["auth"] = {
                "htpasswd": {"realm": "imagefs-test", "path": str(self.root / "htpasswd")}
            }
        elif self.auth == "token":
            assert self.token_issuer is not None
            config["auth"] = {
                "token": {
                    "realm": self.token_issuer.realm,
                    "service": self.service,
                    "issuer": self.token_issuer.issuer,
                    "rootcertbundle": str(self.token_issuer.rootcertbundle),
                }
            }
        self.config_file.write_text(json.dumps(config, indent=2) + "\n")

    # -- the request log ---------------------------------------------------------------------

    def mark(self) -> None:
        """Forget the requests logged so far: `requests()` then starts from here."""
        self._sync_log()
        self._log_offset = self.log_file.stat().st_size

    def requests(self, *, sync: bool = True) -> list[LoggedRequest]:
        """Requests the registry completed since start (or the last `mark()`), oldest first.

        distribution logs a request just *after* writing its response, so a client can see
        its answer before the line exists. With `sync` we send a marker request and wait
        for its line, which makes the lines of everything the caller already finished
        (practically) certain to be there.
        """
        if sync:
            self._sync_log()
        out: list[LoggedRequest] = []
        for entry in self._log_entries():
            uri = str(entry.get("http.request.uri", ""))
            if _SYNC_MARKER in uri:
                continue
            written = entry.get("http.response.written")
            user = entry.get("auth.user.name")
            out.append(
                LoggedRequest(
                    method=str(entry.get("http.request.method", "")),
                    uri=uri,
                    path=urllib.parse.urlsplit(uri).path,
                    status=int(entry.get("http.response.status", 0)),
                    bytes_written=int(written) if written is not None else None,
                    user=str(user) if user else None,
                    fields=entry,
                )
            )
        return out

    def blob_gets(self, repo: str | None = None) -> list[LoggedRequest]:
        """The `GET /v2/<repo>/blobs/sha256:...` requests since the mark (all repos if None)."""
        prefix = f"/v2/{repo}/blobs/" if repo is not None else ""
        return [r for r in self.requests() if r.is_blob_get and r.path.startswith(prefix)]

    def blob_gets_until(
        self, done: Callable[[list[LoggedRequest]], bool], *, timeout: float = 10.0
    ) -> list[LoggedRequest]:
        """`blob_gets()` once `done(...)` holds of them, or as they stand after `timeout`.

        For assertions that something *was* fetched: distribution writes a request's log
        line from its own goroutine after the response, and on a loaded machine that line
        can trail the sync marker's. Polling for the expected lines closes that race; a
        test asserting that nothing was fetched needs no wait (a late line only adds).
        """
        deadline = time.monotonic() + timeout
        while True:
            gets = self.blob_gets()
            if done(gets) or time.monotonic() >= deadline:
                return gets
            time.sleep(0.05)

    def _log_entries(self) -> Iterator[dict[str, Any]]:
        with open(self.log_file, "rb") as f:
            f.seek(self._log_offset)
            data = f.read()
        for line in data.splitlines():
            if not line.startswith(b"{"):
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line still being written
            if not isinstance(entry, dict):
                continue
            msg = str(entry.get("msg", ""))
            if msg.startswith("response completed"):
                yield entry
            elif msg.startswith("error authorizing context"):
                # Auth failures skip the "response completed" line; they were 401s.
                yield {**entry, "http.response.status": 401}

    def _sync_log(self) -> None:
        if not self.running:
            return
        marker = f"{_SYNC_MARKER}={uuid.uuid4().hex}"
        _probe(f"{self.url}/v2/?{marker}", self.ssl_context() if self.tls else None)
        deadline = time.monotonic() + 5
        needle = marker.encode()
        while time.monotonic() < deadline:
            with open(self.log_file, "rb") as f:
                f.seek(self._log_offset)
                if needle in f.read():
                    return
            time.sleep(0.01)
        raise InfraError(f"registry log {self.log_file} never showed the sync request")

    def __repr__(self) -> str:
        where = self.url if self._port else "not started"
        return f"<LocalRegistry {where} auth={self.auth} tls={self.tls}>"


def _probe(url: str, ctx: ssl.SSLContext | None) -> int | None:
    """HTTP status of GET `url`, or None when nothing answers yet."""
    try:
        with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (urllib.error.URLError, OSError):
        return None
