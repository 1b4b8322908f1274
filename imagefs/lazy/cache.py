"""The chunk cache: verified byte ranges of layer blobs, one cache per store root.

A lazily read layer blob is a sparse, partly present object. Each piece we fetched and
verified (a gzip span, an eStargz or zstd:chunked chunk run, ...) is kept as one file:

    ROOT/cache/chunks/<layer hex>/<start>-<end>      (compressed blob bytes [start, end))

with a 16-byte header: magic `IFSC`, 4 reserved bytes, and the xxh3_64 of the payload — the
cache's own checksum, so a torn write or bit rot is noticed and the piece fetched again. The
sha256 chains that make the bytes trustworthy were checked before the piece was written.

Why one file per piece: writes are temp-then-rename (atomic), presence is a directory entry,
and eviction is `unlink`, which never breaks a read in progress in this or another process
(an open file stays readable). Several mounts and commands share the cache; each keeps an
in-memory view of the pieces per layer and rescans the layer's directory on a miss.

Size cap: least recently used pieces go first (a hit touches the file's mtime, coarsely),
until the cache is under 90% of its cap. Whole blobs in `blobs/` (pulled with `--full`) are
not part of the cache and are never evicted.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import re
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from imagefs.oci.digest import Digest
from imagefs.store import fsutil

log = logging.getLogger("imagefs.cache")

MAGIC = b"IFSC"
_HEADER = struct.Struct("<4s4xQ")
_NAME = re.compile(r"^(\d+)-(\d+)$")
DEFAULT_CACHE_SIZE = 10 << 30
_TOUCH_EVERY = 60.0  # seconds between mtime updates of a hot piece


def parse_size(text: str) -> int:
    """`10GiB`, `512M`, `1.5G`, `1000000` -> bytes (binary units; docker's style)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise ValueError(f"invalid size {text!r} (examples: 10GiB, 512M, 1000000)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def piece_payload(raw: bytes, start: int, end: int) -> bytes | None:
    """The payload of a cache piece file holding blob bytes [start, end), or None when the
    file is torn or rotten (header, length or xxh3 checksum do not match)."""
    if len(raw) < _HEADER.size:
        return None
    magic, check = _HEADER.unpack_from(raw)
    payload = raw[_HEADER.size :]
    if magic != MAGIC or len(payload) != end - start or xxhash.xxh3_64_intdigest(payload) != check:
        return None
    return payload


def piece_range(name: str) -> tuple[int, int] | None:
    """`<start>-<end>` -> (start, end); None for a name that is not a piece."""
    m = _NAME.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass
class _LayerPieces:
    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    dir_mtime_ns: int = -1  # the layer directory's mtime when it was listed


class ChunkCache:
    """Synchronous and thread-safe; async callers use it from worker threads."""

    def __init__(self, root: Path, cap: int = DEFAULT_CACHE_SIZE) -> None:
        self.dir = root / "cache" / "chunks"
        self.cap = cap
        self._layers: dict[str, _LayerPieces] = {}
        self._own: dict[str, set[tuple[int, int]]] = {}  # pieces this process wrote
        self._lock = threading.Lock()
        self._total: int | None = None
        self._touched: dict[str, float] = {}
        self.hits = 0
        self.misses = 0
        self.corrupt = 0

    # -- paths and scanning -----------------------------------------------------------------

    def _layer_dir(self, layer: Digest) -> Path:
        return self.dir / layer.hex

    def _piece_path(self, layer: Digest, start: int, end: int) -> Path:
        return self._layer_dir(layer) / f"{start}-{end}"

    def _dir_mtime(self, layer: Digest) -> int:
        try:
            return os.stat(self._layer_dir(layer)).st_mtime_ns
        except FileNotFoundError:
            return 0

    def _scan(self, layer: Digest) -> _LayerPieces:
        mtime = self._dir_mtime(layer)
        pieces: list[tuple[int, int]] = []
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self._layer_dir(layer)):
                piece = piece_range(name)
                if piece is not None:
                    pieces.append(piece)
        pieces.sort()
        return _LayerPieces([s for s, _ in pieces], [e for _, e in pieces], mtime)

    def _pieces(self, layer: Digest, rescan: bool = False) -> _LayerPieces:
        """The pieces of a layer. On a miss (`rescan`) the directory is listed again only if
        its mtime changed — another process added or evicted pieces — so that a layer with
        thousands of pieces does not cost a listing per missing piece.

        A listing can race with this process's own `put` (and a directory mtime is coarse),
        so the pieces this process wrote since are merged into every new listing."""
        with self._lock:
            got = self._layers.get(layer.hex)
        if got is None or (rescan and self._dir_mtime(layer) != got.dir_mtime_ns):
            got = self._scan(layer)
            with self._lock:
                own = self._own.get(layer.hex, set())
                known = set(zip(got.starts, got.ends, strict=True))
                for piece in sorted(own - known):
                    i = bisect.bisect_left(got.starts, piece[0])
                    got.starts.insert(i, piece[0])
                    got.ends.insert(i, piece[1])
                self._layers[layer.hex] = got
        return got

    def covering(self, layer: Digest, start: int, end: int) -> tuple[int, int] | None:
        """A cached piece that holds all of [start, end), if any (a rescan on a miss)."""
        for rescan in (False, True):
            p = self._pieces(layer, rescan)
            i = bisect.bisect_right(p.starts, start) - 1
            # Pieces may overlap; look back a little for one that reaches far enough.
            for j in range(i, max(-1, i - 8), -1):
                if p.starts[j] <= start and p.ends[j] >= end:
                    return p.starts[j], p.ends[j]
        return None

    def present_bytes(self, layer: Digest) -> int:
        p = self._scan(layer)
        total = 0
        last = -1
        for s, e in zip(p.starts, p.ends, strict=True):
            s = max(s, last)
            if e > s:
                total += e - s
                last = e
        return total

    # -- reading and writing ----------------------------------------------------------------

    def read(self, layer: Digest, start: int, end: int) -> bytes | None:
        """Bytes [start, end) of the blob from the cache; None if absent or damaged."""
        piece = self.covering(layer, start, end)
        if piece is None:
            self.misses += 1
            return None
        path = self._piece_path(layer, *piece)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:  # evicted by someone else since we looked
            self._forget(layer, piece)
            self.misses += 1
            return None
        payload = self._check(path, raw, piece)
        if payload is None:
            self._forget(layer, piece)
            self.misses += 1
            return None
        self.hits += 1
        self._touch(path)
        return payload[start - piece[0] : end - piece[0]]

    def _check(self, path: Path, raw: bytes, piece: tuple[int, int]) -> bytes | None:
        payload = piece_payload(raw, *piece)
        if payload is not None:
            return payload
        self.corrupt += 1
        log.warning("cache piece %s is damaged (torn write or rot); dropping it", path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return None

    def put(self, layer: Digest, start: int, data: bytes) -> None:
        """Keep verified bytes [start, start+len(data)) of a layer blob."""
        end = start + len(data)
        path = self._piece_path(layer, start, end)
        header = _HEADER.pack(MAGIC, xxhash.xxh3_64_intdigest(data))
        try:
            fsutil.atomic_write(path, header + data, durable=False)
        except Exception as exc:  # a full disk must not fail the read that fetched this
            log.warning("cannot cache %s: %s", path, exc)
            return
        mtime = self._dir_mtime(layer)
        with self._lock:
            self._own.setdefault(layer.hex, set()).add((start, end))
            p = self._layers.get(layer.hex)
            if p is not None:
                i = bisect.bisect_left(p.starts, start)
                p.starts.insert(i, start)
                p.ends.insert(i, end)
                p.dir_mtime_ns = mtime  # our own write; others' show as a later change
            if self._total is not None:
                self._total += len(data) + _HEADER.size
        if self._total is None or self._total > self.cap:
            self.evict()

    def _forget(self, layer: Digest, piece: tuple[int, int]) -> None:
        with self._lock:
            p = self._layers.get(layer.hex)
            if p is None:
                return
            self._own.get(layer.hex, set()).discard(piece)
            for i, (s, e) in enumerate(zip(p.starts, p.ends, strict=True)):
                if (s, e) == piece:
                    del p.starts[i], p.ends[i]
                    return

    def _touch(self, path: Path) -> None:
        now = time.monotonic()
        key = str(path)
        if now - self._touched.get(key, 0.0) > _TOUCH_EVERY:
            self._touched[key] = now
            with contextlib.suppress(OSError):
                os.utime(path)

    # -- size cap ---------------------------------------------------------------------------

    def _all_pieces(self) -> list[tuple[float, int, Path]]:
        out: list[tuple[float, int, Path]] = []
        with contextlib.suppress(FileNotFoundError):
            for layer_dir in os.scandir(self.dir):
                if not layer_dir.is_dir():
                    continue
                for entry in os.scandir(layer_dir.path):
                    if not _NAME.match(entry.name):
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        st = entry.stat()
                        out.append((st.st_mtime, st.st_size, Path(entry.path)))
        return out

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self._all_pieces())

    def evict(self, target: int | None = None) -> int:
        """Remove least recently used pieces until under `target` (90% of the cap)."""
        pieces = self._all_pieces()
        total = sum(size for _, size, _ in pieces)
        goal = int(self.cap * 0.9) if target is None else target
        freed = 0
        if total > goal:
            for _, size, path in sorted(pieces):
                if total - freed <= goal:
                    break
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    freed += size
            with self._lock:
                self._layers.clear()  # rescan lazily
                self._own.clear()
        with self._lock:
            self._total = total - freed
        if freed:
            log.info("cache: evicted %d bytes (cap %d)", freed, self.cap)
        return freed

    def drop_layer(self, layer: Digest) -> int:
        """Forget every piece of one layer (gc of a deleted image)."""
        freed = 0
        d = self._layer_dir(layer)
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(d):
                with contextlib.suppress(FileNotFoundError):
                    freed += entry.stat().st_size
                    os.unlink(entry.path)
            d.rmdir()
        with self._lock:
            self._layers.pop(layer.hex, None)
            self._own.pop(layer.hex, None)
            self._total = None
        return freed

    def layers(self) -> list[str]:
        with contextlib.suppress(FileNotFoundError):
            return [e.name for e in os.scandir(self.dir) if e.is_dir()]
        return []
