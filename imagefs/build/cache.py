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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagefs.build.layerdiff import LayerBlob
from imagefs.oci.digest import Digest
from imagefs.store.layout import Layout

_TMP = "partial-"


def key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Entry:
    upper: Path
    layer: LayerBlob | None


class BuildCache:
    def __init__(self, root: Path) -> None:
        self.dir = Layout(root).build_cache

    def sweep(self) -> None:
        """Remove what killed builds left (their pid is gone: nothing else can own them)."""
        if not self.dir.is_dir():
            return
        for entry in self.dir.iterdir():
            if entry.name.startswith(_TMP):
                pid = entry.name[len(_TMP) :].split("-")[0]
                if pid.isdigit() and not _alive(int(pid)):
                    shutil.rmtree(entry, ignore_errors=True)

    def get(self, k: str, blob_exists: Any) -> Entry | None:
        path = self.dir / k
        try:
            meta = json.loads((path / "step.json").read_text())
        except (OSError, ValueError):
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
        path = self.dir / f"{_TMP}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path

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
        (tmp / "step.json").write_text(json.dumps(meta))
        if not keep:
            return Entry(tmp / "upper", layer)
        final = self.dir / k
        try:
            os.rename(tmp, final)
        except OSError:  # another build made the same step meanwhile: theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)
        return Entry(final / "upper", layer)


def remove_all(root: Path) -> int:
    """`prune --build-cache`: drop every cache entry; returns the bytes freed (approximately:
    the files' sizes)."""
    cache_dir = Layout(root).build_cache
    freed = 0
    if not cache_dir.is_dir():
        return 0
    for dirpath, _dirs, files in os.walk(cache_dir):
        for name in files:
            with contextlib.suppress(OSError):
                freed += os.lstat(os.path.join(dirpath, name)).st_size
    shutil.rmtree(cache_dir, ignore_errors=True)
    return freed


def _alive(pid: int) -> bool:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 0)
        return True
    return False
