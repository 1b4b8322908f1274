"""Bringing pieces in before a read needs them.

- `ReadAhead`: a reader that goes on where its last read ended gets the bytes after it
  fetched in the background, in windows of at least half the current window size (few,
  large windows; `making.plan` splits each into several requests in flight). Within one file
  it runs to the file's end (at most `READ_AHEAD` ahead): a file read from its start on is
  usually read whole. A reader that moves on to the data stored next in the layer (the next
  file in TOC / tar order, after at most `STREAM_GAP` bytes of headers, as `tar cf - .` or
  `cp -r` of a directory written in that order do) is *streaming*, and its read-ahead runs on
  across file ends — in a window that grows with the run, as the kernel's read-ahead does:
  twice the bytes read in sequence so far, from `FIRST_WINDOW` up to `READ_AHEAD`. So a
  program reading three small neighbouring files (`python3` importing a package) asks for a
  few hundred KiB more than it reads, not 16 MiB, while `tar` of a whole layer reaches full
  windows after its first 8 MiB. A jump halves the run instead of forgetting it: `tar`,
  whose directory order departs from the stored order now and then, keeps large windows.
- `fetch_everything`, `prefetch_ranges`, `prefetch_landmarks`: background fetches through
  the set's background limiter (2 of the 8 network slots), so on-demand reads find room.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio

from imagefs.errors import ImageFSError
from imagefs.lazy import telemetry
from imagefs.lazy.loading import ESTARGZ_TOC_DIGEST
from imagefs.lazy.making import MAX_FETCH, Job
from imagefs.registry import wire

if TYPE_CHECKING:
    from imagefs.lazy.layers import LayerSet

log = logging.getLogger("imagefs.lazy")

# 16 MiB: a window of small chunks goes out as several 1 MiB requests in flight at once, and
# the next window starts while 8 MiB of this one are still ahead of the reader (4 MiB left
# the reader waiting on each window's decoding; docs/bench.md).
READ_AHEAD = 16 << 20
# The first window of a streaming run (see the module docstring; measured in
# docs/slacker.md: a fixed 16 MiB window made `python3 -c 'import json, ...'` fetch 2.7x
# what it read).
FIRST_WINDOW = 512 << 10
# Between the end of one file's data and the start of the next one's in a layer's stream:
# a tar header (512 bytes), PAX records, padding. More than this and the reader jumped.
STREAM_GAP = 64 << 10


class Covered:
    """The stream ranges read-ahead windows have asked for, as sorted disjoint intervals
    (merged; at most `MAX_INTERVALS`, then forgotten: asking again costs a look, not a
    fetch)."""

    MAX_INTERVALS = 4096

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def missing(self, start: int, end: int) -> list[tuple[int, int]]:
        out = []
        k = max(0, bisect.bisect_right(self.starts, start) - 1)
        pos = start
        while pos < end and k < len(self.starts):
            if self.ends[k] <= pos:
                k += 1
                continue
            if self.starts[k] > pos:
                out.append((pos, min(end, self.starts[k])))
            pos = max(pos, self.ends[k])
            k += 1
        if pos < end:
            out.append((pos, end))
        return out

    def add(self, start: int, end: int) -> None:
        lo = bisect.bisect_left(self.ends, start)  # first interval ending at/after start
        hi = bisect.bisect_right(self.starts, end)  # past the last starting at/before end
        if lo < hi:
            start = min(start, self.starts[lo])
            end = max(end, self.ends[hi - 1])
        self.starts[lo:hi] = [start]
        self.ends[lo:hi] = [end]
        if len(self.starts) > self.MAX_INTERVALS:
            self.starts.clear()
            self.ends.clear()


class ReadAhead:
    """Per layer: where the last read ended, how far read-ahead has been started, whether
    the reader is streaming through the layer."""

    def __init__(self, layers: LayerSet) -> None:
        self.layers = layers
        self._last_end: dict[int, int] = {}
        self._until: dict[int, int] = {}
        self._file_end: dict[int, int | None] = {}
        self._streaming: set[int] = set()
        self._run: dict[int, int] = {}  # bytes read in sequence (halved at each jump)
        self._covered: dict[int, Covered] = {}

    def note(self, i: int, offset: int, length: int, file_end: int | None) -> None:
        """A read of [offset, offset+length) of layer i, in a file ending at `file_end`
        (None: no file, e.g. `prefetch` callers); starts a window when one is due."""
        last = self._last_end.get(i)
        last_file_end = self._file_end.get(i)
        end = offset + length
        self._last_end[i] = end
        self._file_end[i] = file_end
        if last is None or not 0 <= offset - last <= STREAM_GAP:
            self._streaming.discard(i)  # a jump: random access until it goes on again
            self._until.pop(i, None)
            self._run[i] = self._run.get(i, 0) // 2
            return
        run = self._run[i] = self._run.get(i, 0) + length
        if offset != last or (last_file_end is not None and last >= last_file_end):
            self._streaming.add(i)  # moved on to the next file stored in the layer
        if i in self._streaming:
            limit, window = None, min(READ_AHEAD, max(FIRST_WINDOW, 2 * run))
        else:  # within one file: to its end
            limit, window = file_end, READ_AHEAD
        target = end + window if limit is None else min(end + window, limit)
        start = max(self._until.get(i, 0), end)
        if target <= start or (target - start < window // 2 and target != limit):
            return
        self._until[i] = target
        # A reader that jumps back and forth (`tar` where directory order is not stored
        # order) starts windows over ground an earlier window covered: only the rest goes.
        covered = self._covered.setdefault(i, Covered())
        for a, b in covered.missing(start, target):
            self._start(i, a, b - a)
        covered.add(start, target)

    def _start(self, i: int, offset: int, length: int) -> None:
        nursery = self.layers.nursery
        if nursery is None:
            return

        async def prefetch() -> None:
            telemetry.current.set(None)  # read-ahead is nobody's read in a trace
            wire.set_cause("read-ahead")
            with contextlib.suppress(ImageFSError):  # the read that needs it will report
                await self.layers.prefetch(i, offset, length)

        nursery.start_soon(prefetch)


async def fetch_everything(ls: LayerSet) -> None:
    """Make the whole image local, a piece at a time, one fetch at a time, so that
    on-demand reads (which may run several fetches at once) always get ahead."""
    for i, layer in enumerate(ls.layers):
        try:
            await ls.ensure(i)
            size = ls.stream_size(i)
            for offset in range(0, size, READ_AHEAD):
                async with ls.background:
                    await ls.prefetch(i, offset, READ_AHEAD)
        except ImageFSError as exc:
            log.warning("background fetch of layer %d (%s): %s", i, layer.digest.short, exc)
    log.info("background fetch finished")


async def prefetch_ranges(ls: LayerSet, plan: Sequence[tuple[int, int, int]]) -> int:
    """Fetch (layer, stream offset, length) ranges in order, in the background.

    Through the background limiter (first come, first served, so the order of the plan
    is kept): on-demand reads always find network slots free. Returns the ranges done.
    """
    done = 0

    async def one(i: int, offset: int, length: int) -> None:
        nonlocal done
        try:
            async with ls.background:
                await ls.prefetch(i, offset, length)
            done += 1
        except ImageFSError as exc:
            log.warning("prefetch of layer %d at %d: %s", i, offset, exc)

    async with trio.open_nursery() as nursery:
        for i, offset, length in plan:
            if 0 <= i < len(ls.layers):
                nursery.start_soon(one, i, offset, length)
                await trio.lowlevel.checkpoint()  # tasks queue on the limiter in order
    return done


async def prefetch_landmarks(ls: LayerSet) -> None:
    """eStargz: fetch the chunks stored before `.prefetch.landmark`, as the image's
    builder asked. Costs the TOC of each eStargz layer up front."""
    for i, layer in enumerate(ls.layers):
        if ESTARGZ_TOC_DIGEST not in layer.descriptor.annotations or ls.is_local(i):
            continue
        try:
            async with ls.background:
                idx = await ls.ensure(i)
            table = idx.chunks
            if table is None or not table.prefetch_until:
                continue
            jobs = [
                ls.chunk_job(table, k)
                for k in range(len(table))
                if table.starts[k] < table.prefetch_until and not table.zeros[k]
            ]
            # One fetch window per task, each under the background limiter: a single make of
            # every landmark chunk would start all its windows at once and take every network
            # slot from on-demand reads. Tasks queue on the limiter in order.
            async with trio.open_nursery() as nursery:
                for batch in _windows(jobs, MAX_FETCH):
                    nursery.start_soon(_make_in_background, ls, i, batch)
                    await trio.lowlevel.checkpoint()
            log.info("layer %d: prefetched %d chunks before the landmark", i, len(jobs))
        except ImageFSError as exc:
            log.warning("landmark prefetch of layer %d: %s", i, exc)


def _windows(jobs: Sequence[Job], size: int) -> list[list[Job]]:
    """Consecutive runs of `jobs` (in blob order) spanning at most `size` compressed bytes
    each (a single larger job is a window of its own)."""
    out: list[list[Job]] = []
    for job in jobs:
        if out and job.end - out[-1][0].start <= size:
            out[-1].append(job)
        else:
            out.append([job])
    return out


async def _make_in_background(ls: LayerSet, i: int, jobs: list[Job]) -> None:
    async with ls.background:
        await ls.maker.make(i, jobs, payloads=False)
