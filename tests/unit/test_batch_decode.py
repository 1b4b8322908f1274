"""Many small chunks decoded per request (`ChunkTable.decode_many`, `making._decode_group`):
one bad chunk in a request costs only itself. Its readers get an error and none of its bytes
are kept; the good chunks of the same request are kept and served, and never fetched again.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from pathlib import Path

import pytest
import trio
import trio.testing
import zstandard

from imagefs.errors import ImageFSError, IntegrityError, LayerFormatError
from imagefs.layers import estargz
from imagefs.layers.chunks import ChunkTable
from imagefs.lazy.layers import LayerSet
from imagefs.lazy.loading import ESTARGZ_TOC_DIGEST
from imagefs.oci.digest import Digest
from imagefs.oci.image import Layer
from imagefs.oci.manifest import Descriptor
from imagefs.store import Store
from tests.unit.test_making import BLOB, PIECE, FakeRegistry, SlowDisk, _job, _maker
from tests.unit.test_pieces import _one_chunk, no_whole_blob

MiB = 1 << 20


def _text(seed: int, n: int) -> bytes:
    rng = random.Random(seed)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"epsilon", b"zeta"]
    return b" ".join(rng.choice(words) for _ in range(n // 5))[:n]


# Small files: the read of one takes the following ones along in the same request.
SMALL = {f"f{k}.txt": _text(k, 3000 + 100 * k) for k in range(12)}
BAD = "f5.txt"
FILLER = random.Random(0).randbytes(256 << 10)  # keeps the small files out of the TOC fetch


def _layer() -> tuple[Layer, bytes]:
    """An eStargz layer of small files, and its blob with the member of BAD corrupted."""
    specs = [estargz.FileSpec(n, data=d) for n, d in SMALL.items()]
    blob = estargz.write_estargz([*specs, estargz.FileSpec("filler", data=FILLER)])
    toc = estargz.read_toc(blob.blob, len(blob.blob))
    entry = next(e for e in toc.entries if e.name == BAD)
    bad = bytearray(blob.blob)
    for p in range(entry.offset + 20, entry.offset + 40):  # inside its deflate data
        bad[p] ^= 0x55
    desc = Descriptor(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        Digest.of(blob.blob),
        len(blob.blob),
        annotations={ESTARGZ_TOC_DIGEST: blob.toc_digest},
    )
    return Layer(desc, Digest.parse(blob.diff_id)), bytes(bad)


async def test_one_bad_chunk_fails_only_its_readers_and_is_never_kept(tmp_path: Path) -> None:
    layer, served = _layer()
    fetched: Counter[int] = Counter()  # blob byte -> times fetched

    async def fetch_range(_: Layer, start: int, end: int) -> bytes:
        fetched.update(range(start, end))
        return served[start:end]

    ls = LayerSet(Store(tmp_path), [layer], no_whole_blob, fetch_range=fetch_range)
    idx = await ls.ensure(0)
    table = idx.chunks
    assert table is not None

    def where(name: str) -> tuple[int, int]:
        entry = idx.toc.find(name.encode())
        assert entry is not None
        return idx.toc.offset(entry), idx.toc.size(entry)

    first, _ = where("f3.txt")
    last, size = where("f7.txt")
    # One read across f3..f7: a single request holds their chunks (and neighbours after).
    with pytest.raises(IntegrityError, match="chunk at"):
        await ls.read(0, first, last + size - first)
    assert fetched and max(fetched.values()) == 1
    requests = ls.stats[0].fetches
    bad_piece = table.piece(next(iter(table.covering(*where(BAD)))))
    assert not ls.pieces.exists(bad_piece)  # none of its bytes kept
    # The good chunks of that request were kept: served without fetching or decoding again.
    made = ls.inflations
    for name in ("f3.txt", "f4.txt", "f6.txt", "f7.txt", "f8.txt"):
        assert await ls.read(0, *where(name)) == SMALL[name]
    assert ls.inflations == made and ls.stats[0].fetches == requests
    # The bad one fails again for its next reader (fetched again: it was never kept).
    with pytest.raises(IntegrityError):
        await ls.read(0, *where(BAD))
    assert not ls.pieces.exists(bad_piece)
    ls.close()


async def test_a_bad_piece_in_a_request_does_not_cost_its_waiting_neighbours(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Reader A asks for pieces 0-3 (one request); piece 2 arrives corrupt. Reader B waits
    on A's flight of piece 1 only: it gets it from that flight, nothing is fetched twice."""

    class Corrupting(FakeRegistry):
        async def fetch(self, layer: int, start: int, end: int) -> bytes:
            data = bytearray(await super().fetch(layer, start, end))
            bad = 2 * PIECE - start + 100
            if 0 <= bad < len(data):
                data[bad] ^= 1
            return bytes(data)

    registry = Corrupting()
    maker = _maker(tmp_path, registry, SlowDisk(look=0.2, decode=0.1))
    jobs = [_job(k) for k in range(4)]
    outcome: list[str] = []

    async def a() -> None:
        try:
            await maker.make(0, jobs)
        except ImageFSError as exc:
            outcome.append(f"a: {exc}")

    async def b() -> None:
        await trio.sleep(0.5)  # joins a's flights
        got = await maker.make(0, [jobs[1]])
        outcome.append(f"b: {got[jobs[1].name] == BLOB[PIECE : 2 * PIECE]}")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(a)
        nursery.start_soon(b)
    assert sorted(outcome) == ["a: piece 2 fails its digest", "b: True"]
    assert max(registry.served.values()) == 1, registry.calls
    assert not maker.cache.exists(jobs[2].name)
    assert all(maker.cache.exists(jobs[k].name) for k in (0, 1, 3))
    assert not maker.flights


def test_decode_many_answers_for_each_chunk() -> None:
    """A table of three zstd chunks, the middle one corrupt: the others decode."""
    datas = [_text(k, 5000) for k in range(3)]
    frames = [zstandard.ZstdCompressor().compress(d) for d in datas]
    frames[1] = frames[1][:-8] + bytes(8)
    tables = [
        _one_chunk("zstd", f, len(d), hashlib.sha256(d).digest())
        for f, d in zip(frames, datas, strict=True)
    ]
    blob = b"".join(frames)
    base = 0
    got = []
    for f, t in zip(frames, tables, strict=True):
        shifted = ChunkTable(
            t.codec,
            t.voffsets,
            t.sizes,
            type(t.starts)("Q", [base]),
            type(t.ends)("Q", [base + len(f)]),
            t.inners,
            t.digests,
            t.zeros,
        )
        got += shifted.decode_many([0], memoryview(blob), 0)
        base += len(f)
    assert got[0] == datas[0] and got[2] == datas[2]
    assert isinstance(got[1], LayerFormatError | IntegrityError)


@pytest.mark.parametrize("declared", [True, False])
def test_a_zstd_chunk_bomb_is_refused_with_or_without_a_declared_size(declared: bool) -> None:
    import tracemalloc

    zeros = bytes(64 * MiB)
    bomb = zstandard.ZstdCompressor(level=1, write_content_size=declared).compress(zeros)
    del zeros
    table = _one_chunk("zstd", bomb, MiB, hashlib.sha256(bytes(MiB)).digest())
    tracemalloc.start()
    try:
        with pytest.raises(LayerFormatError, match="beyond its declared"):
            table.decode(0, bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB, peak
