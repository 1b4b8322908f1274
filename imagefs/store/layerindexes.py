"""Where layer indexes are kept, by trust domain: what verified an index is part of its key.

An index says where each file's bytes sit in a layer. Whoever controls an index controls
which bytes a path shows, even when every byte it leads to is genuine (a forged index that
gives `a.txt` the offset of `b.txt`). So an index is only ever used by an image whose own
manifest chain vouches for it:

    ROOT/indexes/layer/sha256/<layer hex>
        built here from the whole blob, verified against the layer digest: bound to the
        layer, shared by every image that has the layer.
    ROOT/indexes/bound/sha256/<layer hex>/<kind>-<verifier hex>        (raw verified bytes)
    ROOT/indexes/bound/sha256/<layer hex>/<kind>-<verifier hex>.idx    (derived LayerIndex)
        bound to a manifest's metadata. kind `estargz`: verifier = the layer descriptor's
        `containerd.io/snapshot/stargz/toc.digest` (sha256 of the TOC JSON, kept raw);
        `zstdchunked`: the `manifest-checksum` annotation (sha256 of the compressed TOC
        frame); `published`: the digest of an `imagefs index --push` blob found through a
        manifest's referrers. A mount looks an entry up only under the verifier its own
        manifest names, so another image's TOC or published index is never reached.
    ROOT/indexes/referrers/sha256/<manifest hex>
        JSON {layer digest: published index blob digest} that this manifest's referrers led
        to, so an offline remount finds its published indexes, and another image never does.
    ROOT/indexes/refused/<layer hex>-<kind>-<verifier hex>
        a TOC that disagreed with the layer's own tar stream (checked when the whole blob was
        local): never used again; mounts fall back to the whole blob.

The raw bytes are kept so that `imagefs check` can re-derive every binding: sha256(raw) must
be the verifier in the name and the `.idx` must be what the raw bytes derive to. Every file is
reached through `fsutil` with `root=` (a link anywhere from the store root down, or a FIFO in
place of a record, is `LinkInStore`: never followed, never opened, never a hang), read with a
bound, written temp-then-rename (`fsutil.atomic_write`) and removed with `fsutil.safe_unlink`.
"""

from __future__ import annotations

import contextlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagefs.errors import ImageFSError, IntegrityError, LayerFormatError
from imagefs.layers import chunks as chunk_tables
from imagefs.layers import seekindex
from imagefs.layers.layerindex import LayerIndex
from imagefs.oci.digest import Digest
from imagefs.store import fsutil
from imagefs.store.layout import Layout

ESTARGZ = "estargz"
ZSTD_CHUNKED = "zstdchunked"
PUBLISHED = "published"
KINDS = (ESTARGZ, ZSTD_CHUNKED, PUBLISHED)

_RAW_MAGIC = b"IFSRAW1\n"
_U32 = struct.Struct("<I")

# Bounds on what is read back (nothing in the store is read unbounded: a planted or grown
# file must not exhaust memory). An index or raw TOC record holds at most a 512 MiB
# zstd:chunked TOC (`zstdchunked.MAX_TOC_SIZE`) plus a seek index's windows; the referrer
# record is one line per layer.
MAX_RECORD = 1 << 30
MAX_REFERRERS = 4 << 20


@dataclass(frozen=True)
class Bound:
    """One manifest-bound entry: which layer, what kind, verified by which digest."""

    layer: Digest
    kind: str
    verifier: Digest

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.verifier.hex}"


