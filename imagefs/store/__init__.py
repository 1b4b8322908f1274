"""The local store under `--root`: an OCI image layout plus imagefs's own working areas.

```
ROOT/oci-layout, index.json, blobs/sha256/<hex>   the OCI layout (skopeo/umoci can read it)
ROOT/ingest/<hex>.partial|.lock                     downloads in progress (resumable)
ROOT/leases/<pid>-<n>                               blobs a running command is about to use
ROOT/mounts/<id>.json                               live mounts (see imagefs.fs)
ROOT/lock                                           taken by writers of index.json and by gc
```

Garbage collection keeps every blob reachable from `index.json` and from a live lease. A
lease is a file its owner holds an flock on; a lease whose owner died is unlocked, so gc knows
to ignore and remove it. That lets `pull` and `prune` run at the same time without `prune`
deleting a blob that `pull` has stored but not yet named.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from imagefs.errors import StoreError
from imagefs.oci.digest import Digest
from imagefs.oci.manifest import Index, Manifest, parse_manifest
from imagefs.store import fsutil, locks
from imagefs.store.blobs import BlobStore, Ingest
from imagefs.store.refs import ImageRecord, RefStore

__all__ = ["BlobStore", "ImageRecord", "Ingest", "Lease", "MountRecord", "Store"]

_lease_counter = itertools.count()


@dataclass(frozen=True)
class MountRecord:
    mountpoint: str
    pid: int
    image: str
    manifest_digest: str
    started: str


class Lease:
    """Protects the listed blobs from gc while the owning process lives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        import fcntl

        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def add(self, *digests: Digest) -> None:
        if digests:
            os.write(self._fd, "".join(f"{d}\n" for d in digests).encode())

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)


class Store:
    """Facade over blobs, references, leases and mounts. Synchronous."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = BlobStore(root)
        self.refs = RefStore(root)
        self.mounts_dir = root / "mounts"
        self.leases_dir = root / "leases"
        self._init_layout()

    def _init_layout(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            layout = self.root / "oci-layout"
            if not layout.exists():
                fsutil.atomic_write(layout, b'{"imageLayoutVersion":"1.0.0"}\n')
            if not self.refs.path.exists():
                with self.locked():
                    if not self.refs.path.exists():
                        self.refs.save([])
        except OSError as exc:
            raise fsutil.os_error(exc, self.root, "creating the store in") from exc

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive: for read-modify-write of index.json and for gc."""
        with locks.locked(self.root / "lock"):
            yield

    @contextlib.contextmanager
    def lease(self) -> Iterator[Lease]:
        lease = Lease(self.leases_dir / f"{os.getpid()}-{next(_lease_counter)}")
        try:
            yield lease
        finally:
            lease.release()

    # -- reading images ---------------------------------------------------------------------

    def records(self) -> list[ImageRecord]:
        return self.refs.load()

    def read_manifest(self, digest: Digest) -> Manifest | Index:
        return parse_manifest(self.blobs.read(digest), None)

    # -- garbage collection -----------------------------------------------------------------

    def _live_lease_digests(self) -> set[str]:
        live: set[str] = set()
        if not self.leases_dir.is_dir():
            return live
        for path in self.leases_dir.iterdir():
            fd = locks.try_lock(path)
            if fd is not None:  # nobody holds it: its owner is gone
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                os.close(fd)
                continue
            with contextlib.suppress(FileNotFoundError):
                live.update(path.read_text().split())
        return live

    def reachable(self, records: Iterable[ImageRecord]) -> set[str]:
        """Digests (as strings) of every blob the given images need."""
        keep: set[str] = set()
        for rec in records:
            keep.add(str(rec.manifest.digest))
            if rec.index_digest is not None:
                keep.add(str(rec.index_digest))
            try:
                manifest = self.read_manifest(rec.manifest.digest)
            except StoreError:
                continue
            if isinstance(manifest, Manifest):
                keep.add(str(manifest.config.digest))
                keep.update(str(layer.digest) for layer in manifest.layers)
        # Layers `imagefs build` keeps for reuse (see imagefs.build.cache).
        from imagefs.build.cache import cached_layer_digests

        keep.update(cached_layer_digests(self.root))
        return keep

    def collect_garbage(
        self, candidates: Iterable[Digest] | None = None
    ) -> list[tuple[Digest, int]]:
        """Delete unreachable blobs (all of them, or only among `candidates`). Hold `locked`."""
        keep = self.reachable(self.records()) | self._live_lease_digests()
        pool = list(self.blobs.iter_digests()) if candidates is None else list(candidates)
        freed: list[tuple[Digest, int]] = []
        for digest in pool:
            if str(digest) in keep:
                continue
            size = self.blobs.delete(digest)
            if size or candidates is None:
                freed.append((digest, size))
        return freed

    # -- mounts -----------------------------------------------------------------------------

    def active_mounts(self) -> list[MountRecord]:
        """Mounts whose daemon still holds its record's lock (dead ones are cleaned up)."""
        found: list[MountRecord] = []
        if not self.mounts_dir.is_dir():
            return found
        for path in sorted(self.mounts_dir.glob("*.json")):
            fd = locks.try_lock(path)
            if fd is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                os.close(fd)
                continue
            with contextlib.suppress(Exception):
                found.append(MountRecord(**json.loads(path.read_text())))
        return found
