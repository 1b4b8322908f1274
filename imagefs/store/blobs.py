"""Content-addressed blobs, ingested the containerd way.

Bytes arrive in `ingest/<hex>.partial`; only when their size and digest match the promise are
they fsynced and renamed to `blobs/<alg>/<hex>`. So a blob that is visible is always whole and
correct, and a partial file left by a killed process is resumed (with a Range request) by the
next ingest of the same digest. One flock per digest makes concurrent ingests of one blob
wait for each other instead of downloading twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imagefs.errors import IntegrityError, StoreError
from imagefs.oci.digest import Digest
from imagefs.store import fsutil, locks

_READ_CHUNK = 1 << 20


class BlobStore:
    """`ROOT/blobs/sha256/<hex>` plus the ingest area. Synchronous: call from a thread."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs_dir = root / "blobs"
        self.ingest_dir = root / "ingest"

    def path(self, digest: Digest) -> Path:
        return self.blobs_dir / digest.algorithm / digest.hex

    def has(self, digest: Digest) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: Digest) -> int | None:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def read(self, digest: Digest) -> bytes:
        """A whole (small) blob: manifests and configs. Verified again, they are cheap."""
        try:
            data = self.path(digest).read_bytes()
        except FileNotFoundError:
            raise StoreError(f"blob {digest} is missing from the store") from None
        digest.verify(data)
        return data

    def put(self, data: bytes, digest: Digest | None = None) -> Digest:
        """Store a small blob held in memory, after checking it against `digest`."""
        actual = Digest.of(data) if digest is None else digest
        actual.verify(data)
        target = self.path(actual)
        if not target.exists():
            fsutil.atomic_write(target, data)
        return actual

    def delete(self, digest: Digest) -> int:
        """Remove a blob; returns the bytes freed (0 if it was not there)."""
        target = self.path(digest)
        try:
            size = target.stat().st_size
            target.unlink()
        except FileNotFoundError:
            return 0
        return size

    def iter_digests(self) -> Iterator[Digest]:
        for alg_dir in sorted(self.blobs_dir.glob("*")):
            for entry in sorted(alg_dir.iterdir()):
                if entry.name.startswith(fsutil.TEMP_PREFIX):
                    continue
                with contextlib.suppress(Exception):
                    yield Digest.parse(f"{alg_dir.name}:{entry.name}")

    @contextlib.contextmanager
    def ingest(self, digest: Digest, size: int) -> Iterator[Ingest | None]:
        """Exclusive right to write `digest`; yields None when the blob is already stored.

        Another process ingesting the same digest makes this wait, and then usually
        yields None because that process stored it.
        """
        self.ingest_dir.mkdir(parents=True, exist_ok=True)
        with locks.locked(self.ingest_dir / f"{digest.hex}.lock"):
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
        try:
            self._file = open(self.partial, "ab+")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise fsutil.os_error(exc, self.partial, "opening") from exc
        self.offset = self._rehash_existing()

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
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.partial, target)
            fsutil.fsync_dir(target.parent)
        except OSError as exc:
            raise fsutil.os_error(exc, target, "storing") from exc
        return target

    def close(self) -> None:
        self._file.close()
        # An empty partial is worth nothing to a resume; a non-empty one is kept.
        with contextlib.suppress(FileNotFoundError):
            if self.partial.stat().st_size == 0:
                self.partial.unlink()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"