def derive(bound: Bound, params: dict[str, Any], raw: bytes) -> LayerIndex:
    """The LayerIndex that verified raw bytes stand for; checks the verifier first.

    Pure and CPU-bound (run it in a thread). Raises IntegrityError when the raw bytes are
    not what the verifier names, LayerFormatError when they do not parse.
    """
    if bound.verifier.algorithm != "sha256" or Digest.of(raw) != bound.verifier:
        raise IntegrityError(
            f"{bound.kind} index for layer {bound.layer.short} is not {bound.verifier.short}"
        )
    # A format's modules are imported when a layer of that format is met, not by every mount.
    if bound.kind == ESTARGZ:
        from imagefs.layers import estargz, lostnames

        toc = estargz.parse_toc(raw)
        names = lostnames.from_params(params.get("names"))
        t, table, warnings = chunk_tables.from_estargz(toc, int(params["toc_offset"]), names)
        return LayerIndex(bound.layer, t, chunks=table, warnings=tuple(warnings))
    if bound.kind == ZSTD_CHUNKED:
        from imagefs.layers import lostnames, zstdchunked

        position = zstdchunked.ManifestPosition(
            int(params["offset"]), int(params["length"]), int(params["uncompressed"])
        )
        ztoc = zstdchunked.decode_manifest(raw, position)
        names = lostnames.from_params(params.get("names"))
        t, table, warnings = chunk_tables.from_zstd_chunked(ztoc, names)
        return LayerIndex(bound.layer, t, chunks=table, warnings=tuple(warnings))
    if bound.kind == PUBLISHED:
        idx = LayerIndex.from_bytes(bound.layer, raw)
        if idx.seek is None or idx.seek.blob_digest != str(bound.layer):
            raise IntegrityError(
                f"published index {bound.verifier.short} is not for layer {bound.layer.short}"
            )
        if int(params.get("layer_size", idx.seek.compressed_size)) != idx.seek.compressed_size:
            raise IntegrityError(f"published index {bound.verifier.short}: blob size mismatch")
        seekindex.check_span_bounds(idx.seek)
        idx.toc.check()  # built elsewhere: every record must hold what the accessors expect
        return idx
    raise LayerFormatError(f"unknown index kind {bound.kind!r}")


def _derived_bytes(bound: Bound, raw: bytes, index: LayerIndex) -> bytes:
    """The derived form to keep: a published index *is* a serialised LayerIndex, which
    `derive` parsed unchanged, so its raw bytes are kept as they are — serialising the parse
    again (`to_bytes`, zlib level 6 over the seek points' windows) cost ~90 ms per 40k-entry
    layer, on the path of a mount's first read."""
    return raw if bound.kind == PUBLISHED else index.to_bytes()


def _pack_raw(params: dict[str, Any], raw: bytes) -> bytes:
    head = json.dumps(params, sort_keys=True).encode()
    return _RAW_MAGIC + _U32.pack(len(head)) + head + raw


def _unpack_raw(data: bytes) -> tuple[dict[str, Any], bytes]:
    if not data.startswith(_RAW_MAGIC) or len(data) < len(_RAW_MAGIC) + 4:
        raise LayerFormatError("not an imagefs raw index record")
    (n,) = _U32.unpack_from(data, len(_RAW_MAGIC))
    pos = len(_RAW_MAGIC) + 4
    try:
        params = json.loads(data[pos : pos + n])
    except ValueError:
        raise LayerFormatError("raw index record: damaged parameters") from None
    if not isinstance(params, dict):
        raise LayerFormatError("raw index record: damaged parameters")
    return params, data[pos + n :]


