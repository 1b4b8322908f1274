"""The content tree the lazy-loading tests publish, and what they count of its fetches.

A few small files and four 3 MiB incompressible files, published (by the fixtures in
`conftest.py`) as a plain gzip image with a pushed imagefs index, as zstd:chunked and as
eStargz. Plain values and helpers live here, the fixtures in `conftest.py`, so that no test
module imports another.
"""

from __future__ import annotations

import os
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

from imagefs.layers import estargz
from imagefs.lazy.packs import locate_piece
from imagefs.testing.images import (
    LayoutImage,
    PushedImage,
    init_layout,
    layout_append_blob,
    push,
)
from imagefs.testing.registry import LocalRegistry

SMALL = {
    "etc/motd": b"lazy loading: only what is read\n",
    "etc/hostname": b"imagefs\n",
    "usr/share/doc/readme.txt": b"read me\n" * 100,
}
BIG = {f"data/big{k}.bin": random.Random(k).randbytes(3 << 20) for k in range(4)}
FILES = {**SMALL, **BIG}


@dataclass(frozen=True)
class Published:
    ref: str
    layer_digests: list[str]
    layer_size: int  # the (single) content layer's blob size
    # what mount/ls/cat need to read it lazily: the gzip image's index is published next to
    # it, which imagefs uses only when asked (`--trust-published-index`)
    flags: tuple[str, ...] = ()

    @property
    def trusts_published_index(self) -> bool:
        return "--trust-published-index" in self.flags


def write_files(rootfs: Path) -> None:
    """Writes FILES under `rootfs` (a umoci rootfs step)."""
    for name, data in FILES.items():
        path = rootfs / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def layer_fetches(registry: LocalRegistry, pub: Published) -> list[tuple[int, int]]:
    """(status, bytes) of every GET of the image's layer blobs since the last mark."""
    return [
        (r.status, r.bytes_written or 0)
        for r in registry.blob_gets()
        if r.path.rsplit("/", 1)[1] in pub.layer_digests
    ]


def push_estargz(
    registry: LocalRegistry,
    work: Path,
    ref: str,
    specs: list[estargz.FileSpec],
    *,
    chunk_size: int = 4 << 20,
    prefetch: int | None = None,
    toc_digest: str | None = None,
) -> tuple[PushedImage, LayoutImage]:
    """Writes `specs` as one eStargz layer (umoci base, TOC digest annotated as ctr-remote
    does — or `toc_digest`, a wrong one, for a TOC a mount must refuse), pushes it to
    `registry` as `ref`, and returns the push and the layout image."""
    layout = init_layout(work / "layout")
    subprocess.run(["umoci", "new", "--image", f"{layout}:esgz"], check=True)
    blob = estargz.write_estargz(specs, chunk_size=chunk_size, prefetch=prefetch)
    image = layout_append_blob(
        LayoutImage(layout, "esgz"),
        blob.blob,
        diff_id=blob.diff_id,
        media_type="application/vnd.oci.image.layer.v1.tar+gzip",
        annotations={"containerd.io/snapshot/stargz/toc.digest": toc_digest or blob.toc_digest},
    )
    return push(image, registry, ref), image


def rot_piece(path: Path) -> None:
    """Flip the last byte of the cached piece at `path` (its own payload in its pack, so
    that other pieces of the pack stay whole)."""
    fd = os.open(path, os.O_RDWR)
    try:
        where = locate_piece(fd, path.name, os.fstat(fd).st_size)
        assert where is not None, path
        last = where[0] + where[1] - 1
        os.pwrite(fd, bytes([os.pread(fd, 1, last)[0] ^ 0x01]), last)
    finally:
        os.close(fd)
