"""The FUSE adapter without FUSE: requests go straight to ImageOperations over fake layers."""

from __future__ import annotations

import errno
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pyfuse3
import pytest
import trio
import trio.testing

from imagefs.errors import LayerFormatError
from imagefs.fs.operations import ImageOperations
from imagefs.layers.toc import EntryType, Toc, TocBuilder
from imagefs.lazy import telemetry
from imagefs.lazy.layers import LayerSet
from imagefs.overlay import ROOT_INODE, Attrs, Overlay


@dataclass
class _Digest:
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass
class _Layer:
    digest: _Digest


@dataclass
class _Index:
    toc: Toc


class FakeLayers:
    """What ImageOperations uses of a LayerSet: `layers`, `ensure`; None is a broken layer."""

    def __init__(self, tocs: list[Toc | None]) -> None:
        self.tocs = tocs
        self.layers = [_Layer(_Digest(f"sha256:{i:064x}")) for i in range(len(tocs))]
        self.ensured: list[int] = []
        self.nursery: Any = None  # where ImageOperations starts background loads

    async def ensure(self, i: int) -> _Index:
        self.ensured.append(i)
        toc = self.tocs[i]
        if toc is None:
            raise LayerFormatError("layer tar: header checksum mismatch at offset 512")
        return _Index(toc)

    def index(self, i: int) -> _Index:
        toc = self.tocs[i]
        assert toc is not None
        return _Index(toc)

    def loaded(self, i: int) -> bool:
        return True

    def read_warm(self, i: int, offset: int, length: int, **_: Any) -> bytes | None:
        return None  # nothing is warm here: every read goes through `read`

    async def read(self, i: int, offset: int, length: int, **_: Any) -> bytes:
        """Layer i's stream is the byte `offset % 251` at every offset."""
        return bytes(b % 251 for b in range(offset, offset + length))


def _toc(*entries: tuple[bytes, EntryType, dict[str, Any]]) -> Toc:
    b = TocBuilder()
    for path, etype, kw in entries:
        b.add(path, etype, **kw)
    return b.build()


def _ops(tocs: list[Toc | None]) -> tuple[ImageOperations, FakeLayers]:
    layers = FakeLayers(tocs)
    overlay = Overlay(len(tocs), exact_dir_nlink=False)
    return ImageOperations(overlay, cast(LayerSet, layers)), layers


async def test_hard_link_to_a_missing_lower_target_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lower = _toc((b"keep", EntryType.DIR, {}), (b"keep/a", EntryType.REG, {"size": 1}))
    upper = _toc(
        (b"", EntryType.DIR, {}),
        (b"ok", EntryType.HARDLINK, {"linkname": b"keep/a"}),
        (b"broken", EntryType.HARDLINK, {"linkname": b"no/such"}),
        (b"to-dir", EntryType.HARDLINK, {"linkname": b"keep"}),
    )
    ops, _ = _ops([lower, upper])
    with caplog.at_level(logging.WARNING, logger="imagefs.fs"):
        missing = await ops.lookup(ROOT_INODE, b"broken")
        assert missing.st_ino == 0  # skipped: a negative entry, not an error
        again = await ops.lookup(ROOT_INODE, b"broken")
        assert again.st_ino == 0
        assert (await ops.lookup(ROOT_INODE, b"ok")).st_ino != 0
        assert (await ops.lookup(ROOT_INODE, b"to-dir")).st_ino == 0
    lines = [r.getMessage() for r in caplog.records]
    assert len([m for m in lines if "'broken'" in m]) == 1, lines
    assert any("layer 1" in m and "'broken'" in m and "missing" in m for m in lines), lines
    assert any("'to-dir'" in m and "a directory" in m for m in lines), lines
    assert not ops.overlay.warnings  # drained into the log