class LayerIndexStore:
    """Synchronous; callers on trio run it in worker threads."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths = Layout(root)

    def _read(self, path: Path, limit: int | None = None) -> bytes | None:
        """A record's bytes (at most `limit`, MAX_RECORD by default), its directories reached
        from the root; None when absent. A link or FIFO anywhere on the way is LinkInStore."""
        return fsutil.read_bytes(path, root=self.root, limit=limit or MAX_RECORD)

    def _write(self, path: Path, data: bytes, *, durable: bool = True) -> None:
        fsutil.atomic_write(path, data, root=self.root, durable=durable)

    def _unlink(self, *paths: Path) -> None:
        for path in paths:
            fsutil.safe_unlink(path, root=self.root)

    # -- paths ------------------------------------------------------------------------------

    def layer_path(self, layer: Digest) -> Path:
        return self.paths.layer_indexes / layer.algorithm / layer.hex

    def bound_dir(self, layer: Digest) -> Path:
        return self.paths.bound_indexes / layer.algorithm / layer.hex

    def raw_path(self, bound: Bound) -> Path:
        return self.bound_dir(bound.layer) / bound.name

    def derived_path(self, bound: Bound) -> Path:
        return self.bound_dir(bound.layer) / f"{bound.name}.idx"

    def refused_path(self, bound: Bound) -> Path:
        return self.paths.refused_indexes / f"{bound.layer.hex}-{bound.name}"

    def referrers_path(self, manifest: Digest) -> Path:
        return self.paths.referrer_indexes / manifest.algorithm / manifest.hex

    # -- bound to the layer -----------------------------------------------------------------

    def load_layer(self, layer: Digest) -> LayerIndex | None:
        """The index built here from the verified blob; None when absent or damaged."""
        path = self.layer_path(layer)
        data = self._read(path)
        if data is None:
            return None
        try:
            idx = LayerIndex.from_bytes(layer, data)
        except LayerFormatError:
            idx = None
        if idx is None or idx.seek is None or idx.seek.blob_digest != str(layer):
            self._unlink(path)  # damaged, or not built from this blob: not bound
            return None
        return idx

    def save_layer(self, index: LayerIndex) -> None:
        if index.seek is None or index.seek.blob_digest != str(index.digest):
            raise ValueError("only an index built from the verified blob is bound to a layer")
        self._write(self.layer_path(index.digest), index.to_bytes())

    # -- bound to a manifest ----------------------------------------------------------------

    def refused(self, bound: Bound) -> bool:
        return fsutil.lstat(self.refused_path(bound), root=self.root) is not None

    def refuse(self, bound: Bound, why: str) -> None:
        self._write(self.refused_path(bound), why.encode() + b"\n")
        self._unlink(self.derived_path(bound), self.raw_path(bound))

    def load_bound(self, bound: Bound) -> LayerIndex | None:
        """The entry for exactly this (layer, kind, verifier), unless refused or damaged."""
        if self.refused(bound):
            return None
        data = self._read(self.derived_path(bound))
        if data is not None:
            with contextlib.suppress(LayerFormatError):
                return LayerIndex.from_bytes(bound.layer, data)
        raw = self.load_raw(bound)  # the derived form is a cache of the raw bytes: rebuild it
        if raw is None:
            return None
        try:
            idx = derive(bound, *raw)
        except ImageFSError:
            self.remove(bound)
            return None
        self._write(self.derived_path(bound), _derived_bytes(bound, raw[1], idx), durable=False)
        return idx

    def load_raw(
        self, bound: Bound, *, drop_damaged: bool = True
    ) -> tuple[dict[str, Any], bytes] | None:
        data = self._read(self.raw_path(bound))
        if data is None:
            return None
        try:
            return _unpack_raw(data)
        except LayerFormatError:
            if drop_damaged:
                self.remove(bound)
            return None

    def save_bound(
        self, bound: Bound, params: dict[str, Any], raw: bytes, index: LayerIndex
    ) -> None:
        """Keep verified raw bytes and what they derive to (raw first: it is the truth)."""
        self._write(self.raw_path(bound), _pack_raw(params, raw))
        self._write(self.derived_path(bound), _derived_bytes(bound, raw, index), durable=False)

    def remove(self, bound: Bound) -> None:
        self._unlink(self.derived_path(bound), self.raw_path(bound))

    def bound_entries(self, layer: Digest) -> list[Bound]:
        """The manifest-bound entries kept for a layer (any manifest's)."""
        out = []
        for entry in fsutil.scan(self.bound_dir(layer), root=self.root):
            kind, _, hexd = entry.name.partition("-")
            if entry.kind == "file" and kind in KINDS and "." not in hexd:
                with contextlib.suppress(ImageFSError):
                    out.append(Bound(layer, kind, Digest("sha256", hexd)))
        return out

    # -- which published indexes a manifest's referrers led to ------------------------------

    def referrers(self, manifest: Digest) -> dict[str, str]:
        data = self._read(self.referrers_path(manifest), MAX_REFERRERS)
        if data is None:
            return {}
        try:
            found = json.loads(data)
        except ValueError:
            return {}
        if not isinstance(found, dict):
            return {}
        return {str(k): str(v) for k, v in found.items()}

    def remember_referrers(self, manifest: Digest, found: dict[str, str]) -> None:
        merged = {**self.referrers(manifest), **found}
        data = json.dumps(merged, sort_keys=True).encode()
        self._write(self.referrers_path(manifest), data)


__all__ = ["ESTARGZ", "KINDS", "PUBLISHED", "ZSTD_CHUNKED", "Bound", "LayerIndexStore", "derive"]
