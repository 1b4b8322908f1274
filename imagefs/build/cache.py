"""The build cache: the upper directory and layer of every filesystem step, by cache key.

```
ROOT/build-cache/<key>/upper/      the step's overlay upper dir (also a lower of later steps)
ROOT/build-cache/<key>/step.json   {"layer": {digest, size, diff_id} | null}
ROOT/build-cache/partial-<pid>-<id>/        a step being built (renamed to <key> when it succeeded)
```

A key is the sha256 of the parent step's key, the instruction as it will run (expanded
arguments, shell, env and build args in scope, user, workdir, network) and, for COPY/ADD,
the content digest of the sources. A hit needs the entry *and* its layer blob in the store
(`imagefs prune` may have collected the blob; the step is then rebuilt). An entry becomes
visible only by the rename of a finished directory, so a killed build leaves at most a
`partial-*` directory, which the next build removes. `imagefs prune` keeps the blobs and
indexes of cached layers; `imagefs prune --build-cache` drops the cache first (then what
only the cache kept). Do not run that during a build.

Every path is reached from the store root through `fsutil` (no link followed): `build-cache`
itself a link is refused in one line; `<key>` or `<key>/upper` a link is not a cache entry
(its `upper` would be handed to overlayfs as a lower directory: a planted link would give RUN
a host directory); sweeping and `prune --build-cache` never delete through a link.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagefs.build.layerdiff import LayerBlob
from imagefs.errors import ImageFSError, StoreError
from imagefs.oci.digest import Digest
from imagefs.store import fsutil
from imagefs.store.layout import Layout

_TMP = "partial-"
_MAX_META = 1 << 20  # step.json: a few hundred bytes


def key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Entry:
    upper: Path
    layer: LayerBlob | None


def _meta(root: Path, entry: Path) -> Any:
    """An entry's step.json (bounded, no link followed); None when absent or unreadable."""
    try:
        raw = fsutil.read_bytes(entry / "step.json", root=root, limit=_MAX_META)
        return None if raw is None else json.loads(raw)
    except (ImageFSError, OSError, ValueError):
        return None


class BuildCache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = Layout(root).build_cache

    def sweep(self) -> None:
        """Remove what killed builds left (their pid is gone: nothing else can own them)."""
        for entry in fsutil.scan(self.dir, root=self.root):
            if entry.name.startswith(_TMP):
                pid = entry.name[len(_TMP) :].split("-")[0]
                if pid.isdigit() and not _alive(int(pid)):
                    fsutil.safe_rmtree(self.dir / entry.name, root=self.root)

    def get(self, k: str, blob_exists: Any) -> Entry | None:
        path = self.dir / k
        if not fsutil.is_real_dir(path / "upper", root=self.root):
            return None  # absent, or a link somewhere: never handed to overlayfs
        meta = _meta(self.root, path)
        if not isinstance(meta, dict):
            return None
        layer = None
        if meta.get("layer"):
            m = meta["layer"]
            layer = LayerBlob(
                Digest.parse(m["digest"]), Digest.parse(m["diff_id"]), int(m["size"]), 0,
                dict(m.get("annotations") or {}),
            )  # fmt: skip
            if not blob_exists(layer.digest):
                return None
        return Entry(path / "upper", layer)

    def new_dir(self) -> Path:
        name = f"{_TMP}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with fsutil.dir_fd(self.dir, root=self.root, create=True) as d:
            os.mkdir(name, 0o755, dir_fd=d)
        return self.dir / name

    def commit(self, tmp: Path, k: str, layer: LayerBlob | None, *, keep: bool) -> Entry:
        """Record `tmp` (holding `upper/`) under key `k`; with keep=False, just use it."""
        meta = {"layer": None}
        if layer is not None:
            meta["layer"] = {  # type: ignore[assignment]
                "digest": str(layer.digest),
                "diff_id": str(layer.diff_id),
                "size": layer.size,
                "annotations": dict(layer.annotations),
            }
        fsutil.atomic_write(tmp / "step.json", json.dumps(meta).encode(), root=self.root)
        if not keep:
            return Entry(tmp / "upper", layer)
        final = self.dir / k
        try:
            with fsutil.dir_fd(self.dir, root=self.root) as d:
                os.rename(tmp.name, k, src_dir_fd=d, dst_dir_fd=d)
        except OSError:  # another build made the same step meanwhile: theirs is as good
            fsutil.safe_rmtree(tmp, root=self.root)
            if not fsutil.is_real_dir(final / "upper", root=self.root):
                raise StoreError(
                    f"{final} is not a build cache entry (a link?); imagefs never follows "
                    "links in its store (`imagefs prune --build-cache` empties the cache)"
                ) from None
        return Entry(final / "upper", layer)


def remove_all(root: Path) -> int:
    """`prune --build-cache`: drop every cache entry; returns the bytes freed (approximately:
    the files' sizes)."""
    return fsutil.safe_rmtree(Layout(root).build_cache, root=root)  # a link: the link itself goes


def _alive(pid: int) -> bool:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 0)
        return True
    return False
