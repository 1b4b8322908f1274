"""Early loads of the layers below (`LayerSet.ensure_ahead`) go as far as they are let: "kept",
only an index or TOC this machine keeps (nothing fetched); "metadata", also the TOC its
manifest names or its published index, fetched. Neither ever fetches layer data: a layer
with no TOC and no published index is left for the request that needs it."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import trio

from imagefs.lazy.layers import LayerSet
from imagefs.oci.image import Layer
from imagefs.store import Store
from tests.unit.test_pieces import FILES, _estargz_layer, gzip_layer, no_whole_blob


async def test_an_early_load_fetches_the_toc_and_no_file_data(tmp_path: Path) -> None:
    layer, blob = _estargz_layer()
    fetched: list[tuple[int, int]] = []

    async def fetch_range(_: Layer, start: int, end: int) -> bytes:
        fetched.append((start, end))
        return blob[start:end]

    first = LayerSet(Store(tmp_path), [layer], no_whole_blob, fetch_range=fetch_range)
    try:
        await first.ensure_ahead(0, "kept")  # nothing kept yet: nothing loaded, nothing fetched
        assert fetched == [] and not first.loaded(0)
        await first.ensure_ahead(0, "metadata")  # the TOC, by ranges from the tail (kept)
        assert first.loaded(0) and fetched
        toc_start = min(start for start, _ in fetched)
        idx = await first.ensure(0)
        first_file = min(idx.toc.offset(e) for e in idx.toc.visible() if idx.toc.size(e))
        # only the tail (footer, TOC, the last chunks that come with them) was fetched
        assert toc_start > len(blob) - 64 * 1024 - 1 and toc_start > first_file
    finally:
        first.close()
    fetched.clear()
    again = LayerSet(Store(tmp_path), [layer], no_whole_blob, fetch_range=fetch_range)
    try:
        await again.ensure_ahead(0, "kept")  # a remount: the kept TOC, from disk
        assert again.loaded(0) and fetched == []
    finally:
        again.close()


async def test_an_early_load_of_a_layer_without_metadata_fetches_nothing(
    tmp_path: Path,
) -> None:
    layer, blob = gzip_layer({"f0.bin": FILES["f0.bin"]})
    wanted: list[str] = []

    async def fetch_blob(_: Layer) -> None:
        wanted.append("blob")
        raise AssertionError("an early load never fetches a whole blob")

    async def fetch_range(_: Layer, start: int, end: int) -> bytes:
        wanted.append(f"range {start}-{end}")
        return blob[start:end]

    ls = LayerSet(Store(tmp_path), [layer], fetch_blob, fetch_range=fetch_range)
    try:
        await ls.ensure_ahead(0, "metadata")  # no TOC, no published index: left for a request
        assert not ls.loaded(0) and wanted == []
    finally:
        ls.close()


async def test_a_metadata_load_is_not_dropped_for_a_kept_load_in_flight(tmp_path: Path) -> None:
    """A request that goes down the stack starts "kept" loads below the first layer it
    needs, then "metadata" loads once it needs a lower one; a "metadata" load started while
    the layer's "kept" load (which finds nothing in a cold store) is in flight still loads
    the layer, after it."""
    layer, blob = _estargz_layer()

    async def fetch_range(_: Layer, start: int, end: int) -> bytes:
        return blob[start:end]

    ls = LayerSet(Store(tmp_path), [layer], no_whole_blob, fetch_range=fetch_range)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ls.ensure_ahead, 0, "kept")
            nursery.start_soon(ls.ensure_ahead, 0, "metadata")
        assert ls.loaded(0)
    finally:
        ls.close()


async def test_a_mount_does_not_wait_for_a_fetched_toc_to_be_written(tmp_path: Path) -> None:
    """With a nursery (a mount), the index a fetched TOC makes is used at once and written
    to the store in the background (`LayerSet.keep`); it is there once the write ends."""
    layer, blob = _estargz_layer()

    async def fetch_range(_: Layer, start: int, end: int) -> bytes:
        return blob[start:end]

    ls = LayerSet(Store(tmp_path), [layer], no_whole_blob, fetch_range=fetch_range)
    save, release, saved = ls.indexes.save_bound, threading.Event(), []

    def slow_save(*args: Any) -> None:
        release.wait(10)
        save(*args)
        saved.append(args[0])

    ls.indexes.save_bound = slow_save  # type: ignore[method-assign, assignment]
    try:
        async with trio.open_nursery() as nursery:
            ls.nursery = nursery
            idx = await ls.ensure(0)
            assert len(idx.toc) and saved == []  # loaded, still being written
            release.set()
        assert len(saved) == 1
        again = LayerSet(Store(tmp_path), [layer], no_whole_blob)  # no fetch: kept only
        try:
            await again.ensure_ahead(0, "kept")
            assert again.loaded(0)
        finally:
            again.close()
    finally:
        ls.close()
