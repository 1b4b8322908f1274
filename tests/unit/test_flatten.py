"""A single-frame zstd layer is flattened once, and never past the size its index states
(issue 9 follow-up, item 11): an index that understates it (a published one, opted into,
while the blob became local) must not make imagefs fill the disk. Real zstd blobs, the
real LayerSet; RLIMIT_FSIZE makes "more written than stated" observable."""

from __future__ import annotations

import dataclasses
import io
import resource
import signal
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import zstandard

from imagefs.errors import LayerFormatError
from imagefs.layers.layerindex import build_from_blob
from imagefs.lazy.layers import ZSTD_FLAT_THRESHOLD, LayerSet
from imagefs.oci.digest import Digest
from imagefs.oci.image import Layer
from imagefs.oci.manifest import Descriptor
from imagefs.store import Store

MiB = 1 << 20


def _zstd_layer(store: Store, zeros: int) -> tuple[Layer, bytes]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("zeros.bin")
        info.size = zeros
        tf.addfile(info, io.BytesIO(bytes(zeros)))
    tar = buf.getvalue()
    blob = zstandard.ZstdCompressor(level=1).compress(tar)  # one frame
    digest = store.blobs.put(blob)
    desc = Descriptor("application/vnd.oci.image.layer.v1.tar+zstd", digest, len(blob))
    return Layer(desc, Digest.of(tar)), tar


@pytest.fixture
def file_size_cap() -> Iterator[int]:
    """Writes past 24 MiB fail with EFBIG (SIGXFSZ ignored) for the test's duration."""
    cap = 24 * MiB
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (cap, old_limit[1]))
    try:
        yield cap
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_an_understated_zstd_layer_is_refused_before_filling_the_disk(
    tmp_path: Path, file_size_cap: int
) -> None:
    store = Store(tmp_path / "root")
    layer, _ = _zstd_layer(store, 64 * MiB)
    idx = build_from_blob(store.blobs.path(layer.digest), layer.digest, "zstd")
    assert idx.seek is not None and len(idx.seek.points) == 1
    stated = ZSTD_FLAT_THRESHOLD + MiB  # flattened, but far below the 64 MiB it inflates to
    seek = dataclasses.replace(idx.seek, uncompressed_size=stated)
    ls = LayerSet(store, [layer], _never, fetch_range=_never_range)
    ls.indexes.save_layer(dataclasses.replace(idx, seek=seek))  # an index that understates

    async def main() -> None:
        with pytest.raises(LayerFormatError, match="inflates beyond"):
            await ls.read(0, 0, 100)  # was: 64 MiB written (here: EFBIG), then compared

    try:
        trio.run(main)
    finally:
        ls.close()
    assert not list((store.root / "cache" / "flat").iterdir())  # the temp file is gone


def test_concurrent_readers_flatten_once(tmp_path: Path) -> None:
    store = Store(tmp_path / "root")
    layer, _ = _zstd_layer(store, ZSTD_FLAT_THRESHOLD + 2 * MiB)
    ls = LayerSet(store, [layer], _never, fetch_range=_never_range)
    flattened = 0
    real = store.blobs.open  # what flattening reads the blob with, and nothing else here

    def counted(digest: Digest) -> io.BufferedReader:
        nonlocal flattened
        flattened += 1
        return real(digest)

    store.blobs.open = counted  # type: ignore[method-assign]

    async def main() -> None:
        idx = await ls.ensure(0)
        entry = idx.toc.find(b"zeros.bin")
        assert entry is not None
        offset = idx.toc.offset(entry)
        results: list[bytes] = []

        async def reader(k: int) -> None:
            results.append(await ls.read(0, offset + k * MiB, 4096))

        async with trio.open_nursery() as nursery:
            for k in range(6):
                nursery.start_soon(reader, k)
        assert results == [bytes(4096)] * 6

    try:
        trio.run(main)
    finally:
        ls.close()
    assert flattened == 1


async def _never(_: Layer) -> None:
    raise AssertionError("a local layer is never fetched")


async def _never_range(_: Layer, start: int, end: int) -> bytes:
    raise AssertionError("a local layer is never fetched")
