"""`imagefs check [--repair]`: verify everything the store holds; remove what is wrong.

- every blob in `blobs/` against its sha256 (a blob is named by its digest);
- every piece in `cache/pieces` against its xxh3 checksum and its sha256 (its name);
- every index binding (`layers.indexstore`): a layer-bound index parses and names the blob
  it was built from; a manifest-bound entry's raw bytes hash to the verifier in its name
  and derive to its `.idx`; anything else under `indexes/` (and the layer-keyed
  `indexes/sha256`, `cache/chunks` of earlier versions) cannot be bound and is removed;
- `index.json` parses, and every image it names has its manifest and config;
- leftovers of killed processes: temporary files, empty or stale ingest partials.

Without `--repair` it only reports; with it, damaged blobs, pieces and indexes are deleted
(a later pull or read fetches them again) and leftovers are removed. Partial downloads that
are a valid prefix stay: the next pull resumes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from imagefs.errors import ImageFSError, LayerFormatError
from imagefs.layers.index import LayerIndex
from imagefs.layers.indexstore import KINDS, Bound, IndexStore, derive
from imagefs.lazy.cache import PieceCache, is_piece_name, piece_payload
from imagefs.oci.digest import Digest
from imagefs.oci.manifest import Manifest
from imagefs.store import Store, fsutil, locks
from imagefs.store.blobs import sha256_file


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
    store = Store(root)
    report = CheckReport()

    def bad(what: str, path: Path | None = None) -> None:
        report.problems.append(what)
        if repair and path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            report.removed.append(str(path))

    with store.locked():
        for alg_dir in sorted((root / "blobs").glob("*")):
            for path in sorted(alg_dir.iterdir()):
                if path.name.startswith(fsutil.TEMP_PREFIX):
                    bad(f"leftover temporary file {path}", path)
                    continue
                report.blobs += 1
                if alg_dir.name != "sha256" or sha256_file(path) != f"sha256:{path.name}":
                    bad(f"blob {alg_dir.name}:{path.name} does not match its digest", path)

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

        ingest = root / "ingest"
        if ingest.is_dir():
            for path in sorted(ingest.glob("*.partial")):
                fd = locks.try_lock(ingest / f"{path.stem}.lock")
                if fd is None:
                    continue  # a pull is writing it right now
                os.close(fd)
                if path.stat().st_size == 0:
                    bad(f"empty partial download {path}", path)
        # build-cache/build-tmp hold image contents (and a running build's mounts), not the
        # store's own files: never walked.
        tops = [p for p in root.iterdir() if p.name not in ("build-cache", "build-tmp")]
        temps = (t for top in tops for t in [top, *(top.rglob("*") if top.is_dir() else ())])
        for tmp in sorted(t for t in temps if t.name.startswith(fsutil.TEMP_PREFIX)):
            if "blobs" in tmp.parts:
                continue  # reported above
            bad(f"leftover temporary file {tmp}", tmp)
    return report


Bad = Callable[[str, "Path | None"], None]


def _check_pieces(root: Path, report: CheckReport, bad: Bad) -> None:
    pieces = PieceCache(root).dir
    if not pieces.is_dir():
        return
    for path in sorted(pieces.iterdir()):
        if path.name.startswith(fsutil.TEMP_PREFIX):
            continue  # reported with the other leftovers
        if not is_piece_name(path.name) or path.is_symlink() or not path.is_file():
            bad(f"stray file in the cache: {path}", path)
            continue
        report.pieces += 1
        payload = piece_payload(path.read_bytes())
        if payload is None or hashlib.sha256(payload).hexdigest() != path.name:
            bad(f"cache piece {path} is damaged", path)


def _check_indexes(root: Path, report: CheckReport, bad: Bad, repair: bool) -> None:
    store = IndexStore(root)
    old = store.dir / "sha256"  # layer-keyed indexes of earlier versions: bound to nothing
    if old.is_dir():
        bad(f"layer indexes of an earlier version, bound to no manifest: {old}", None)
        if repair:
            shutil.rmtree(old, ignore_errors=True)
            report.removed.append(str(old))
    chunks = root / "cache" / "chunks"
    if chunks.is_dir():
        bad(f"chunk cache of an earlier version, keyed by offsets: {chunks}", None)
        if repair:
            shutil.rmtree(chunks, ignore_errors=True)
            report.removed.append(str(chunks))
    layer_dir = store.dir / "layer" / "sha256"
    if layer_dir.is_dir():
        for path in sorted(layer_dir.iterdir()):
            if path.name.startswith(fsutil.TEMP_PREFIX):
                continue
            report.indexes += 1
            try:
                digest = Digest.parse(f"sha256:{path.name}")
            except ImageFSError:
                bad(f"stray file among layer indexes: {path}", path)
                continue
            try:
                if path.is_symlink():
                    raise LayerFormatError("a symlink")
                idx = LayerIndex.from_bytes(digest, path.read_bytes())
                if idx.seek is None or idx.seek.blob_digest != str(digest):
                    raise LayerFormatError("not built from this layer's blob")
            except ImageFSError as exc:
                bad(f"layer index {path}: {exc}", path)
    bound_root = store.dir / "bound" / "sha256"
    if bound_root.is_dir():
        for layer_path in sorted(bound_root.iterdir()):
            if layer_path.is_symlink() or not layer_path.is_dir():
                bad(f"stray file among bound indexes: {layer_path}", layer_path)
                continue
            for path in sorted(layer_path.iterdir()):
                if path.name.startswith(fsutil.TEMP_PREFIX) or path.name.endswith(".idx"):
                    continue
                report.indexes += 1
                why = _bound_problem(store, layer_path.name, path.name)
                if why is not None:
                    bad(f"index {path}: {why}", path)
                    derived = path.with_name(path.name + ".idx")
                    if repair and derived.exists():
                        derived.unlink()
            for path in sorted(layer_path.glob("*.idx")):
                if not path.with_name(path.name[: -len(".idx")]).exists():
                    bad(f"derived index {path} has no verified bytes", path)


def _bound_problem(store: IndexStore, layer_hex: str, name: str) -> str | None:
    kind, _, hexd = name.partition("-")
    try:
        bound = Bound(Digest.parse(f"sha256:{layer_hex}"), kind, Digest.parse(f"sha256:{hexd}"))
    except ImageFSError:
        return "not a (layer, kind, verifier) name"
    if kind not in KINDS:
        return f"unknown kind {kind!r}"
    raw = store.load_raw(bound, drop_damaged=False)
    if raw is None:
        return "damaged"
    try:
        idx = derive(bound, *raw)
    except ImageFSError as exc:
        return str(exc)
    derived = store.derived_path(bound)
    if derived.exists() and derived.read_bytes() != idx.to_bytes():
        return "its derived index is not what its verified bytes say"
    return None
