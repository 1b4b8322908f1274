"""Serving one mount in the foreground: wire store, registry, overlay and pyfuse3 together.

`serve()` runs until the filesystem is unmounted (by `imagefs umount`, a plain
`fusermount3 -u`, or SIGTERM/SIGINT, which unmount it) and cleans up after itself: the mount
record and the lease on the image's blobs go away with the process.

Nothing but an unmount or a signal ends the daemon: every task in its nursery (read-ahead,
prefetch, landmarks, background fetch, the control socket) runs under `guarded`, which logs a
failure — one line, plus the traceback for an exception of an unexpected type — instead of
letting it cancel the nursery and with it the mount; the FUSE operations translate their own
errors to errno (fs/operations.py). A failed mount says why: what libfuse and fusermount3
printed (`/dev/fuse: Permission denied`, `allow_other only allowed if ...`) and the log path.
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pyfuse3
import trio

from imagefs.errors import ImageFSError, first_error
from imagefs.fs.lifecycle import MountOptions, MountRegistration, control_socket, report_ready
from imagefs.fs.operations import ImageOperations
from imagefs.lazy.cache import DEFAULT_CACHE_SIZE
from imagefs.lazy.telemetry import Telemetry, serve_control
from imagefs.lazy.wiring import lazy_layer_set
from imagefs.oci.image import Layer
from imagefs.overlay import Overlay
from imagefs.session import Session
from imagefs.store import MountRecord
from imagefs.store.lookup import find_record, load_resolved
from imagefs.store.refs import now_rfc3339

if TYPE_CHECKING:
    from imagefs.profiles import Profile

log = logging.getLogger("imagefs.fs")


async def serve(
    session: Session,
    query: str,
    mountpoint: Path,
    options: MountOptions,
    ready_fd: int | None = None,
    *,
    cache_size: int = DEFAULT_CACHE_SIZE,
    background_fetch: bool = False,
    trace: Path | None = None,
    prefetch: Profile | None = None,
    landmarks: bool = True,
    log_path: Path | None = None,
    trust_published_index: bool = False,
) -> None:
    store = session.store
    record = await session.disk(find_record, store, query)
    image = await session.disk(load_resolved, store, record.manifest.digest, record.index_digest)
    layers = image.layers
    # The trace's clock starts at the session's first request (the image's metadata pull,
    # when it was not local), so every byte the mount cost is in the trace and in stats.
    now = time.monotonic_ns()
    started = min(session.wire.earliest_ns() or now, now)
    tele = Telemetry([layer.size for layer in layers], trace_path=trace, started_ns=started)
    session.wire.listen(tele.fetch)
    layer_set = lazy_layer_set(
        session,
        record,
        layers,
        cache_size=cache_size,
        trust_published_index=trust_published_index,
    )
    cache = layer_set.cache
    assert cache is not None
    # Directory link counts would need every layer of a directory's listing before its
    # first stat; like btrfs, report 1 ("unknown", which find(1) understands) and stay lazy.
    overlay = Overlay(len(layers), exact_dir_nlink=False)
    total = sum(layer.size for layer in layers)
    ops = ImageOperations(overlay, layer_set, total_size=total)
    ops.telemetry = tele
    name = str(record.name or record.repo_digest or record.manifest.digest)
    with store.lease() as lease:
        lease.add(record.manifest.digest, image.id, *(layer.digest for layer in layers))
        fuse_init(ops, mountpoint, options, log_path)
        registration = MountRegistration(
            store,
            MountRecord(
                str(mountpoint), os.getpid(), name, str(record.manifest.digest), now_rfc3339()
            ),
        )
        log.info("mounted %s (%s) at %s", name, record.manifest.digest, mountpoint)
        # main() returns when the kernel ends the session (fusermount3 -u) — then there is
        # nothing left to unmount — or when a signal made us call terminate().
        signalled: list[int] = []
        try:
            async with trio.open_nursery() as nursery:
                background = GuardedNursery(nursery)
                nursery.start_soon(_watch_signals, signalled)

                def snapshot() -> dict[str, object]:
                    return _stats_snapshot(
                        lambda: {
                            "image": name,
                            "manifest_digest": str(record.manifest.digest),
                            "mountpoint": str(mountpoint),
                            "registry_requests": sum(
                                c.requests_sent for c in session._clients.values()
                            ),
                            "fetches_in_flight": session.wire.in_flight,
                            "cache": {
                                "hits": cache.hits,
                                "misses": cache.misses,
                                "corrupt": cache.corrupt,
                                "held_reads": cache.held_reads,
                            },
                            "layer_sources": [st.source for st in layer_set.stats],
                        },
                        tele,
                    )

                sock = control_socket(store, mountpoint)
                background.start_soon(serve_control, sock, snapshot, name="control socket")
                # LayerSet starts read-aheads here; typed as a Nursery, it only calls start_soon.
                layer_set.nursery = cast(trio.Nursery, background)
                ops.tree.load_top_soon()
                if prefetch is not None:
                    plan = profile_plan(prefetch, record.manifest.digest, layers)
                    background.start_soon(layer_set.prefetch_ranges, plan, name="prefetch")
                if landmarks:
                    background.start_soon(layer_set.prefetch_landmarks, name="landmark prefetch")
                if background_fetch:
                    background.start_soon(layer_set.fetch_everything, name="background fetch")
                settle_garbage_collector()
                report_ready(ready_fd)
                await pyfuse3.main()
                nursery.cancel_scope.cancel()
        finally:
            tele.close()
            layer_set.close()
            registration.close()
            try:
                pyfuse3.close(unmount=bool(signalled))
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    log.warning("closing the FUSE session: %s", exc)
            log.info("unmounted %s", mountpoint)


# The collector's first threshold: allocations of tracked objects between two young
# collections (CPython's default is 700).
GC_YOUNG_THRESHOLD = 10_000


def settle_garbage_collector() -> None:
    """Freeze what start-up made and let the young generation grow before it is collected.

    A mount's requests build tracked objects by the ten thousand (a `find -ls` of the bench
    image makes ~50k inodes and their listings) and free few cycles. With CPython's defaults
    the collector ran ~270 young and 2-3 full collections in such a `find`, the full ones
    scanning every object start-up made too (imports: modules, functions, classes): 55-90 ms
    of a 350-680 ms in-process replay of its requests. Frozen start-up objects and a young
    threshold of 10,000: ~17 ms (docs/bench.md). Cycles are still collected, only in fewer,
    larger batches; the full collection's own rule (a quarter more long-lived objects since
    the last one) is unchanged. No collection before the freeze: it would cost the mount's
    start ~20 ms, and what start-up left as garbage is little and stays so."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def fuse_init(
    ops: ImageOperations, mountpoint: Path, options: MountOptions, log_path: Path | None
) -> None:
    """pyfuse3.init, with the reason for a failure in the error, not only in the log.

    libfuse and fusermount3 print why a mount failed on fd 2 and pyfuse3 raises a bare
    "fuse_session_mount failed"; so fd 2 goes to a temp file for the call, and what it
    caught goes to the log and into the one-line error."""
    saved = os.dup(2)
    failure: str | None = None
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            pyfuse3.init(ops, str(mountpoint), options.fuse_options())
        except RuntimeError as exc:
            failure = str(exc)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        said = captured.read(16384).decode(errors="replace")
    reasons = [line.strip() for line in said.splitlines() if line.strip()]
    for line in reasons:
        log.info("libfuse: %s", line)
    if failure is None:
        return
    where = f" (log: {log_path})" if log_path is not None else ""
    raise ImageFSError(f"cannot mount on {mountpoint}: {'; '.join(reasons) or failure}{where}")


