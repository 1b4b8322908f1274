"""Content-addressed blobs, ingested the containerd way.

Bytes arrive in `ingest/<hex>.partial`; only when their size and digest match the promise are
they fsynced and renamed to `blobs/<alg>/<hex>`. So a blob that is visible is always whole and
correct, and a partial file left by a killed process is resumed (with a Range request) by the
next ingest of the same digest. One flock per digest makes concurrent ingests of one blob
wait for each other instead of downloading twice.

Every access goes through `fsutil` with `root=`: a symlink planted at a blob's name, at a
partial download or at one of these directories is never followed (see fsutil).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from imagefs.errors import IntegrityError, StoreError
from imagefs.oci.digest import Digest
from imagefs.store import fsutil, locks
from imagefs.store.layout import Layout

_READ_CHUNK = 1 << 20

log = logging.getLogger("imagefs.store")


class BlobStore:
    """`ROOT/blobs/sha256/<hex>` plus the ingest area. Synchronous: call from a thread."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs_dir = Layout(root).blobs
        self.ingest_dir = Layout(root).ingest

    def path(self, digest: Digest) -> Path:
        return self.blobs_dir / digest.algorithm / digest.hex

    def _lstat(self, digest: Digest) -> os.stat_result | None:
        """The blob's lstat; None when missing or when a link or other non-file sits there."""
        st = fsutil.lstat(self.path(digest), root=self.root)
        return st if st is not None and stat.S_ISREG(st.st_mode) else None

    def has(self, digest: Digest) -> bool:
        return self._lstat(digest) is not None

    def size(self, digest: Digest) -> int | None:
        st = self._lstat(digest)
        return None if st is None else st.st_size

    def open(self, digest: Digest) -> io.BufferedReader:
        """The stored blob for reading (never through a link). NotFound-style StoreError
        when missing."""
        path = self.path(digest)
        try:
            fd = fsutil.safe_open(path.parent, path.name, os.O_RDONLY, root=self.root)
        except FileNotFoundError:
            raise StoreError(f"blob {digest} is missing from the store") from None
        return os.fdopen(fd, "rb")

    def read(self, digest: Digest) -> bytes:
        """A whole (small) blob: manifests and configs. Verified again, they are cheap."""
        data = fsutil.read_bytes(self.path(digest), root=self.root)
        if data is None:
            raise StoreError(f"blob {digest} is missing from the store")
        digest.verify(data)
        return data

    def put(self, data: bytes, digest: Digest | None = None) -> Digest:
        """Store a small blob held in memory, after checking it against `digest`."""
        actual = Digest.of(data) if digest is None else digest
        actual.verify(data)
        if not self.has(actual):
            fsutil.atomic_write(self.path(actual), data, root=self.root)
        return actual

    def delete(self, digest: Digest) -> int:
        """Remove a blob; returns the bytes freed (0 if it was not there). A link planted at
        its name is removed itself (0 bytes), never what it points at."""
        target = self.path(digest)
        st = fsutil.lstat(target, root=self.root)
        if st is None or stat.S_ISDIR(st.st_mode):
            return 0
        fsutil.safe_unlink(target, root=self.root)
        return st.st_size if stat.S_ISREG(st.st_mode) else 0

    def iter_digests(self) -> Iterator[Digest]:
        """Digests named in blobs/ (regular files only; links and directories skipped)."""
        for alg in fsutil.scan(self.blobs_dir, root=self.root):
            if alg.kind != "dir":
                continue
            for entry in fsutil.scan(self.blobs_dir / alg.name, root=self.root):
                if entry.kind != "file" or entry.name.startswith(fsutil.TEMP_PREFIX):
                    continue
                with contextlib.suppress(Exception):
                    yield Digest.parse(f"{alg.name}:{entry.name}")

    @contextlib.contextmanager
    def ingest(self, digest: Digest, size: int) -> Iterator[Ingest | None]:
        """Exclusive right to write `digest`; yields None when the blob is already stored.

        Another process ingesting the same digest makes this wait, and then usually
        yields None because that process stored it.
        """
        fsutil.ensure_dir(self.ingest_dir, root=self.root)
        with locks.locked(self.ingest_dir / f"{digest.hex}.lock", root=self.root):
            if self.has(digest):
                yield None
                return
            ingest = Ingest(self, digest, size)
            try:
                yield ingest
            finally:
                ingest.close()


