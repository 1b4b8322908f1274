"""One lazy tree for the mount and for `ls`/`cat`: both load a layer once per blob and give
its TOC to every slot of the stack that holds that blob; a broken layer is the mount's EIO and
the browse's ImageFSError, and the next request tries it again."""

from __future__ import annotations

import contextlib
import errno
import logging
from dataclasses import dataclass
from typing import cast

import pyfuse3
import pytest

from imagefs.browse import Browser
from imagefs.errors import LayerFormatError
from imagefs.fs.operations import ImageOperations
from imagefs.layers.toc import EntryType, Toc, TocBuilder
from imagefs.lazy.layers import LayerSet
from imagefs.lazy.tree import LazyTree
from imagefs.overlay import ROOT_INODE, Overlay


@dataclass(frozen=True)
class _Layer:
    digest: str


@dataclass(frozen=True)
class _Index:
    toc: Toc


class RepeatedLayers:
    """What the tree uses of a LayerSet (`layers`, `ensure`; no `nursery`, so no early loads
    of the layers below), for a stack whose bottom and top are the same blob (a base layer
    repeated, as `COPY` of identical content makes)."""

    nursery = None

    def __init__(self, digests: list[str], tocs: dict[str, Toc]) -> None:
        self.layers = [_Layer(d) for d in digests]
        self.tocs = tocs
        self.ensured: list[int] = []
        self.broken: set[str] = set()

    async def ensure(self, i: int) -> _Index:
        self.ensured.append(i)
        digest = self.layers[i].digest
        if digest in self.broken:
            raise LayerFormatError("layer tar: header checksum mismatch at offset 512")
        return _Index(self.tocs[digest])


def _toc(*paths: bytes) -> Toc:
    b = TocBuilder()
    b.add(b"", EntryType.DIR)
    for path in paths:
        b.add(path, EntryType.REG, size=1)
    return b.build()


def _stack() -> RepeatedLayers:
    return RepeatedLayers(["A", "B", "A"], {"A": _toc(b"a"), "B": _toc(b"b")})


def _browser(layers: RepeatedLayers) -> Browser:
    overlay = Overlay(len(layers.layers), exact_dir_nlink=False)
    return Browser("test", cast(LayerSet, layers), overlay, contextlib.ExitStack())


def _mount(layers: RepeatedLayers) -> ImageOperations:
    overlay = Overlay(len(layers.layers), exact_dir_nlink=False)
    return ImageOperations(overlay, cast(LayerSet, layers))


async def _mount_listing(ops: ImageOperations) -> list[bytes]:
    return [name for name, _ in await ops._ask(ops.overlay.readdir, ROOT_INODE)]


async def test_browse_loads_a_repeated_blob_once() -> None:
    layers = _stack()
    browser = _browser(layers)
    assert [name for name, _ in await browser.listdir(ROOT_INODE)] == [b"a", b"b"]
    assert sorted(layers.ensured) == [1, 2]  # slot 0 got layer 2's TOC: same blob
    assert all(browser.overlay.has_layer(i) for i in range(3))


async def test_mount_loads_a_repeated_blob_once() -> None:
    layers = _stack()
    ops = _mount(layers)
    assert await _mount_listing(ops) == [b"a", b"b"]
    assert sorted(layers.ensured) == [1, 2]


async def test_mount_and_browse_share_the_tree() -> None:
    assert isinstance(_browser(_stack()).tree, LazyTree)
    assert isinstance(_mount(_stack()).tree, LazyTree)


async def test_a_broken_layer_is_eio_in_the_mount_and_tried_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    layers = _stack()
    layers.broken.add("B")
    ops = _mount(layers)
    with (
        caplog.at_level(logging.ERROR, logger="imagefs.fs"),
        pytest.raises(pyfuse3.FUSEError) as info,
    ):
        await ops.lookup(ROOT_INODE, b"b")
    assert info.value.errno == errno.EIO
    assert any("layer 1 (B)" in r.getMessage() for r in caplog.records)
    layers.broken.clear()
    assert (await ops.lookup(ROOT_INODE, b"b")).st_ino != 0  # not remembered as broken


async def test_a_broken_layer_is_the_error_itself_in_a_browse() -> None:
    layers = _stack()
    layers.broken.add("B")
    browser = _browser(layers)
    with pytest.raises(LayerFormatError, match="checksum mismatch"):
        await browser.listdir(ROOT_INODE)
    layers.broken.clear()
    assert [name for name, _ in await browser.listdir(ROOT_INODE)] == [b"a", b"b"]
