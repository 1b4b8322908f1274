"""Layer format conversions for the bench's image variants: gzip tar layers to eStargz.

`tar_to_filespecs` turns one tar stream into the `FileSpec` entries imagefs's eStargz writer
(`imagefs.layers.estargz.write_estargz`) takes, keeping type, mode, owner, mtime, link
targets, device numbers and xattrs. `estargz_layout` writes every layer of a built image
again as eStargz into the same OCI layout, under a tag of its own, with the TOC digest
annotation.
"""

from __future__ import annotations

import gzip
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from bench.util import BenchError, log, run
from imagefs.layers.estargz import TOC_DIGEST_ANNOTATION, FileSpec, footer_size, parse_footer
from imagefs.layers.estargz import write_estargz as _write_estargz
from imagefs.testing.images import LayoutImage, layout_append_blob

CONVERTED_TAG = "estargz-v2"
"""The converted image's tag suffix in the bench's OCI layout, where a conversion is kept and
reused: bump it whenever the conversion's output changes, so a cached one is not measured in
its place (v2: device numbers kept)."""


def converted_tag(image_name: str) -> str:
    """The tag `estargz_layout` keeps image `image_name`'s eStargz conversion under."""
    return f"{image_name}-{CONVERTED_TAG}"


ESTARGZ_CHUNK = 4 << 20
"""Chunk size of large files (the writer's default; containerd's estargz uses 4 MiB too)."""

_TYPES = {
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.CONTTYPE: "reg",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}
_XATTR = "SCHILY.xattr."


def tar_to_filespecs(fileobj: IO[bytes] | gzip.GzipFile) -> Iterator[FileSpec]:
    """The entries of an uncompressed tar stream as eStargz `FileSpec`s, in tar order.

    Names are kept as the tar has them (directories get a trailing `/`, as eStargz TOCs
    write them); whiteouts are ordinary files to the writer and stay whiteouts for readers.
    """
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for member in tar:
            kind = _TYPES.get(member.type)
            if kind is None:
                raise BenchError(f"tar entry {member.name!r}: unsupported type {member.type!r}")
            data = b""
            if kind == "reg":
                f = tar.extractfile(member)
                if f is None:
                    raise BenchError(f"tar entry {member.name!r}: no data")
                data = f.read()
            name = member.name
            if kind == "dir" and not name.endswith("/"):
                name += "/"
            xattrs = {
                k[len(_XATTR) :]: v.encode("utf-8", "surrogateescape")
                for k, v in member.pax_headers.items()
                if k.startswith(_XATTR)
            }
            yield FileSpec(
                name=name,
                type=kind,
                data=data,
                mode=member.mode,
                uid=member.uid,
                gid=member.gid,
                mtime=int(member.mtime),
                link_name=member.linkname,
                xattrs=xattrs,
                dev_major=member.devmajor,
                dev_minor=member.devminor,
            )


def toc_fetch_bytes(blob: Path) -> int:
    """What imagefs fetches to read this eStargz blob's footer and TOC: the last 64 KiB,
    plus the TOC member from its offset when it starts earlier (imagefs/lazy/layers.py)."""
    tail_fetch = 64 << 10
    size = blob.stat().st_size
    with open(blob, "rb") as f:
        f.seek(max(0, size - tail_fetch))
        tail = f.read()
    toc_offset = parse_footer(tail)
    total = len(tail)
    if toc_offset < size - len(tail):
        total += size - footer_size(tail) - toc_offset
    return total


def estargz_layout(source: LayoutImage, tag: str) -> LayoutImage:
    """`source`'s layers rewritten as eStargz, in the same layout under `tag` (cached: an
    existing `tag` is reused). diff_ids are the new tars'; the runtime config stays empty,
    as the bench images' is."""
    if _tagged(source.layout, tag):
        return LayoutImage(source.layout, tag)
    layers = source.layers()
    log(f"converting {source.tag} to eStargz ({len(layers)} layers)")
    # A fresh manifest under a scratch tag, one layer at a time; the last append names `tag`,
    # so an interrupted conversion leaves no `tag` behind.
    scratch = f"{tag}.partial-{os.getpid()}"
    run(["umoci", "new", "--image", f"{source.layout}:{scratch}"])
    image = LayoutImage(source.layout, scratch)
    for i, desc in enumerate(layers):
        blob_path = source.layout / "blobs" / "sha256" / str(desc["digest"]).split(":", 1)[1]
        with gzip.open(blob_path, "rb") as raw:
            specs = list(tar_to_filespecs(raw))
        written = _write_estargz(specs, chunk_size=ESTARGZ_CHUNK)
        log(
            f"  layer {i}: {len(specs):,} entries, gzip {int(desc['size']) / 1e6:.1f} MB -> "
            f"eStargz {len(written.blob) / 1e6:.1f} MB"
        )
        image = layout_append_blob(
            image,
            written.blob,
            diff_id=written.diff_id,
            media_type="application/vnd.oci.image.layer.v1.tar+gzip",
            annotations={TOC_DIGEST_ANNOTATION: written.toc_digest},
            tag=tag if i == len(layers) - 1 else None,
            created_by=f"bench: layer {i} of {source.tag} as eStargz",
        )
    return LayoutImage(source.layout, tag)


def _tagged(layout: Path, tag: str) -> bool:
    index = json.loads((layout / "index.json").read_text())
    return any(
        desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
        for desc in index["manifests"]
    )
