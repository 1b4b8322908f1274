"""The piece cache checks a piece by blocks (issue 10, item 2): opening a piece checks its
pack's table and block sums only, a read checks the blocks it touches the first time, and a
rotten block is refused when a read touches it, and only then. Real pack files in tmp dirs."""

from __future__ import annotations

import hashlib
import os
import random
import struct
from pathlib import Path

import pytest
import xxhash

from imagefs.check import check_store
from imagefs.lazy.cache import PieceCache
from imagefs.lazy.packs import (
    BLOCK,
    BLOCKS_HEADER,
    PACK_ENTRY,
    PACK_HEADER,
    PACK_MAGIC,
    Where,
    encode,
    locate_piece,
    read_piece,
)
from tests.unit.test_pieces import local_gzip_layer, local_layer_set

MiB = 1 << 20


def _pack(root: Path, sizes: list[int]) -> tuple[PieceCache, list[str], list[bytes]]:
    cache = PieceCache(root)
    payloads = [random.Random(k).randbytes(size) for k, size in enumerate(sizes)]
    names = [hashlib.sha256(p).hexdigest() for p in payloads]
    cache.put_many(list(zip(names, payloads, strict=True)))
    cache.close()
    return cache, names, payloads


def _flip(path: Path, at: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 0x40]), at)
    finally:
        os.close(fd)