async def test_a_broken_layer_costs_eio_and_names_its_digest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    upper = _toc(
        (b"", EntryType.DIR, {}),
        (b"top", EntryType.DIR, {}),
        (b"top/f", EntryType.REG, {"size": 3}),
    )
    ops, layers = _ops([None, upper])
    with caplog.at_level(logging.ERROR, logger="imagefs.fs"):
        with pytest.raises(pyfuse3.FUSEError) as info:
            await ops.opendir(ROOT_INODE, cast(pyfuse3.RequestContext, None))
        assert info.value.errno == errno.EIO
        top = await ops.lookup(ROOT_INODE, b"top")
        assert (await ops.lookup(top.st_ino, b"f")).st_ino != 0
    assert any(
        f"layer 0 ({layers.layers[0].digest})" in r.getMessage()
        and "checksum mismatch" in r.getMessage()
        for r in caplog.records
    )


async def test_readdir_lists_dot_and_dotdot_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """`.` is the directory, `..` its parent (the root's is the root), then the entries;
    readdirplus takes no lookup reference for the two (the kernel keeps none)."""
    toc = _toc(
        (b"", EntryType.DIR, {}),
        (b"a", EntryType.DIR, {}),
        (b"a/b", EntryType.DIR, {}),
        (b"a/b/f", EntryType.REG, {"size": 1}),
    )
    ops, _ = _ops([toc])
    replies: list[tuple[bytes, int, int]] = []

    def reply(_token: object, name: bytes, attrs: pyfuse3.EntryAttributes, next_id: int) -> bool:
        replies.append((name, attrs.st_ino, next_id))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    ctx = cast(pyfuse3.RequestContext, None)
    token = cast(pyfuse3.ReaddirToken, None)

    async def listing(ino: int) -> list[tuple[bytes, int, int]]:
        replies.clear()
        await ops.readdir(await ops.opendir(ino, ctx), 0, token)
        return list(replies)

    root = await listing(ROOT_INODE)
    a_ino = next(ino for name, ino, _ in root if name == b"a")
    assert root == [(b".", ROOT_INODE, 1), (b"..", ROOT_INODE, 2), (b"a", a_ino, 3)]
    b_ino = (await ops.lookup(a_ino, b"b")).st_ino
    assert [r[:2] for r in await listing(b_ino)][:2] == [(b".", b_ino), (b"..", a_ino)]
    assert [r[:2] for r in await listing(a_ino)][:2] == [(b".", a_ino), (b"..", ROOT_INODE)]
    # Resuming after `..` (offset 2) gives the entries only.
    replies.clear()
    await ops.readdir(await ops.opendir(a_ino, ctx), 2, token)
    assert [r[0] for r in replies] == [b"b"]


