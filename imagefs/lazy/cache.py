"""The piece cache: verified *uncompressed* pieces, addressed by their own sha256.

    ROOT/cache/pieces/sha256/<hex>     16-byte header (magic `IFSP`, 4 reserved bytes,
                                       xxh3_64 of the payload) + payload

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

Why one file per piece: writes are temp-then-rename (`O_EXCL|O_NOFOLLOW` temp inside the
directory opened once with `O_NOFOLLOW`, renamed and unlinked relative to it: never through
a symlink), presence is a directory entry, eviction is `unlink`, which never breaks a read
in progress here or in another process (an open file stays readable). The xxh3 self-check
(torn write, rot) runs once when this process first opens a piece and in `imagefs check`;
after that its fd stays in a small LRU and reads are `pread`s.

Size cap (`--cache-size`, counted in bytes on disk): least recently used pieces go first (a
hit touches the mtime, coarsely) until the cache is under 90% of its cap. Whole blobs in
`blobs/` are not part of the cache and never evicted. `prune` does not map pieces back to
layers (content addressing has no cheap way to); the cap's LRU eviction bounds them.
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
from pathlib import Path

import xxhash

from imagefs.errors import IntegrityError, StoreError
from imagefs.store import fsutil

log = logging.getLogger("imagefs.cache")

MAGIC = b"IFSP"
HEADER = struct.Struct("<4s4xQ")
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


def piece_payload(raw: bytes) -> bytes | None:
    """The payload of a piece file, or None when it is torn or rotten (header, xxh3)."""
    if len(raw) < HEADER.size:
        return None
    magic, check = HEADER.unpack_from(raw)
    payload = raw[HEADER.size :]
    if magic != MAGIC or xxhash.xxh3_64_intdigest(payload) != check:
        return None
    return payload


def verify_piece(hexd: str, payload: bytes) -> None:
    """The one check that makes bytes a piece: their sha256 is the name they go under."""
    if hashlib.sha256(payload).hexdigest() != hexd:
        raise IntegrityError(f"piece sha256:{hexd[:12]} fails its digest")


class PieceCache:
    """Synchronous and thread-safe. `pread` of an already open piece never blocks for long
    (page cache), so the event loop may call it directly; everything else runs in threads."""

    def __init__(self, root: Path, cap: int = DEFAULT_CACHE_SIZE) -> None:
        self.root = root
        self.dir = root / "cache" / "pieces" / "sha256"
        self.cap = cap
        self._lock = threading.Lock()
        self._fds: OrderedDict[str, tuple[int, int]] = OrderedDict()  # hex -> (fd, size)
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
        return None if got is None else got[1]

    def open(self, hexd: str) -> bool:
        """Make a piece readable by `pread`: open it and check it once. False if absent or
        damaged (a damaged piece is removed, so the next read fetches it again)."""
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
            self.misses += 1
            return False
        try:
            size = os.fstat(fd).st_size
            raw = b"" if hexd in self._checked else os.pread(fd, size, 0)
        except OSError:
            os.close(fd)
            self.misses += 1
            return False
        if hexd in self._checked and size >= HEADER.size:
            self._keep(hexd, fd, size - HEADER.size)
            return True
        if piece_payload(raw) is None:
            os.close(fd)
            self.corrupt += 1
            self.misses += 1
            log.warning("cache piece %s is damaged (torn write or rot); dropping it", hexd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(hexd, dir_fd=self._dir())
            return False
        if len(self._checked) < _MAX_CHECKED:
            self._checked.add(hexd)
        self._keep(hexd, fd, size - HEADER.size)
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

    def _keep(self, hexd: str, fd: int, size: int) -> None:
        closing = []
        with self._lock:
            old = self._fds.pop(hexd, None)
            if old is not None:
                closing.append(old[0])
            self._fds[hexd] = (fd, size)
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
            fd, size = got
            if expect is not None and size != expect:
                raise IntegrityError(
                    f"piece sha256:{hexd[:12]} holds {size} bytes; its index declares {expect}"
                )
            # The fd stays open while we read, even if another thread closes it meanwhile:
            # a dup is cheaper than a race.
            fd = os.dup(fd)
        try:
            data = os.pread(fd, max(0, min(length, size - offset)), HEADER.size + offset)
        finally:
            os.close(fd)
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
        """Keep a piece whose sha256 the caller has checked against `hexd` (`verify_piece`).

        Never fails the read that produced it: a full disk only loses the cache entry.
        """
        if not _NAME.match(hexd):
            raise ValueError(f"not a piece name: {hexd!r}")
        try:
            dfd = self._dir()
        except StoreError as exc:  # a link where the cache directory should be
            log.warning("cannot cache piece %s: %s", hexd[:12], exc)
            return
        tmp = f"{fsutil.TEMP_PREFIX}{hexd[:16]}.{os.getpid()}.{threading.get_ident()}"
        data = HEADER.pack(MAGIC, xxhash.xxh3_64_intdigest(payload)) + payload
        try:
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o644,
                dir_fd=dfd,
            )
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.rename(tmp, hexd, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            log.warning("cannot cache piece %s: %s", hexd[:12], exc)
            return
        self.writes += 1
        if len(self._checked) < _MAX_CHECKED:
            self._checked.add(hexd)  # written from bytes just checked
        with self._lock:
            if self._total is not None:
                self._total += len(data)
        if self._total is None or self._total > self.cap:
            self.evict()

    # -- size cap ---------------------------------------------------------------------------

    def _all_pieces(self) -> list[tuple[float, int, str]]:
        out: list[tuple[float, int, str]] = []
        with contextlib.suppress(FileNotFoundError), os.scandir(self._dir()) as it:
            for entry in it:
                if _NAME.match(entry.name):
                    with contextlib.suppress(FileNotFoundError):
                        st = entry.stat(follow_symlinks=False)
                        out.append((st.st_mtime, st.st_size, entry.name))
        return out

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self._all_pieces())

    def evict(self, target: int | None = None) -> int:
        """Remove least recently used pieces until under `target` (90% of the cap)."""
        pieces = self._all_pieces()
        total = sum(size for _, size, _ in pieces)
        goal = int(self.cap * 0.9) if target is None else target
        freed = 0
        if total > goal:
            for _, size, name in sorted(pieces):
                if total - freed <= goal:
                    break
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
            fds = [fd for fd, _ in self._fds.values()]
            self._fds.clear()
            if self._dirfd is not None:
                fds.append(self._dirfd)
                self._dirfd = None
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
