"""Warm requests: what the adapter builds once and keeps, and what a warm read does not do.

Attributes and listings come from a real `Overlay` (counted); reads from a real `LayerSet`
over a gzip layer and an eStargz layer in a real store (no sockets: the eStargz blob is
served by a fake `fetch_range`)."""

from __future__ import annotations

import errno
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any, cast

import pyfuse3
import pytest
import trio

from imagefs.fs.operations import ImageOperations
from imagefs.layers.toc import EntryType, Toc, TocBuilder
from imagefs.lazy import telemetry
from imagefs.lazy.layers import LayerSet
from imagefs.oci.image import Layer
from imagefs.overlay import ROOT_INODE, Attrs, Overlay
from imagefs.store import Store
from tests.unit.test_pieces import _estargz_layer, gzip_layer

_CTX = cast(pyfuse3.RequestContext, None)
_TOKEN = cast(pyfuse3.ReaddirToken, None)


class _Counting(Overlay):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: Counter[str] = Counter()

    def getattr(self, ino: int) -> Attrs:
        self.calls["getattr"] += 1
        return super().getattr(ino)

    def _children(self, d: Any) -> list[tuple[bytes, int]]:
        if d.children is None:
            self.calls["listing built"] += 1
        return super()._children(d)


class _NoLayers:
    layers: tuple[Any, ...] = ()  # the overlay has its TOC already: nothing is loaded
    nursery = None


def _tree() -> Toc:
    b = TocBuilder()
    b.add(b"", EntryType.DIR, mode=0o755)
    b.add(b"etc", EntryType.DIR, mode=0o750, uid=3, gid=4, mtime=1_700_000_000)
    b.add(b"etc/passwd", EntryType.REG, size=5000, mode=0o644, mtime=1_600_000_000)
    b.add(b"etc/hard", EntryType.HARDLINK, linkname=b"etc/passwd")
    b.add(b"etc/tty", EntryType.CHAR, devmajor=4, devminor=1, mode=0o620)
    b.add(b"lib", EntryType.SYMLINK, linkname=b"usr/lib")
    b.add(b"usr/lib/x.so", EntryType.REG, size=10, mode=0o755)  # usr, usr/lib implicit
    return b.build()


def _fields(e: pyfuse3.EntryAttributes) -> tuple[int, ...]:
    return (
        e.st_ino,
        e.st_mode,
        e.st_nlink,
        e.st_uid,
        e.st_gid,
        e.st_rdev,
        e.st_size,
        e.st_blocks,
        e.st_mtime_ns,
        e.st_atime_ns,
        e.st_ctime_ns,
    )


def _expected(a: Attrs) -> tuple[int, ...]:
    return (
        a.ino,
        a.mode,
        a.nlink,
        a.uid,
        a.gid,
        a.rdev,
        a.size,
        a.blocks,
        a.mtime_ns,
        a.mtime_ns,
        a.mtime_ns,
    )


async def test_listings_and_attributes_are_built_once_and_are_the_overlays(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    toc = _tree()
    overlay = _Counting(1, exact_dir_nlink=False)
    ops = ImageOperations(overlay, cast(LayerSet, _NoLayers()))
    replies: list[tuple[bytes, pyfuse3.EntryAttributes]] = []

    def reply(_token: object, name: bytes, attrs: pyfuse3.EntryAttributes, next_id: int) -> bool:
        replies.append((name, attrs))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)

    async def listing(ino: int) -> list[tuple[bytes, pyfuse3.EntryAttributes]]:
        replies.clear()
        fh = await ops.opendir(ino, _CTX)
        await ops.readdir(fh, 0, _TOKEN)
        await ops.releasedir(fh)
        return list(replies)

    overlay.set_layer(0, toc)
    root = await listing(ROOT_INODE)
    etc = next(e.st_ino for name, e in root if name == b"etc")
    first = await listing(etc)
    assert [name for name, _ in first] == [b".", b"..", b"hard", b"passwd", b"tty"]
    built = overlay.calls.copy()
    assert built["listing built"] == 2

    # The answers are the overlay's own, field by field (asked here without counting).
    for name, e in [*root, *first]:
        assert _fields(e) == _expected(Overlay.getattr(overlay, e.st_ino)), name
    passwd = next(e for name, e in first if name == b"passwd")
    assert passwd.st_nlink == 2 and passwd.st_size == 5000  # the hard link shares it
    tty = next(e for name, e in first if name == b"tty")
    assert tty.st_rdev == os.makedev(4, 1)

    # Warm: listing again, stat-ing, looking up what was listed ask the overlay nothing more.
    again = await listing(etc)
    assert [(n, _fields(e)) for n, e in again] == [(n, _fields(e)) for n, e in first]
    for _, e in again:
        assert _fields(await ops.getattr(e.st_ino, _CTX)) == _fields(e)
    assert _fields(await ops.lookup(etc, b"passwd", _CTX)) == _fields(passwd)
    assert (await ops.lookup(ROOT_INODE, b"etc", _CTX)).st_ino == etc  # a second reference
    assert (await ops.lookup(etc, b"nothing", _CTX)).st_ino == 0
    assert overlay.calls == built

    # Once the kernel forgets the directory (its readdirplus and lookup references), the
    # overlay drops its listing: built again on next need, with the same inodes, whose
    # attributes the adapter still has.
    await ops.forget([(etc, 1)])
    await listing(etc)
    assert overlay.calls == built  # one reference still held
    await ops.forget([(etc, 1)])
    assert [(n, _fields(e)) for n, e in await listing(etc)] == [(n, _fields(e)) for n, e in first]
    assert overlay.calls["listing built"] == built["listing built"] + 1
    assert overlay.calls["getattr"] == built["getattr"]


