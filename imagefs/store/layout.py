"""Every path under a store root, named once.

```
ROOT/oci-layout, index.json, blobs/sha256/<hex>   the OCI layout (skopeo/umoci can read it)
ROOT/lock                                           taken by writers of index.json and by gc
ROOT/ingest/<hex>.partial|.lock                     downloads in progress (resumable)
ROOT/leases/<pid>-<n>-<random>                      blobs a running command is about to use
ROOT/mounts/<id>.json, <id>.sock                    live mounts and their control sockets
ROOT/logs/mount-<id>.log                            a mount daemon's log
ROOT/indexes/layer|bound|referrers/sha256/…, refused/   layer indexes (see store.layerindexes)
ROOT/cache/pieces/sha256/<hex>                      verified uncompressed pieces (lazy.cache)
ROOT/cache/flat/<layer hex>                         flattened layers (lazy.layers)
ROOT/build-cache/<key>/, build-tmp/<pid>-<id>/      imagefs build's cache and work areas
```

Modules that keep files under the root ask a `Layout` for the path instead of spelling it:
the store's own directory list (`STORE_DIRS`), `check`, `prune`'s sweep and the modules that
write each area then cannot disagree. Pure: paths only, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["STORE_DIRS", "Layout"]

# Areas of earlier versions that nothing reads any more: prune and check remove them.
OLD_INDEXES = "indexes/sha256"  # layer-keyed indexes, bound to no manifest
OLD_CHUNKS = "cache/chunks"  # the offset-keyed chunk cache

STORE_DIRS = (
    "blobs",
    "blobs/sha256",
    "ingest",
    "leases",
    "mounts",
    "indexes",
    "indexes/layer",
    "indexes/layer/sha256",
    "indexes/bound",
    "indexes/bound/sha256",
    "indexes/referrers",
    "indexes/referrers/sha256",
    "indexes/refused",
    OLD_INDEXES,
    "cache",
    "cache/pieces",
    "cache/pieces/sha256",
    OLD_CHUNKS,
    "cache/flat",
    "logs",
    "build-cache",  # its entries' upper dirs become overlay lower dirs of RUN steps
)
"""imagefs's own directories under the root: none of them may be a symbolic link."""


@dataclass(frozen=True)
class Layout:
    """The paths under one store root. Cheap: build one wherever a root is at hand."""

    root: Path

    # -- the OCI layout and the store's own bookkeeping ---------------------------------------

    @property
    def oci_layout(self) -> Path:
        return self.root / "oci-layout"

    @property
    def index_json(self) -> Path:
        return self.root / "index.json"

    @property
    def lock(self) -> Path:
        return self.root / "lock"

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    @property
    def ingest(self) -> Path:
        return self.root / "ingest"

    @property
    def leases(self) -> Path:
        return self.root / "leases"

    # -- mounts -------------------------------------------------------------------------------

    @property
    def mounts(self) -> Path:
        return self.root / "mounts"

    def mount_record(self, mount_id: str) -> Path:
        return self.mounts / f"{mount_id}.json"

    def control_socket(self, mount_id: str) -> Path:
        return self.mounts / f"{mount_id}.sock"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def mount_log(self, mount_id: str) -> Path:
        return self.logs / f"mount-{mount_id}.log"

    # -- what is derived from layers ----------------------------------------------------------

    @property
    def indexes(self) -> Path:
        return self.root / "indexes"

    @property
    def layer_indexes(self) -> Path:
        """`<algorithm>/<layer hex>`: indexes built here, bound to the layer."""
        return self.indexes / "layer"

    @property
    def bound_indexes(self) -> Path:
        """`<algorithm>/<layer hex>/<kind>-<verifier hex>[.idx]`: bound to a manifest."""
        return self.indexes / "bound"

    @property
    def referrer_indexes(self) -> Path:
        """`<algorithm>/<manifest hex>`: what a manifest's referrers led to."""
        return self.indexes / "referrers"

    @property
    def refused_indexes(self) -> Path:
        """`<layer hex>-<kind>-<verifier hex>`: TOCs that disagreed with their layer."""
        return self.indexes / "refused"

    @property
    def pieces(self) -> Path:
        return self.root / "cache" / "pieces" / "sha256"

    @property
    def flat(self) -> Path:
        return self.root / "cache" / "flat"

    def old_areas(self) -> tuple[Path, Path]:
        """(layer-keyed indexes, offset-keyed chunk cache) of earlier versions."""
        return self.root / OLD_INDEXES, self.root / OLD_CHUNKS

    def derived_areas(self) -> tuple[Path, ...]:
        """Areas whose entries are named `<layer or manifest hex>[-…]`: what `prune` sweeps
        when no image uses that layer (manifest) any more."""
        return (
            self.layer_indexes / "sha256",
            self.bound_indexes / "sha256",
            self.referrer_indexes / "sha256",
            self.refused_indexes,
            self.flat,
        )

    # -- imagefs build ------------------------------------------------------------------------

    @property
    def build_cache(self) -> Path:
        return self.root / "build-cache"

    @property
    def build_work(self) -> Path:
        return self.root / "build-tmp"

    def not_walked(self) -> tuple[Path, Path]:
        """Areas holding image contents (with their own links) and a running build's mounts,
        not the store's own files: `check` never walks them."""
        return self.build_cache, self.build_work
