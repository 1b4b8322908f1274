"""The FUSE adapter's own cost per request, without FUSE and without the read path.

    .venv/bin/python tools/lib/bench/adaptercost.py LAYOUT [--repeat 5]

Builds the bench image's layer TOCs once (kept under `.bench/adapter-tocs/`), then replays,
straight into `ImageOperations` over a fresh `Overlay`, the requests the kernel sends for
three workloads of `tools/bench`: `find -ls` (opendir + readdirplus of every directory,
readlink of every symlink), 2000 random small files (lookups of path components not seen
before, as the dentry cache would, then open, read, release) and `tar cf -` (every file
opened, read in 128 KiB requests, released). The layer set is a stand-in whose `read`
returns bytes from memory at once, so what is timed is the adapter and the overlay above
the read path: what `imagefs/fs/operations.py` and `imagefs/overlay/merge.py` cost per
request. `pyfuse3.readdir_reply` (C, needs a kernel request) is replaced by a list append.

Prints the median over `--repeat` replays of microseconds per request per workload. Run
it with PYTHONPATH pointing at another checkout's sources to compare two versions.
"""

from __future__ import annotations

import argparse
import json
import random
import stat
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pyfuse3
import trio

from imagefs.fs.operations import ImageOperations
from imagefs.layers.layerindex import build_from_blob
from imagefs.layers.toc import Toc
from imagefs.lazy.layers import LayerSet
from imagefs.oci import mediatypes
from imagefs.oci.digest import Digest
from imagefs.overlay import ROOT_INODE, Overlay

READ_SIZE = 128 * 1024
SMALL = 64 * 1024
RANDOM_FILES = 2000


@dataclass
class _Index:
    toc: Toc


@dataclass
class _Layer:
    digest: Digest


class MemoryLayers:
    """What ImageOperations uses of a LayerSet, answering from memory."""

    def __init__(self, tocs: list[Toc]) -> None:
        self.layers = [_Layer(Digest.parse(f"sha256:{i:064x}")) for i in range(len(tocs))]
        self._idx = [_Index(t) for t in tocs]
        self._zeros = bytes(READ_SIZE)
        self.nursery = None  # no background loads: every layer is loaded already

    async def ensure(self, i: int) -> _Index:
        return self._idx[i]

    def index(self, i: int) -> _Index:
        return self._idx[i]

    def loaded(self, i: int) -> bool:
        return True

    def read_warm(self, i: int, offset: int, length: int, **_: Any) -> bytes | None:
        return self._zeros[:length]  # every read is warm

    async def read(self, i: int, offset: int, length: int, **_: Any) -> bytes:
        return self._zeros[:length]


def load_tocs(layout: Path, cache: Path) -> list[Toc]:
    manifest_desc = json.loads((layout / "index.json").read_text())["manifests"][0]
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / manifest_desc["digest"].split(":")[1]).read_text())
    cache.mkdir(parents=True, exist_ok=True)
    tocs = []
    for desc in manifest["layers"]:
        digest = Digest.parse(desc["digest"])
        kept = cache / f"{digest.hex}.toc"
        if kept.exists():
            tocs.append(Toc.from_bytes(kept.read_bytes()))
            continue
        compression = mediatypes.layer_compression(desc["mediaType"])
        idx = build_from_blob(blobs / digest.hex, digest, compression)
        kept.write_bytes(idx.toc.to_bytes())
        tocs.append(idx.toc)
    return tocs


def _ops(tocs: list[Toc]) -> ImageOperations:
    overlay = Overlay(len(tocs), exact_dir_nlink=False)  # as the daemon makes it
    return ImageOperations(overlay, cast(LayerSet, MemoryLayers(tocs)))


_listing: list[tuple[bytes, pyfuse3.EntryAttributes]] = []


def _reply(
    token: pyfuse3.ReaddirToken, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int
) -> bool:
    _listing.append((name, attr))
    return True