class _Counting(Overlay):
    """The overlay, counting the calls the adapter makes of it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: Counter[str] = Counter()

    def locate(self, ino: int) -> tuple[int, int]:
        self.calls["locate"] += 1
        return super().locate(ino)

    def getattr(self, ino: int) -> Attrs:
        self.calls["getattr"] += 1
        return super().getattr(ino)

    def path(self, ino: int) -> bytes:
        self.calls["path"] += 1
        return super().path(ino)


def _counting_ops(tocs: list[Toc | None]) -> tuple[ImageOperations, _Counting]:
    overlay = _Counting(len(tocs), exact_dir_nlink=False)
    ops = ImageOperations(overlay, cast(LayerSet, FakeLayers(tocs)))
    ops.telemetry = telemetry.Telemetry([1 << 20] * len(tocs))  # as the daemon sets it up
    return ops, overlay


_CTX = cast(pyfuse3.RequestContext, None)
_TREE = _toc(
    (b"", EntryType.DIR, {}),
    (b"d", EntryType.DIR, {}),
    (b"d/f", EntryType.REG, {"size": 300_000, "offset": 4096}),
    (b"link", EntryType.SYMLINK, {"linkname": b"d/f"}),
)


async def test_reads_of_an_open_file_ask_the_overlay_nothing() -> None:
    """open finds where the file's bytes are once; each read then goes straight to the
    layer set (the old adapter located the file again on every read)."""
    ops, overlay = _counting_ops([_TREE])
    d = await ops.lookup(ROOT_INODE, b"d", _CTX)
    f = await ops.lookup(d.st_ino, b"f", _CTX)
    overlay.calls.clear()
    info = await ops.open(f.st_ino, os.O_RDONLY, _CTX)
    opened = overlay.calls.copy()
    data = b""
    while chunk := await ops.read(info.fh, len(data), 128 * 1024):
        data += chunk
    assert data == bytes(b % 251 for b in range(4096, 4096 + 300_000))
    assert overlay.calls == opened  # 4 reads, not one overlay call among them
    assert opened["getattr"] == 0  # open needs no attributes either
    await ops.release(info.fh)
    with pytest.raises(pyfuse3.FUSEError) as gone:
        await ops.read(info.fh, 0, 1)
    assert gone.value.errno == errno.EBADF


async def test_without_a_trace_requests_look_up_no_paths() -> None:
    """Telemetry only counts operations when no trace is written: no path is built for it."""
    ops, overlay = _counting_ops([_TREE])
    d = await ops.lookup(ROOT_INODE, b"d", _CTX)
    f = await ops.lookup(d.st_ino, b"f", _CTX)
    info = await ops.open(f.st_ino, os.O_RDONLY, _CTX)
    await ops.read(info.fh, 0, 10)
    await ops.readlink((await ops.lookup(ROOT_INODE, b"link", _CTX)).st_ino, _CTX)
    assert overlay.calls["path"] == 0
    assert ops.telemetry is not None
    assert ops.telemetry.ops == {"lookup": 3, "open": 1, "read": 1, "readlink": 1}
    assert ops.telemetry.bytes_served == 10


async def test_with_a_trace_requests_are_recorded_with_their_paths(tmp_path: Path) -> None:
    ops, _ = _counting_ops([_TREE])
    ops.telemetry = telemetry.Telemetry([1 << 20], trace_path=tmp_path / "trace.jsonl")
    d = await ops.lookup(ROOT_INODE, b"d", _CTX)
    info = await ops.open((await ops.lookup(d.st_ino, b"f", _CTX)).st_ino, os.O_RDONLY, _CTX)
    await ops.read(info.fh, 5, 10)
    ops.telemetry.close()
    records = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert [(r["op"], r["path"]) for r in records] == [
        ("lookup", "d"),
        ("lookup", "d/f"),
        ("open", "d/f"),
        ("read", "d/f"),
    ]
    assert records[-1]["offset"] == 5 and records[-1]["stream_offset"] == 4096 + 5


async def test_open_refuses_what_is_not_a_regular_file() -> None:
    ops, _ = _counting_ops([_TREE])
    d = await ops.lookup(ROOT_INODE, b"d", _CTX)
    link = await ops.lookup(ROOT_INODE, b"link", _CTX)
    for ino, code in ((d.st_ino, errno.EISDIR), (link.st_ino, errno.EINVAL)):
        with pytest.raises(pyfuse3.FUSEError) as info:
            await ops.open(ino, os.O_RDONLY, _CTX)
        assert info.value.errno == code
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.open(d.st_ino, os.O_RDWR, _CTX)
    assert info.value.errno == errno.EROFS


class _SlowLayers(FakeLayers):
    """Each index load takes a while (trio time), counted: how many run at once."""

    def __init__(self, tocs: list[Toc | None]) -> None:
        super().__init__(tocs)
        self.ready: set[int] = set()
        self.running = self.peak = 0
        self.ahead: list[tuple[int, str]] = []
        self.kept = True  # whether every index is kept here (else: only from metadata)

    async def ensure(self, i: int) -> _Index:
        if i not in self.ready:
            self.running += 1
            self.peak = max(self.peak, self.running)
            await trio.sleep(1)
            self.running -= 1
            self.ready.add(i)
        return await super().ensure(i)

    async def ensure_ahead(self, i: int, ahead: str) -> None:
        self.ahead.append((i, ahead))
        if ahead == "metadata" or self.kept:  # kept: as in the index store
            await self.ensure(i)

    def loaded(self, i: int) -> bool:
        return i in self.ready


async def test_the_first_request_loads_the_layers_below_concurrently(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Listing `etc` needs all four layers, top first; they load side by side (one
    load's time in all), not one after another."""
    tocs: list[Toc | None] = [
        _toc((b"etc", EntryType.DIR, {}), (f"etc/f{i}".encode(), EntryType.REG, {}))
        for i in range(4)
    ]
    layers = _SlowLayers(tocs)
    ops = ImageOperations(Overlay(4, exact_dir_nlink=False), cast(LayerSet, layers))
    async with trio.open_nursery() as nursery:
        layers.nursery = nursery
        entry = await ops.lookup(ROOT_INODE, b"etc")
        fh = await ops.opendir(entry.st_ino, cast(pyfuse3.RequestContext, None))
    assert [name for name, _ in ops._dirs[fh][1]] == [b"f0", b"f1", b"f2", b"f3"]
    assert layers.peak >= 3, layers.peak  # the three lower layers at once
    assert layers.ready == {0, 1, 2, 3}


