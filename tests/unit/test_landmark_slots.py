"""Landmark prefetch is a background fetch: it takes at most the background limiter's 2 of
the 8 network slots, so an on-demand read always finds room (it used to start every fetch
window of the landmark at once)."""

from __future__ import annotations

import random
from pathlib import Path

import trio

from imagefs.layers import estargz
from imagefs.lazy.layers import LayerSet
from imagefs.lazy.loading import ESTARGZ_TOC_DIGEST
from imagefs.lazy.prefetch import prefetch_landmarks
from imagefs.oci.digest import Digest
from imagefs.oci.image import Layer
from imagefs.oci.manifest import Descriptor
from imagefs.store import Store
from tests.unit.test_pieces import no_whole_blob


async def test_landmark_prefetch_keeps_to_its_two_network_slots(tmp_path: Path) -> None:
    rnd = random.Random(7)
    specs = [estargz.FileSpec(f"f{k}.bin", data=rnd.randbytes(300_000)) for k in range(24)]
    blob = estargz.write_estargz(specs, chunk_size=100_000, prefetch=20)  # ~6 MB before it
    desc = Descriptor(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        Digest.of(blob.blob),
        len(blob.blob),
        annotations={ESTARGZ_TOC_DIGEST: blob.toc_digest},
    )
    layer = Layer(desc, Digest.parse(blob.diff_id))
    now = peak = 0
    fetched = 0

    async def fetch_range(_: Layer, start: int, end: int) -> bytes:
        nonlocal now, peak, fetched
        now += 1
        peak = max(peak, now)
        await trio.sleep(0.05)
        now -= 1
        fetched += end - start
        return blob.blob[start:end]

    ls = LayerSet(Store(tmp_path), [layer], no_whole_blob, fetch_range=fetch_range)
    try:
        await ls.ensure(0)  # the TOC first (a fetch of its own)
        peak = 0
        await prefetch_landmarks(ls)
    finally:
        ls.close()
    assert fetched > 5_000_000  # the chunks before the landmark did come
    assert 1 <= peak <= 2, peak
