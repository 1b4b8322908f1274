"""Early loads of the layers below (`LayerSet.ensure_if_cheap`) use only what this machine
keeps: an early load never fetches, so bytes still come from the registry only when a
request needs them (a path the upper layers decide costs nothing below)."""

from __future__ import annotations

from pathlib import Path

from imagefs.lazy.layers import LayerSet
from imagefs.oci.image import Layer
from imagefs.store import Store
from tests.unit.test_pieces import _estargz_layer, no_whole_blob


async def test_an_early_load_fetches_nothing_and_a_kept_toc_loads(tmp_path: Path) -> None:
    layer, blob = _estargz_layer()
    fetched: list[tuple[int, int]] = []

    async def fetch_range(_: Layer, start: int, end: int) -> bytes:
        fetched.append((start, end))
        return blob[start:end]

    first = LayerSet(Store(tmp_path), [layer], no_whole_blob, fetch_range=fetch_range)
    try:
        await first.ensure_if_cheap(0)  # nothing kept yet: nothing loaded, nothing fetched
        assert fetched == [] and not first.loaded(0)
        await first.ensure(0)  # a request needs it: the TOC is fetched (and kept)
        assert fetched and first.loaded(0)
    finally:
        first.close()
    fetched.clear()
    again = LayerSet(Store(tmp_path), [layer], no_whole_blob, fetch_range=fetch_range)
    try:
        await again.ensure_if_cheap(0)  # a remount: the kept TOC, from disk
        assert again.loaded(0) and fetched == []
    finally:
        again.close()
