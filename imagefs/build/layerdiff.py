"""An overlayfs upper directory -> an OCI layer (tar + gzip), digests taken in the same pass.

The upper directory of a step *is* its diff: what the step created or changed is there, a
deleted lower entry is a character device 0:0 (a whiteout), and a directory whose lower
children must all be hidden carries `trusted.overlay.opaque=y`. In the layer those become
`.wh.NAME` (an empty regular file, mode 0, owner 0:0, mtime 0, as containerd 2 writes
it for BuildKit) and `DIR/.wh..wh..opq` (OCI image-spec layer.md).

The tar is what BuildKit writes: entries in lexical order, parents before children, numeric
owners without names, PAX headers where needed (long or non-UTF-8 names, `SCHILY.xattr.*`,
binary values included), hard links inside the layer kept as links. With `SOURCE_DATE_EPOCH`
every mtime newer than it is clamped to it (BuildKit's `rewrite-timestamp`), so a rebuild of
the same inputs gives the same bytes. Overlay's own `trusted.overlay.*` xattrs never leave
the machine.

Whiteouts made by overlayfs may all be hard links of one inode in the work directory, so
devices 0:0 are never treated as hard links.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from imagefs.oci.digest import Digest

WHITEOUT_PREFIX = ".wh."
OPAQUE = ".wh..wh..opq"
_OVERLAY_XATTR = "trusted.overlay."


@dataclass(frozen=True)
class LayerBlob:
    digest: Digest
    """sha256 of the compressed blob."""
    diff_id: Digest
    """sha256 of the uncompressed tar."""
    size: int
    entries: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    """For the manifest's layer descriptor (an eStargz layer's TOC digest)."""


class _HashingWriter:
    """A write-only file that hashes what passes through and forwards it."""

    def __init__(self, sink: IO[bytes] | None) -> None:
        self.sink = sink
        self.hasher = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hasher.update(data)
        self.size += len(data)
        if self.sink is not None:
            self.sink.write(data)
        return len(data)

    def flush(self) -> None:
        if self.sink is not None:
            self.sink.flush()


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _xattrs(path: Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for name in sorted(names):
        if name.startswith(_OVERLAY_XATTR):
            continue
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
    return out


def _is_opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


def walk_upper(upper: Path) -> Iterator[tuple[str, Path, os.stat_result]]:
    """(name in the layer, path, lstat) in lexical depth-first order, root excluded."""

    def visit(directory: Path, prefix: str) -> Iterator[tuple[str, Path, os.stat_result]]:
        names = sorted(os.listdir(os.fsencode(directory)))
        for raw in names:
            name = os.fsdecode(raw)
            path = directory / name
            st = path.lstat()
            rel = f"{prefix}{name}"
            yield rel, path, st
            if stat.S_ISDIR(st.st_mode):
                yield from visit(path, rel + "/")

    yield from visit(upper, "")


def _clamp(mtime: float, epoch: int | None) -> int:
    value = int(mtime)
    return min(value, epoch) if epoch is not None else value


def _info(name: str, st: os.stat_result, epoch: int | None) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    info.mtime = _clamp(st.st_mtime, epoch)
    return info


def layer_entries(
    upper: Path, epoch: int | None = None
) -> Iterator[tuple[tarfile.TarInfo, Path | None]]:
    """The tar entries of `upper`'s layer, in order; a regular file's comes with its path
    (its data is read by whoever writes the tar: gzip and eStargz writers alike)."""
    links: dict[tuple[int, int], str] = {}
    for rel, path, st in walk_upper(upper):
        parent, _, base = rel.rpartition("/")
        if is_whiteout(st):
            wh = f"{parent}/{WHITEOUT_PREFIX}{base}" if parent else WHITEOUT_PREFIX + base
            # as containerd 2 (BuildKit's differ) writes it: mode 0, owner 0:0, mtime 0
            # -- who deleted the entry, and when, is not part of the layer
            info = tarfile.TarInfo(wh)
            info.mode = info.uid = info.gid = info.mtime = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            yield info, None
            continue
        info = _info(rel, st, epoch)
        xattrs = _xattrs(path)
        if xattrs:
            info.pax_headers = {
                f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()
            }
        mode = st.st_mode
        key = (st.st_dev, st.st_ino)
        if stat.S_ISREG(mode) and st.st_nlink > 1 and key in links:
            info.type = tarfile.LNKTYPE
            info.linkname = links[key]
            yield info, None
        elif stat.S_ISREG(mode):
            if st.st_nlink > 1:
                links[key] = rel
            info.type = tarfile.REGTYPE
            info.size = st.st_size
            yield info, path
        elif stat.S_ISDIR(mode):
            info.type = tarfile.DIRTYPE
            yield info, None
            if _is_opaque(path):
                opq = _info(f"{rel}/{OPAQUE}", st, epoch)
                opq.mode = 0o644
                opq.pax_headers = {}
                yield opq, None
        elif stat.S_ISLNK(mode):
            info.type = tarfile.SYMTYPE
            info.linkname = os.readlink(path)
            yield info, None
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            yield info, None
        elif stat.S_ISFIFO(mode):
            info.type = tarfile.FIFOTYPE
            yield info, None
        # sockets have no tar form; docker skips them too


def write_tar(upper: Path, out: IO[bytes], epoch: int | None = None) -> int:
    """Write the layer tar of `upper` to `out`; returns the number of entries."""
    count = 0
    with tarfile.open(
        fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8",
        errors="surrogateescape",
    ) as tar:  # fmt: skip
        for info, path in layer_entries(upper, epoch):
            if path is None:
                tar.addfile(info)
            else:
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            count += 1
    return count


def write_layer(upper: Path, out: IO[bytes], epoch: int | None = None) -> LayerBlob:
    """tar -> sha256 (diff_id) -> gzip -> sha256 (digest) -> `out`, in one pass."""
    compressed = _HashingWriter(out)
    # mtime=0 and no file name in the gzip header: the same tar always gives the same blob.
    sink: Any = compressed
    with gzip.GzipFile(filename="", mode="wb", fileobj=sink, mtime=0, compresslevel=6) as gz:
        plain = _HashingWriter(gz)  # type: ignore[arg-type]
        count = write_tar(upper, plain, epoch)  # type: ignore[arg-type]
    return LayerBlob(
        digest=Digest.parse(f"sha256:{compressed.hasher.hexdigest()}"),
        diff_id=Digest.parse(f"sha256:{plain.hasher.hexdigest()}"),
        size=compressed.size,
        entries=count,
    )


def is_empty(upper: Path) -> bool:
    return not any(os.scandir(upper))
