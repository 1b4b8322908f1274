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
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import http.server
import json
import secrets
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Literal, Self

# bcrypt, trustme and cryptography are test-only dependencies (the `test` extra): they are
# imported where the TLS, htpasswd and token modes need them, so that `tools/demo` (a plain
# registry) runs on a fresh clone whose venv has only imagefs's own dependencies.
if TYPE_CHECKING:
    import trustme
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

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
TokenAlgorithm = Literal["ES256", "RS256"]

REGISTRY_BINARY = "docker-registry"
_SYNC_MARKER = "imagefs-log-sync"
_START_TIMEOUT = 15.0


class InfraError(RuntimeError):
    """The test infrastructure itself failed (missing binary, registry did not start).

    Deliberately not an `ImageFSError`: it is never something imagefs should handle, and a
    test that sees it should fail loudly with the message (which says how to fix the machine).
    """


def require_binary(name: str) -> str:
    """Return the path of `name` or raise with the fix, so no test is silently skipped."""
    path = shutil.which(name)
    if path is None:
        raise InfraError(
            f"{name!r} is not installed; run tools/test (it installs the Debian packages "
            "docker-registry, skopeo, umoci) or apt-get install it"
        )
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the caller retries on a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def libtrust_key_id(public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> str:
    """The docker/libtrust key id of a public key, as distribution 2.8 matches a JWT `kid`.

    libtrust takes sha256 of the DER SubjectPublicKeyInfo, keeps 240 bits, base32-encodes
    them (48 chars) and groups them by four with colons. The registry indexes the public keys
    of the certificates in `auth.token.rootcertbundle` by this id.
    """
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode("ascii")
    return ":".join(b32[i : i + 4] for i in range(0, len(b32), 4))


# --------------------------------------------------------------------------------------------
# Token issuer


@dataclass(frozen=True)
class TokenRequest:
    """One request the token issuer answered, kept so tests can assert tokens are reused."""

    method: str
    service: str | None
    scopes: tuple[str, ...]
    account: str | None
    """User name from Basic credentials (or the `account` query parameter), if any."""
    authenticated: bool
    """True when valid credentials were presented."""
    status: int
    granted: tuple[tuple[str, str, tuple[str, ...]], ...]
    """(type, name, actions) per granted resource."""


class TokenIssuer:
    """A docker token-protocol server (`GET realm?service=..&scope=..`) in a thread.

    Why our own: distribution ships none, and we want to control and observe it: which
    users may push, whether anonymous pull is allowed, how long tokens live, and how many
    token requests a client made.

    Policy: valid Basic credentials get every action they ask for (pull, push, delete, `*`);
    anonymous callers get only `pull` when `anonymous_pull`, else 401; wrong credentials get
    401 (as Docker Hub and distribution's reference issuers do).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        users: Mapping[str, str],
        service: str,
        issuer: str = "imagefs-test-issuer",
        algorithm: TokenAlgorithm = "ES256",
        key_hint: Literal["kid", "x5c"] = "kid",
        anonymous_pull: bool = True,
        expires_in: int = 300,
        tls_cert: trustme.LeafCert | None = None,
        port: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.users = dict(users)
        self.service = service
        self.issuer = issuer
        self.algorithm: TokenAlgorithm = algorithm
        self.key_hint = key_hint
        self.anonymous_pull = anonymous_pull
        self.expires_in = expires_in
        self._tls_cert = tls_cert
        self._port = port
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        workdir.mkdir(parents=True, exist_ok=True)
        self._key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
        if algorithm == "ES256":
            self._key = ec.generate_private_key(ec.SECP256R1())
        else:
            self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.key_id = libtrust_key_id(self._key.public_key())
        self._cert = _self_signed_cert(self._key, "imagefs test token signer")
        self.rootcertbundle = workdir / "token-signer.pem"
        self.rootcertbundle.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            self._port = free_port()
        return self._port

    @property
    def realm(self) -> str:
        """The URL the registry names in its `WWW-Authenticate: Bearer realm=...` challenge."""
        scheme = "https" if self._tls_cert is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}/token"

    def start(self) -> None:
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                issuer._handle(self)

            def do_POST(self) -> None:
                # The OAuth2 POST form is optional in the protocol; clients (containerd)
                # fall back to GET on 404/405, which is the path we want exercised.
                self._drain()
                _send_json(self, 405, {"errors": [{"code": "UNSUPPORTED"}]})

            def _drain(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(n)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the recorded `requests()` are the log."""

        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        if self._tls_cert is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            with self._tls_cert.private_key_and_cert_chain_pem.tempfile() as pem:
                ctx.load_cert_chain(pem)
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="imagefs-token-issuer", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # -- observation -------------------------------------------------------------------------

    def requests(self) -> list[TokenRequest]:
        """Every token request answered so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        """Forget recorded requests (e.g. between the phases of one test)."""
        with self._lock:
            self._requests.clear()

    # -- the protocol ------------------------------------------------------------------------

    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(h.path)
        query = urllib.parse.parse_qs(url.query)
        service = query.get("service", [None])[0]
        scopes = tuple(s for value in query.get("scope", []) for s in value.split(" ") if s)
        account = query.get("account", [None])[0]
        if url.path != "/token":
            _send_json(h, 404, {"errors": [{"code": "NOT_FOUND"}]})
            return

        authenticated = False
        header = h.headers.get("Authorization", "")
        if header.lower().startswith("basic "):
            try:
                user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            except ValueError:
                user, password = "", ""
            account = user
            expected = self.users.get(user)
            if expected is None or not secrets.compare_digest(expected, password):
                self._record(h.command, service, scopes, account, False, 401, ())
                _send_json(
                    h,
                    401,
                    {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]},
                    {"WWW-Authenticate": 'Basic realm="imagefs-test-issuer"'},
                )
                return
            authenticated = True
        elif not self.anonymous_pull:
            self._record(h.command, service, scopes, account, False, 401, ())
            _send_json(
                h,
                401,
                {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
                {"WWW-Authenticate": 'Basic realm="imagefs-test-issuer"'},
            )
            return

        granted: list[tuple[str, str, tuple[str, ...]]] = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions_s = rest.rpartition(":")
            wanted = tuple(a for a in actions_s.split(",") if a)
            allowed = {"pull", "push", "delete", "*"} if authenticated else {"pull"}
            ok = tuple(a for a in wanted if a in allowed)
            if name and ok:
                granted.append((kind, name, ok))

        now = int(time.time())
        token = self._sign(
            {
                "iss": self.issuer,
                "sub": account or "",
                "aud": service or self.service,
                "exp": now + self.expires_in,
                "nbf": now - 10,
                "iat": now,
                "jti": uuid.uuid4().hex,
                "access": [{"type": k, "name": n, "actions": list(a)} for k, n, a in granted],
            }
        )
        self._record(h.command, service, scopes, account, authenticated, 200, tuple(granted))
        issued = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        _send_json(
            h,
            200,
            {
                "token": token,
                "access_token": token,
                "expires_in": self.expires_in,
                "issued_at": issued,
            },
        )

    def _record(
        self,
        method: str,
        service: str | None,
        scopes: tuple[str, ...],
        account: str | None,
        authenticated: bool,
        status: int,
        granted: tuple[tuple[str, str, tuple[str, ...]], ...],
    ) -> None:
        with self._lock:
            self._requests.append(
                TokenRequest(method, service, scopes, account, authenticated, status, granted)
            )

    def _sign(self, claims: Mapping[str, Any]) -> str:
        """A compact JWS the registry accepts: `kid` = libtrust id, or `x5c` = our cert."""
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, padding
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        header: dict[str, Any] = {"typ": "JWT", "alg": self.algorithm}
        if self.key_hint == "kid":
            header["kid"] = self.key_id
        else:
            header["x5c"] = [
                base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()
            ]
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        ).encode("ascii")
        if isinstance(self._key, ec.EllipticCurvePrivateKey):
            der = self._key.sign(signing_input, ec.ECDSA(hashes.SHA256()))
            r, s = decode_dss_signature(der)
            # JWS wants the raw fixed-size r||s, not the DER that cryptography produces.
            signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        else:
            signature = self._key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        return signing_input.decode("ascii") + "." + _b64url(signature)


def _send_json(
    h: http.server.BaseHTTPRequestHandler,
    status: int,
    body: Mapping[str, Any],
    headers: Mapping[str, str] | None = None,
) -> None:
    data = json.dumps(body).encode()
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(data)


def _self_signed_cert(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, common_name: str
) -> x509.Certificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


# --------------------------------------------------------------------------------------------
# The registry


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

    @property
    def is_manifest(self) -> bool:
        return "/manifests/" in self.path


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
