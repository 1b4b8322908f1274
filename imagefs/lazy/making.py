"""Making pieces: fetch planning, verification and single flight.

A *piece* is verified uncompressed data kept in the `PieceCache` under the sha256 of its
payload. A `Job` says how to make one: compressed blob bytes [start, end) and a `decode`
that verifies and inflates them (capped at the declared size). `PieceMaker.make` makes the
missing pieces of a set of jobs:

- single flight: a piece being made by another task is waited for, never made twice;
- planning (`plan`): the compressed ranges of the missing pieces are grouped into Range
  requests (pieces that touch or nearly touch go together; a small request takes following
  neighbour pieces along; no request grows past `max_fetch` once it holds a piece, so a long
  read-ahead becomes several requests in flight, each decoded as soon as it arrives);
- one worker-thread hop per request decodes, verifies and keeps all its pieces (as one
  pack file in the cache, see `cache.py`).

Where the compressed bytes come from (a local blob or the registry) is the caller's: this
module sees a layer only as a number passed back to `fetch`, `is_local` and `pread`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import trio

from imagefs.errors import ImageFSError, IntegrityError, LayerFormatError, unwrap_groups
from imagefs.lazy.cache import PieceCache

log = logging.getLogger("imagefs.lazy")

# Chunks smaller than this are fetched together with their neighbours in one request: a round
# trip costs far more than the few extra KiB (see docs/bench.md for the measurement).
MIN_FETCH = 256 << 10
# A request stops taking more pieces at this size: several requests of a long read-ahead are
# then in flight at once and the first is decoded (on one core) while the next arrive.
MAX_FETCH = 1 << 20


T = TypeVar("T")


class Hop(Protocol):
    """How blocking work leaves the event loop: `trio.to_thread.run_sync`, or in tests a
    deterministic stand-in (no real threads under a MockClock: its autojump fires while a
    thread runs, which makes any interleaving possible but none reproducible)."""

    async def __call__(
        self, fn: Callable[[], T], *, limiter: trio.CapacityLimiter | None = None
    ) -> T: ...


async def to_thread(fn: Callable[[], T], *, limiter: trio.CapacityLimiter | None = None) -> T:
    return await trio.to_thread.run_sync(fn, limiter=limiter)


class Batch(Protocol):
    """Decodes many pieces in one call (`chunks.ChunkTable`): per index its verified bytes
    or the error refusing it, from compressed blob bytes starting at blob offset `base`."""

    def decode_many(
        self, ks: Iterable[int], blob: bytes | memoryview, base: int
    ) -> list[bytes | ImageFSError]: ...


@dataclass(frozen=True)
class Job:
    """How to make one piece: compressed bytes [start, end) -> verified payload, by
    `decode`, or (many small pieces of one request in one tight loop) by piece `k` of
    `batch`."""

    name: str  # sha256 hex of the payload
    start: int
    end: int
    decode: Callable[[bytes], bytes]
    batch: Batch | None = None
    k: int = 0


class Flight:
    """One piece being made; waiters take the payload from here (a tiny cache cap may have
    evicted it again by the time they look)."""

    def __init__(self) -> None:
        self.event = trio.Event()
        self.payload: bytes | None = None


def plan(
    missing: Sequence[Job],
    neighbours: Sequence[Job] = (),
    min_fetch: int = MIN_FETCH,
    max_fetch: int = MAX_FETCH,
) -> list[list[Job]]:
    """Group the jobs of missing pieces into Range requests.

    Pieces that touch or nearly touch (a gap of at most `min_fetch // 4`) are fetched
    together, up to `max_fetch` per request; a last request smaller than `min_fetch` takes
    the following neighbour pieces along (speculatively: files next to each other in a layer
    tend to be read together).
    """
    jobs = sorted(missing, key=lambda j: (j.start, j.end))
    groups: list[list[Job]] = []
    top = 0  # end of the last group
    for j in jobs:
        if groups and j.start - top <= min_fetch // 4 and j.end - groups[-1][0].start <= max_fetch:
            groups[-1].append(j)
            top = max(top, j.end)
        else:
            groups.append([j])
            top = j.end
    if groups and neighbours:
        last = groups[-1]
        for n in sorted(neighbours, key=lambda j: (j.start, j.end)):
            if n.start < top:
                continue  # before or inside the request: not a following neighbour
            if top - last[0].start >= min_fetch or n.start - top > min_fetch // 4:
                break
            last.append(n)
            top = max(top, n.end)
    return groups


@dataclass
class PieceMaker:
    """Makes pieces of the layers of one `LayerSet`, each at most once at a time."""

    cache: PieceCache
    fetch: Callable[[int, int, int], Awaitable[bytes]]  # layer, start, end -> blob bytes
    is_local: Callable[[int], bool]  # whether the layer's whole blob is in the store
    pread: Callable[[int, int, int], bytes]  # layer, start, end -> local blob bytes
    cpu: trio.CapacityLimiter
    min_fetch: int = MIN_FETCH
    max_fetch: int = MAX_FETCH
    describe: Callable[[int], str] = str  # a layer for the log
    hop: Hop = to_thread  # blocking cache looks and decoding leave the event loop here

    def __post_init__(self) -> None:
        self.flights: dict[str, Flight] = {}
        self.inflations = 0  # pieces decoded by this process (a warm read decodes none)
        self._looks: dict[int, set[str]] = {}  # cache looks out on a thread -> flights ended
        self._next_look = 0

    async def make(
        self,
        i: int,
        jobs: Sequence[Job],
        neighbours: Callable[[], Sequence[Job]] = tuple,
        *,
        payloads: bool = True,
    ) -> dict[str, bytes]:
        """Make sure the pieces of `jobs` exist; returns the payloads this call made or
        waited for (name -> bytes), the others are in the cache (open). Prefetches pass
        `payloads=False`: what they make is not held in memory, only kept in the cache, and
        what is there already is only looked at, not opened (a reader opens it when it
        needs it). `neighbours` is called only when this call will fetch something."""
        cache = self.cache
        got: dict[str, bytes] = {}
        there = cache.open if payloads else cache.exists
        in_flight = self.flights

        # What the next look looks at, and what earlier looks found missing that nothing
        # has made since (a flight that lands during a look is noted in `landed`): each
        # look after the first is only at what may have changed. A 16 MiB read-ahead window
        # of small chunks is hundreds of pieces, looked at again whenever one of them
        # landed during a look (a cold eStargz read-all of the bench image: ~170k `stat`s
        # for ~47k pieces).
        looking: Sequence[Job] = jobs
        known: list[Job] = []

        def absent() -> tuple[list[Job], list[Job]]:
            # A piece in flight is counted missing without a look: the event loop then
            # waits for its flight (which it would do anyway, unless it had just landed).
            missing = [
                j
                for j in looking
                if j.name not in got and (j.name in in_flight or not there(j.name))
            ]
            # Neighbours only matter when something must be fetched, not when all that is
            # missing is in flight already (a reader behind read-ahead: the common case).
            # `in_flight` is read from this thread only as that hint; the event loop decides.
            # A cheap existence check for them (a read that opens them checks them).
            fetching = any(j.name not in in_flight for j in (*known, *missing))
            company = (
                [j for j in neighbours() if j.name not in in_flight and not cache.exists(j.name)]
                if fetching
                else []
            )
            return missing, company

        while True:
            # The look runs on a thread. A flight that ends while it is out may have kept its
            # piece after the look passed it by, and is gone from `flights` when the look
            # returns: without `landed` that piece would be fetched a second time.
            landed: set[str] = set()
            token = self._next_look = self._next_look + 1
            self._looks[token] = landed
            try:
                found, company = await self.hop(absent)
            finally:
                del self._looks[token]
            missing = [*known, *found]
            if any(j.name in landed for j in missing):
                # kept meanwhile (or failed: then the next look fetches it): look again at
                # those only
                looking = [j for j in missing if j.name in landed]
                known = [j for j in missing if j.name not in landed]
                continue
            if not missing:
                return got
            # No await from here to registering our flights: the in-flight check holds.
            waiting = [(j.name, self.flights[j.name]) for j in missing if j.name in self.flights]
            if not waiting:
                break
            for name, flight in waiting:
                await flight.event.wait()
                if flight.payload is not None:
                    got[name] = flight.payload
            looking, known = missing, []  # made by those flights, or not: look again
        unique: dict[str, Job] = {}
        for j in missing:
            unique.setdefault(j.name, j)
        extra = {
            j.name: j
            for j in company
            if j.name not in unique and j.name not in self.flights and j.name not in landed
        }
        groups = plan(list(unique.values()), list(extra.values()), self.min_fetch, self.max_fetch)
        flights = {j.name: Flight() for group in groups for j in group}
        self.flights.update(flights)
        failed: list[str] = []  # why wanted pieces were refused (the other groups go on)
        try:
            with unwrap_groups():
                async with trio.open_nursery() as nursery:
                    wanted = set(unique) if payloads else set()
                    for group in groups:
                        nursery.start_soon(self._make_group, i, group, flights, wanted, failed)
        finally:
            for name, flight in flights.items():
                self.flights.pop(name, None)
                flight.event.set()
            for landed_during in self._looks.values():
                landed_during.update(flights)
        if failed:
            raise IntegrityError(failed[0])
        for name in unique:
            payload = flights[name].payload
            if payload is not None:
                got[name] = payload
        return got

    async def _make_group(
        self,
        i: int,
        group: list[Job],
        flights: dict[str, Flight],
        wanted: set[str],
        failed: list[str],
    ) -> None:
        """Fetch one compressed range, then decode, verify and keep all its pieces in one
        worker-thread hop. A piece that fails is neither kept nor served; the others of
        the request are (their readers are served, nothing is fetched again). A wanted
        piece that fails is noted in `failed` (its reader gets EIO); a neighbour is only
        logged: nobody asked for it."""
        start, end = group[0].start, max(j.end for j in group)
        local = self.is_local(i)
        data = None if local else await self.fetch(i, start, end)
        cache = self.cache

        def decode_and_keep() -> tuple[list[tuple[str, bytes]], list[tuple[Job, Exception]]]:
            blob = self.pread(i, start, end) if data is None else data
            view = memoryview(blob)
            results = _decode_group(group, view, start)
            keep: list[tuple[str, bytes]] = []
            bad: list[tuple[Job, Exception]] = []
            for j, got in zip(group, results, strict=True):
                if isinstance(got, Exception):
                    bad.append((j, got))
                else:
                    keep.append((j.name, got))
            cache.put_many(keep)  # one pack per request: a file write and a link per piece
            return [(n, p if n in wanted else b"") for n, p in keep], bad

        made, bad = await self.hop(decode_and_keep, limiter=self.cpu)
        self.inflations += len(made)
        for name, payload in made:
            if name in wanted:
                flights[name].payload = payload
        for j, exc in bad:
            if j.name not in wanted:
                # a waiter on it finds no payload and fetches (and reports) itself
                log.warning("piece at %d-%d not kept: %s", j.start, j.end, exc)
                continue
            log.error(
                "layer %d (%s): bytes %d-%d %s failed verification (%s); not served, not kept",
                i,
                self.describe(i),
                j.start,
                j.end,
                "of the local blob" if local else "from the registry",
                exc,
            )
            failed.append(str(exc))


def _decode_group(group: Sequence[Job], view: memoryview, base: int) -> list[bytes | Exception]:
    """Each job's verified payload or its error, in order: runs of jobs of one `Batch` in
    one `decode_many` call, the others by their own `decode`."""
    out: list[bytes | Exception] = []
    n = 0
    while n < len(group):
        j = group[n]
        batch = j.batch
        if batch is None:
            try:
                out.append(j.decode(bytes(view[j.start - base : j.end - base])))
            except (IntegrityError, LayerFormatError) as exc:
                out.append(exc)
            n += 1
            continue
        run = n
        while run < len(group) and group[run].batch is batch:
            run += 1
        out.extend(batch.decode_many([x.k for x in group[n:run]], view, base))
        n = run
    return out
