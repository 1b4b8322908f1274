"""The piece cache: verified *uncompressed* pieces, addressed by their own sha256.

    ROOT/cache/pieces/sha256/<hex>     a *pack* holding the piece (`packs`: a header, a
                                       table of the pieces it holds, each 64 KiB block's
                                       xxh3_64, the payloads); each piece's name is a hard
                                       link to its pack

`hex` is the sha256 of the payload: an eStargz/zstd:chunked chunk's `chunkDigest`, or the
uncompressed span digest of an imagefs seek index. A piece is written only after
sha256(payload) == hex was checked, so it can only ever answer a request for its own
digest: sharing pieces across layers and images is safe whatever metadata led to them
(a forged TOC cannot make a piece answer for another digest), and identical content is
kept once.

Trade-off (issue 10): pieces hold inflated bytes, not the compressed ranges they came from.
On disk a piece is ~2-4x its compressed form, but a warm read is a `pread` of an open file
with no inflating and no hashing, and equal chunks of different layers and images share one
piece. Compressed bytes are not kept at all.

Why packs with a hard link per piece: the pieces one request brings (tens to hundreds of
small eStargz / zstd:chunked chunks) are written as one file, then linked under each
piece's name: one create + write + a `link` per piece instead of a create, write, close and
rename per piece (measured: ~13 µs CPU per piece instead of ~90, `docs/bench.md`), while a
piece is still found by its name alone, in this process or any other (no shared index).
The table maps the name opened to its bytes in the pack; a name the table does not list, or
a table failing its xxh3, is a damaged piece. Writes are temp-then-link/rename
(`O_EXCL|O_NOFOLLOW` temp inside the directory opened once with `O_NOFOLLOW`, linked,
renamed and unlinked relative to it: never through a symlink), presence is a directory
entry, eviction is `unlink`, which never breaks a read in progress here or in another
process (an open file stays readable).

Self-checks by block (issue 10: warm random reads). Opening a piece reads and checks only
its pack's header, table and block sums (a few hundred bytes); a `pread` checks each block
it touches the first time, reading whole blocks for that, and serves the slice; an open
piece remembers its checked blocks in a bytearray, so later reads of them are plain
`pread`s. A block failing its sum is a damaged piece, dropped exactly as a damaged table is
(removed, counted in `corrupt`, the read goes to the maker): nothing unchecked is served.
Before, a first read of a piece this process had not opened yet (nearly every read of a
fresh daemon over a warm store) read and hashed the whole ~1 MiB span for a 10 KB file.
A piece this process wrote itself opens from what the write noted (its place in the pack
and its block sums; the file under the name must be the pack written, same inode and size),
not by reading the pack's header and table back: a cold read-all opens each piece read-ahead
wrote moments before. Its blocks are checked on first read all the same.
Pieces just put are also held in memory (`HELD_BYTES`, each up to `HELD_PIECE_MAX`, the
oldest let go first) until a read reaches their end: the bytes whose sha256 the maker checked
moments before, served without opening the pack or checking its blocks (nothing read from disk).
When a piece's fd falls out of the LRU its checked blocks are forgotten and checked again on
reopen: one block costs a 64 KiB pread + xxh3 (~10 µs), and no per-name memo grows with the
cache (the old one held up to 128k names). `imagefs check` reads every block of every piece.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import xxhash

from imagefs.errors import IntegrityError, StoreError
from imagefs.lazy.packs import (
    MAX_PACK_ENTRIES,
    Where,
    encode,
    is_piece_name,
    locate_piece,
    write_all,
)
from imagefs.store import fsutil
from imagefs.store.layout import Layout

log = logging.getLogger("imagefs.cache")

DEFAULT_CACHE_SIZE = 10 << 30
_TOUCH_EVERY = 60.0  # seconds between mtime updates of a hot piece
# Pieces whose last touch is remembered (`PieceCache._touched`, ~150 bytes each); past it
# the memory is dropped whole: forgetting costs one more `utime` a piece, not a leak.
_TOUCHED_MAX = 16384
MAX_OPEN = 1024  # fds kept open for warm reads (the soft RLIMIT_NOFILE is raised to fit)
# Pieces this process wrote and has not opened yet whose place in their pack it remembers
# (`PieceCache._written`): ~300 bytes each.
_WRITTEN_MAX = 8192
# Verified payloads this process just made, held in memory for their first reader
# (`PieceCache._held`): opening a piece from disk (open, fstat, its table or the write's
# note, the first block's pread and sum) is most of a first read's cost for the small pieces
# of eStargz and zstd:chunked. Read-ahead runs up to 16 MiB (`prefetch.READ_AHEAD`) ahead of
# a sequential reader; 8 MiB holds about half of that (measured, cold eStargz read-all:
# 30.6k reads answered from memory, 17k pieces let go unread; 16 MiB: 39k and 8k, but the
# daemon's peak RSS grew by 23-31 MB instead of 13-16 for zstd:chunked, against 150 MB).
# Pieces over 1 MiB are not held (gzip+index spans are 1 MiB and are).
HELD_BYTES = 8 << 20
HELD_PIECE_MAX = 1 << 20
# What a held piece costs besides its payload (the bytes object's header, its name, the
# OrderedDict's entry), counted against HELD_BYTES: many tiny pieces stay bounded too.
_HELD_ENTRY = 256


def parse_size(text: str) -> int:
    """`10GiB`, `512M`, `1.5G`, `1000000` -> bytes (binary units; docker's style)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise ValueError(f"invalid size {text!r} (examples: 10GiB, 512M, 1000000)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def _raise_fd_limit(want: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def _check_declared(hexd: str, size: int, expect: int | None) -> None:
    """A piece is only ever its digest's bytes, so a size other than the one its index
    declares (`expect`) means the index lies about the chunk: IntegrityError."""
    if expect is not None and size != expect:
        raise IntegrityError(
            f"piece sha256:{hexd[:12]} holds {size} bytes; its index declares {expect}"
        )


def verify_piece(hexd: str, payload: bytes) -> None:
    """The one check that makes bytes a piece: their sha256 is the name they go under."""
    if hashlib.sha256(payload).hexdigest() != hexd:
        raise IntegrityError(f"piece sha256:{hexd[:12]} fails its digest")


@dataclass(slots=True)
class _Open:
    """A piece open in this process: its fd, where it lies, which blocks were checked."""

    fd: int
    where: Where
    checked: bytearray  # 1 for each block whose sum this process has checked
    unchecked: int  # blocks still to check (0: every read is a plain pread)


class PieceCache:
    """Synchronous and thread-safe. `pread` of an already open piece never blocks for long
    (page cache), so the event loop may call it directly; everything else runs in threads."""

    def __init__(
        self, root: Path, cap: int = DEFAULT_CACHE_SIZE, *, held: int = HELD_BYTES
    ) -> None:
        self.root = root
        self.dir = Layout(root).pieces
        self.cap = cap
        self._lock = threading.Lock()
        self._fds: OrderedDict[str, _Open] = OrderedDict()
        _raise_fd_limit(MAX_OPEN + 256)
        self._dirfd: int | None = None
        self._total: int | None = None
        self._touched: dict[str, float] = {}
        # name -> (the pack's inode and size, where the piece lies): written here, not yet
        # opened. A cold read-all opens each piece a read-ahead wrote moments before, and
        # reading back its pack's header and table to find it was ~5 % of the event loop's
        # time (docs/bench.md). Only the table's word is skipped: the blocks a read
        # touches are still checked against their sums.
        self._written: OrderedDict[str, tuple[int, int, Where]] = OrderedDict()
        # name -> payload: pieces just put, kept in memory (at most `held` bytes, the oldest
        # let go first) until a read reaches their end. A cold read-all reads each piece
        # read-ahead made moments before; opening it from disk was ~16 % of the event loop's
        # time for eStargz (docs/bench.md). They are the bytes whose sha256 the maker just
        # checked (`put_many`'s contract), so they need no block sums.
        self._held: OrderedDict[str, bytes] = OrderedDict()
        self._held_bytes = 0
        self._held_cap = held
        self.held_reads = 0  # reads answered from `_held`
        self.held_unread = 0  # held payloads let go (the cap) before a read reached their end
        self.hits = 0
        self.misses = 0
        self.corrupt = 0
        self.writes = 0
        self.blocks_checked = 0  # blocks whose sum a read checked
        self.bytes_checked = 0  # and their bytes: a small first read hashes one block

    # -- the directory, never through a symlink ---------------------------------------------

    def _dir(self) -> int:
        if self._dirfd is None:
            # Walked from the root, no component a link (one planted after the store was
            # opened included): LinkInStore. Then pinned: every name is relative to this fd.
            fd = fsutil.open_dir(self.dir, root=self.root, create=True)
            with self._lock:
                if self._dirfd is None:
                    self._dirfd = fd
                else:
                    os.close(fd)
        assert self._dirfd is not None
        return self._dirfd

    # -- reading ----------------------------------------------------------------------------

    def is_open(self, hexd: str) -> bool:
        return hexd in self._fds or hexd in self._held

    def size(self, hexd: str) -> int | None:
        held = self._held.get(hexd)
        if held is not None:
            return len(held)
        got = self._fds.get(hexd)
        return None if got is None else got.where.length

    def open(self, hexd: str, *, count_miss: bool = True) -> bool:
        """Make a piece readable by `pread`: open it and check its pack's table (its blocks
        are checked as reads touch them). False if absent or its table is damaged (a damaged
        piece is removed, so the next read fetches it again).
        `count_miss=False`: a look before the maker's own (which counts the miss)."""
        if hexd in self._fds or hexd in self._held:
            return True
        try:  # a link, FIFO or device under the name is a miss (never opened, never a hang)
            fd = fsutil.safe_open(self._dir(), hexd, os.O_RDONLY)
        except fsutil.LinkInStore:
            self.misses += 1
            return False
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ELOOP):
                log.warning("cache piece %s: %s", hexd[:12], exc)
            if count_miss:
                self.misses += 1
            return False
        try:
            st = os.fstat(fd)
            with self._lock:
                written = self._written.pop(hexd, None)
            if written is not None and written[:2] == (st.st_ino, st.st_size):
                where: Where | None = written[2]  # the pack this process wrote under it
            else:
                where = locate_piece(fd, hexd, st.st_size)
        except OSError:
            os.close(fd)
            self.misses += 1
            return False
        if where is None:
            self._damaged(hexd, fd)
            return False
        n = len(where.sums)
        if time.time() - st.st_mtime < _TOUCH_EVERY:  # fresh: its first read need not touch it
            self._note_touched(hexd, time.monotonic())
        self._keep(hexd, _Open(fd, where, bytearray(n), n))
        return True

    def _damaged(self, hexd: str, fd: int) -> None:
        """Drop a piece (open at `fd`, which is closed) whose table or a block failed its
        xxh3: the next read makes it again. Its name is unlinked only while it still names
        the damaged file: a piece found damaged long after it was opened may have been
        replaced meanwhile (by another process's put), and the new one is left alone."""
        self.corrupt += 1
        self.misses += 1
        log.warning("cache piece %s is damaged (torn write or rot); dropping it", hexd)
        try:
            ino = os.fstat(fd).st_ino
            if os.stat(hexd, dir_fd=self._dir(), follow_symlinks=False).st_ino == ino:
                os.unlink(hexd, dir_fd=self._dir())
        except OSError:
            pass  # gone already
        finally:
            os.close(fd)

    def exists(self, hexd: str) -> bool:
        """Whether a piece is there (no check of its content): for speculative fetches.
        One this process wrote and has not opened since (`_written`: read-ahead's pieces,
        made ahead of their reader) is there without a `stat` (a cold eStargz read-all of
        the bench image asked ~26k times)."""
        if hexd in self._fds or hexd in self._held or hexd in self._written:
            return True
        try:
            os.stat(hexd, dir_fd=self._dir(), follow_symlinks=False)
        except OSError:
            return False
        return True

    def _keep(self, hexd: str, piece: _Open) -> None:
        closing = []
        with self._lock:
            old = self._fds.pop(hexd, None)
            if old is not None:
                closing.append(old.fd)
            self._fds[hexd] = piece
            while len(self._fds) > MAX_OPEN:  # its checked blocks go too (see the docstring)
                closing.append(self._fds.popitem(last=False)[1].fd)
        for old_fd in closing:
            os.close(old_fd)

    def pread(
        self, hexd: str, offset: int, length: int, *, expect: int | None = None
    ) -> bytes | None:
        """Payload bytes [offset, offset+length) of an open piece; None if not open, or if
        a block it touches fails its sum (the piece is then dropped: the maker remakes it).

        `expect`: the piece's size as the index that names it declares. A piece is only
        ever its digest's bytes, so another size means the index lies about the chunk (a
        cold read refuses it the same way): IntegrityError, never a prefix served."""
        with self._lock:
            got = self._fds.get(hexd)
            if got is None:
                if hexd in self._held:
                    return self._pread_held(hexd, offset, length, expect)
                return None
            self._fds.move_to_end(hexd)
            where = got.where
            size = where.length
            if expect is not None and size != expect:
                _check_declared(hexd, size, expect)  # raises
            # Under the lock, so no other thread closes the fd (and another open reuses its
            # number) meanwhile: a pread of an open piece from the page cache takes
            # microseconds, less than the dup + close this used to pay on every read.
            n = max(0, min(length, size - offset))
            if got.unchecked and n:
                data = self._checked_pread(got, offset, n)
                if data is None:
                    del self._fds[hexd]
            else:
                data = os.pread(got.fd, n, where.offset + offset)
        if data is None:
            self._damaged(hexd, got.fd)
            return None
        self.hits += 1
        # `_touch`'s test, here: every warm read passes it, nearly all without a touch
        now = time.monotonic()
        if now - self._touched.get(hexd, 0.0) > _TOUCH_EVERY:
            self._touch(hexd, now)
        return data

    def _pread_held(self, hexd: str, offset: int, length: int, expect: int | None) -> bytes:
        """`pread` of a held payload; a read that reaches its end lets it go (the kernel's
        page cache keeps what was read; a later read opens the pack). Under the lock."""
        payload = self._held[hexd]
        size = len(payload)
        _check_declared(hexd, size, expect)
        end = min(offset + length, size)
        if end >= size:
            del self._held[hexd]
            self._held_bytes -= size + _HELD_ENTRY
        self.hits += 1
        self.held_reads += 1
        return payload[offset:end] if (offset, end) != (0, size) else payload

    def _hold(self, pieces: dict[str, bytes]) -> None:
        """Hold just-made payloads (`_held`), the oldest let go past the cap."""
        cap = self._held_cap
        with self._lock:
            held = self._held
            for hexd, payload in pieces.items():
                if len(payload) > HELD_PIECE_MAX or hexd in held:
                    continue
                held[hexd] = payload
                self._held_bytes += len(payload) + _HELD_ENTRY
            while self._held_bytes > cap:
                self._held_bytes -= len(held.popitem(last=False)[1]) + _HELD_ENTRY
                self.held_unread += 1

    def _checked_pread(self, got: _Open, offset: int, n: int) -> bytes | None:
        """[offset, offset+n) of a piece, reading whole blocks to check the ones not checked
        yet; None if one fails. Called under the lock."""
        where, checked = got.where, got.checked
        first, last = offset // where.block, (offset + n - 1) // where.block
        if checked[first] if first == last else all(checked[first : last + 1]):
            return os.pread(got.fd, n, where.offset + offset)
        lo = first * where.block
        hi = min((last + 1) * where.block, where.length)
        data = os.pread(got.fd, hi - lo, where.offset + lo)
        if len(data) != hi - lo:
            return None  # the file is shorter than its table says: torn
        view = memoryview(data)
        for k in range(first, last + 1):
            if checked[k]:
                continue
            part = view[(k - first) * where.block : (k + 1 - first) * where.block]
            if xxhash.xxh3_64_intdigest(part) != where.sums[k]:
                return None
            checked[k] = 1
            got.unchecked -= 1
            self.blocks_checked += 1
            self.bytes_checked += len(part)
        return data if (lo, hi) == (offset, offset + n) else data[offset - lo : offset - lo + n]

    def read(self, hexd: str) -> bytes | None:
        """The whole payload (checked), or None."""
        if not self.open(hexd):
            return None
        size = self.size(hexd)
        return None if size is None else self.pread(hexd, 0, size)

    def _touch(self, hexd: str, now: float) -> None:
        """Mark a piece used (its mtime: what `evict` orders by). The caller touches a piece
        at most once a minute (`_TOUCH_EVERY`, tested where a read is served)."""
        self._note_touched(hexd, now)
        with contextlib.suppress(OSError):
            os.utime(hexd, dir_fd=self._dir(), follow_symlinks=False)

    def _note_touched(self, hexd: str, when: float) -> None:
        touched = self._touched
        if len(touched) >= _TOUCHED_MAX:
            touched.clear()  # one step, safe beside another thread's `get`
        touched[hexd] = when

    # -- writing ----------------------------------------------------------------------------

    def put(self, hexd: str, payload: bytes) -> None:
        """Keep one piece (see `put_many`)."""
        self.put_many([(hexd, payload)])

    def put_many(self, pieces: Sequence[tuple[str, bytes]]) -> None:
        """Keep pieces whose sha256 the caller has checked against their names
        (`verify_piece`), as one pack with a hard link per name.

        Never fails the read that produced them: a full disk only loses cache entries.
        """
        unique: dict[str, bytes] = {}
        for hexd, payload in pieces:
            if not is_piece_name(hexd):
                raise ValueError(f"not a piece name: {hexd!r}")
            unique.setdefault(hexd, payload)
        if not unique:
            return
        self._hold(unique)
        items = list(unique.items())
        for start in range(0, len(items), MAX_PACK_ENTRIES):
            self._put_pack(items[start : start + MAX_PACK_ENTRIES])

    def _put_pack(self, items: list[tuple[str, bytes]]) -> None:
        try:
            dfd = self._dir()
        except StoreError as exc:  # a link where the cache directory should be
            log.warning("cannot cache pieces %s...: %s", items[0][0][:12], exc)
            return
        pack = encode(items)
        tmp = f"{fsutil.TEMP_PREFIX}{items[0][0][:16]}.{os.getpid()}.{threading.get_ident()}"
        kept: list[str] = []
        try:
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o644,
                dir_fd=dfd,
            )
            try:
                write_all(fd, [pack.head, pack.table, *(payload for _, payload in items)])
                st = os.fstat(fd)
            finally:
                os.close(fd)
            for hexd, _ in items:
                try:
                    self._link(tmp, hexd, dfd)
                except OSError as exc:  # e.g. a directory planted under the name
                    log.warning("cannot cache piece %s: %s", hexd[:12], exc)
                    continue
                kept.append(hexd)
        except OSError as exc:
            log.warning("cannot cache %d piece(s): %s", len(items), exc)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
        if not kept:
            return
        self._remember_written(kept, items, pack.wheres, st)
        self.writes += len(kept)
        with self._lock:
            if self._total is not None:
                self._total += pack.size
        if self._total is None or self._total > self.cap:
            self.evict()

    def _remember_written(
        self,
        kept: list[str],
        items: list[tuple[str, bytes]],
        wheres: list[Where],
        st: os.stat_result,
    ) -> None:
        """Note where each piece just written lies in its pack, for `open` (at most
        `_WRITTEN_MAX`, the oldest forgotten first)."""
        names = set(kept)
        with self._lock:
            for (hexd, _), where in zip(items, wheres, strict=True):
                if hexd not in names:
                    continue
                self._written[hexd] = (st.st_ino, st.st_size, where)
                self._written.move_to_end(hexd)
            while len(self._written) > _WRITTEN_MAX:
                self._written.popitem(last=False)

    def _link(self, tmp: str, hexd: str, dfd: int) -> None:
        """Name `tmp` `hexd` too. Whatever is there already (a damaged piece, a planted
        link, the same piece from another process) is replaced, never written through."""
        try:
            os.link(tmp, hexd, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
        except FileExistsError:
            spare = f"{tmp}.{hexd[:16]}"
            os.link(tmp, spare, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
            try:
                os.rename(spare, hexd, src_dir_fd=dfd, dst_dir_fd=dfd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(spare, dir_fd=dfd)
                raise

    # -- size cap ---------------------------------------------------------------------------

    def _all_packs(self) -> list[tuple[float, int, list[str]]]:
        """(mtime, bytes on disk, names) per file: the names of a pack are one entry."""
        packs: dict[int, tuple[float, int, list[str]]] = {}
        with contextlib.suppress(FileNotFoundError), os.scandir(self._dir()) as it:
            for entry in it:
                if is_piece_name(entry.name):
                    with contextlib.suppress(FileNotFoundError):
                        st = entry.stat(follow_symlinks=False)
                        mtime, _, names = packs.setdefault(st.st_ino, (0.0, 0, []))
                        names.append(entry.name)
                        packs[st.st_ino] = (max(mtime, st.st_mtime), st.st_size, names)
        return list(packs.values())

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self._all_packs())

    def evict(self, target: int | None = None) -> int:
        """Remove least recently used packs until under `target` (90% of the cap)."""
        packs = self._all_packs()
        total = sum(size for _, size, _ in packs)
        goal = int(self.cap * 0.9) if target is None else target
        freed = 0
        if total > goal:
            for _, size, names in sorted(packs):
                if total - freed <= goal:
                    break
                for name in names:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=self._dir())
                with self._lock:  # no longer there: `exists` must not say it is
                    for name in names:
                        self._written.pop(name, None)
                freed += size
        with self._lock:
            self._total = total - freed
        if freed:
            log.info("cache: evicted %d bytes (cap %d)", freed, self.cap)
        return freed

    def close(self) -> None:
        if self.held_reads or self.held_unread:
            log.info(
                "cache: %d reads from pieces held in memory, %d held pieces let go unread",
                self.held_reads,
                self.held_unread,
            )
        with self._lock:
            self._held.clear()
            self._held_bytes = 0
            fds = [piece.fd for piece in self._fds.values()]
            self._fds.clear()
            if self._dirfd is not None:
                fds.append(self._dirfd)
                self._dirfd = None
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
