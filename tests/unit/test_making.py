"""Fetch planning, single flight and read-ahead, driven by a fake `fetch_range` on trio's
MockClock (pytest-trio's `autojump_clock`): no sockets, and a fetch "takes" a virtual second
so that concurrent readers really pile up behind each other's flights. No real threads
either (the clock jumps while one runs, so any interleaving could happen, none reliably):
`SlowDisk` stands in for the worker-thread hop."""

from __future__ import annotations

import functools
import hashlib
import os
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio.testing

from imagefs.errors import ImageFSError, IntegrityError
from imagefs.layers import estargz
from imagefs.lazy.cache import PieceCache
from imagefs.lazy.layers import LayerSet
from imagefs.lazy.loading import ESTARGZ_TOC_DIGEST, TAIL_FETCH
from imagefs.lazy.making import MAX_FETCH, MIN_FETCH, Job, PieceMaker, plan
from imagefs.lazy.prefetch import FIRST_WINDOW, READ_AHEAD, Covered
from imagefs.oci.digest import Digest
from imagefs.oci.image import Layer
from imagefs.oci.manifest import Descriptor
from imagefs.store import Store
from tests.unit.test_pieces import FILES, _estargz_layer, no_whole_blob

KiB = 1 << 10
PIECE = 64 * KiB
BLOB = random.Random(1).randbytes(64 * PIECE)  # 4 MiB: "compressed" = payload here


def _payload(k: int) -> bytes:
    return BLOB[k * PIECE : (k + 1) * PIECE]


def _job(k: int, *, size: int = PIECE, gap: int = 0) -> Job:
    start = k * (PIECE + gap)
    payload = BLOB[start : start + size]
    name = hashlib.sha256(payload).hexdigest()

    def decode(data: bytes) -> bytes:
        if hashlib.sha256(data).hexdigest() != name:
            raise IntegrityError(f"piece {k} fails its digest")
        return data

    return Job(name, start, start + size, decode)


