"""PURE (bar `pread`s of an open fd). The piece cache's file format: packs of verified pieces.

    ROOT/cache/pieces/sha256/<hex>     a *pack*: header (magic `IFSB`, entry count, block
                                       size, block count, xxh3_64 of those fields, the
                                       table and the sums), a table
                                       of (sha256, offset, length, index of its first block
                                       sum) per piece, the block sums (xxh3_64 of each
                                       BLOCK-sized block of each payload, in table order),
                                       the payloads; each piece's name is a hard link to it
    (earlier versions wrote `IFSK` packs, an xxh3_64 of each whole payload in the table, and
    before them one piece per file, `IFSP`, 4 reserved bytes, xxh3_64, payload: both still
    read, a whole payload being their one block)

`encode` lays a pack out, `locate_piece` finds one piece in a pack (its table checked, no
payload byte read), `read_piece` reads a whole piece with every block checked. What the
cache does with packs (links, eviction, checked-block memory, pieces held in memory) is
`cache.PieceCache`'s.

BLOCK = 64 KiB, measured in process from the page cache (CPU µs, docs/bench.md): a first
read of a 10 KB slice of a 1 MiB piece (open + pread) costs 26 µs with 16 KiB blocks, 31
with 64 KiB, 60 with 256 KiB (150-165 checking the whole piece at open); a first
sequential read of the piece in 128 KiB reads (a warm `tar`) costs 321, 244 and 242 µs
(265 before): small blocks pay Python's per-block work eight times a kernel read. 64 KiB
is within 5 µs of the best for small files and the best for large ones; its sums are 128
bytes a 1 MiB span.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Sequence
from typing import NamedTuple

import xxhash

MAGIC = b"IFSP"  # one piece per file (earlier versions; read, not written)
HEADER = struct.Struct("<4s4xQ")
PACK_MAGIC = b"IFSK"  # packs with one xxh3 a payload (earlier versions; read, not written)
PACK_HEADER = struct.Struct("<4sIQ")  # magic, entries, xxh3_64 of the table
PACK_ENTRY = struct.Struct("<32sQQQ")  # sha256, payload offset, length, xxh3_64 of payload
BLOCKS_MAGIC = b"IFSB"
# magic, entries, block size, block sums, xxh3_64 of what comes before it in the header,
# the table and the sums: one check over all that an open reads
BLOCKS_HEADER = struct.Struct("<4sIIQQ")
# sha256, payload offset, length, index of the payload's first block sum; PACK_ENTRY's shape
BLOCKS_ENTRY = PACK_ENTRY
BLOCK = 64 << 10  # bytes per checked block of a payload (why 64 KiB: the docstring)
_MIN_BLOCK, _MAX_BLOCK = 4 << 10, 64 << 20  # block sizes a pack may declare
MAX_PACK_ENTRIES = 1 << 16
_NAME = re.compile(r"^[0-9a-f]{64}$")


def is_piece_name(name: str) -> bool:
    return bool(_NAME.match(name))


class Where(NamedTuple):
    """Where a piece lies in its file and what its blocks must hash to."""

    offset: int  # of the payload in the file
    length: int  # of the payload
    block: int  # bytes per checked block (the last one may be shorter)
    sums: tuple[int, ...]  # xxh3_64 of each block, ceil(length / block) of them


def blocks(length: int, block: int) -> int:
    """How many blocks of `block` bytes hold `length` bytes."""
    return -(-length // block)


def locate_piece(fd: int, hexd: str, file_size: int) -> Where | None:
    """Where piece `hexd` lies in the file open at `fd`, or None when the file's header or
    table is torn or rotten or does not list that piece. Reads no payload byte."""
    head = os.pread(fd, BLOCKS_HEADER.size, 0)
    if len(head) >= HEADER.size and head[:4] == MAGIC:
        length = file_size - HEADER.size  # one whole payload: its one block
        return Where(HEADER.size, length, max(length, 1), (HEADER.unpack_from(head)[1],))
    if head[:4] == PACK_MAGIC and len(head) >= PACK_HEADER.size:
        _, count, check = PACK_HEADER.unpack_from(head)
        nsums = block = 0
        table = _table(fd, count, 0, PACK_HEADER.size, b"", check)
    elif head[:4] == BLOCKS_MAGIC and len(head) == BLOCKS_HEADER.size:
        _, count, block, nsums, check = BLOCKS_HEADER.unpack(head)
        # no more sums than the file's bytes can have blocks: the pread below is bounded
        if not _MIN_BLOCK <= block <= _MAX_BLOCK or nsums > file_size // block + count:
            return None
        table = _table(fd, count, nsums, BLOCKS_HEADER.size, head[:-8], check)
    else:
        return None
    if table is None:
        return None
    want = bytes.fromhex(hexd)
    at = table.find(want)
    while at >= 0 and at % PACK_ENTRY.size:  # 32 bytes inside another field: look on
        at = table.find(want, at + 1)
    if at < 0 or at >= len(table) - nsums * 8:  # not in the table (perhaps in the sums)
        return None
    _, offset, length, last = PACK_ENTRY.unpack_from(table, at)
    if offset + length > file_size:
        return None
    if head[:4] == PACK_MAGIC:  # `last` is the whole payload's xxh3: one block
        return Where(offset, length, max(length, 1), (last,))
    n = blocks(length, block)
    if last + n > nsums:
        return None
    at = len(table) - nsums * 8 + last * 8
    return Where(offset, length, block, struct.unpack_from(f"<{n}Q", table, at))


def _table(fd: int, count: int, nsums: int, at: int, covered: bytes, check: int) -> bytes | None:
    """The table and block sums at `at`, if whole and matching the header's xxh3 (of the
    header's `covered` fields, then the table and sums)."""
    if not 0 < count <= MAX_PACK_ENTRIES:
        return None
    want = count * PACK_ENTRY.size + nsums * 8
    table = os.pread(fd, want, at)
    if len(table) != want:
        return None
    digest = xxhash.xxh3_64(covered)
    digest.update(table)
    return table if digest.intdigest() == check else None


