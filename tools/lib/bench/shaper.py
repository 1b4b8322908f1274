"""A TCP proxy that makes a loopback registry look like one across a WAN, for tools that
cannot emulate a network themselves (skopeo). Used when `tc ... netem` is not available
(a kernel without sch_netem).

Each direction of each connection is a link with a one-way delay (half the round trip) and a
rate: a chunk read from one side is delivered to the other once the link has serialised it
(all connections share one link per direction, as they would share a real one) and then the
delay has passed. Bytes are buffered in the proxy meanwhile, so TCP flow control between the
endpoints and the proxy never throttles below the emulated rate.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from types import TracebackType

CHUNK = 64 * 1024


class _Link:
    """One direction's shared serialisation: `free_at` is when the link is idle again."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.free_at = 0.0
        self.lock = threading.Lock()

    def sent_at(self, arrival: float, n: int) -> float:
        if not self.rate:
            return arrival
        with self.lock:
            self.free_at = max(self.free_at, arrival) + n / self.rate
            return self.free_at


class ShapingProxy:
    """`with ShapingProxy("127.0.0.1", port, rtt_s=0.02, rate=12.5e6) as p:` then talk to
    127.0.0.1:p.port instead."""

    def __init__(
        self, host: str, port: int, *, rtt_s: float, rate_bytes_per_s: float | None
    ) -> None:
        self.upstream = (host, port)
        self.delay = rtt_s / 2
        self.links = {"up": _Link(rate_bytes_per_s), "down": _Link(rate_bytes_per_s)}
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []

    def __enter__(self) -> ShapingProxy:
        self._spawn(self._accept)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._listener.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()
        for t in self._threads:
            t.join(5)

    def _spawn(self, target: object, *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._sockets.append(s)
            self._pipe(client, server, self.links["up"])
            self._pipe(server, client, self.links["down"])

    def _pipe(self, src: socket.socket, dst: socket.socket, link: _Link) -> None:
        q: queue.Queue[tuple[float, bytes]] = queue.Queue()

        def pump() -> None:
            while True:
                try:
                    data = src.recv(CHUNK)
                except OSError:
                    data = b""
                now = time.monotonic()
                q.put((link.sent_at(now, len(data)) + self.delay, data))
                if not data:
                    return

        def deliver() -> None:
            while True:
                due, data = q.get()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                try:
                    dst.sendall(data)
                except OSError:
                    return

        self._spawn(pump)
        self._spawn(deliver)