# -- reads ------------------------------------------------------------------------------------

FILES = {f"f{k}.bin": random.Random(k).randbytes(150_000) for k in range(8)}


def _gzip_layer(store: Store) -> Layer:
    return gzip_layer(FILES, store)[0]


async def _mount(store: Store, layer: Layer, blob: bytes | None) -> ImageOperations:
    async def fetch_blob(_: Layer) -> None:
        raise AssertionError("the whole blob is never fetched here")

    async def fetch_range(_: Layer, start: int, end: int) -> bytes:
        assert blob is not None, "a local layer is never fetched"
        return blob[start:end]

    layers = LayerSet(store, [layer], fetch_blob, fetch_range=fetch_range)
    ops = ImageOperations(Overlay(1, exact_dir_nlink=False), layers)
    ops.telemetry = telemetry.Telemetry([layer.size])  # as the daemon sets it up
    return ops


async def _read_file(ops: ImageOperations, name: bytes) -> bytes:
    entry = await ops.lookup(ROOT_INODE, name, _CTX)
    info = await ops.open(entry.st_ino, os.O_RDONLY, _CTX)
    out = b""
    while chunk := await ops.read(info.fh, len(out), 128 * 1024):
        out += chunk
    await ops.release(info.fh)
    return out


@pytest.mark.parametrize("kind", ["gzip", "estargz"])
async def test_a_warm_read_is_preads_only(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pieces made by one mount: the next mount's reads of them go no further than
    `LayerSet.read_warm` (no coroutine of the read path, no thread hop, no inflate), and
    its reads of an already open piece complete without ever suspending."""
    store = Store(tmp_path)
    if kind == "gzip":
        layer, blob = _gzip_layer(store), None
    else:
        layer, blob = _estargz_layer(FILES, chunk_size=40_000)  # a 128 KiB read: 4-5 pieces
    cold = await _mount(store, layer, blob)
    for name in FILES:
        assert await _read_file(cold, name.encode()) == FILES[name]
    assert cold.layers.inflations > 0
    cold.layers.close()

    warm = await _mount(store, layer, blob)
    await warm.layers.ensure(0)  # the index is loaded (the first lookup would load it)
    hops = 0
    run_sync = trio.to_thread.run_sync

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal hops
        hops += 1
        return await run_sync(*args, **kwargs)

    async def refused(*args: Any, **kwargs: Any) -> bytes:
        raise AssertionError("a warm read went down the making path")

    monkeypatch.setattr(trio.to_thread, "run_sync", counted)
    monkeypatch.setattr(warm.layers, "read", refused)
    for name in ("f2.bin", "f5.bin"):
        assert await _read_file(warm, name.encode()) == FILES[name]
    assert (warm.layers.inflations, hops) == (0, 0)
    tele = warm.telemetry
    assert tele is not None and tele.reads == tele.served_from["cache"] > 0

    # A piece already open: the read coroutine finishes on its first step.
    entry = await warm.lookup(ROOT_INODE, b"f5.bin", _CTX)
    fh = (await warm.open(entry.st_ino, os.O_RDONLY, _CTX)).fh
    step = warm.read(fh, 1000, 4096)
    with pytest.raises(StopIteration) as done:
        step.send(None)
    assert done.value.value == FILES["f5.bin"][1000:5096]
    warm.layers.close()


async def test_a_warm_read_that_fails_costs_eio_not_the_mount(tmp_path: Path) -> None:
    store = Store(tmp_path)
    ops = await _mount(store, _gzip_layer(store), None)
    assert await _read_file(ops, b"f1.bin") == FILES["f1.bin"]
    entry = await ops.lookup(ROOT_INODE, b"f1.bin", _CTX)
    fh = (await ops.open(entry.st_ino, os.O_RDONLY, _CTX)).fh
    real = ops.layers.read_warm

    def broken(*args: Any, **kwargs: Any) -> bytes | None:
        raise RuntimeError("a bug in the warm path")

    ops.layers.read_warm = broken  # type: ignore[method-assign]
    with pytest.raises(pyfuse3.FUSEError) as failed:
        await ops.read(fh, 0, 100)
    assert failed.value.errno == errno.EIO
    ops.layers.read_warm = real  # type: ignore[method-assign]
    assert await ops.read(fh, 0, 100) == FILES["f1.bin"][:100]
    ops.layers.close()
