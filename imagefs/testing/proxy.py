"""A small HTTP proxy in front of a real registry that can misbehave on purpose.

Requests are forwarded to the upstream registry unless a `Rule` matches (method + path
regex, for its first `times` matches): then the rule's fault is injected instead — an error
status (with `Retry-After`), a redirect to another host, a redirect loop, a truncated or
corrupted body, an ignored `Range` header, a wrong `Content-Length` (too long or too short),
a connection reset, a stall before the answer, or a stall in the middle of the body — and the
lies a real registry never tells: a body that never ends (`endless_body`, counting what it
managed to send before the client hung up), a `Content-Range` shifted from what was asked, a
`401` whose Bearer realm is this proxy itself (`challenge`: put it behind a `redirect` and it
is a stranger asking for the registry's credentials). Every request is recorded with its
headers, so tests can check what a client sent (for example that no Authorization header
followed a redirect to another host).

Also a command-line tool (`tools/faultproxy`, or `python -m imagefs.testing.proxy`):

    tools/faultproxy --upstream http://127.0.0.1:5000 --rule 'GET /blobs/ flip flip_at=100' \
        --rule 'GET /manifests/ status status=503 times=2' --port 5001

Threaded stdlib `http.server`; bodies are buffered, which is fine for test-sized blobs.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

Fault = str
FAULTS = (
    "status",  # answer `status` (with `retry_after`) instead of forwarding
    "redirect",  # 307 to `redirect_to` + the same path
    "redirect_loop",  # 307 to itself (or `redirect_to`) with a toggled query: A->B->A...
    "truncate",  # declare the full length, send `truncate_to` bytes, close
    "flip",  # invert the byte at `flip_at`
    "ignore_range",  # drop the Range header: the whole body comes back with 200
    "bad_length",  # Content-Length off by `length_delta` (+: body ends early, -: extra bytes)
    "reset",  # close the connection with RST before any answer
    "stall",  # sleep `stall_seconds`, then forward as usual
    "stall_body",  # send headers and `truncate_to` body bytes, sleep `stall_seconds`, send rest
    "endless_body",  # answer `status` with a body that never ends (`declared`: Content-Length)
    "shift_content_range",  # forward; a 206's Content-Range says `shift` bytes further on
    "challenge",  # 401 with `WWW-Authenticate: Bearer realm="<this proxy>/token"`
)
ENDLESS_CHUNK = 64 << 10


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
    length_delta: int = 100
    declared: int = -1  # endless_body: the Content-Length to claim; -1: none (read to close)
    endless_max: int = 1 << 30  # endless_body: end an answer after this many bytes all the same
    shift: int = 1  # shift_content_range: how far
    hits: int = 0
    sent: int = 0  # endless_body: body bytes written (all answers) before clients hung up

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r} (known: {', '.join(FAULTS)})")

    def matches(self, method: str, path: str) -> bool:
        return (self.method in ("*", method)) and re.search(self.path, path) is not None

    @classmethod
    def parse(cls, text: str) -> Rule:
        """`METHOD PATH-REGEX FAULT [key=value ...]`: `GET /blobs/ status status=503 times=2`."""
        words = text.split()
        if len(words) < 3:
            raise ValueError(f"rule {text!r}: want METHOD PATH-REGEX FAULT [key=value ...]")
        method, path, fault, *rest = words
        kinds = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for item in rest:
            key, sep, value = item.partition("=")
            if not sep or key not in kinds or key in ("method", "path", "fault", "hits", "sent"):
                raise ValueError(f"rule {text!r}: bad setting {item!r}")
            kind = str(kinds[key])
            try:
                if kind == "int":
                    values[key] = int(value)
                elif kind == "float":
                    values[key] = float(value)
                else:
                    values[key] = value
            except ValueError:
                raise ValueError(f"rule {text!r}: {key} wants a number, not {value!r}") from None
        return cls(method.upper() if method != "*" else method, path, fault, **values)


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    status: int


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (as clients facing injected faults do) is not news."""
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            super().handle_error(request, client_address)


