"""The local store under `--root`: an OCI image layout plus imagefs's own working areas.

Every path under the root is named in `store.layout` (`Store.paths`).

Garbage collection keeps every blob reachable from `index.json` and from a live lease. A
lease is a file its owner holds an flock on; a lease whose owner died is unlocked, so gc knows
to ignore and remove it. That lets `pull` and `prune` run at the same time without `prune`
deleting a blob that `pull` has stored but not yet named.

Nothing under the root is reached through a symbolic link (see `fsutil`): a store whose own
directories (`STORE_DIRS`) are links is refused with one line, and links planted among blobs,
leases or mount records are skipped, never followed; `imagefs check --repair` removes them.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from imagefs.errors import ImageFSError, StoreError
from imagefs.oci.digest import Digest
from imagefs.oci.manifest import Index, Manifest, parse_manifest
from imagefs.store import fsutil, locks
from imagefs.store.blobs import BlobStore, Ingest
from imagefs.store.layout import STORE_DIRS, Layout
from imagefs.store.refs import ImageRecord, RefStore

__all__ = [
    "STORE_DIRS",
    "BlobStore",
    "ImageRecord",
    "Ingest",
    "Layout",
    "Lease",
    "MountRecord",
    "Store",
]

_lease_counter = itertools.count()


def layout_links(root: Path) -> list[Path]:
    """The store's own directories that are symbolic links (or not directories at all).

    A symlinked root is an error here (StoreError): unlike its subdirectories it is the
    administrator's choice, so `check --repair` must not remove it either."""
    st = os.lstat(root) if os.path.lexists(root) else None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise fsutil.LinkInStore(
            f"store root {root} is a symbolic link; imagefs never follows links in its "
            "store (use the real path with --root)"
        )
    bad: list[Path] = []
    for rel in STORE_DIRS:
        path = root / rel
        if path.parent in bad:
            continue
        try:
            lst = fsutil.lstat(path, root=root)
        except fsutil.LinkInStore:
            continue  # its parent is in `bad` already
        except FileNotFoundError:
            continue
        if lst is not None and not stat.S_ISDIR(lst.st_mode):
            bad.append(path)
    return bad


@dataclass(frozen=True)
class MountRecord:
    mountpoint: str
    pid: int
    image: str
    manifest_digest: str
    started: str


