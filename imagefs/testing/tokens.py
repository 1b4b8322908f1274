"""A docker token-protocol issuer for the test registry's token mode (`TokenIssuer`).

distribution ships none; ours lets a test choose who may push, whether anonymous pull is
allowed and how long tokens live, and see every token request a client made.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import http.server
import json
import secrets
import ssl
import threading
import time
import urllib.parse
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from imagefs.testing.infra import free_port

# cryptography and trustme are test-only dependencies (the `test` extra): imported where
# the token mode needs them.
if TYPE_CHECKING:
    import trustme
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

TokenAlgorithm = Literal["ES256", "RS256"]


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