@dataclass
class FaultProxy:
    upstream: str  # "http://127.0.0.1:PORT"
    require_basic: tuple[str, str] | None = None
    rules: list[Rule] = field(default_factory=list)
    port: int = 0  # 0: any free port
    # called with each request and the fault injected (the command-line tool prints them)
    on_request: Callable[[Recorded, str], None] | None = None

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

        self._server = _Server(("127.0.0.1", self.port), Handler)
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

    def _record(self, h: BaseHTTPRequestHandler, status: int, fault: str = "") -> None:
        entry = Recorded(h.command, h.path, dict(h.headers.items()), status)
        with self._lock:
            self.recorded.append(entry)
        if self.on_request is not None:
            self.on_request(entry, fault)

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
        fault = rule.fault if rule is not None else ""
        if rule is not None and rule.fault == "status":
            self._record(h, rule.status, fault)
            headers = {"Retry-After": rule.retry_after} if rule.retry_after else {}
            self._reply(
                h,
                rule.status,
                headers,
                b'{"errors":[{"code":"UNAVAILABLE","message":"injected by the test proxy"}]}',
            )
            return
        if rule is not None and rule.fault == "redirect":
            self._record(h, 307, fault)
            self._reply(h, 307, {"Location": rule.redirect_to + h.path}, b"")
            return
        if rule is not None and rule.fault == "redirect_loop":
            self._record(h, 307, fault)
            # toggle a query parameter so that every hop is a "new" URL: A -> B -> A -> ...
            hop = "b" if "imagefs-loop=a" in h.path or "imagefs-loop" not in h.path else "a"
            path = re.sub(r"[?&]imagefs-loop=[ab]", "", h.path)
            path += ("&" if "?" in path else "?") + f"imagefs-loop={hop}"
            self._reply(h, 307, {"Location": (rule.redirect_to or self.url) + path}, b"")
            return
        if rule is not None and rule.fault == "endless_body":
            self._record(h, rule.status, fault)
            self._endless(h, rule)
            return
        if rule is not None and rule.fault == "challenge":
            self._record(h, 401, fault)
            realm = f'Bearer realm="{self.url}/token",service="stranger"'
            body = b'{"errors":[{"code":"UNAUTHORIZED","message":"injected by the test proxy"}]}'
            self._reply(h, 401, {"WWW-Authenticate": realm}, body)
            return
        if rule is not None and rule.fault == "reset":
            self._record(h, 0, fault)
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
        path = re.sub(r"[?&]imagefs-loop=[ab]$", "", h.path)
        status, resp_headers, data = self._forward(h.command, path, headers_out, body)
        self._record(h, status, fault)
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
            resp_headers["Content-Length"] = str(max(0, len(data) + rule.length_delta))
            self._reply(h, status, resp_headers, data, close=True)
            return
        if rule is not None and rule.fault == "shift_content_range" and status == 206:
            first, last, total = re.findall(r"\d+|\*", resp_headers.get("Content-Range", ""))[:3]
            d = rule.shift
            resp_headers["Content-Range"] = f"bytes {int(first) + d}-{int(last) + d}/{total}"
        if rule is not None and rule.fault == "stall_body":
            resp_headers["Content-Length"] = str(len(data))
            cut = min(rule.truncate_to, len(data))
            self._reply(h, status, resp_headers, data[:cut], close=True)
            time.sleep(rule.stall_seconds)
            with contextlib.suppress(OSError):  # the client may have given up meanwhile
                h.wfile.write(data[cut:])
                h.wfile.flush()
            return
        self._reply(h, status, resp_headers, data)

    def _endless(self, h: BaseHTTPRequestHandler, rule: Rule) -> None:
        """Headers, then body bytes until the client hangs up (or `endless_max`)."""
        h.send_response(rule.status)
        if rule.declared >= 0:
            h.send_header("Content-Length", str(rule.declared))
        if rule.status == 206:  # the range asked for, so that the client reads the body
            asked = re.match(r"bytes=(\d+)-(\d*)", h.headers.get("Range", "")) or None
            first, last = (asked.group(1), asked.group(2)) if asked else ("0", "")
            h.send_header("Content-Range", f"bytes {first}-{last or first}/*")
        h.send_header("Content-Type", "application/json")
        h.send_header("Connection", "close")
        h.close_connection = True
        h.end_headers()
        if h.command == "HEAD":
            return
        h.wfile.flush()
        chunk = memoryview(b'{"errors":[' + b" " * (ENDLESS_CHUNK - 11))
        here = 0
        try:
            while here < rule.endless_max:
                # socket.send, not sendall: `sent` counts every byte the kernel took, even
                # from a chunk the client hung up in the middle of (a client that read any
                # body byte has then always been counted)
                n = h.connection.send(chunk[here % len(chunk) :])
                here += n
                with self._lock:
                    rule.sent += n
        except OSError:
            pass  # the client hung up: what we want it to do

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


def main(argv: Sequence[str] | None = None) -> int:
    """`tools/faultproxy`: run a fault proxy in front of a registry until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="tools/faultproxy",
        description="An HTTP proxy in front of a registry that injects faults on purpose.",
        epilog="RULE: 'METHOD PATH-REGEX FAULT [key=value ...]'; METHOD may be *. Faults: "
        + ", ".join(FAULTS)
        + ". Keys: times, status, retry_after, redirect_to, truncate_to, flip_at, "
        "stall_seconds, length_delta, declared, endless_max, shift.",
    )
    parser.add_argument("--upstream", required=True, help="registry base URL, http://HOST:PORT")
    parser.add_argument("--rule", action="append", default=[], help="a fault rule (repeatable)")
    parser.add_argument("--port", type=int, default=0, help="listen port (default: a free one)")
    parser.add_argument("-q", "--quiet", action="store_true", help="do not print each request")
    a = parser.parse_args(argv)
    try:
        rules = [Rule.parse(text) for text in a.rule]
    except ValueError as exc:
        parser.error(str(exc))

    def show(entry: Recorded, fault: str) -> None:
        note = f"  [{fault}]" if fault else ""
        print(f"{entry.method} {entry.path} -> {entry.status}{note}", flush=True)

    proxy = FaultProxy(a.upstream, rules=rules, port=a.port, on_request=None if a.quiet else show)
    with proxy:
        print(f"fault proxy on {proxy.url} -> {a.upstream}; Ctrl-C to stop", flush=True)
        for rule in rules:
            print(f"  rule: {rule.method} {rule.path} {rule.fault}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