async def find_ls(tocs: list[Toc]) -> tuple[int, list[tuple[bytes, int, int]]]:
    """Returns (requests, files as (path, inode, size)) for the other workloads to use."""
    ops = _ops(tocs)
    ctx = cast(pyfuse3.RequestContext, None)
    requests = 0
    files: list[tuple[bytes, int, int]] = []
    stack: list[tuple[bytes, int]] = [(b"", ROOT_INODE)]
    while stack:
        path, ino = stack.pop()
        fh = await ops.opendir(ino, ctx)
        _listing.clear()
        await ops.readdir(fh, 0, cast(pyfuse3.ReaddirToken, None))
        await ops.releasedir(fh)
        requests += 3 + len(_listing)  # each readdirplus entry counts as one
        for name, attrs in list(_listing):
            if name in (b".", b".."):  # listed first since readdir shows them; not children
                continue
            child = path + b"/" + name if path else name
            if stat.S_ISDIR(attrs.st_mode):
                stack.append((child, attrs.st_ino))
            elif stat.S_ISLNK(attrs.st_mode):
                await ops.readlink(attrs.st_ino, ctx)
                requests += 1
            elif stat.S_ISREG(attrs.st_mode):
                files.append((child, attrs.st_ino, attrs.st_size))
    return requests, files


async def random_reads(tocs: list[Toc], paths: list[bytes]) -> int:
    ops = _ops(tocs)
    ctx = cast(pyfuse3.RequestContext, None)
    known: dict[bytes, int] = {b"": ROOT_INODE}  # the kernel's dentry cache
    requests = 0
    for path in paths:
        parent = b""
        for comp in path.split(b"/"):
            here = parent + b"/" + comp if parent else comp
            if here not in known:
                known[here] = (await ops.lookup(known[parent], comp, ctx)).st_ino
                requests += 1
            parent = here
        info = await ops.open(known[path], 0, ctx)
        off = 0
        while data := await ops.read(info.fh, off, READ_SIZE):
            off += len(data)
            requests += 1
        await ops.release(info.fh)
        requests += 3  # open, the read at EOF, release
    return requests


async def _replay(tocs: list[Toc], repeat: int) -> dict[str, float]:
    times: dict[str, list[float]] = {"find": [], "random": [], "tar": []}
    for _ in range(repeat):
        t0 = time.process_time()
        n_find, files = await find_ls(tocs)
        times["find"].append((time.process_time() - t0) / n_find)
        small = sorted(p for p, _, size in files if 0 < size < SMALL)
        paths = random.Random(20240607).sample(small, min(RANDOM_FILES, len(small)))
        t0 = time.process_time()
        n_random = await random_reads(tocs, paths)
        times["random"].append((time.process_time() - t0) / n_random)
        t0 = time.process_time()
        n_tar = await tar_all(tocs)
        times["tar"].append((time.process_time() - t0) / n_tar)
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


async def tar_all(tocs: list[Toc]) -> int:
    """`tar cf -` on a fresh overlay: each directory listed, then each of its files opened,
    read in READ_SIZE requests (the last one at EOF) and released."""
    ops = _ops(tocs)
    ctx = cast(pyfuse3.RequestContext, None)
    requests = 0
    stack: list[int] = [ROOT_INODE]
    while stack:
        fh = await ops.opendir(stack.pop(), ctx)
        _listing.clear()
        await ops.readdir(fh, 0, cast(pyfuse3.ReaddirToken, None))
        await ops.releasedir(fh)
        requests += 3 + len(_listing)
        for name, attrs in list(_listing):
            if name in (b".", b".."):  # listed first since readdir shows them; not children
                continue
            if stat.S_ISDIR(attrs.st_mode):
                stack.append(attrs.st_ino)
            elif stat.S_ISREG(attrs.st_mode):
                info = await ops.open(attrs.st_ino, 0, ctx)
                for off in range(0, attrs.st_size + 1, READ_SIZE):
                    await ops.read(info.fh, off, READ_SIZE)
                    requests += 1
                await ops.release(info.fh)
                requests += 2
    return requests


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="adaptercost", description=__doc__.split("\n\n")[0])
    p.add_argument("layout", type=Path)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--tocs", type=Path, default=Path(".bench/adapter-tocs"))
    a = p.parse_args(argv)
    tocs = load_tocs(a.layout, a.tocs)
    pyfuse3.readdir_reply = _reply
    result = trio.run(_replay, tocs, a.repeat)
    print(" ".join(f"{k}={v:.2f}us/request" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
