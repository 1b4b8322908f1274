"""The content tree the lazy-loading tests publish, and what they count of its fetches.

A few small files and four 3 MiB incompressible files, published (by the fixtures in
`conftest.py`) as a plain gzip image with a pushed imagefs index, as zstd:chunked and as
eStargz. Plain values and helpers live here, the fixtures in `conftest.py`, so that no test
module imports another.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

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