def test_plan_groups_near_pieces_caps_requests_and_takes_neighbours_along() -> None:
    jobs = [_job(k) for k in range(64)]  # 4 MiB of touching pieces (a read-ahead window)
    groups = plan(jobs)
    assert [len(g) for g in groups] == [MAX_FETCH // PIECE] * (64 * PIECE // MAX_FETCH)
    assert [j for g in groups for j in g] == jobs  # in blob order, each once
    # a gap wider than a quarter of MIN_FETCH starts a new request
    far = Job("x", jobs[3].end + MIN_FETCH // 4 + 1, jobs[3].end + MIN_FETCH // 4 + 2, bytes)
    assert [len(g) for g in plan([jobs[2], far, jobs[3]])] == [2, 1]
    # a small request takes following neighbours along up to MIN_FETCH, never earlier ones
    groups = plan([jobs[10]], jobs[5:40])
    assert [j.start for j in groups[0]] == [j.start for j in jobs[10 : 10 + MIN_FETCH // PIECE]]
    # shuffled input: same plan
    shuffled = jobs[:]
    random.Random(2).shuffle(shuffled)
    assert plan(shuffled) == plan(jobs)


class FakeRegistry:
    """`fetch_range` over BLOB: counts every byte it serves and how many fetches overlap."""

    def __init__(self, fail_first: int = 0) -> None:
        self.served: Counter[int] = Counter()  # blob offset // PIECE -> times served
        self.calls: list[tuple[int, int]] = []
        self.running = self.most_running = 0
        self.fail_first = fail_first

    async def fetch(self, _layer: int, start: int, end: int) -> bytes:
        self.calls.append((start, end))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await trio.sleep(1)  # virtual: the MockClock jumps when every task waits
            if self.fail_first:
                self.fail_first -= 1
                raise ImageFSError("registry said 503")
            for k in range(start // PIECE, (end + PIECE - 1) // PIECE):
                self.served[k] += 1
            return BLOB[start:end]
        finally:
            self.running -= 1


T = TypeVar("T")


class SlowDisk:
    """The worker-thread hop, deterministic: the work happens at once, its answer comes back
    after virtual time. A cache look (no limiter) takes `look` seconds, as on a slow or busy
    disk; decoding (under the cpu limiter) takes `decode` seconds."""

    def __init__(self, look: float = 0.0, decode: float = 0.0) -> None:
        self.look, self.decode = look, decode

    async def __call__(
        self, fn: Callable[[], T], *, limiter: trio.CapacityLimiter | None = None
    ) -> T:
        result = fn()
        await trio.sleep(self.look if limiter is None else self.decode)
        return result


def _maker(tmp_path: Path, registry: FakeRegistry, disk: SlowDisk | None = None) -> PieceMaker:
    def no_pread(_i: int, _start: int, _end: int) -> bytes:
        raise AssertionError("nothing is local")

    return PieceMaker(
        PieceCache(tmp_path),
        registry.fetch,
        lambda _i: False,
        no_pread,
        trio.CapacityLimiter(2),
        hop=disk or SlowDisk(),
    )


async def test_a_long_window_goes_out_as_several_requests_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    registry = FakeRegistry()
    maker = _maker(tmp_path, registry)
    jobs = [_job(k) for k in range(64)]
    got = await maker.make(0, jobs)
    assert len(got) == 64 and maker.inflations == 64
    # the 4 MiB window (a read-ahead) went out as four 1 MiB requests in flight together
    assert sorted(registry.calls) == [(k * MAX_FETCH, (k + 1) * MAX_FETCH) for k in range(4)]
    assert registry.most_running == 4
    # warm: nothing fetched or decoded again
    assert await maker.make(0, jobs) == {}
    assert len(registry.calls) == 4 and maker.inflations == 64


async def test_single_flight_no_piece_fetched_twice(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Readers come while earlier ones look at the cache, fetch or decode. A cache look takes
    2 s here: the readers at 1.5 s and 2 s look before the first reader's pieces are kept and
    get their answer ("absent") after its flights have ended. They must not fetch again."""
    registry = FakeRegistry()
    maker = _maker(tmp_path, registry, SlowDisk(look=2.0, decode=0.1))
    jobs = [_job(k) for k in range(64)]
    results: list[tuple[range, dict[str, bytes]]] = []

    async def reader(ks: range) -> None:
        results.append((ks, await maker.make(0, [jobs[k] for k in ks])))

    async with trio.open_nursery() as nursery:
        for ks in (range(0, 64), range(10, 20), range(30, 64), range(0, 64), range(5, 6)):
            nursery.start_soon(reader, ks)
            await trio.sleep(0.5)
    assert max(registry.served.values()) == 1 and len(registry.served) == 64, registry.calls
    assert len(results) == 5
    for ks, got in results:  # every reader got its payloads, made or waited for or kept
        assert all(hashlib.sha256(p).hexdigest() == n for n, p in got.items())
        for k in ks:
            assert jobs[k].name in got or maker.cache.read(jobs[k].name) == _payload(k)
    assert sorted(results[0][1]) == sorted(j.name for j in jobs)  # the first made them all
    assert maker.inflations == 64 and not maker.flights


async def test_a_failed_flight_wakes_its_waiters_who_try_themselves(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    registry = FakeRegistry(fail_first=1)
    maker = _maker(tmp_path, registry, SlowDisk(look=0.2, decode=0.1))
    jobs = [_job(k) for k in range(4)]
    outcome: list[str] = []

    async def first() -> None:
        try:
            await maker.make(0, jobs)
        except ImageFSError as exc:
            outcome.append(f"first: {exc}")

    async def second() -> None:
        await trio.sleep(0.5)  # joins the first one's flight
        got = await maker.make(0, jobs)
        outcome.append(f"second: {len(got)}")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        nursery.start_soon(second)
    assert sorted(outcome) == ["first: registry said 503", "second: 4"]
    assert len(registry.calls) == 2 and max(registry.served.values()) == 1
    assert not maker.flights


async def test_a_piece_that_fails_verification_is_not_kept_and_fetched_again(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    registry = FakeRegistry()
    honest = registry.fetch

    async def flips_a_byte(i: int, start: int, end: int) -> bytes:
        data = bytearray(await honest(i, start, end))
        data[7] ^= 1
        return bytes(data)

    maker = _maker(tmp_path, registry)
    maker.fetch = flips_a_byte
    job = _job(3)
    with pytest.raises(IntegrityError):
        await maker.make(0, [job])
    assert not maker.cache.exists(job.name) and maker.inflations == 0
    maker.fetch = honest
    assert await maker.make(0, [job]) == {job.name: BLOB[job.start : job.end]}
    assert maker.cache.exists(job.name) and maker.inflations == 1


async def test_read_ahead_runs_across_files_read_in_stored_order(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """`tar cf - .` reads file after file in the order they are stored: once the reader has
    moved on to the next files, the following files come in ahead of it (a window twice the
    run read so far: after 900 KB, the last 1.2 MB), each byte once."""
    layer, blob = _estargz_layer()
    calls: list[tuple[int, int]] = []

    async def fetch_range(_: Layer, start: int, end: int) -> bytes:
        calls.append((start, end))
        await trio.sleep(1)
        return blob[start:end]

    ls = LayerSet(Store(tmp_path), [layer], no_whole_blob, fetch_range=fetch_range)
    idx = await ls.ensure(0)
    after_toc = len(calls)

    async def read_file(name: str) -> None:
        entry = idx.toc.find(name.encode())
        assert entry is not None
        start, size = idx.toc.offset(entry), idx.toc.size(entry)
        data = b""
        for off in range(0, size, 128 * KiB):  # the kernel's read size
            n = min(128 * KiB, size - off)
            data += await ls.read(0, start + off, n, read_ahead_until=start + size)
        assert data == FILES[name]

    async with trio.open_nursery() as nursery:
        ls.nursery = nursery
        for name in list(FILES)[:3]:
            await read_file(name)
    # (the nursery waited for the read-ahead those reads started)
    before = len(calls)
    async with trio.open_nursery() as nursery:
        ls.nursery = nursery
        for name in list(FILES)[3:]:
            await read_file(name)
    assert len(calls) == before, calls[before:]  # all there before the reader came
    assert before - after_toc >= 2
    # no byte of the blob fetched twice, the TOC's tail fetch included (it brings the last
    # chunks along: their requests take those bytes instead of fetching them again)
    pieces: Counter[int] = Counter()
    for start, end in calls:
        pieces.update(range(start, end))
    assert pieces and max(pieces.values()) == 1
    ls.close()


async def test_a_short_run_of_small_files_reads_ahead_a_little(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A program reading two small neighbouring files (`python3` importing a package) is
    streaming, but its read-ahead window starts at `FIRST_WINDOW`, not `READ_AHEAD`: the layer
    is not fetched whole for 40 KB read (it was, with a fixed 16 MiB window)."""
    rng = random.Random(5)
    files = {f"pkg/m{k:03d}.py": rng.randbytes(20_000) for k in range(200)}  # 4 MB
    layer, blob = _estargz_layer(files, chunk_size=4 << 20)
    fetched: list[tuple[int, int]] = []

    async def fetch_range(_: Layer, start: int, end: int) -> bytes:
        fetched.append((start, end))
        return blob[start:end]

    ls = LayerSet(Store(tmp_path), [layer], no_whole_blob, fetch_range=fetch_range)
    idx = await ls.ensure(0)
    after_toc = len(fetched)
    async with trio.open_nursery() as nursery:
        ls.nursery = nursery
        for name in ("pkg/m000.py", "pkg/m001.py"):
            entry = idx.toc.find(name.encode())
            assert entry is not None
            start, size = idx.toc.offset(entry), idx.toc.size(entry)
            got = await ls.read(0, start, size, read_ahead_until=start + size)
            assert got == files[name]
    ahead = sum(end - start for start, end in fetched[after_toc:])
    # a few hundred KiB ahead of 40 KB read, not the 4 MB layer (a fixed 16 MiB window)
    assert 40_000 < ahead < 1 << 20 < 3 << 20 < len(blob), ahead
    assert FIRST_WINDOW < 1 << 20 < READ_AHEAD
    ls.close()


def test_read_ahead_asks_only_for_ground_no_earlier_window_covered() -> None:
    covered = Covered()
    assert covered.missing(10, 20) == [(10, 20)]
    covered.add(10, 20)
    covered.add(30, 40)
    assert covered.missing(0, 50) == [(0, 10), (20, 30), (40, 50)]
    assert covered.missing(12, 18) == [] and covered.missing(15, 35) == [(20, 30)]
    covered.add(20, 30)  # touching: merged into one
    assert (covered.starts, covered.ends) == ([10], [40])
    covered.add(0, 5)
    covered.add(45, 60)
    covered.add(3, 50)
    assert (covered.starts, covered.ends) == ([0], [60])


async def test_a_toc_larger_than_the_tail_guess_is_fetched_without_overlap(
    tmp_path: Path,
) -> None:
    """The eStargz TOC comes with a first guess of the blob's last 64 KiB; a TOC larger than
    that takes one more request for the part before the tail, never the tail again."""
    rng = random.Random(3)
    specs = [
        estargz.FileSpec(f"d/{rng.randbytes(24).hex()}", data=rng.randbytes(8)) for _ in range(3000)
    ]
    built = estargz.write_estargz(specs)
    blob = built.blob
    assert len(blob) - built.toc_offset > TAIL_FETCH  # the case under test
    desc = Descriptor(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        Digest.of(blob),
        len(blob),
        annotations={ESTARGZ_TOC_DIGEST: built.toc_digest},
    )
    calls: list[tuple[int, int]] = []

    async def fetch_range(_: Layer, start: int, end: int) -> bytes:
        calls.append((start, end))
        return blob[start:end]

    ls = LayerSet(
        Store(tmp_path), [Layer(desc, Digest.parse(built.diff_id))], no_whole_blob, fetch_range
    )
    idx = await ls.ensure(0)
    assert len(idx.toc) > 3000
    times: Counter[int] = Counter()
    for start, end in calls:
        times.update(range(start, end))
    assert len(calls) == 2 and max(times.values()) == 1, calls
    ls.close()


async def test_pieces_in_flight_or_just_made_are_not_looked_for_on_disk(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read-ahead asks again for pieces it has in flight, and for pieces it has just made:
    neither costs a `stat` of the cache directory (a cold eStargz read-all of the bench
    image made ~140k of them). Only the first look at each piece goes to the disk."""
    registry = FakeRegistry()
    maker = _maker(tmp_path, registry)
    jobs = [_job(k) for k in range(8)]
    names = {j.name for j in jobs}
    stats: list[str] = []
    real_stat = os.stat

    def counting_stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if path in names:
            stats.append(path)
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting_stat)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(maker.make, 0, jobs, payloads=False))
        await trio.sleep(0.5)  # its fetch is in flight (a virtual second)
        assert sorted(stats) == sorted(names)  # the first look: each piece once
        assert await maker.make(0, jobs, payloads=False) == {}  # waits for those flights
    assert sorted(stats) == sorted(names)  # nothing more looked for on disk
    assert max(registry.served.values()) == 1 and len(registry.served) == 8
    assert all(maker.cache.exists(n) for n in names)
