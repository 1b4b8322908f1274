"""`imagefs check [--repair]`: verify everything the store holds; remove what is wrong.

- every blob in `blobs/` against its sha256 (a blob is named by its digest);
- every chunk-cache piece against its xxh3 checksum (and its name against its length);
- every layer index against its checksum (and that it parses);
- `index.json` parses, and every image it names has its manifest and config;
- leftovers of killed processes: temporary files, empty or stale ingest partials.

Without `--repair` it only reports; with it, damaged blobs, pieces and indexes are deleted
(a later pull or read fetches them again) and leftovers are removed. Partial downloads that
are a valid prefix stay: the next pull resumes them.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from imagefs.errors import ImageFSError
from imagefs.layers.index import IndexStore, LayerIndex
from imagefs.lazy.cache import piece_payload, piece_range
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

        chunks = root / "cache" / "chunks"
        if chunks.is_dir():
            for layer_dir in sorted(chunks.iterdir()):
                for path in sorted(layer_dir.iterdir()):
                    piece = piece_range(path.name)
                    if piece is None:
                        bad(f"stray file in the cache: {path}", path)
                        continue
                    report.pieces += 1
                    if piece_payload(path.read_bytes(), *piece) is None:
                        bad(f"cache piece {path} is damaged", path)

        indexes = IndexStore(root)
        if indexes.dir.is_dir():
            for alg_dir in sorted(indexes.dir.iterdir()):
                for path in sorted(alg_dir.iterdir()):
                    if path.name.startswith(fsutil.TEMP_PREFIX):
                        bad(f"leftover temporary file {path}", path)
                        continue
                    report.indexes += 1
                    try:
                        LayerIndex.from_bytes(
                            Digest.parse(f"{alg_dir.name}:{path.name}"), path.read_bytes()
                        )
                    except ImageFSError as exc:
                        bad(f"layer index {path}: {exc}", path)

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
        for tmp in sorted(root.rglob(f"{fsutil.TEMP_PREFIX}*")):
            if "blobs" in tmp.parts or "indexes" in tmp.parts:
                continue  # reported above
            bad(f"leftover temporary file {tmp}", tmp)
    return report