class Ingest:
    """An open partial file for one digest. `offset` is where a resumed download starts."""

    def __init__(self, store: BlobStore, digest: Digest, size: int) -> None:
        self.store = store
        self.digest = digest
        self.size = size
        self.partial = store.ingest_dir / f"{digest.hex}.partial"
        self._hasher: Any = digest.new_hasher()
        self._file = self._open_partial()
        self.offset = self._rehash_existing()

    def _open_partial(self) -> BinaryIO:
        """The partial file, appended to. We hold its digest's lock, so anything odd at its
        name — a planted link, a FIFO, a file with other hard links (its bytes are shared
        with a file outside our control) — is ours to remove and start afresh."""
        root, name = self.store.root, self.partial.name
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND
        try:
            with fsutil.dir_fd(self.store.ingest_dir, root=root) as d:
                for _ in range(3):
                    try:
                        fd = fsutil.safe_open(d, name, flags)
                    except fsutil.LinkInStore:
                        log.warning("%s: not a regular file; removed, not followed", self.partial)
                        os.unlink(name, dir_fd=d)
                        continue
                    if os.fstat(fd).st_nlink > 1:
                        os.close(fd)
                        log.warning("%s: has other hard links; removed", self.partial)
                        os.unlink(name, dir_fd=d)
                        continue
                    return os.fdopen(fd, "ab+")
        except OSError as exc:
            raise fsutil.os_error(exc, self.partial, "opening") from exc
        raise StoreError(f"{self.partial} keeps being replaced; is another user tampering?")

    def _rehash_existing(self) -> int:
        """Resume: hash what an earlier, interrupted ingest already wrote."""
        self._file.seek(0)
        done = 0
        while chunk := self._file.read(_READ_CHUNK):
            self._hasher.update(chunk)
            done += len(chunk)
        if done > self.size:  # cannot be a prefix of the promised blob
            self.reset()
            return 0
        return done

    def reset(self) -> None:
        """Throw away what was written (the source did not honour Range, or lied)."""
        self._file.seek(0)
        self._file.truncate()
        self._hasher = self.digest.new_hasher()
        self.offset = 0

    def write(self, data: bytes) -> None:
        if self.offset + len(data) > self.size:
            self.reset()
            raise IntegrityError(
                f"blob {self.digest}: more data than the {self.size} bytes the manifest declares"
            )
        try:
            self._file.write(data)
        except OSError as exc:
            self.reset()
            raise fsutil.os_error(exc, self.partial, "writing") from exc
        self._hasher.update(data)
        self.offset += len(data)

    def commit(self) -> Path:
        """Check size and digest, fsync, and make the blob visible."""
        if self.offset != self.size:
            raise IntegrityError(
                f"blob {self.digest}: got {self.offset} bytes, the manifest declares {self.size}"
            )
        actual = f"{self.digest.algorithm}:{self._hasher.hexdigest()}"
        if actual != str(self.digest):
            self.reset()
            raise IntegrityError(f"blob {self.digest}: content has digest {actual}; discarded")
        target = self.store.path(self.digest)
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            fsutil.replace(self.partial, target, root=self.store.root)
        except OSError as exc:
            raise fsutil.os_error(exc, target, "storing") from exc
        return target

    def close(self) -> None:
        empty = self.offset == 0
        self._file.close()
        # An empty partial is worth nothing to a resume; a non-empty one is kept.
        if empty:
            with contextlib.suppress(OSError, StoreError):
                st = fsutil.lstat(self.partial, root=self.store.root)
                if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == 0:
                    fsutil.safe_unlink(self.partial, root=self.store.root)


def sha256_file(path: Path, *, root: Path | None = None) -> str:
    h = hashlib.sha256()
    fd = fsutil.safe_open(path.parent, path.name, os.O_RDONLY, root=root)
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"