def read_piece(fd: int, hexd: str) -> bytes | None:
    """The payload of piece `hexd` from its file, every block checked; None if damaged."""
    where = locate_piece(fd, hexd, os.fstat(fd).st_size)
    if where is None:
        return None
    payload = os.pread(fd, where.length, where.offset)
    if len(payload) != where.length:
        return None
    view, block = memoryview(payload), where.block
    for k, check in enumerate(where.sums):
        if xxhash.xxh3_64_intdigest(view[k * block : (k + 1) * block]) != check:
            return None
    return payload


class Encoded(NamedTuple):
    """A pack laid out: what to write before the payloads, and where each piece lies."""

    head: bytes  # the header, its xxh3 included
    table: bytes  # the entries, then the block sums
    wheres: list[Where]  # each piece's place and block sums, in the order given
    size: int  # of the whole file, payloads included


def encode(items: Sequence[tuple[str, bytes]]) -> Encoded:
    """The pack of `items` ((sha256 hex, payload), names unique): write `head`, `table`,
    then the payloads in the order given."""
    sums: list[int] = []
    firsts: list[int] = []
    table = bytearray()
    for hexd, payload in items:
        firsts.append(len(sums))
        table += BLOCKS_ENTRY.pack(bytes.fromhex(hexd), 0, len(payload), len(sums))
        view = memoryview(payload)
        sums.extend(
            xxhash.xxh3_64_intdigest(view[at : at + BLOCK]) for at in range(0, len(payload), BLOCK)
        )
    offset = BLOCKS_HEADER.size + len(table) + 8 * len(sums)
    wheres = []
    for k, (_, payload) in enumerate(items):  # the payloads' offsets, now they are known
        struct.pack_into("<Q", table, k * BLOCKS_ENTRY.size + 32, offset)
        n, first = blocks(len(payload), BLOCK), firsts[k]
        wheres.append(Where(offset, len(payload), BLOCK, tuple(sums[first : first + n])))
        offset += len(payload)
    table += struct.pack(f"<{len(sums)}Q", *sums)
    head = BLOCKS_HEADER.pack(BLOCKS_MAGIC, len(items), BLOCK, len(sums), 0)[:-8]
    digest = xxhash.xxh3_64(head)
    digest.update(table)
    head += struct.pack("<Q", digest.intdigest())
    return Encoded(head, bytes(table), wheres, offset)


def write_all(fd: int, parts: list[bytes]) -> None:
    """Write every byte of `parts` at `fd`'s position (`writev`, short writes resumed)."""
    views = [memoryview(p) for p in parts if p]
    while views:
        n = os.writev(fd, views[:512])  # IOV_MAX is 1024 on Linux
        while n and views:
            if n >= len(views[0]):
                n -= len(views.pop(0))
            else:
                views[0] = views[0][n:]
                n = 0
