"""A small HTTP proxy in front of a real registry that can misbehave on purpose.

Requests are forwarded to the upstream registry unless a `Rule` matches (method + path
regex, for its first `times` matches): then the rule's fault is injected instead — an error
status (with `Retry-After`), a redirect to another host, a truncated or corrupted body, an
ignored `Range` header, a wrong `Content-Length`, a connection reset, or a stall. Every
request is recorded with its headers, so tests can check what a client sent (for example
that no Authorization header followed a redirect to another host).

Threaded stdlib `http.server`; bodies are buffered, which is fine for test-sized blobs.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

Fault = (
    str  # "status", "redirect", "truncate", "flip", "ignore_range", "bad_length", "reset", "stall"
)


@dataclass
class Rule:
    method: str
    path: str  # regex searched in the request path
    fault: Fault
    times: int = 1_000_000
    status: int = 503
    retry_after: str | None = None
    redirect_to: str = ""  # base URL of another server; the path is kept
    truncate_to: int = 0
    flip_at: int = 0
    stall_seconds: float = 0.0
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.method in ("*", method)) and re.search(self.path, path) is not None


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    status: int


@dataclass
class FaultProxy:
    upstream: str  # "http://127.0.0.1:PORT"
    require_basic: tuple[str, str] | None = None
    rules: list[Rule] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.recorded: list[Recorded] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._sockets: set[socket.socket] = set()
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with proxy._lock:
                    proxy._sockets.add(self.connection)

            def log_message(self, format: str, *args: Any) -> None:
                return None

            def do_GET(self) -> None:
                proxy._handle(self)

            do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop, and drop open keep-alive connections too: a stopped proxy is gone."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.recorded.clear()

    # -- handling ---------------------------------------------------------------------------

    def _rule_for(self, method: str, path: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.matches(method, path) and rule.hits < rule.times:
                    rule.hits += 1
                    return rule
        return None

    def _record(self, h: BaseHTTPRequestHandler, status: int) -> None:
        with self._lock:
            self.recorded.append(Recorded(h.command, h.path, dict(h.headers.items()), status))

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        if self.require_basic is not None:
            want = "Basic " + base64.b64encode(":".join(self.require_basic).encode()).decode()
            if h.headers.get("Authorization") != want:
                self._record(h, 401)
                self._reply(h, 401, {"WWW-Authenticate": 'Basic realm="proxy"'}, b"")
                return
        rule = self._rule_for(h.command, h.path)
        if rule is not None and rule.fault == "status":
            self._record(h, rule.status)
            headers = {"Retry-After": rule.retry_after} if rule.retry_after else {}
            self._reply(
                h,
                rule.status,
                headers,
                b'{"errors":[{"code":"UNAVAILABLE","message":"injected by the test proxy"}]}',
            )
            return
        if rule is not None and rule.fault == "redirect":
            self._record(h, 307)
            self._reply(h, 307, {"Location": rule.redirect_to + h.path}, b"")
            return
        if rule is not None and rule.fault == "reset":
            self._record(h, 0)
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            h.connection.close()
            h.close_connection = True
            return
        if rule is not None and rule.fault == "stall":
            time.sleep(rule.stall_seconds)
        headers_out = {
            k: v
            for k, v in h.headers.items()
            if k.lower() not in ("host", "connection", "content-length")
        }
        if rule is not None and rule.fault == "ignore_range":
            headers_out.pop("Range", None)
        status, resp_headers, data = self._forward(h.command, h.path, headers_out, body)
        self._record(h, status)
        if rule is not None and rule.fault == "truncate":
            declared = len(data)
            data = data[: rule.truncate_to]
            resp_headers["Content-Length"] = str(declared)
            self._reply(h, status, resp_headers, data, close=True)
            return
        if rule is not None and rule.fault == "flip" and data:
            buf = bytearray(data)
            buf[min(rule.flip_at, len(buf) - 1)] ^= 0xFF
            data = bytes(buf)
        if rule is not None and rule.fault == "bad_length":
            resp_headers["Content-Length"] = str(len(data) + 100)
            self._reply(h, status, resp_headers, data, close=True)
            return
        self._reply(h, status, resp_headers, data)

    def _forward(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        target = urlsplit(self.upstream)
        conn = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port, timeout=60)
        try:
            conn.request(method, path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            out = {
                k: v
                for k, v in resp.getheaders()
                if k.lower() not in ("transfer-encoding", "connection", "content-length")
            }
            if "Location" in out and out["Location"].startswith(self.upstream):
                out["Location"] = self.url + out["Location"][len(self.upstream) :]
            return resp.status, out, data
        finally:
            conn.close()

    @staticmethod
    def _reply(
        h: BaseHTTPRequestHandler,
        status: int,
        headers: dict[str, str],
        data: bytes,
        close: bool = False,
    ) -> None:
        h.send_response(status)
        headers = dict(headers)
        headers.setdefault("Content-Length", str(len(data)))
        for k, v in headers.items():
            h.send_header(k, v)
        if close:
            h.send_header("Connection", "close")
            h.close_connection = True
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)
        h.wfile.flush()