class GuardedNursery:
    """The daemon's nursery as background tasks see it: `start_soon` runs each task under
    `guarded`, so a task's failure is logged and never cancels the mount."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    @property
    def cancel_scope(self) -> trio.CancelScope:
        return self._nursery.cancel_scope

    def start_soon(
        self, fn: Callable[..., Awaitable[object]], *args: object, name: object = None
    ) -> None:
        what = str(name or getattr(fn, "__qualname__", fn))
        self._nursery.start_soon(guarded, what, fn, *args, name=what)


async def guarded(what: str, fn: Callable[..., Awaitable[object]], *args: object) -> None:
    """Run one background task; its failure costs that task, never the daemon."""
    try:
        await fn(*args)
    except Exception as exc:  # cancellation (a BaseException) still goes through
        leaf = first_error(exc)
        if isinstance(leaf, ImageFSError):
            log.warning("%s: %s", what, leaf)
        else:
            log.error("%s failed: %s: %s", what, type(leaf).__name__, leaf, exc_info=exc)


def _stats_snapshot(extra: Callable[[], dict[str, object]], tele: Telemetry) -> dict[str, object]:
    """A stats answer that cannot take the control socket down: an error is an answer."""
    try:
        snap = tele.snapshot(extra())
        json.dumps(snap)
        return snap
    except Exception as exc:
        log.exception("stats snapshot")
        return {"error": f"{type(exc).__name__}: {exc}"}


async def _watch_signals(signalled: list[int]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            signalled.append(signum)
            pyfuse3.terminate()
            return


def profile_plan(
    profile: Profile, manifest_digest: object, layers: list[Layer]
) -> list[tuple[int, int, int]]:
    """The profile's ranges as (layer, offset, length), if it was made for this image."""
    if profile.image != str(manifest_digest) or list(profile.layers) != [
        str(layer.digest) for layer in layers
    ]:
        log.warning("prefetch profile is for %s, not this image; ignored", profile.image)
        return []
    return [(f.layer, start, n) for f in profile.files for start, n in f.ranges]
