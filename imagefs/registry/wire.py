"""What came over the wire, and why: every response body counted once, where it arrives.

Every request a `Connection` sends carries a *cause* — why imagefs fetched it — and, for a
layer's bytes, the layer (its index in the image being served). Call sites say the cause
with `with wire.cause("toc"):` (a context variable, so it reaches the request through any
number of calls and trio tasks started inside); the registry client gives each verb a
default (`default_cause`) that a caller's cause overrides, so a manifest fetched for a
published index counts as "index", a manifest fetched by `pull` as "manifest".

The count is taken in one place: an httpx response hook wraps each response's body stream,
and the bytes are counted as the body is read from the connection — after transfer framing,
before anything above looks at them. Retries, resumes and redirect hops are separate
responses, each counted for what it carried; a body abandoned half way counts what came.
A 200 answer to a Range request is the whole blob, whatever the caller wanted it for
(cause "whole layer"). When the body is done (read to the end or closed) one `Fetch` goes to
the `Wire`'s listeners — a mount's telemetry — which is what `imagefs stats`, the trace and
its report add up, so the three agree by construction.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import httpx

Cause = Literal[
    "manifest",  # image manifests and indexes (tags, digests)
    "config",  # an image config (and other small blobs read whole)
    "referrers",  # looking for artifacts next to an image (referrers API, sha256-<hex> tag)
    "index",  # a published imagefs layer index (its artifact manifest and blob)
    "toc",  # an eStargz / zstd:chunked table of contents (footer, TOC)
    "lost names",  # tar headers of names a TOC could not carry (layers.lostnames)
    "whole layer",  # a whole blob: pull, a layer without usable TOC/index, a 200 to a Range
    "read",  # pieces a read waited for
    "read-ahead",  # pieces fetched ahead of a reader going on
    "prefetch",  # profiles, landmarks, --background-fetch
    "auth",  # bearer tokens from a token server
    "other",  # /v2/ probes, HEADs, uploads: anything no caller named
]
CAUSES: tuple[Cause, ...] = (
    "manifest",
    "config",
    "referrers",
    "index",
    "toc",
    "lost names",
    "whole layer",
    "read",
    "read-ahead",
    "prefetch",
    "auth",
    "other",
)

_cause: contextvars.ContextVar[Cause | None] = contextvars.ContextVar(
    "imagefs_fetch_cause", default=None
)
_layer: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "imagefs_fetch_layer", default=None
)


@contextlib.contextmanager
def cause(why: Cause, *, layer: int | Literal[False] | None = False) -> Iterator[None]:
    """Requests sent inside are fetched for `why` (and for `layer`, when given: None says
    "no layer", False leaves the current one)."""
    token = _cause.set(why)
    layer_token = _layer.set(layer) if layer is not False else None
    try:
        yield
    finally:
        if layer_token is not None:
            _layer.reset(layer_token)
        _cause.reset(token)


@contextlib.contextmanager
def default_cause(why: Cause) -> Iterator[None]:
    """`why`, unless a caller already said why (the registry client's verbs use this)."""
    if _cause.get() is not None:
        yield
        return
    with cause(why):
        yield


@contextlib.contextmanager
def for_layer(layer: int) -> Iterator[None]:
    """Requests sent inside fetch bytes of (or for) layer `layer`; the cause stays."""
    token = _layer.set(layer)
    try:
        yield
    finally:
        _layer.reset(token)


def set_cause(why: Cause) -> None:
    """For the whole of the current task (a background task's first line)."""
    _cause.set(why)


@dataclass(frozen=True, slots=True)
class Fetch:
    """One response: what it carried and why. Times are `time.monotonic_ns()`."""

    cause: Cause
    layer: int | None
    nbytes: int  # body bytes that came over the wire
    began_ns: int  # the request was sent
    ended_ns: int  # the body was done (read to its end, or closed)
    status: int
    method: str

    @property
    def seconds(self) -> float:
        return (self.ended_ns - self.began_ns) / 1e9


Listener = Callable[[Fetch], None]

BACKLOG = 4096  # fetches kept for a listener that comes later (a mount's metadata pull)


class Wire:
    """The fetches of one session (all its registry clients), handed to listeners.

    Fetches done before anyone listens (`imagefs mount` pulling the manifest and config
    before the mount's telemetry exists) wait in a bounded backlog and are replayed to the
    first listener."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._backlog: deque[Fetch] = deque(maxlen=BACKLOG)
        self.in_flight = 0  # bodies being read right now
        self._began: weakref.WeakKeyDictionary[httpx.Request, int] = weakref.WeakKeyDictionary()

    def listen(self, listener: Listener) -> None:
        while self._backlog:
            listener(self._backlog.popleft())
        self._listeners.append(listener)

    def earliest_ns(self) -> int | None:
        """When the first fetch still waiting for a listener began."""
        return min((f.began_ns for f in self._backlog), default=None)

    def record(self, fetch: Fetch) -> None:
        if not self._listeners:
            self._backlog.append(fetch)
        for listener in self._listeners:
            listener(fetch)

    # -- httpx hooks ------------------------------------------------------------------------

    def event_hooks(self) -> dict[str, list[Callable[..., Any]]]:
        return {"request": [self._on_request], "response": [self._on_response]}

    async def _on_request(self, request: httpx.Request) -> None:
        self._began[request] = time.monotonic_ns()

    async def _on_response(self, response: httpx.Response) -> None:
        request = response.request
        why = _cause.get() or "other"
        if response.status_code == 200 and "range" in request.headers:
            why = "whole layer"  # the registry ignored the Range: this body is the blob
        began = self._began.pop(request, None) or time.monotonic_ns()
        response.stream = _Metered(
            response.stream, self, why, _layer.get(), began, response.status_code, request.method
        )
        self.in_flight += 1


class _Metered(httpx.AsyncByteStream):
    """A response body that counts its bytes as they arrive and reports once when done."""

    def __init__(
        self,
        inner: Any,
        wire: Wire,
        why: Cause,
        layer: int | None,
        began_ns: int,
        status: int,
        method: str,
    ) -> None:
        self._inner = inner
        self._wire = wire
        self._fields = (why, layer)
        self._began = began_ns
        self._status = status
        self._method = method
        self._n = 0
        self._done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            self._n += len(chunk)
            yield chunk
        self._report()

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._report()

    def _report(self) -> None:
        if self._done:
            return
        self._done = True
        self._wire.in_flight -= 1
        why, layer = self._fields
        self._wire.record(
            Fetch(why, layer, self._n, self._began, time.monotonic_ns(), self._status, self._method)
        )
