"""How much of a lazily read layer is cached, for `imagefs images` (CACHED) and `inspect`.

Pieces are named by their content's digest, not by layer, so the layer's index says which
pieces it needs; the answer is the compressed bytes of the ranges whose pieces are present
(what a mount would not have to fetch again). A statistic only: any index kept for the
layer will do, whichever image it is bound to.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from imagefs.layers.layerindex import LayerIndex
from imagefs.lazy.cache import PieceCache
from imagefs.lazy.packs import is_piece_name
from imagefs.oci.image import Layer
from imagefs.store.layerindexes import LayerIndexStore


def _any_index(root: Path, layer: Layer) -> LayerIndex | None:
    store = LayerIndexStore(root)
    idx = store.load_layer(layer.digest)
    if idx is not None:
        return idx
    for bound in store.bound_entries(layer.digest):
        if not store.refused(bound):
            idx = store.load_bound(bound)
            if idx is not None:
                return idx
    return None


def cached_bytes(root: Path, layer: Layer) -> int:
    idx = _any_index(root, layer)
    if idx is None:
        return 0
    present: set[str] = set()
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        present = {n for n in os.listdir(PieceCache(root).dir) if is_piece_name(n)}
    if not present:
        return 0
    ranges: list[tuple[int, int]] = []
    if idx.chunks is not None:
        t = idx.chunks
        ranges = [
            (t.starts[k], t.ends[k])
            for k in range(len(t))
            if not t.zeros[k] and t.piece(k) in present
        ]
    elif idx.seek is not None:
        s = idx.seek
        ranges = [
            s.span_range(k) for k in range(len(s.points)) if s.raw_digests[k].hex() in present
        ]
    total, last = 0, -1
    for a, b in sorted(ranges):
        a = max(a, last)
        if b > a:
            total += b - a
            last = b
    return total
