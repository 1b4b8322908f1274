"""The piece cache holds the pieces it was just given in memory, for their first reader
(`PieceCache._held`): a bounded number of bytes, the oldest let go first, each until a read
reaches its end; pieces over `HELD_PIECE_MAX` are never held. Real pack files in tmp dirs."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from imagefs.errors import IntegrityError
from imagefs.lazy.cache import _HELD_ENTRY, HELD_PIECE_MAX, PieceCache


def _pieces(sizes: list[int]) -> list[tuple[str, bytes]]:
    payloads = [random.Random(k).randbytes(size) for k, size in enumerate(sizes)]
    return [(hashlib.sha256(p).hexdigest(), p) for p in payloads]


def _forget_the_disk(cache: PieceCache) -> None:
    """Unlink every pack: what is read afterwards can only come from memory."""
    for name in os.listdir(cache.dir):
        os.unlink(cache.dir / name)


def test_a_piece_just_put_is_read_from_memory_until_a_read_reaches_its_end(
    tmp_path: Path,
) -> None:
    cache = PieceCache(tmp_path)
    [(name, payload)] = _pieces([100_000])
    cache.put(name, payload)
    _forget_the_disk(cache)
    assert cache.open(name)
    assert cache.size(name) == len(payload)
    assert cache.pread(name, 10, 1000, expect=len(payload)) == payload[10:1010]
    assert cache.pread(name, 50_000, 60_000) == payload[50_000:]  # reaches the end
    assert cache.held_reads == 2
    assert cache.pread(name, 0, 10) is None  # let go, and not on disk any more
    assert not cache.open(name)


def test_held_pieces_are_bounded_in_bytes_and_the_oldest_go_first(tmp_path: Path) -> None:
    cache = PieceCache(tmp_path, held=250_000)
    pieces = _pieces([100_000, 100_000, 100_000])
    for name, payload in pieces:
        cache.put(name, payload)
    _forget_the_disk(cache)
    assert cache.held_unread == 1
    assert cache.pread(pieces[0][0], 0, 10) is None  # the oldest was let go
    for name, payload in pieces[1:]:
        assert cache.pread(name, 0, len(payload)) == payload


def test_many_tiny_pieces_are_bounded_by_what_each_costs_not_only_its_bytes(
    tmp_path: Path,
) -> None:
    """Each held piece counts its payload and `_HELD_ENTRY` for itself: 10-byte pieces fit
    7 to a cap of 2,000 bytes, not 200."""
    cache = PieceCache(tmp_path, held=2_000)
    pieces = _pieces([10] * 100)
    for name, payload in pieces:
        cache.put(name, payload)
    assert 100 - cache.held_unread == 2_000 // (10 + _HELD_ENTRY)
    _forget_the_disk(cache)
    name, payload = pieces[-1]
    assert cache.pread(name, 0, 10) == payload  # the newest are the ones held


def test_a_piece_over_the_limit_is_not_held(tmp_path: Path) -> None:
    cache = PieceCache(tmp_path, held=4 * HELD_PIECE_MAX)
    [(big, payload)] = _pieces([HELD_PIECE_MAX + 1])
    cache.put(big, payload)
    assert cache.pread(big, 0, 10) is None  # not open: a read opens it from its pack
    assert cache.open(big)
    assert cache.pread(big, 0, 10) == payload[:10]
    assert cache.held_reads == 0


def test_a_held_piece_refuses_an_index_that_declares_another_size(tmp_path: Path) -> None:
    cache = PieceCache(tmp_path)
    [(name, payload)] = _pieces([5000])
    cache.put(name, payload)
    with pytest.raises(IntegrityError, match="declares 4999"):
        cache.pread(name, 0, 10, expect=4999)


def test_closing_the_cache_lets_held_pieces_go(tmp_path: Path) -> None:
    cache = PieceCache(tmp_path)
    [(name, payload)] = _pieces([5000])
    cache.put(name, payload)
    _forget_the_disk(cache)
    cache.close()
    assert not cache.open(name)


def test_a_piece_written_and_not_yet_opened_is_there_until_evicted(tmp_path: Path) -> None:
    """`exists` answers for the pieces this process wrote without looking at the disk (the
    read-ahead window asks again and again), and stops once eviction removed them."""
    cache = PieceCache(tmp_path, held=0)
    pieces = _pieces([1000] * 4)
    cache.put_many(pieces)
    assert all(cache.exists(n) for n, _ in pieces)
    assert cache.evict(target=0) > 0
    assert not any(cache.exists(n) for n, _ in pieces)


def test_the_memory_of_touched_pieces_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each piece read is remembered as touched (its mtime is the LRU clock, updated at
    most once a minute); a long mount reading many pieces keeps at most `_TOUCHED_MAX`."""
    monkeypatch.setattr("imagefs.lazy.cache._TOUCHED_MAX", 5)
    cache = PieceCache(tmp_path, held=0)
    pieces = _pieces([100] * 12)
    cache.put_many(pieces)
    for name, payload in pieces:
        assert cache.read(name) == payload
        assert len(cache._touched) <= 5
    assert cache._touched  # still remembering the latest
