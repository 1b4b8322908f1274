"""The piece cache, chunk bombs, the index store's trust keys, and LayerSet's single flight,
driven by a fake `fetch_range` over a real eStargz blob (no sockets)."""

from __future__ import annotations

import hashlib
import os
import random
import tracemalloc
import zlib
from array import array
from collections import Counter
from pathlib import Path

import pytest
import trio
import xxhash
import zstandard

from imagefs.errors import LayerFormatError
from imagefs.layers import estargz
from imagefs.layers.chunks import ChunkTable
from imagefs.lazy.cache import PieceCache, verify_piece
from imagefs.lazy.layers import LayerSet
from imagefs.lazy.loading import ESTARGZ_TOC_DIGEST
from imagefs.lazy.packs import HEADER, MAGIC, locate_piece
from imagefs.oci.digest import Digest
from imagefs.oci.image import Layer
from imagefs.oci.manifest import Descriptor
from imagefs.store import Store
from imagefs.store.layerindexes import ESTARGZ, PUBLISHED, Bound, LayerIndexStore

MiB = 1 << 20


def _one_chunk(codec: str, compressed: bytes, size: int, digest: bytes) -> ChunkTable:
    def q(v: int) -> array[int]:
        return array("Q", [v])

    return ChunkTable(codec, q(0), q(size), q(0), q(len(compressed)), q(0), digest, b"\0")


