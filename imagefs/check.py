"""`imagefs check [--repair]`: verify everything the store holds; remove what is wrong.

- every blob in `blobs/` against its sha256 (a blob is named by its digest);
- every piece in `cache/pieces` against its xxh3 checksum and its sha256 (its name);
- every index binding (`store.layerindexes`): a layer-bound index parses and names the blob
  it was built from; a manifest-bound entry's raw bytes hash to the verifier in its name
  and derive to its `.idx`; anything else under `indexes/` (and the layer-keyed
  `indexes/sha256`, `cache/chunks` of earlier versions) cannot be bound and is removed;
- `index.json` parses, and every image it names has its manifest and config;
- leftovers of killed processes: temporary files, empty or stale ingest partials;
- symbolic links (and FIFOs, devices) anywhere under the root: imagefs never follows them,
  and `--repair` removes the link itself, never what it points at.

Without `--repair` it only reports; with it, damaged blobs, pieces and indexes are deleted
(a later pull or read fetches them again) and leftovers are removed. Partial downloads that
are a valid prefix stay: the next pull resumes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from imagefs.errors import ImageFSError, LayerFormatError
from imagefs.layers.layerindex import LayerIndex
from imagefs.lazy.cache import PieceCache
from imagefs.lazy.packs import is_piece_name, read_piece
from imagefs.oci.digest import Digest
from imagefs.oci.manifest import Manifest
from imagefs.store import Layout, Store, fsutil, layout_links, locks
from imagefs.store.blobs import sha256_file
from imagefs.store.layerindexes import KINDS, MAX_RECORD, Bound, LayerIndexStore, derive


@dataclass
class CheckReport:
    blobs: int = 0
    pieces: int = 0
    indexes: int = 0
    images: int = 0
    problems: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_store(root: Path, repair: bool = False) -> CheckReport:
    """Synchronous; takes the store lock so no gc runs meanwhile."""
    report = CheckReport()

    def bad(what: str, path: Path | None = None) -> None:
        report.problems.append(what)
        if repair and path is not None:
            fsutil.safe_rmtree(path, root=root)  # a link: the link itself goes
            report.removed.append(str(path))

    layout_links(root)  # a symlinked root is refused (one line), never repaired
    _find_links(root, bad)
    if layout_links(root):
        return report  # without --repair: the store cannot be looked at safely
    store = Store(root)
    with store.locked():
        for alg, name, path in _files(root, store.paths.blobs, bad):
            report.blobs += 1
            if alg != "sha256" or sha256_file(path, root=root) != f"sha256:{name}":
                bad(f"blob {alg}:{name} does not match its digest", path)

        _check_pieces(root, report, bad)
        _check_indexes(root, report, bad, repair)

        try:
            records = store.records()
        except ImageFSError as exc:
            report.problems.append(str(exc))
            records = []
        for rec in records:
            report.images += 1
            name = str(rec.name or rec.repo_digest or rec.manifest.digest)
            try:
                manifest = store.read_manifest(rec.manifest.digest)
                if isinstance(manifest, Manifest):
                    store.blobs.read(manifest.config.digest)
            except ImageFSError as exc:
                report.problems.append(f"image {name}: {exc} (pull it again)")

        ingest = store.paths.ingest
        for entry in fsutil.scan(ingest, root=root):
            if entry.kind != "file" or not entry.name.endswith(".partial"):
                continue
            stem = entry.name.removesuffix(".partial")
            fd = locks.try_lock(ingest / f"{stem}.lock", root=root)
            if fd is None and fsutil.lstat(ingest / f"{stem}.lock", root=root) is not None:
                continue  # a pull is writing it right now
            if fd is not None:
                os.close(fd)
            if entry.size == 0:
                bad(f"empty partial download {ingest / entry.name}", ingest / entry.name)
        for tmp in _temp_files(root):
            bad(f"leftover temporary file {tmp}", tmp)
    return report


def _files(
    root: Path, area: Path, temp: Callable[[str, Path], None] | None = None
) -> Iterator[tuple[str, str, Path]]:
    """(subdirectory, name, path) of the regular files in `area/*/` (links were reported
    by `_find_links`); temp files go to `temp` when given."""
    for sub in fsutil.scan(area, root=root):
        if sub.kind != "dir":
            continue
        for entry in fsutil.scan(area / sub.name, root=root):
            path = area / sub.name / entry.name
            if entry.kind != "file":
                continue
            if temp is not None and entry.name.startswith(fsutil.TEMP_PREFIX):
                temp(f"leftover temporary file {path}", path)
                continue
            yield sub.name, entry.name, path


def _walk(root: Path) -> Iterator[tuple[Path, str, int, os.stat_result]]:
    """(directory, name, directory fd, lstat) of everything under `root`; no link followed."""
    not_walked = {p.name for p in Layout(root).not_walked()}
    rfd = fsutil.open_dir(root, root=root)
    try:
        for top, dirs, files, dfd in os.fwalk(".", dir_fd=rfd, follow_symlinks=False):
            names = sorted(dirs + files)
            # The build areas hold image contents (with their own links) and a running
            # build's mounts: listed (a link there is reported and removed like any other),
            # never descended into.
            if top == ".":
                dirs[:] = [d for d in dirs if d not in not_walked]  # fwalk honours this
            here = root / top if top != "." else root
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    yield here, name, dfd, os.stat(name, dir_fd=dfd, follow_symlinks=False)
    finally:
        os.close(rfd)


def _find_links(root: Path, bad: Callable[[str, Path], None]) -> None:
    """Symbolic links, FIFOs and devices under the root: never imagefs's own (it makes
    regular files, directories and its mounts' sockets only)."""
    for here, name, dfd, st in _walk(root):
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            with contextlib.suppress(OSError):
                target = os.readlink(name, dir_fd=dfd)
                bad(f"symbolic link {here / name} -> {target} (never followed)", here / name)
                continue
            bad(f"symbolic link {here / name} (never followed)", here / name)
        elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISSOCK(mode)):
            bad(f"{here / name} is not a regular file (never opened)", here / name)


