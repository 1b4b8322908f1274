"""Counting at the wire (`registry.wire`): each response body counted once, as it arrives,
with the cause its caller named; and a mount's telemetry adding them up. httpx's own
MockTransport stands in for the network (no sockets in unit tests); the integration test
`test_fetch_accounting` checks the same counts against a real registry's access log."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from imagefs.lazy.telemetry import Telemetry
from imagefs.registry import wire


def _streamed(status: int, *pieces: bytes) -> httpx.Response:
    """A response whose body arrives in pieces, as from a real connection (a body given as
    bytes would be read by httpx before any hook saw it)."""

    async def body() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    return httpx.Response(status, content=body())


def _handler(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/ranged":
        if "range" in request.headers:
            return _streamed(206, b"r" * 10)
        return _streamed(200, b"w" * 100)
    if request.url.path == "/stream":
        return _streamed(200, *[b"s" * 1000] * 4)
    return _streamed(200, b"x" * 40, b"yy")


def _client(w: wire.Wire) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.MockTransport(_handler),
        base_url="http://registry.test",
        event_hooks=w.event_hooks(),
    )


def _record(w: wire.Wire) -> list[wire.Fetch]:
    got: list[wire.Fetch] = []
    w.listen(got.append)
    return got


def test_a_response_is_counted_once_with_its_cause_and_layer() -> None:
    async def main() -> list[wire.Fetch]:
        w = wire.Wire()
        got = _record(w)
        async with _client(w) as client:
            with wire.cause("toc", layer=3):
                await client.get("/a")
                with wire.default_cause("manifest"):  # the caller's cause wins
                    await client.get("/b")
            with wire.default_cause("config"):
                await client.get("/c")
            await client.get("/d")
        assert w.in_flight == 0
        return got

    got = trio.run(main)
    assert [(f.cause, f.layer, f.nbytes, f.status) for f in got] == [
        ("toc", 3, 42, 200),
        ("toc", 3, 42, 200),
        ("config", None, 42, 200),
        ("other", None, 42, 200),
    ]
    assert all(f.ended_ns >= f.began_ns for f in got)


def test_a_200_to_a_range_request_is_the_whole_layer() -> None:
    async def main() -> list[wire.Fetch]:
        w = wire.Wire()
        got = _record(w)
        async with _client(w) as client:
            with wire.cause("read", layer=1):
                await client.get("/ranged", headers={"Range": "bytes=0-9"})
                await client.get("/ranged?x", headers={"Range": "bytes=0-9"})
            await client.get("/ranged")  # no Range: a 200 is just a 200
        return got

    got = trio.run(main)
    assert [(f.cause, f.nbytes) for f in got] == [("read", 10), ("read", 10), ("other", 100)]

    async def ignoring() -> list[wire.Fetch]:
        w = wire.Wire()
        got = _record(w)

        def handler(request: httpx.Request) -> httpx.Response:
            return _streamed(200, b"w" * 60, b"w" * 40)

        async with httpx.AsyncClient(
            transport=httpx.MockTransport(handler), event_hooks=w.event_hooks()
        ) as client:
            with wire.cause("read", layer=1):
                await client.get("http://r.test/blob", headers={"Range": "bytes=0-9"})
        return got

    got = trio.run(ignoring)
    assert [(f.cause, f.layer, f.nbytes) for f in got] == [("whole layer", 1, 100)]


def test_a_body_dropped_half_way_counts_what_came() -> None:
    async def main() -> list[wire.Fetch]:
        w = wire.Wire()
        got = _record(w)
        async with _client(w) as client:
            with wire.cause("read-ahead"):
                async with client.stream("GET", "/stream") as resp:
                    async for _chunk in resp.aiter_raw():
                        break  # hang up after the first piece
        assert w.in_flight == 0
        return got

    got = trio.run(main)
    assert len(got) == 1 and got[0].cause == "read-ahead"
    assert 0 < got[0].nbytes <= 4000 and got[0].nbytes % 1000 == 0


def test_fetches_before_anyone_listens_are_replayed_to_the_first_listener() -> None:
    async def main() -> tuple[list[wire.Fetch], int | None]:
        w = wire.Wire()
        async with _client(w) as client:
            with wire.cause("manifest"):
                await client.get("/m")
            earliest = w.earliest_ns()
            got = _record(w)
            await client.get("/later")
        return got, earliest

    got, earliest = trio.run(main)
    assert [f.cause for f in got] == ["manifest", "other"]
    assert earliest == got[0].began_ns


@pytest.mark.parametrize("tracing", [False, True])
def test_telemetry_adds_up_fetches_by_cause_and_layer(tmp_path: Path, tracing: bool) -> None:
    trace = tmp_path / "t.jsonl" if tracing else None
    tele = Telemetry([1000, 2000], trace_path=trace, started_ns=0)
    for cause, layer, n in [("manifest", None, 5), ("toc", 1, 300), ("read", 1, 700)]:
        tele.fetch(wire.Fetch(cause, layer, n, 10, 2_000_010, 206, "GET"))  # type: ignore[arg-type]
    tele.close()
    snap = tele.snapshot()
    assert snap["bytes_fetched"] == 1005 and snap["fetches"] == 3
    assert snap["fetched_by_cause"] == {"manifest": 5, "toc": 300, "read": 700}
    assert [la["fetched"] for la in snap["layers"]] == [0, 1000]
    assert snap["layers"][1]["fetched_pct"] == 50.0
    if trace is not None:
        lines = [json.loads(x) for x in trace.read_text().splitlines()]
        assert [(x["op"], x["cause"], x["layer"], x["bytes"]) for x in lines] == [
            ("fetch", "manifest", None, 5),
            ("fetch", "toc", 1, 300),
            ("fetch", "read", 1, 700),
        ]
        assert lines[0]["t"] == 2_000_010 and lines[0]["latency"] == 0.002
