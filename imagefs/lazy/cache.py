"""The piece cache: verified *uncompressed* pieces, addressed by their own sha256.

    ROOT/cache/pieces/sha256/<hex>     a *pack*: header (magic `IFSK`, entry count, xxh3_64
                                       of the table), a table of (sha256, offset, length,
                                       xxh3_64 of the payload) per piece, the payloads;
                                       each piece's name is a hard link to its pack
    (earlier versions wrote one piece per file: `IFSP`, 4 reserved bytes, xxh3_64, payload;
    still read)

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
process (an open file stays readable). The xxh3 self-check of a piece (torn write, rot)
runs once when this process first opens it and in `imagefs check`; after that its fd stays
in a small LRU and reads are `pread`s.

Size cap (`--cache-size`, counted in bytes on disk, a pack once however many names it
has): least recently used packs go first (a hit touches the mtime, coarsely; the names of a
pack share it) until the cache is under 90% of its cap, all names of a pack together (only
that frees its bytes). Whole blobs in `blobs/` are not part of the cache and never evicted.
`prune` does not map pieces back to layers (content addressing has no cheap way to); the
cap's LRU eviction bounds them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import xxhash

from imagefs.errors import IntegrityError, StoreError
from imagefs.store import fsutil
from imagefs.store.layout import Layout

log = logging.getLogger("imagefs.cache")

MAGIC = b"IFSP"  # one piece per file (earlier versions; read, not written)
HEADER = struct.Struct("<4s4xQ")
PACK_MAGIC = b"IFSK"
PACK_HEADER = struct.Struct("<4sIQ")  # magic, entries, xxh3_64 of the table
PACK_ENTRY = struct.Struct("<32sQQQ")  # sha256, payload offset, length, xxh3_64 of payload
MAX_PACK_ENTRIES = 1 << 16
_NAME = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_CACHE_SIZE = 10 << 30
_TOUCH_EVERY = 60.0  # seconds between mtime updates of a hot piece
MAX_OPEN = 1024  # fds kept open for warm reads (the soft RLIMIT_NOFILE is raised to fit)
_MAX_CHECKED = 1 << 17  # names whose xxh3 this process checked (~120 B each: <= 16 MB RSS)


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


def is_piece_name(name: str) -> bool:
    return bool(_NAME.match(name))


def locate_piece(fd: int, hexd: str, file_size: int) -> tuple[int, int, int] | None:
    """Where piece `hexd` lies in the file open at `fd`: (offset, length, xxh3_64 of the
    payload), or None when the file is torn or rotten or does not hold that piece."""
    head = os.pread(fd, PACK_HEADER.size, 0)
    if len(head) >= HEADER.size and head[:4] == MAGIC:
        return HEADER.size, file_size - HEADER.size, HEADER.unpack_from(head)[1]
    if len(head) < PACK_HEADER.size:
        return None
    magic, count, check = PACK_HEADER.unpack(head)
    if magic != PACK_MAGIC or not 0 < count <= MAX_PACK_ENTRIES:
        return None
    table = os.pread(fd, count * PACK_ENTRY.size, PACK_HEADER.size)
    if len(table) != count * PACK_ENTRY.size or xxhash.xxh3_64_intdigest(table) != check:
        return None
    want = bytes.fromhex(hexd)
    at = table.find(want)
    while at >= 0 and at % PACK_ENTRY.size:  # 32 bytes inside another field: look on
        at = table.find(want, at + 1)
    if at < 0:
        return None
    _, offset, length, xxh = PACK_ENTRY.unpack_from(table, at)
    return (offset, length, xxh) if offset + length <= file_size else None


def read_piece(fd: int, hexd: str) -> bytes | None:
    """The payload of piece `hexd` from its file (self-checked), or None if damaged."""
    size = os.fstat(fd).st_size
    where = locate_piece(fd, hexd, size)
    if where is None:
        return None
    offset, length, check = where
    payload = os.pread(fd, length, offset)
    if len(payload) != length or xxhash.xxh3_64_intdigest(payload) != check:
        return None
    return payload


def _write_all(fd: int, parts: list[bytes]) -> None:
    views = [memoryview(p) for p in parts if p]
    while views:
        n = os.writev(fd, views[:512])  # IOV_MAX is 1024 on Linux
        while n and views:
            if n >= len(views[0]):
                n -= len(views.pop(0))
            else:
                views[0] = views[0][n:]
                n = 0


def verify_piece(hexd: str, payload: bytes) -> None:
    """The one check that makes bytes a piece: their sha256 is the name they go under."""
    if hashlib.sha256(payload).hexdigest() != hexd:
        raise IntegrityError(f"piece sha256:{hexd[:12]} fails its digest")


class PieceCache:
    """Synchronous and thread-safe. `pread` of an already open piece never blocks for long
    (page cache), so the event loop may call it directly; everything else runs in threads."""

    def __init__(self, root: Path, cap: int = DEFAULT_CACHE_SIZE) -> None:
        self.root = root
        self.dir = Layout(root).pieces
        self.cap = cap
        self._lock = threading.Lock()
        # hex -> (fd, offset of the payload in its file, payload length)
        self._fds: OrderedDict[str, tuple[int, int, int]] = OrderedDict()
        # Checked once per process: a piece whose fd fell out of the LRU is reopened without
        # reading it all again (a rot after that is for the next process or `check`).
        self._checked: set[str] = set()
        _raise_fd_limit(MAX_OPEN + 256)
        self._dirfd: int | None = None
        self._total: int | None = None
        self._touched: dict[str, float] = {}
        self.hits = 0
        self.misses = 0
        self.corrupt = 0
        self.writes = 0

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
        return hexd in self._fds

    def checked(self, hexd: str) -> bool:
        """Whether this process checked the piece already (reopening it reads nothing)."""
        return hexd in self._checked

    def size(self, hexd: str) -> int | None:
        got = self._fds.get(hexd)
        return None if got is None else got[2]

    def open(self, hexd: str, *, count_miss: bool = True) -> bool:
        """Make a piece readable by `pread`: open it and check it once. False if absent or
        damaged (a damaged piece is removed, so the next read fetches it again).
        `count_miss=False`: a look before the maker's own (which counts the miss)."""
        if hexd in self._fds:
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
            size = os.fstat(fd).st_size
            where = locate_piece(fd, hexd, size)
            good = where is not None
            if where is not None and hexd not in self._checked:
                payload = os.pread(fd, where[1], where[0])
                good = xxhash.xxh3_64_intdigest(payload) == where[2]
        except OSError:
            os.close(fd)
            self.misses += 1
            return False
        if where is None or not good:
            os.close(fd)
            self.corrupt += 1
            self.misses += 1
            log.warning("cache piece %s is damaged (torn write or rot); dropping it", hexd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(hexd, dir_fd=self._dir())
            return False
        if len(self._checked) < _MAX_CHECKED:
            self._checked.add(hexd)
        self._keep(hexd, fd, where[0], where[1])
        return True

    def exists(self, hexd: str) -> bool:
        """Whether a piece is there (no check of its content): for speculative fetches."""
        if hexd in self._fds:
            return True
        try:
            os.stat(hexd, dir_fd=self._dir(), follow_symlinks=False)
        except OSError:
            return False
        return True

    def _keep(self, hexd: str, fd: int, base: int, size: int) -> None:
        closing = []
        with self._lock:
            old = self._fds.pop(hexd, None)
            if old is not None:
                closing.append(old[0])
            self._fds[hexd] = (fd, base, size)
            while len(self._fds) > MAX_OPEN:
                closing.append(self._fds.popitem(last=False)[1][0])
        for old_fd in closing:
            os.close(old_fd)

    def pread(
        self, hexd: str, offset: int, length: int, *, expect: int | None = None
    ) -> bytes | None:
        """Payload bytes [offset, offset+length) of an open piece; None if not open.

        `expect`: the piece's size as the index that names it declares. A piece is only
        ever its digest's bytes, so another size means the index lies about the chunk (a
        cold read refuses it the same way): IntegrityError, never a prefix served."""
        with self._lock:
            got = self._fds.get(hexd)
            if got is None:
                return None
            self._fds.move_to_end(hexd)
            fd, base, size = got
            if expect is not None and size != expect:
                raise IntegrityError(
                    f"piece sha256:{hexd[:12]} holds {size} bytes; its index declares {expect}"
                )
            # Under the lock, so no other thread closes the fd (and another open reuses its
            # number) meanwhile: a pread of an open piece from the page cache takes
            # microseconds, less than the dup + close this used to pay on every read.
            data = os.pread(fd, max(0, min(length, size - offset)), base + offset)
        self.hits += 1
        self._touch(hexd)
        return data

    def read(self, hexd: str) -> bytes | None:
        """The whole payload (checked), or None."""
        if not self.open(hexd):
            return None
        size = self.size(hexd)
        return None if size is None else self.pread(hexd, 0, size)

    def _touch(self, hexd: str) -> None:
        now = time.monotonic()
        if now - self._touched.get(hexd, 0.0) > _TOUCH_EVERY:
            self._touched[hexd] = now
            with contextlib.suppress(OSError):
                os.utime(hexd, dir_fd=self._dir(), follow_symlinks=False)

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
            if not _NAME.match(hexd):
                raise ValueError(f"not a piece name: {hexd!r}")
            unique.setdefault(hexd, payload)
        if not unique:
            return
        items = list(unique.items())
        for start in range(0, len(items), MAX_PACK_ENTRIES):
            self._put_pack(items[start : start + MAX_PACK_ENTRIES])

    def _put_pack(self, items: list[tuple[str, bytes]]) -> None:
        try:
            dfd = self._dir()
        except StoreError as exc:  # a link where the cache directory should be
            log.warning("cannot cache pieces %s...: %s", items[0][0][:12], exc)
            return
        offset = PACK_HEADER.size + len(items) * PACK_ENTRY.size
        table = bytearray()
        for hexd, payload in items:
            table += PACK_ENTRY.pack(
                bytes.fromhex(hexd), offset, len(payload), xxhash.xxh3_64_intdigest(payload)
            )
            offset += len(payload)
        head = PACK_HEADER.pack(PACK_MAGIC, len(items), xxhash.xxh3_64_intdigest(table))
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
                _write_all(fd, [head, bytes(table), *(payload for _, payload in items)])
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
        self.writes += len(kept)
        for hexd in kept:
            if len(self._checked) < _MAX_CHECKED:
                self._checked.add(hexd)  # written from bytes just checked
        with self._lock:
            if self._total is not None:
                self._total += offset
        if self._total is None or self._total > self.cap:
            self.evict()

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
                if _NAME.match(entry.name):
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
                freed += size
        with self._lock:
            self._total = total - freed
        if freed:
            log.info("cache: evicted %d bytes (cap %d)", freed, self.cap)
        return freed

    def close(self) -> None:
        with self._lock:
            fds = [fd for fd, _, _ in self._fds.values()]
            self._fds.clear()
            if self._dirfd is not None:
                fds.append(self._dirfd)
                self._dirfd = None
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