def _temp_files(root: Path) -> list[Path]:
    """Temporary files outside blobs/ (reported with their blobs above)."""
    out: list[Path] = []
    blobs = Layout(root).blobs.name
    for here, name, _, st in _walk(root):
        rel = (here / name).relative_to(root).parts
        if not name.startswith(fsutil.TEMP_PREFIX) or not stat.S_ISREG(st.st_mode):
            continue
        if rel[0] == blobs:
            continue
        out.append(here / name)
    return out


Bad = Callable[[str, "Path | None"], None]


def _check_pieces(root: Path, report: CheckReport, bad: Bad) -> None:
    pieces = PieceCache(root).dir
    for entry in fsutil.scan(pieces, root=root):
        path = pieces / entry.name
        if entry.name.startswith(fsutil.TEMP_PREFIX) or entry.kind in ("link", "other"):
            continue  # reported with the other leftovers / by _find_links
        if not is_piece_name(entry.name) or entry.kind != "file":
            bad(f"stray file in the cache: {path}", path)
            continue
        report.pieces += 1
        try:
            fd = fsutil.safe_open(pieces, entry.name, os.O_RDONLY, root=root)
        except FileNotFoundError:
            continue  # evicted while we looked
        except ImageFSError as exc:  # swapped for something else since the scan
            bad(f"cache piece {path}: {exc}", path)
            continue
        try:
            payload = read_piece(fd, entry.name)  # its own bytes in its pack, self-checked
        finally:
            os.close(fd)
        if payload is None or hashlib.sha256(payload).hexdigest() != path.name:
            bad(f"cache piece {path} is damaged", path)


def _check_indexes(root: Path, report: CheckReport, bad: Bad, repair: bool) -> None:
    store = LayerIndexStore(root)
    paths = Layout(root)
    old, chunks = paths.old_areas()
    if _is_dir(root, old):
        bad(f"layer indexes of an earlier version, bound to no manifest: {old}", old)
    if _is_dir(root, chunks):
        bad(f"chunk cache of an earlier version, keyed by offsets: {chunks}", chunks)
    layer_dir = paths.layer_indexes / "sha256"
    if _is_dir(root, layer_dir):
        for entry in fsutil.scan(layer_dir, root=root):
            path = layer_dir / entry.name
            if entry.name.startswith(fsutil.TEMP_PREFIX) or entry.kind in ("link", "other"):
                continue
            report.indexes += 1
            try:
                digest = Digest.parse(f"sha256:{path.name}")
            except ImageFSError:
                bad(f"stray file among layer indexes: {path}", path)
                continue
            try:
                if entry.kind != "file":
                    raise LayerFormatError("not a regular file")
                data = fsutil.read_bytes(path, root=root, limit=MAX_RECORD)
                idx = LayerIndex.from_bytes(digest, data or b"")
                if idx.seek is None or idx.seek.blob_digest != str(digest):
                    raise LayerFormatError("not built from this layer's blob")
            except ImageFSError as exc:
                bad(f"layer index {path}: {exc}", path)
    bound_root = paths.bound_indexes / "sha256"
    if _is_dir(root, bound_root):
        for layer_entry in fsutil.scan(bound_root, root=root):
            layer_path = bound_root / layer_entry.name
            if layer_entry.kind in ("link", "other"):
                continue  # reported by _find_links
            if layer_entry.kind != "dir":
                bad(f"stray file among bound indexes: {layer_path}", layer_path)
                continue
            # lstat-based and from the root: links and FIFOs were reported by _find_links
            entries = fsutil.scan(layer_path, root=root)
            names = {e.name for e in entries}
            for entry in entries:
                path = layer_path / entry.name
                if entry.name.startswith(fsutil.TEMP_PREFIX) or entry.kind in ("link", "other"):
                    continue
                if entry.name.endswith(".idx"):
                    if entry.name[: -len(".idx")] not in names:
                        bad(f"derived index {path} has no verified bytes", path)
                    continue
                report.indexes += 1
                why = _bound_problem(store, layer_path.name, entry.name)
                if why is not None:
                    bad(f"index {path}: {why}", path)
                    if repair:
                        fsutil.safe_unlink(path.with_name(entry.name + ".idx"), root=root)


def _is_dir(root: Path, path: Path) -> bool:
    """A real directory (not a link to one), reached without following links."""
    return fsutil.is_real_dir(path, root=root)


def _bound_problem(store: LayerIndexStore, layer_hex: str, name: str) -> str | None:
    kind, _, hexd = name.partition("-")
    try:
        bound = Bound(Digest.parse(f"sha256:{layer_hex}"), kind, Digest.parse(f"sha256:{hexd}"))
    except ImageFSError:
        return "not a (layer, kind, verifier) name"
    if kind not in KINDS:
        return f"unknown kind {kind!r}"
    try:
        raw = store.load_raw(bound, drop_damaged=False)
        if raw is None:
            return "damaged"
        idx = derive(bound, *raw)
        # bounded, never through a link, never a FIFO (it would hang check)
        derived = fsutil.read_bytes(store.derived_path(bound), root=store.root, limit=MAX_RECORD)
    except ImageFSError as exc:
        return str(exc)
    if derived is not None and derived != idx.to_bytes():
        return "its derived index is not what its verified bytes say"
    return None