def _where(path: Path) -> Where:
    fd = os.open(path, os.O_RDONLY)
    try:
        where = locate_piece(fd, path.name, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    assert where is not None
    return where


def _payload_at(path: Path) -> int:
    return _where(path).offset


def test_a_rotten_block_is_refused_when_a_read_touches_it_and_only_then(tmp_path: Path) -> None:
    cache, names, payloads = _pack(tmp_path, [MiB, 300_000])
    k = 5
    path = cache.dir / names[0]
    _flip(path, _payload_at(path) + k * BLOCK + 1234)  # rot in block k of the first piece
    reader = PieceCache(tmp_path)
    assert reader.open(names[0]) and reader.corrupt == 0  # the table is whole: it opens
    before = 2 * BLOCK + 10
    assert reader.pread(names[0], before, 10_000) == payloads[0][before : before + 10_000]
    after = (k + 1) * BLOCK
    assert reader.pread(names[0], after, BLOCK) == payloads[0][after : after + BLOCK]
    assert reader.corrupt == 0 and path.exists()
    # a read touching block k (from the checked block before it) is refused, never served
    assert reader.pread(names[0], k * BLOCK - 100, 200) is None
    assert reader.corrupt == 1 and not reader.is_open(names[0]) and not path.exists()
    assert reader.pread(names[0], before, 10) is None  # dropped: the maker remakes it
    # the pack's other piece still serves
    assert reader.read(names[1]) == payloads[1]
    reader.close()


def test_a_damaged_piece_replaced_meanwhile_is_dropped_but_its_new_file_kept(
    tmp_path: Path,
) -> None:
    cache, names, payloads = _pack(tmp_path, [MiB])
    path = cache.dir / names[0]
    reader = PieceCache(tmp_path)
    assert reader.open(names[0])
    _flip(path, _payload_at(path) + 3 * BLOCK)  # rot in the file the reader holds open
    PieceCache(tmp_path).put(names[0], payloads[0])  # another process writes it again
    assert reader.pread(names[0], 3 * BLOCK, 10) is None and reader.corrupt == 1
    assert PieceCache(tmp_path).read(names[0]) == payloads[0]  # the new file stays
    reader.close()


def test_a_first_small_read_checks_one_block_not_the_piece(tmp_path: Path) -> None:
    _, names, payloads = _pack(tmp_path, [MiB])
    reader = PieceCache(tmp_path)
    assert reader.open(names[0]) and reader.bytes_checked == 0  # opening reads no payload
    at = 7 * BLOCK + 100
    assert reader.pread(names[0], at, 10_000) == payloads[0][at : at + 10_000]
    assert (reader.blocks_checked, reader.bytes_checked) == (1, BLOCK)
    assert reader.pread(names[0], at + 20_000, 10_000) == payloads[0][at + 20_000 : at + 30_000]
    assert reader.blocks_checked == 1  # a checked block: a plain pread
    across = 9 * BLOCK - 5  # a read across blocks 8 and 9 checks those two
    assert reader.pread(names[0], across, 10) == payloads[0][across : across + 10]
    assert (reader.blocks_checked, reader.bytes_checked) == (3, 3 * BLOCK)
    assert reader.read(names[0]) == payloads[0]  # the rest, once
    assert (reader.blocks_checked, reader.bytes_checked) == (MiB // BLOCK, MiB)
    assert reader.read(names[0]) == payloads[0] and reader.bytes_checked == MiB
    reader.close()


@pytest.mark.parametrize("where", ["header", "table", "sums"])
def test_a_torn_or_rotten_table_or_sums_region_is_a_damaged_piece(
    tmp_path: Path, where: str
) -> None:
    cache, names, _ = _pack(tmp_path, [MiB, 5000])
    path = cache.dir / names[0]
    at = {
        "header": 8,  # the block size (64 KiB -> 64 KiB + 64)
        "table": BLOCKS_HEADER.size + 40,  # the first entry's payload offset
        "sums": BLOCKS_HEADER.size + 2 * PACK_ENTRY.size + 3 * 8,  # block 3's sum
    }[where]
    _flip(path, at)
    reader = PieceCache(tmp_path)
    assert not reader.open(names[0]) and reader.corrupt == 1 and not path.exists()
    reader.close()


def test_a_pack_shorter_than_its_table_says_is_damaged(tmp_path: Path) -> None:
    cache, names, _ = _pack(tmp_path, [MiB])
    path = cache.dir / names[0]
    os.truncate(path, path.stat().st_size - 1)  # a write that stopped short
    reader = PieceCache(tmp_path)
    # the table says the payload runs past the file's end: damaged before any payload read
    assert not reader.open(names[0]) and reader.corrupt == 1
    reader.close()


def test_rot_in_any_block_is_found_by_read_piece_and_check(tmp_path: Path) -> None:
    cache, names, _ = _pack(tmp_path, [MiB + 1000, 2000])
    path = cache.dir / names[0]
    base = _payload_at(path)
    assert check_store(tmp_path).ok
    for k in range(MiB // BLOCK + 1):  # the last, short block included
        at = base + min(k * BLOCK + 77, MiB + 999)
        _flip(path, at)
        fd = os.open(path, os.O_RDONLY)
        try:
            assert read_piece(fd, names[0]) is None, k
            assert read_piece(fd, names[1]) is not None
        finally:
            os.close(fd)
        report = check_store(tmp_path)
        assert [p for p in report.problems if names[0] in p], k
        assert not [p for p in report.problems if names[1] in p]
        _flip(path, at)


def _ifsk_pack(path: Path, payloads: list[bytes]) -> None:
    """A pack as the previous version wrote it: one xxh3 of each whole payload."""
    offset = PACK_HEADER.size + len(payloads) * PACK_ENTRY.size
    table = b""
    for payload in payloads:
        digest = hashlib.sha256(payload).digest()
        table += PACK_ENTRY.pack(digest, offset, len(payload), xxhash.xxh3_64_intdigest(payload))
        offset += len(payload)
    head = PACK_HEADER.pack(PACK_MAGIC, len(payloads), xxhash.xxh3_64_intdigest(table))
    path.write_bytes(head + table + b"".join(payloads))


def test_a_pack_of_the_previous_version_is_still_read_and_checked(tmp_path: Path) -> None:
    cache = PieceCache(tmp_path)
    cache.dir.mkdir(parents=True)
    payloads = [random.Random(k).randbytes(200_000) for k in range(2)]
    names = [hashlib.sha256(p).hexdigest() for p in payloads]
    pack = tmp_path / "pack"
    _ifsk_pack(pack, payloads)
    for name in names:
        os.link(pack, cache.dir / name)
    assert cache.read(names[0]) == payloads[0]
    assert cache.open(names[1]) and cache.pread(names[1], 10, 5) == payloads[1][10:15]
    cache.close()
    assert check_store(tmp_path).ok
    _flip(cache.dir / names[1], _payload_at(cache.dir / names[1]) + 150_000)
    reader = PieceCache(tmp_path)
    assert reader.open(names[1])  # its one block is the whole payload, checked on a read
    assert reader.pread(names[1], 10, 5) is None and reader.corrupt == 1
    assert reader.read(names[0]) == payloads[0]
    reader.close()
    assert struct.unpack_from("<4s", (cache.dir / names[0]).read_bytes())[0] == PACK_MAGIC


async def test_a_rotten_block_of_a_span_is_remade_by_the_read_that_meets_it(
    tmp_path: Path,
) -> None:
    store, layer, files = local_gzip_layer(tmp_path)
    ls = local_layer_set(store, layer)
    idx = await ls.ensure(0)
    entry = idx.toc.find(b"f5.txt")
    assert entry is not None
    offset, size = idx.toc.offset(entry), idx.toc.size(entry)
    assert await ls.read(0, offset, size) == files["f5.txt"]
    ls.close()
    for piece in ls.pieces.dir.iterdir():  # rot in every block of every span kept
        where = _where(piece)
        for k in range(len(where.sums)):
            _flip(piece, where.offset + k * BLOCK + 3)
    again = local_layer_set(store, layer)
    await again.ensure(0)
    assert await again.read(0, offset + 100, 1000) == files["f5.txt"][100:1100]
    assert again.pieces.corrupt == 1 and again.inflations == 1  # remade, never served
    again.close()


def test_a_piece_this_process_wrote_opens_without_reading_its_table_and_is_still_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`open` of a piece this cache just wrote takes its place in the pack from what the
    write noted (no header or table read back), and its blocks are still checked: rot
    that came after the write is refused."""
    import imagefs.lazy.cache as cache_module

    cache = PieceCache(tmp_path, held=0)  # read from the pack, not from memory
    payloads = [random.Random(k).randbytes(size) for k, size in enumerate([MiB, 70_000, 0])]
    names = [hashlib.sha256(p).hexdigest() for p in payloads]
    cache.put_many(list(zip(names, payloads, strict=True)))
    path = cache.dir / names[0]
    _flip(path, _payload_at(path) + 4 * BLOCK + 7)  # rot in block 4 of the first piece

    def no_table_read(*_: object) -> None:
        raise AssertionError("the pack's table was read back")

    monkeypatch.setattr(cache_module, "locate_piece", no_table_read)
    for name, payload in zip(names[1:], payloads[1:], strict=True):
        assert cache.read(name) == payload
    assert cache.open(names[0])
    assert cache.pread(names[0], 0, BLOCK) == payloads[0][:BLOCK]  # a sound block serves
    assert cache.pread(names[0], 4 * BLOCK, 10) is None  # the rotten one is refused
    assert cache.corrupt == 1 and not path.exists()
    cache.close()


def test_a_note_of_a_write_is_not_taken_for_another_file_under_the_name(tmp_path: Path) -> None:
    """A piece written here, then written again by another process (a new pack under the
    same name) before this one opens it: the note does not match the file, so the file's
    own table says where the piece is."""
    cache = PieceCache(tmp_path)
    filler = random.Random(9).randbytes(5000)
    payload = random.Random(1).randbytes(200_000)
    name = hashlib.sha256(payload).hexdigest()
    cache.put(name, payload)
    other = PieceCache(tmp_path)  # another process: the piece second in a bigger pack
    other.put_many([(hashlib.sha256(filler).hexdigest(), filler), (name, payload)])
    other.close()
    assert cache.read(name) == payload and cache.corrupt == 0
    cache.close()


def test_a_fresh_piece_is_not_touched_on_its_first_read_but_an_old_one_is(tmp_path: Path) -> None:
    """A read refreshes an old piece's mtime (the cap evicts least recently used packs
    first); a piece written moments ago needs no such write, and gets none."""
    writer = PieceCache(tmp_path)
    payloads = [random.Random(k).randbytes(70_000 + k) for k in range(2)]
    names = [hashlib.sha256(p).hexdigest() for p in payloads]
    for name, payload in zip(names, payloads, strict=True):
        writer.put(name, payload)  # a pack each: a touch of one is not the other's
    writer.close()
    fresh, old = writer.dir / names[0], writer.dir / names[1]
    stale = old.stat().st_mtime - 7200
    os.utime(old, (stale, stale))
    fresh_mtime = fresh.stat().st_mtime_ns
    reader = PieceCache(tmp_path)
    assert reader.read(names[0]) == payloads[0] and reader.read(names[1]) == payloads[1]
    assert fresh.stat().st_mtime_ns == fresh_mtime
    assert old.stat().st_mtime > stale + 3600
    reader.close()


def test_where_encode_puts_a_piece_is_where_a_reader_of_the_file_finds_it(
    tmp_path: Path,
) -> None:
    """A writer opens its own pieces from what `encode` said (never reading the table
    back), so the two must agree for every piece: empty, one byte, a block and one more."""
    payloads = [b"", b"x", os.urandom(BLOCK), os.urandom(BLOCK + 1), os.urandom(3 * BLOCK - 7)]
    items = [(hashlib.sha256(p).hexdigest(), p) for p in payloads]
    pack = encode(items)
    path = tmp_path / "pack"
    path.write_bytes(pack.head + pack.table + b"".join(payloads))
    assert pack.size == path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        for (hexd, payload), where in zip(items, pack.wheres, strict=True):
            assert locate_piece(fd, hexd, pack.size) == where
            assert read_piece(fd, hexd) == payload
    finally:
        os.close(fd)
