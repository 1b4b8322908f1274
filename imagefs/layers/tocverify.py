"""Does a layer's own TOC (eStargz / zstd:chunked) tell the truth about its tar stream?

The diff_id (and the layer digest) cover the tar stream, not the TOC: a TOC verified by its
annotation can still point `a.txt` at `b.txt`'s bytes, and a lazy mount would then show a
tree no extractor shows. When the whole blob is local, its tar-stream index is compared
with the TOC: paths, types, modes, sizes, link targets, owners, device numbers, xattrs, and
every chunk's sha256 against the bytes at that place of the file in the tar stream (one
sequential inflate of the blob).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zstandard

from imagefs.layers.layerindex import LayerIndex
from imagefs.layers.tarscan import EntryType

_READ = 1 << 20


Entry = tuple[EntryType, int, int, bytes, int, int, int, int, tuple[tuple[bytes, bytes], ...]]


def _entries(idx: LayerIndex) -> dict[bytes, Entry]:
    """Per path, what a mount shows of it besides its bytes: type, permission bits, size,
    link target, owner (uid, gid), device numbers and xattrs. mtimes are left out: a TOC
    carries seconds where a tar stream may carry nanoseconds (and they grant nothing)."""
    toc = idx.toc
    out = {}
    for i in toc.visible():
        if toc.is_implicit(i):
            continue
        a = toc.attrs(i)
        size = a.size if a.type is EntryType.REG else 0
        xattrs = tuple(sorted(toc.xattrs(i).items()))
        out[toc.path(i)] = (
            a.type,
            a.mode & 0o7777,
            size,
            a.linkname,
            a.uid,
            a.gid,
            a.devmajor,
            a.devminor,
            xattrs,
        )
    return out


def _entry_disagreement(built: LayerIndex, other: LayerIndex, what: str) -> str | None:
    ours, theirs = _entries(built), _entries(other)
    for path in sorted(set(ours) | set(theirs)):
        if ours.get(path) != theirs.get(path):
            shown = path.decode("utf-8", "replace")
            return f"{shown}: tar stream has {ours.get(path)}, {what} says {theirs.get(path)}"
    return None


def published_disagreement(built: LayerIndex, published: LayerIndex) -> str | None:
    """None when a published index says what the blob's own index says, else what differs.

    Both are seek-point indexes of the same tar stream: every entry (as `_entries` sees it)
    and every regular file's offset in the stream must be the same. Its spans need no check:
    each span read is verified against the span digests, and its blob digest is the layer's.
    """
    problem = _entry_disagreement(built, published, "published index")
    if problem is not None:
        return problem
    btoc, ptoc = built.toc, published.toc
    for i in ptoc.visible():
        if ptoc.entry_type(i) is not EntryType.REG or not ptoc.size(i):
            continue
        j = btoc.find(ptoc.path(i))
        if j is None or btoc.offset(j) != ptoc.offset(i):
            shown = ptoc.path(i).decode("utf-8", "replace")
            return f"{shown}: published index puts it at another offset than the tar stream"
    return None


def _zeros_digest(size: int) -> str:
    """sha256 of `size` zero bytes, hashed a block at a time: a "zeros" chunk may declare
    any size (it carries no data), and must not become one allocation of that size."""
    h = hashlib.sha256()
    block = bytes(min(size, _READ))
    while size:
        n = min(size, len(block))
        h.update(block[:n] if n < len(block) else block)
        size -= n
    return h.hexdigest()


def _stream(blob: Path | int, compression: str) -> Iterator[bytes]:
    fd = blob if isinstance(blob, int) else os.open(blob, os.O_RDONLY | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if compression == "gzip":
            import gzip

            # gzip.GzipFile reads multi-member streams (eStargz: one member per chunk)
            with gzip.GzipFile(fileobj=f) as g:
                while data := g.read(_READ):
                    yield data
        elif compression == "zstd":
            dctx = zstandard.ZstdDecompressor()
            with dctx.stream_reader(f, read_across_frames=True) as r:
                while data := r.read(_READ):
                    yield data
        else:
            while data := f.read(_READ):
                yield data


def disagreement(built: LayerIndex, toc_idx: LayerIndex, blob: Path | int) -> str | None:
    """None when the TOC-derived index agrees with the tar-stream index, else what differs.
    `blob`: a path, or a file descriptor the caller opened (a store's shell opens its blobs
    through `store.fsutil`: no link followed) and this closes."""
    assert built.seek is not None
    table = toc_idx.chunks
    if table is None:
        return None
    problem = _entry_disagreement(built, toc_idx, "TOC")
    if problem is not None:
        return problem
    # Every chunk's digest against the bytes at that place in the tar stream.
    ranges: list[tuple[int, int, str]] = []  # (tar-stream offset, size, sha256)
    ttoc, btoc = toc_idx.toc, built.toc
    for i in ttoc.visible():
        if ttoc.entry_type(i) is not EntryType.REG or not ttoc.size(i):
            continue
        j = btoc.find(ttoc.path(i))
        assert j is not None
        voff, base = ttoc.offset(i), btoc.offset(j)
        for k in table.covering(voff, ttoc.size(i)):
            if not table.zeros[k]:
                ranges.append((base + table.voffsets[k] - voff, table.sizes[k], table.piece(k)))
            else:
                zero = _zeros_digest(table.sizes[k])
                ranges.append((base + table.voffsets[k] - voff, table.sizes[k], zero))
    ranges.sort()
    pos = 0
    active: list[tuple[int, int, str, Any]] = []
    nxt = 0
    for data in _stream(blob, built.seek.compression):
        end = pos + len(data)
        while nxt < len(ranges) and ranges[nxt][0] < end:
            start, size, want = ranges[nxt]
            active.append((start, size, want, hashlib.sha256()))
            nxt += 1
        still = []
        for start, size, want, h in active:
            lo, hi = max(start, pos), min(start + size, end)
            if hi > lo:
                h.update(data[lo - pos : hi - pos])
            if start + size <= end:
                if h.hexdigest() != want:
                    return f"chunk at tar offset {start} does not hold what the TOC says"
            else:
                still.append((start, size, want, h))
        active = still
        pos = end
    if active or nxt < len(ranges):
        return "TOC names bytes beyond the end of the tar stream"
    return None