@pytest.mark.parametrize("codec", ["zstd", "gzip"])
def test_a_chunk_bomb_never_inflates_past_its_declared_size(codec: str) -> None:
    zeros = bytes(64 * MiB)
    if codec == "zstd":
        bomb = zstandard.ZstdCompressor(level=1).compress(zeros)
    else:
        c = zlib.compressobj(1, zlib.DEFLATED, 31)
        bomb = c.compress(zeros) + c.flush()
    del zeros
    # The TOC declares 1 MiB and the digest of 1 MiB of zeros: the bomb's honest prefix.
    table = _one_chunk(codec, bomb, MiB, hashlib.sha256(bytes(MiB)).digest())
    tracemalloc.start()
    try:
        if codec == "zstd":  # one frame per chunk: more output than declared is refused
            with pytest.raises(LayerFormatError, match="beyond its declared"):
                table.decode(0, bomb)
        else:  # eStargz members may hold several chunks: output stops at inner + size
            assert table.decode(0, bomb) == bytes(MiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB, peak


def test_piece_cache_checks_once_and_survives_eviction_and_rot(tmp_path: Path) -> None:
    cache = PieceCache(tmp_path, cap=3 * MiB)
    payloads = [random.Random(k).randbytes(MiB) for k in range(3)]
    names = [hashlib.sha256(p).hexdigest() for p in payloads]
    verify_piece(names[0], payloads[0])
    with pytest.raises(Exception, match="fails its digest"):
        verify_piece(names[0], payloads[1])
    cache.put(names[0], payloads[0])
    assert cache.open(names[0]) and cache.pread(names[0], 10, 5) == payloads[0][10:15]
    # evicted while open: the open piece still reads (unlink-safe)
    cache.put(names[1], payloads[1])
    cache.put(names[2], payloads[2])  # over the cap: LRU eviction to 90%
    assert cache.total_bytes() <= 3 * MiB
    assert cache.pread(names[0], 0, 4) == payloads[0][:4]
    # rot: a new process (a new cache object) notices it on a read of it, drops it
    path = cache.dir / names[2]
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    other = PieceCache(tmp_path, cap=3 * MiB)
    assert other.read(names[2]) is None and other.corrupt == 1 and not path.exists()
    # a planted symlink is never followed, and a put replaces the link, not its target
    target = tmp_path / "outside"
    target.write_bytes(b"secret")
    (cache.dir / names[2]).symlink_to(target)
    assert not other.open(names[2])
    other.put(names[2], payloads[2])
    assert target.read_bytes() == b"secret" and not (cache.dir / names[2]).is_symlink()


def test_pieces_of_one_request_share_a_pack_and_each_answers_only_for_itself(
    tmp_path: Path,
) -> None:
    cache = PieceCache(tmp_path, cap=64 * MiB)
    payloads = [random.Random(k).randbytes(1000 + 37 * k) for k in range(40)]
    names = [hashlib.sha256(p).hexdigest() for p in payloads]
    cache.put_many(list(zip(names, payloads, strict=True)))
    inodes = {os.stat(cache.dir / n).st_ino for n in names}
    assert len(inodes) == 1 and cache.writes == 40  # one file, a name (hard link) per piece
    size = os.stat(cache.dir / names[0]).st_size
    assert cache.total_bytes() == size  # the cap counts the pack once
    fresh = PieceCache(tmp_path)  # another process: finds each piece by its name alone
    for name, payload in zip(names, payloads, strict=True):
        assert fresh.read(name) == payload
    # rot in one piece's bytes drops that piece only
    path = cache.dir / names[7]
    fd = os.open(path, os.O_RDWR)
    where = locate_piece(fd, names[7], size)
    assert where is not None
    os.pwrite(fd, b"\x00" if os.pread(fd, 1, where[0]) != b"\x00" else b"\x01", where[0])
    os.close(fd)
    other = PieceCache(tmp_path)
    assert other.read(names[7]) is None and other.corrupt == 1 and not path.exists()
    assert other.read(names[8]) == payloads[8]
    # a pack under a name its table does not list answers nothing (content addressing)
    stranger = hashlib.sha256(b"not in the pack").hexdigest()
    os.link(cache.dir / names[0], cache.dir / stranger)
    assert not PieceCache(tmp_path).open(stranger) and not (cache.dir / stranger).exists()
    # eviction frees a whole pack: all its names go together
    cache.put(names[7], payloads[7])  # a pack of its own, newer
    assert cache.evict(target=size // 2) >= size
    assert [n for n in names if (cache.dir / n).exists()] == [names[7]]
    assert PieceCache(tmp_path).read(names[7]) == payloads[7]


def test_a_name_that_cannot_be_linked_loses_only_its_own_piece(tmp_path: Path) -> None:
    cache = PieceCache(tmp_path)
    payloads = [random.Random(k).randbytes(500) for k in range(3)]
    names = [hashlib.sha256(p).hexdigest() for p in payloads]
    (cache.dir / names[1]).mkdir(parents=True)  # planted: a directory under a piece name
    cache.put_many(list(zip(names, payloads, strict=True)))
    assert cache.writes == 2 and (cache.dir / names[1]).is_dir()
    assert cache.read(names[0]) == payloads[0] and cache.read(names[2]) == payloads[2]
    assert [p.name for p in cache.dir.iterdir() if p.name.startswith(".")] == []  # no temp


def test_a_piece_file_of_an_earlier_version_is_still_read(tmp_path: Path) -> None:
    payload = b"kept by an earlier imagefs" * 100
    name = hashlib.sha256(payload).hexdigest()
    cache = PieceCache(tmp_path)
    cache.dir.mkdir(parents=True)
    header = HEADER.pack(MAGIC, xxhash.xxh3_64_intdigest(payload))
    (cache.dir / name).write_bytes(header + payload)
    assert cache.read(name) == payload
    (cache.dir / name).write_bytes(header + payload[:-1] + b"!")
    assert PieceCache(tmp_path).read(name) is None and not (cache.dir / name).exists()


def test_index_store_finds_a_bound_entry_only_under_its_own_verifier(tmp_path: Path) -> None:
    blob = estargz.write_estargz([estargz.FileSpec("a.txt", data=b"a" * 100)])
    toc = estargz.toc_json_from_member(
        blob.blob[blob.toc_offset : len(blob.blob) - estargz.footer_size(blob.blob)]
    )
    layer = Digest.of(blob.blob)
    store = LayerIndexStore(tmp_path)
    bound = Bound(layer, ESTARGZ, Digest.parse(blob.toc_digest))
    from imagefs.store.layerindexes import derive

    idx = derive(bound, {"toc_offset": blob.toc_offset}, toc)
    store.save_bound(bound, {"toc_offset": blob.toc_offset}, toc, idx)
    assert store.load_bound(bound) is not None
    other = Bound(layer, ESTARGZ, Digest.of(b"another TOC"))
    assert store.load_bound(other) is None
    assert store.load_bound(Bound(layer, PUBLISHED, bound.verifier)) is None
    assert store.load_layer(layer) is None  # nothing bound to the layer itself
    with pytest.raises(ValueError):
        store.save_layer(idx)  # a TOC-derived index can never become layer-bound
    # the derived form is only a cache: damaged, it is rebuilt from the verified bytes
    store.derived_path(bound).write_bytes(b"junk")
    assert store.load_bound(bound) is not None
    store.refuse(bound, "lies")
    assert store.load_bound(bound) is None
    # raw bytes that are not what the verifier names are not used
    store.save_bound(other, {"toc_offset": blob.toc_offset}, toc, idx)
    store.derived_path(other).unlink()
    assert store.load_bound(other) is None


FILES = {f"f{k}.bin": random.Random(k).randbytes(300_000) for k in range(6)}


async def no_whole_blob(_: Layer) -> None:
    """A LayerSet's `fetch_blob` for tests where every byte must come as ranges."""
    raise AssertionError("the whole blob is never needed")


def _estargz_layer(
    files: dict[str, bytes] = FILES, chunk_size: int = 100_000
) -> tuple[Layer, bytes]:
    specs = [estargz.FileSpec(n, data=d) for n, d in files.items()]
    blob = estargz.write_estargz(specs, chunk_size=chunk_size)
    desc = Descriptor(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        Digest.of(blob.blob),
        len(blob.blob),
        annotations={ESTARGZ_TOC_DIGEST: blob.toc_digest},
    )
    return Layer(desc, Digest.parse(blob.diff_id)), blob.blob


async def test_single_flight_warm_reads_and_shared_pieces(tmp_path: Path) -> None:
    layer, blob = _estargz_layer()
    fetched: Counter[tuple[int, int]] = Counter()

    async def fetch_range(_: Layer, start: int, end: int) -> bytes:
        fetched[(start, end)] += 1
        await trio.sleep(0.01)  # let the other readers pile up behind the flight
        return blob[start:end]

    def layer_set() -> LayerSet:
        return LayerSet(Store(tmp_path), [layer], no_whole_blob, fetch_range=fetch_range)

    ls = layer_set()
    idx = await ls.ensure(0)
    entry = idx.toc.find(b"f3.bin")
    assert entry is not None
    offset, size = idx.toc.offset(entry), idx.toc.size(entry)
    results: list[bytes] = []

    async def reader() -> None:
        results.append(await ls.read(0, offset, size))

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(reader)
    assert results == [FILES["f3.bin"]] * 8
    assert fetched and max(fetched.values()) == 1, fetched  # no range fetched twice
    made = ls.inflations
    assert made >= 3  # the file's three chunks, decoded once for eight readers
    before = sum(fetched.values())
    assert await ls.read(0, offset + 5, 1000) == FILES["f3.bin"][5:1005]
    assert ls.inflations == made and sum(fetched.values()) == before  # warm: a pread
    ls.close()

    # Another process (another image with this layer): TOC and pieces are reused.
    again = layer_set()
    await again.ensure(0)
    assert await again.read(0, offset, size) == FILES["f3.bin"]
    assert again.inflations == 0 and sum(fetched.values()) == before
    # every piece file is named by the sha256 of what it holds
    for name in os.listdir(again.pieces.dir):
        payload = again.pieces.read(name)
        assert payload is not None and hashlib.sha256(payload).hexdigest() == name
    again.close()


def test_a_zstd_span_never_inflates_past_its_recorded_length() -> None:
    import io

    from imagefs.layers.seekindex import build_index, inflate_span

    blob = zstandard.ZstdCompressor().compress(b"x" * 1000)
    index = build_index(io.BytesIO(blob), "zstd")
    assert inflate_span(index, 0, blob) == b"x" * 1000
    # A forged index whose span digest covers a bomb but records 1000 bytes of output.
    bomb = zstandard.ZstdCompressor(level=1).compress(bytes(64 * MiB))
    forged = type(index)("zstd", len(bomb), 1000, index.points, index.span_digests, "", ())
    tracemalloc.start()
    try:
        with pytest.raises(LayerFormatError):
            inflate_span(forged, 0, bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB, peak


def gzip_layer(files: dict[str, bytes], store: Store | None = None) -> tuple[Layer, bytes]:
    """A gzip layer holding `files` (one tar member each, no gzip timestamp) and its blob,
    put in `store`'s blobs when one is given."""
    import gzip
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    blob = gzip.compress(buf.getvalue(), mtime=0)
    digest = store.blobs.put(blob) if store is not None else Digest.of(blob)
    desc = Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", digest, len(blob))
    return Layer(desc, Digest.of(buf.getvalue())), blob


def local_gzip_layer(tmp_path: Path) -> tuple[Store, Layer, dict[str, bytes]]:
    """A gzip layer of eight 400 KB files, stored locally (several ~1 MiB spans)."""
    files = {f"f{k}.txt": random.Random(k).randbytes(200_000).hex().encode() for k in range(8)}
    store = Store(tmp_path)
    layer, _ = gzip_layer(files, store)
    return store, layer, files


def local_layer_set(store: Store, layer: Layer) -> LayerSet:
    """A LayerSet over a local layer: it never fetches."""

    async def no_blob(_: Layer) -> None:
        raise AssertionError("a local layer is never fetched")

    async def no_range(_: Layer, start: int, end: int) -> bytes:
        raise AssertionError("a local layer is never fetched")

    return LayerSet(store, [layer], no_blob, fetch_range=no_range)


async def test_a_local_gzip_layer_inflates_each_span_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, layer, files = local_gzip_layer(tmp_path)
    ls = local_layer_set(store, layer)
    idx = await ls.ensure(0)
    assert idx.seek is not None and len(idx.seek.points) > 2  # several ~1 MiB spans
    entry = idx.toc.find(b"f5.txt")
    assert entry is not None
    offset, size = idx.toc.offset(entry), idx.toc.size(entry)
    assert await ls.read(0, offset, size) == files["f5.txt"]
    made = ls.inflations
    assert 1 <= made <= 2  # the span(s) holding the file, inflated once into pieces
    for start in range(0, size, 4096):  # small reads all over the file: preads only
        n = min(4096, size - start)
        assert await ls.read(0, offset + start, n) == files["f5.txt"][start : start + n]
    assert ls.inflations == made
    ls.close()

    # A new mount (a new LayerSet and PieceCache over the same store): the pieces are on
    # disk, not open in this process. Its first read opens and checks them on the event
    # loop: no inflate and no worker-thread hop (the hop is what a warm read paid for).
    again = local_layer_set(store, layer)
    await again.ensure(0)
    hops = 0
    run_sync = trio.to_thread.run_sync

    async def counted(*args: object, **kwargs: object) -> object:
        nonlocal hops
        hops += 1
        return await run_sync(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(trio.to_thread, "run_sync", counted)
    assert await again.read(0, offset, size) == files["f5.txt"]
    monkeypatch.undo()
    assert again.inflations == 0 and hops == 0, (again.inflations, hops)
    assert again.pieces.misses == 0
    again.close()


async def test_a_warm_piece_is_served_only_at_its_declared_size(tmp_path: Path) -> None:
    """Layer 1's TOC (verified by its own annotation) gives its 100-byte `g.bin` the chunk
    digest of layer 0's 300,000-byte `f0.bin`. Cold, the chunk fails its digest; warm (the
    piece cached by layer 0) it used to serve f0.bin's first 100 bytes as g.bin."""
    from imagefs.errors import IntegrityError
    from imagefs.testing.hostile import estargz_retoc

    honest, blob0 = _estargz_layer()
    liar = estargz.write_estargz([estargz.FileSpec("g.bin", data=b"g" * 100)])
    f0 = hashlib.sha256(FILES["f0.bin"][:100_000]).hexdigest()  # f0.bin's first chunk
    forged, toc_json = estargz_retoc(liar, {"g.bin": {"chunkDigest": f"sha256:{f0}"}})
    desc = Descriptor(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        Digest.of(forged.blob),
        len(forged.blob),
        annotations={ESTARGZ_TOC_DIGEST: str(Digest.of(toc_json))},
    )
    blobs = {honest.digest: blob0, desc.digest: forged.blob}
    layers = [honest, Layer(desc, Digest.parse(forged.diff_id))]

    async def fetch_range(layer: Layer, start: int, end: int) -> bytes:
        return blobs[layer.digest][start:end]

    ls = LayerSet(Store(tmp_path), layers, no_whole_blob, fetch_range=fetch_range)
    try:
        idx1 = await ls.ensure(1)
        g = idx1.toc.find(b"g.bin")
        assert g is not None
        with pytest.raises(IntegrityError):  # cold: the chunk is not what the TOC says
            await ls.read(1, idx1.toc.offset(g), 100)
        idx0 = await ls.ensure(0)
        f = idx0.toc.find(b"f0.bin")
        assert f is not None
        assert await ls.read(0, idx0.toc.offset(f), 300_000) == FILES["f0.bin"]
        with pytest.raises(IntegrityError, match="declares 100"):  # warm: the same answer
            await ls.read(1, idx1.toc.offset(g), 100)
    finally:
        ls.close()