async def test_early_loads_fetch_metadata_only_once_a_request_went_below_its_first_layer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A path the top layer decides (`top.txt`) starts only loads of kept indexes below it;
    once a request needs a lower layer (a lookup of `etc` merges down the stack), the layers
    below that one may fetch their metadata (TOC, published index)."""
    tocs: list[Toc | None] = [
        _toc((b"etc", EntryType.DIR, {}), (f"etc/f{i}".encode(), EntryType.REG, {}))
        for i in range(3)
    ]
    tocs.append(_toc((b"top.txt", EntryType.REG, {})))
    layers = _SlowLayers(tocs)
    layers.kept = False  # a cold store: nothing kept here
    ops = ImageOperations(Overlay(4, exact_dir_nlink=False), cast(LayerSet, layers))
    async with trio.open_nursery() as nursery:
        layers.nursery = nursery
        await ops.lookup(ROOT_INODE, b"top.txt")
        await trio.sleep(5)  # let the early loads run: they find nothing kept
        assert sorted(layers.ahead) == [(0, "kept"), (1, "kept"), (2, "kept")]
        assert layers.ready == {3}
        layers.ahead.clear()
        await ops.lookup(ROOT_INODE, b"etc")  # needs layer 2: the walk goes down
    assert sorted(layers.ahead) == [(0, "metadata"), (1, "metadata")]
    assert layers.ready == {0, 1, 2, 3}


async def test_the_top_layer_alone_loads_from_its_metadata_as_the_mount_comes_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """`load_top_soon` (the daemon calls it before reporting ready) starts an early load of
    the top layer from its metadata, and of no other layer; the first request then finds it
    loaded (`LayerSet.ensure` waits for a load in flight: single flight)."""
    tocs: list[Toc | None] = [_toc((b"low.txt", EntryType.REG, {}))]
    tocs.append(_toc((b"top.txt", EntryType.REG, {})))
    layers = _SlowLayers(tocs)
    layers.kept = False
    ops = ImageOperations(Overlay(2, exact_dir_nlink=False), cast(LayerSet, layers))
    async with trio.open_nursery() as nursery:
        layers.nursery = nursery
        ops.tree.load_top_soon()
        await trio.sleep(0.5)
        assert layers.ahead == [(1, "metadata")] and layers.running == 1
        await trio.sleep(1)
        assert layers.ready == {1}
        entry = await ops.lookup(ROOT_INODE, b"top.txt")
    assert entry.st_ino != 0
    assert layers.ready == {1}  # the path the top layer decides needed nothing below
    assert (0, "metadata") not in layers.ahead
