"""Serving one mount in the foreground: wire store, registry, overlay and pyfuse3 together.

`serve()` runs until the filesystem is unmounted (by `imagefs umount`, a plain
`fusermount3 -u`, or SIGTERM/SIGINT, which unmount it) and cleans up after itself: the mount
record and the lease on the image's blobs go away with the process.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from pathlib import Path

import pyfuse3
import trio

from imagefs import api
from imagefs.errors import ImageFSError
from imagefs.fs.lifecycle import MountOptions, MountRegistration, control_socket, report_ready
from imagefs.fs.operations import ImageOperations
from imagefs.image import Layer, load_resolved
from imagefs.lazy.cache import DEFAULT_CACHE_SIZE
from imagefs.lazy.telemetry import Telemetry, serve_control
from imagefs.lazy.wiring import lazy_layer_set
from imagefs.overlay import Overlay
from imagefs.profiles import Profile
from imagefs.store import MountRecord

log = logging.getLogger("imagefs.fs")


async def serve(
    session: api.Session,
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
) -> None:
    store = session.store
    record = await session.disk(api.find_record, store, query)
    image = await session.disk(load_resolved, store, record.manifest.digest, record.index_digest)
    layers = image.layers
    tele = Telemetry([layer.size for layer in layers], trace_path=trace)
    layer_set = lazy_layer_set(
        session,
        record,
        layers,
        cache_size=cache_size,
        on_fetch=lambda i, _start, n, seconds: tele.fetch(i, n, seconds),
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
        try:
            pyfuse3.init(ops, str(mountpoint), options.fuse_options())
        except RuntimeError as exc:
            raise ImageFSError(f"cannot mount on {mountpoint}: {exc}") from None
        registration = MountRegistration(
            store,
            MountRecord(
                str(mountpoint), os.getpid(), name, str(record.manifest.digest), api.now_rfc3339()
            ),
        )
        log.info("mounted %s (%s) at %s", name, record.manifest.digest, mountpoint)
        # main() returns when the kernel ends the session (fusermount3 -u) — then there is
        # nothing left to unmount — or when a signal made us call terminate().
        signalled: list[int] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_signals, signalled)

                def snapshot() -> dict[str, object]:
                    return tele.snapshot(
                        {
                            "image": name,
                            "manifest_digest": str(record.manifest.digest),
                            "mountpoint": str(mountpoint),
                            "registry_requests": sum(
                                c.requests_sent for c in session._clients.values()
                            ),
                            "cache": {
                                "hits": cache.hits,
                                "misses": cache.misses,
                                "corrupt": cache.corrupt,
                            },
                            "layer_sources": [st.source for st in layer_set.stats],
                        }
                    )

                nursery.start_soon(serve_control, control_socket(store, mountpoint), snapshot)
                layer_set.nursery = nursery
                if prefetch is not None:
                    plan = profile_plan(prefetch, record.manifest.digest, layers)
                    nursery.start_soon(layer_set.prefetch_ranges, plan)
                if landmarks:
                    nursery.start_soon(layer_set.prefetch_landmarks)
                if background_fetch:
                    nursery.start_soon(layer_set.fetch_everything)
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
