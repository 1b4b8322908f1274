"""Network emulation in the registry client, for one-machine experiments.

`--net-latency MS --net-bandwidth RATE` make a loopback registry behave like one across a WAN:
every HTTP request waits one round trip before it is sent, and response bodies of all requests
of a process share one link of the given bandwidth (a token bucket), so parallel fetches
compete as they would for a real link. It lives in an httpx transport, so everything the
client does — token requests, redirects, ranges — pays the same costs.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import trio

_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}


def parse_rate(text: str) -> float:
    """`100mbit`, `12.5MB/s`, `1gbit`, `500kbit` -> bytes per second."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmg]?)(bit|bps|b|B)?(/s)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"invalid rate {text!r} (examples: 100mbit, 12.5MB/s)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    unit = m.group(3) or "bit"
    if unit.lower() in ("bit", "bps") or unit == "b":
        value /= 8
    if value <= 0:
        raise ValueError(f"rate {text!r} must be positive")
    return value


@dataclass
class Link:
    latency: float = 0.0  # seconds added before each request (one round trip)
    bandwidth: float | None = None  # bytes per second shared by all transfers, or unlimited
    # what crossed the link, so a caller can see the emulation was in the path without a clock
    requests: int = field(default=0, init=False)
    sent: int = field(default=0, init=False)  # response body bytes
    _free_at: float = field(default=0.0, init=False)

    async def transfer(self, n: int) -> None:
        """Account for `n` bytes crossing the link; sleeps until the link would be done."""
        self.sent += max(n, 0)
        if not self.bandwidth or n <= 0:
            return
        now = trio.current_time()
        self._free_at = max(self._free_at, now) + n / self.bandwidth
        await trio.sleep_until(self._free_at)


class _ThrottledStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, link: Link) -> None:
        self._inner = inner
        self._link = link

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            await self._link.transfer(len(chunk))
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class EmulatedTransport(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport, link: Link) -> None:
        self._inner = inner
        self._link = link

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self._link.requests += 1
        if self._link.latency:
            await trio.sleep(self._link.latency)
        response = await self._inner.handle_async_request(request)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _ThrottledStream(response.stream, self._link)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()
