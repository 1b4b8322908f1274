"""Where a mounted layer's index comes from, in trust order (see `store.layerindexes`).

For layer i of manifest M:

1. the layer-bound index (`ROOT/indexes/layer`), built here from the verified whole blob;
2. when the whole blob is not local: M's eStargz TOC (verifier: the layer's
   `containerd.io/snapshot/stargz/toc.digest` annotation) or zstd:chunked TOC (verifier: its
   `manifest-checksum` annotation) — from the store under exactly that verifier, else by
   Range GETs, verified, then kept under that verifier;
3. M's published imagefs index, only with `--trust-published-index` (`remote_index`:
   only what M's own referrers led to);
4. otherwise the whole blob, fetched once (verified against the layer digest) and indexed;
   the result is layer-bound. When it is built, every TOC and published index kept for the
   layer is compared with it (the tar stream is what the diff_id covers): one that
   disagrees is refused.

Only step 1 and 4 give data shared with other images; a TOC or published index is only
ever found under the verifier the mounting manifest names.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal, overload

import trio

from imagefs.errors import ImageFSError, IntegrityError, LayerFormatError
from imagefs.layers.layerindex import LayerIndex, build_from_blob
from imagefs.oci import mediatypes
from imagefs.oci.digest import Digest
from imagefs.oci.image import Layer
from imagefs.registry import wire
from imagefs.store import fsutil
from imagefs.store.layerindexes import ESTARGZ, PUBLISHED, ZSTD_CHUNKED, Bound, derive

if TYPE_CHECKING:
    from imagefs.layers import lostnames, zstdchunked
    from imagefs.lazy.layers import LayerSet

log = logging.getLogger("imagefs.lazy")

# A store write the loader need not wait for (`LayerSet.keep`): the index it keeps is in
# memory already, so a request goes on while a worker thread writes it.
Keep = Callable[[Callable[[], None]], Awaitable[None]]
RemoteIndex = Callable[[Layer, Keep], Awaitable[LayerIndex | None]]

ESTARGZ_TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
TAIL_FETCH = 64 << 10  # first guess at footer + TOC size for eStargz
# The most compressed TOC bytes fetched into memory. The footer and the manifest-position
# annotation say where the TOC is, and neither is verified before the fetch (only the bytes
# fetched are): a footer claiming toc_offset=0 on a 20 GiB layer would otherwise buffer
# 20 GiB. A real TOC of 100,000 files compresses to a few MiB; a larger claim is refused and
# the layer is read from its whole blob instead (streamed to disk, verified).
MAX_TOC_FETCH = 64 << 20


def toc_binding(layer: Layer) -> Bound | None:
    """The manifest-bound TOC this layer descriptor names, if any (no I/O)."""
    ann = layer.descriptor.annotations
    try:
        if ESTARGZ_TOC_DIGEST in ann:
            return Bound(layer.digest, ESTARGZ, Digest.parse(ann[ESTARGZ_TOC_DIGEST]))
        if not ann:  # most layers: no TOC, and no format module imported to say so
            return None
        from imagefs.layers import zstdchunked

        position = zstdchunked.position_from_annotations(ann)
        if position is not None:
            return Bound(layer.digest, ZSTD_CHUNKED, Digest.parse(position[1]))
    except ImageFSError:
        return None
    return None


# How far an early load (ahead of a request's need) may go: "kept", only what this machine
# keeps (the index store, the TOC this manifest names if kept); "metadata", also the TOC or
# published index fetched from the registry. Neither fetches layer data or indexes a blob.
Ahead = Literal["kept", "metadata"]


@overload
async def load(ls: LayerSet, i: int) -> LayerIndex: ...
@overload
async def load(ls: LayerSet, i: int, *, ahead: Ahead) -> LayerIndex | None: ...


async def load(ls: LayerSet, i: int, *, ahead: Ahead | None = None) -> LayerIndex | None:
    """Layer i's index, in trust order; with `ahead`, an early load: None where the index
    would need more than `ahead` allows."""
    with wire.for_layer(i):  # everything fetched to index layer i counts for it
        return await _load(ls, i, ahead=ahead)


async def _load(ls: LayerSet, i: int, *, ahead: Ahead | None) -> LayerIndex | None:
    layer = ls.layers[i]
    idx = await trio.to_thread.run_sync(ls.indexes.load_layer, layer.digest)
    if idx is not None:
        ls.stats[i].source = "index store"
        return idx
    if ahead == "kept":
        return await _load_toc(ls, i, fetch=False)
    if not ls.is_local(i):
        idx = await _load_toc(ls, i)
        if idx is None and ls.remote_index is not None:
            try:
                idx = await ls.remote_index(layer, ls.keep)
            except ImageFSError as exc:
                log.warning("layer %d: no usable index in the registry (%s)", i, exc)
            if idx is not None:
                ls.stats[i].source = "registry index"
    if idx is None:
        if ahead is not None:
            # An early load: the layer's metadata, never its data. A layer with neither a
            # TOC nor a published index waits until a request needs it (its whole blob).
            return None
        idx = await _index_whole_blob(ls, i)
    for w in idx.warnings:
        log.warning("layer %d (%s): %s", i, layer.digest.short, w)
    log.info(
        "layer %d (%s): %d entries (%s)", i, layer.digest.short, len(idx.toc), ls.stats[i].source
    )
    return idx


async def _load_toc(ls: LayerSet, i: int, *, fetch: bool = True) -> LayerIndex | None:
    """eStargz or zstd:chunked: the TOC this manifest names, kept or fetched by ranges
    (`fetch=False`: only if kept; an early load, which says nothing of a refused TOC: the
    request that needs the layer does)."""
    layer = ls.layers[i]
    bound = toc_binding(layer)
    if bound is None or (fetch and ls.fetch_range is None):
        return None
    from imagefs.layers import lostnames

    if await trio.to_thread.run_sync(ls.indexes.refused, bound):
        if not fetch:
            return None
        log.warning(
            "layer %d (%s): its TOC %s disagreed with the layer's tar stream before; "
            "fetching the whole layer",
            i,
            layer.digest.short,
            bound.verifier.short,
        )
        return None
    source = "eStargz TOC" if bound.kind == ESTARGZ else "zstd:chunked TOC"
    idx = await trio.to_thread.run_sync(ls.indexes.load_bound, bound)
    if idx is not None:
        ls.stats[i].source = f"{source} (kept)"
        return idx
    if not fetch:
        return None
    params: dict[str, Any]
    try:
        with wire.cause("toc"):
            if bound.kind == ESTARGZ:
                params, raw = await _fetch_estargz_toc(ls, i)
            else:
                from imagefs.layers import zstdchunked

                position = zstdchunked.position_from_annotations(layer.descriptor.annotations)
                assert position is not None
                params, raw = await _fetch_zstd_toc(ls, i, position[0])
        try:
            idx = await trio.to_thread.run_sync(derive, bound, params, raw, limiter=ls.cpu)
        except lostnames.LostNames as lost:
            params = await _recover_names(ls, i, bound, params, lost)
            idx = await trio.to_thread.run_sync(derive, bound, params, raw, limiter=ls.cpu)
    except (LayerFormatError, IntegrityError) as exc:
        log.warning(
            "layer %d (%s): lazy TOC unusable (%s); fetching the whole layer",
            i,
            layer.digest.short,
            exc,
        )
        return None
    await ls.keep(functools.partial(ls.indexes.save_bound, bound, params, raw, idx))
    ls.stats[i].source = source
    return idx


async def _recover_names(
    ls: LayerSet, i: int, bound: Bound, params: dict[str, Any], lost: lostnames.LostNames
) -> dict[str, Any]:
    """Read the true names a TOC could not carry from their tar headers, fetched by range
    (see `layers.lostnames` for where they sit and why they can be trusted)."""
    from imagefs.layers import lostnames

    if bound.kind == ESTARGZ:
        codec, data_end = "gzip", int(params["toc_offset"])
    else:
        codec, data_end = "zstd", int(params["offset"])
    gaps = lostnames.gaps(lost.entries, codec, data_end)
    names: dict[int, tuple[bytes, bytes]] = {}
    fetched = 0
    for gap in gaps:
        if gap.end <= gap.start:
            raise LayerFormatError("a lost name's tar header has no place in the blob")
        if gap.end - gap.start > lostnames.MAX_GAP:
            raise LayerFormatError(
                f"the TOC puts lost names' tar headers in {gap.end - gap.start} bytes at "
                f"{gap.start}, more than the {lostnames.MAX_GAP} imagefs fetches for them"
            )
        with wire.cause("lost names"):
            compressed = await ls.fetch(i, gap.start, gap.end)
        fetched += len(compressed)
        got = await trio.to_thread.run_sync(
            lostnames.recover, gap, codec, compressed, lost.entries, limiter=ls.cpu
        )
        names.update(got)
    log.info(
        "layer %d (%s): %d name(s) the TOC could not carry read from tar headers (%d bytes)",
        i,
        ls.layers[i].digest.short,
        len(lost.lost),
        fetched,
    )
    return {**params, "names": lostnames.to_params(names)}


async def _fetch_estargz_toc(ls: LayerSet, i: int) -> tuple[dict[str, int], bytes]:
    from imagefs.layers import estargz

    size = ls.layers[i].size
    tail_start = max(0, size - TAIL_FETCH)
    tail = await ls.fetch(i, tail_start, size)
    toc_offset = estargz.parse_footer(tail)
    footer = estargz.footer_size(tail)
    if not 0 <= toc_offset < size - footer:
        raise LayerFormatError(f"eStargz footer points outside the blob ({toc_offset})")
    if size - footer - toc_offset > MAX_TOC_FETCH:
        raise LayerFormatError(
            f"eStargz footer puts a {size - footer - toc_offset}-byte TOC at {toc_offset}, "
            f"more than the {MAX_TOC_FETCH} bytes imagefs fetches for a TOC"
        )
    if toc_offset >= tail_start:
        member = tail[toc_offset - tail_start : len(tail) - footer]
        # the last chunks came along: their requests take these bytes instead
        ls.hold(i, tail_start, tail[: toc_offset - tail_start])
    else:
        # a TOC larger than the first guess: only the part before the tail is fetched
        member = await ls.fetch(i, toc_offset, tail_start) + tail[: len(tail) - footer]
    toc_json = await trio.to_thread.run_sync(estargz.toc_json_from_member, member, limiter=ls.cpu)
    return {"toc_offset": toc_offset}, toc_json


async def _fetch_zstd_toc(
    ls: LayerSet, i: int, position: zstdchunked.ManifestPosition
) -> tuple[dict[str, int], bytes]:
    from imagefs.layers import zstdchunked

    end = position.offset + position.length
    if position.length <= 0 or end > ls.layers[i].size:
        raise LayerFormatError("zstd:chunked TOC position outside the blob")
    if position.length > MAX_TOC_FETCH or position.uncompressed_length > zstdchunked.MAX_TOC_SIZE:
        raise LayerFormatError(
            f"zstd:chunked TOC position declares {position.length} bytes "
            f"({position.uncompressed_length} uncompressed), more than imagefs fetches for a TOC"
        )
    raw = await ls.fetch(i, position.offset, end)
    params = {
        "offset": position.offset,
        "length": position.length,
        "uncompressed": position.uncompressed_length,
    }
    return params, raw


async def _index_whole_blob(ls: LayerSet, i: int) -> LayerIndex:
    layer = ls.layers[i]
    if not ls.is_local(i):
        log.info(
            "layer %d (%s): fetching the whole blob, %d bytes", i, layer.digest.short, layer.size
        )
        began = time.monotonic()
        with wire.cause("whole layer"):
            await ls.fetch_blob(layer)
        ls.account(i, 0, layer.size, time.monotonic() - began)
        ls.mark_local(i)
    compression = mediatypes.layer_compression(layer.descriptor.media_type)
    blob = ls.store.blobs.path(layer.digest)
    ls.stats[i].source = "built from the blob"
    is_estargz = ESTARGZ_TOC_DIGEST in layer.descriptor.annotations

    def build() -> LayerIndex:
        fd = fsutil.safe_open(blob.parent, blob.name, os.O_RDONLY, root=ls.store.root)
        return build_from_blob(fd, layer.digest, compression, estargz=is_estargz)

    idx = await trio.to_thread.run_sync(build, limiter=ls.cpu)
    await trio.to_thread.run_sync(ls.indexes.save_layer, idx)
    await trio.to_thread.run_sync(check_tocs, ls, idx, limiter=ls.cpu)
    return idx


def check_tocs(ls: LayerSet, built: LayerIndex) -> None:
    """Compare every TOC and published index kept for this layer with the index of its own
    tar stream; refuse the ones that disagree (in a worker thread: it inflates the blob once
    per TOC; a published index is compared entry by entry, its offsets being tar-stream
    offsets already)."""
    from imagefs.layers import tocverify

    blob = ls.store.blobs.path(built.digest)
    for bound in ls.indexes.bound_entries(built.digest):
        if bound.kind not in (ESTARGZ, ZSTD_CHUNKED, PUBLISHED):
            continue
        toc_idx = ls.indexes.load_bound(bound)
        if toc_idx is None:
            continue
        if bound.kind == PUBLISHED:
            problem = tocverify.published_disagreement(built, toc_idx)
        else:
            fd = fsutil.safe_open(blob.parent, blob.name, os.O_RDONLY, root=ls.store.root)
            problem = tocverify.disagreement(built, toc_idx, fd)  # no link followed
        if problem is not None:
            log.error(
                "layer %s: its %s TOC %s disagrees with the tar stream (%s); refused",
                built.digest.short,
                bound.kind,
                bound.verifier.short,
                problem,
            )
            ls.indexes.refuse(bound, problem)
