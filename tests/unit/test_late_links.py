"""Links planted after the store was opened (issue 9 follow-up, item 6): the piece cache,
a layer's local blob, the stored-blob reads of a lazy mount, index building and the TOC
check all reach their files from the store root, so a link made since is refused
(LinkInStore), never followed. Real files, real links, the real classes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import trio

from imagefs.lazy.cache import PieceCache
from imagefs.lazy.layers import LayerSet
from imagefs.lazy.wiring import _read_stored
from imagefs.oci.image import Layer
from imagefs.published import build_local
from imagefs.store import Store, fsutil
from imagefs.store.fsutil import LinkInStore
from tests.unit.test_pieces import gzip_layer

PRECIOUS = b"the victim's own bytes\n"


def test_a_piece_cache_never_writes_or_evicts_through_a_later_link(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    # cap=1: every put evicts (evict() would run over the victim); held=0: nothing is held in
    # memory, this is about the disk
    cache = PieceCache(root, cap=1, held=0)
    victim = tmp_path / "victim"
    (victim / "sha256").mkdir(parents=True)
    (victim / "sha256" / ("a" * 64)).write_bytes(PRECIOUS)
    (root / "cache").mkdir()
    (root / "cache" / "pieces").symlink_to(victim)  # planted after the cache was made
    payload = b"piece" * 100
    hexd = hashlib.sha256(payload).hexdigest()
    cache.put(hexd, payload)  # logged, not kept: a cache entry is never worth a read
    assert not cache.open(hexd)
    with pytest.raises(LinkInStore):
        cache.evict(0)
    assert sorted(os.listdir(victim / "sha256")) == ["a" * 64]
    assert (victim / "sha256" / ("a" * 64)).read_bytes() == PRECIOUS
    cache.close()


def test_a_fifo_piece_is_a_miss_never_a_hang(tmp_path: Path) -> None:
    cache = PieceCache(tmp_path)
    hexd = "b" * 64
    cache.dir.mkdir(parents=True)
    os.mkfifo(cache.dir / hexd)
    assert not cache.open(hexd)  # was: open(2) blocked for a writer that never comes
    cache.close()


def _gzip_layer(store: Store) -> tuple[Layer, bytes]:
    return gzip_layer({"f.txt": b"layer file\n" * 100}, store)


def _link_blobs_dir(store: Store, tmp_path: Path) -> None:
    """blobs/sha256 moved out of the store and linked back: the same bytes, through a link."""
    blobs = store.root / "blobs" / "sha256"
    outside = tmp_path / "outside-blobs"
    os.rename(blobs, outside)
    blobs.symlink_to(outside)


def test_stored_blob_reads_and_index_builds_refuse_a_later_link(tmp_path: Path) -> None:
    store = Store(tmp_path / "root")
    layer, blob = _gzip_layer(store)
    assert _read_stored(store, layer.digest, 0, 10) == blob[:10]
    path = store.blobs.path(layer.digest)
    build_local(store.root, path, layer)
    _link_blobs_dir(store, tmp_path)
    with pytest.raises(LinkInStore):
        _read_stored(store, layer.digest, 0, 10)
    # The kept index would answer without opening the blob: drop it, so the blob is read.
    fsutil.safe_rmtree(store.paths.layer_indexes, root=store.root)
    with pytest.raises(LinkInStore):
        build_local(store.root, path, layer)


def test_a_local_layer_is_never_read_through_a_later_link(tmp_path: Path) -> None:
    store = Store(tmp_path / "root")
    layer, _ = _gzip_layer(store)

    async def no_blob(_: Layer) -> None:
        raise AssertionError("a local layer is never fetched")

    async def no_range(_: Layer, start: int, end: int) -> bytes:
        raise AssertionError("a local layer is never fetched")

    ls = LayerSet(store, [layer], no_blob, fetch_range=no_range)

    async def main() -> None:
        await ls.ensure(0)  # indexed from the local blob
        _link_blobs_dir(store, tmp_path)
        with pytest.raises(LinkInStore):
            await ls.read(0, 0, 100)

    try:
        trio.run(main)
    finally:
        ls.close()