class Lease:
    """Protects the listed blobs from gc while the owning process lives."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.path = Layout(root).leases / name
        # O_EXCL: a name nobody (no planted link) had; locked before gc can see it as dead.
        self._fd = fsutil.safe_open(
            self.path.parent, name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, root=root
        )
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def add(self, *digests: Digest) -> None:
        if digests:
            os.write(self._fd, "".join(f"{d}\n" for d in digests).encode())

    def release(self) -> None:
        with contextlib.suppress(StoreError):
            fsutil.safe_unlink(self.path, root=self.root)
        os.close(self._fd)


def _read_fd(fd: int, limit: int = 64 << 20) -> bytes:
    """What an open (locked) record holds, read from the fd we have: never a second open.
    Bounded: a lease lists digests (~72 bytes each), a mount record is one small object."""
    return os.pread(fd, min(os.fstat(fd).st_size, limit), 0)


def _build_cache_layers(root: Path) -> set[str]:
    """Layer digests `imagefs build` keeps for reuse: gc keeps them (and their indexes).

    `imagefs.build.cache` writes `build-cache/<key>/step.json`; the store reads only the
    layer digest from it, so that gc needs nothing from the layers above it."""
    out: set[str] = set()
    cache_dir = Layout(root).build_cache
    for entry in fsutil.scan(cache_dir, root=root):  # no link followed
        if entry.kind != "dir":
            continue
        with contextlib.suppress(ImageFSError, OSError, ValueError, KeyError, TypeError):
            raw = fsutil.read_bytes(cache_dir / entry.name / "step.json", root=root, limit=1 << 20)
            layer = None if raw is None else json.loads(raw)["layer"]
            if layer:
                out.add(str(Digest.parse(layer["digest"])))
    return out


class Store:
    """Facade over blobs, references, leases and mounts. Synchronous."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths = Layout(root)
        self.blobs = BlobStore(root)
        self.refs = RefStore(root)
        self.mounts_dir = self.paths.mounts
        self.leases_dir = self.paths.leases
        self._init_layout()

    def _init_layout(self) -> None:
        bad = layout_links(self.root)
        if bad:
            raise fsutil.LinkInStore(
                f"store directory {bad[0]} is a symbolic link or not a directory; imagefs "
                "never follows links in its store (`imagefs check --repair` removes it)"
            )
        try:
            fsutil.ensure_dir(self.root, root=self.root)
            layout = self.paths.oci_layout
            if fsutil.lstat(layout, root=self.root) is None:
                fsutil.atomic_write(layout, b'{"imageLayoutVersion":"1.0.0"}\n', root=self.root)
            if not self.refs.exists():
                with self.locked():
                    if not self.refs.exists():
                        self.refs.save([])
        except OSError as exc:
            raise fsutil.os_error(exc, self.root, "creating the store in") from exc

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive: for read-modify-write of index.json and for gc."""
        with locks.locked(self.paths.lock, root=self.root):
            yield

    @contextlib.contextmanager
    def lease(self) -> Iterator[Lease]:
        name = f"{os.getpid()}-{next(_lease_counter)}-{secrets.token_hex(4)}"
        lease = Lease(self.root, name)
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
        for entry in fsutil.scan(self.leases_dir, root=self.root):
            if entry.kind != "file":
                continue  # a planted link is not a lease: never opened (check --repair)
            content = self._locked_by_someone(self.leases_dir / entry.name)
            if content is not None:
                live.update(content.decode(errors="replace").split())
        return live

    def _locked_by_someone(self, path: Path) -> bytes | None:
        """The content of a record some live process holds locked; a record nobody holds
        (its owner died) is removed and None returned, like one that is not a file."""
        try:
            fd = locks.try_lock(path, root=self.root)
        except fsutil.LinkInStore:
            return None  # swapped for a link since the scan: not ours to follow
        if fd is not None:  # nobody holds it: its owner is gone
            with contextlib.suppress(StoreError):
                fsutil.safe_unlink(path, root=self.root)
            os.close(fd)
            return None
        try:
            fd = fsutil.safe_open(path.parent, path.name, os.O_RDONLY, root=self.root)
        except (FileNotFoundError, fsutil.LinkInStore):
            return None
        try:
            return _read_fd(fd)
        finally:
            os.close(fd)

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
        keep.update(_build_cache_layers(self.root))
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
        for entry in fsutil.scan(self.mounts_dir, root=self.root):
            if entry.kind != "file" or not entry.name.endswith(".json"):
                continue
            content = self._locked_by_someone(self.mounts_dir / entry.name)
            if content is not None:
                with contextlib.suppress(Exception):
                    found.append(MountRecord(**json.loads(content)))
        return found

    def mount_records(self) -> list[tuple[MountRecord, bool]]:
        """Every readable mount record with whether its daemon still holds it (alive).

        Unlike `active_mounts` this removes nothing: `umount` needs a dead daemon's record
        to recognise the mount it left behind."""
        out: list[tuple[MountRecord, bool]] = []
        for entry in fsutil.scan(self.mounts_dir, root=self.root):
            if entry.kind != "file" or not entry.name.endswith(".json"):
                continue
            path = self.mounts_dir / entry.name
            try:
                fd = fsutil.safe_open(path.parent, path.name, os.O_RDWR, root=self.root)
            except (FileNotFoundError, fsutil.LinkInStore):
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    alive = False
                except BlockingIOError:
                    alive = True
                with contextlib.suppress(Exception):
                    out.append((MountRecord(**json.loads(_read_fd(fd))), alive))
            finally:
                os.close(fd)
        return out
