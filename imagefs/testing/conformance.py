"""Images for the mount conformance suite, made by tools that are not imagefs.

`build_conformance_image` makes one gzip OCI layout whose layers come from umoci (what a
rootfs diff produces: whiteouts, type changes, metadata-only changes, hard links, symlinks,
xattrs, odd names, every mode bit, big owners, devices, a 50 MiB file), GNU tar (a real
`.wh..wh..opq`, a whiteout and a re-creation in one layer, GNU long names) and Python's
tarfile (what neither writes: a hard link to a file of a lower layer, a path written twice
around a hard link, implicit directories). `umoci unpack` of that layout is the reference a
mount is compared with, entry by entry (`imagefs.testing.treecmp`).

`estargz_layout` wraps `imagefs.layers.estargz.write_estargz` blobs into an image, and
`bad_layers` holds hand-made layer tars that are broken in the ways real registries serve.

Everything here is synchronous, like the rest of `imagefs.testing`.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import stat
import struct
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from imagefs.testing.images import (
    LayoutImage,
    build_umoci_image,
    layout_add_tar_layer,
    layout_append_blob,
    layout_append_layer,
)

__all__ = [
    "BIG_FILE",
    "BIG_SIZE",
    "IMPLICIT_NEW_DIRS",
    "BadImages",
    "ConformanceImage",
    "EStargzImages",
    "TarItem",
    "big_file_bytes",
    "build_bad_images",
    "build_conformance_image",
    "build_estargz_images",
    "capability_xattr",
    "set_header_field",
    "strip_root_members",
    "tar_bytes",
]

BIG_SIZE = 50 << 20
BIG_FILE = "big/random-ish.bin"
"""The 50 MiB file (relative to the image root)."""

IMPLICIT_NEW_DIRS = (b"implicit", b"implicit/only")
"""Directories that only exist as parents of names in a tarfile layer (no entry of their own)
and that no lower layer had. umoci creates them with MkdirAll at extraction time and never
sets their mtime; the mount shows mtime 0 (see `imagefs.layers.toc`)."""

_GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

# A fixed timestamp for everything the builders create, so listings are stable across runs.
_T0 = 1_600_000_000


def big_file_bytes(size: int = BIG_SIZE, seed: int = 3) -> bytes:
    """Deterministic, moderately compressible bytes: PRNG output mapped onto 23 symbols.

    Random over a small alphabet makes gzip and zstd emit real Huffman-coded blocks (not
    stored ones), so seek points land at arbitrary bit offsets inside compressed blocks.
    """
    table = bytes(b"abcdefghijklmnopqrstuvw"[i % 23] for i in range(256))
    return random.Random(seed).randbytes(size).translate(table)


def capability_xattr(bits: int = 1 << 10) -> bytes:
    """A `security.capability` value (VFS_CAP_REVISION_2, effective): binary, with NULs.

    Default: CAP_NET_BIND_SERVICE permitted. The kernel validates the layout on setxattr.
    """
    return struct.pack("<IIIII", 0x02000001, bits & 0xFFFFFFFF, 0, bits >> 32, 0)


# --------------------------------------------------------------------------------------------
# Hand-made layer tars


@dataclass(frozen=True)
class TarItem:
    """One member of a hand-made layer tar (Python's tarfile, PAX format)."""

    name: str | bytes
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = _T0
    linkname: str | bytes = ""
    pax: Mapping[str, str] | None = None


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", "surrogateescape")


def tar_bytes(items: Sequence[TarItem], *, end: bool = True) -> bytes:
    """An uncompressed PAX tar of `items`, in order; without `end` no end-of-archive blocks."""
    out = bytearray()
    for item in items:
        info = tarfile.TarInfo(_text(item.name))
        info.type = item.type
        info.mode = item.mode
        info.uid, info.gid = item.uid, item.gid
        info.mtime = item.mtime
        info.linkname = _text(item.linkname)
        info.size = len(item.data) if item.type == tarfile.REGTYPE else 0
        if item.pax:
            info.pax_headers = dict(item.pax)
        out += info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        if info.size:
            out += item.data + bytes(-len(item.data) % tarfile.BLOCKSIZE)
    if end:
        out += bytes(2 * tarfile.BLOCKSIZE)
    return bytes(out)


def empty_umoci_image(layout: Path, tag: str) -> LayoutImage:
    """An image with no layers at all (umoci new), to stack hand-made layers on."""
    return build_umoci_image(layout, [], tag=tag)


# --------------------------------------------------------------------------------------------
# The conformance image


@dataclass(frozen=True)
class ConformanceImage:
    layout: LayoutImage
    """The gzip OCI layout (umoci layers 0-2, GNU tar layer 3, tarfile layer 4)."""
    big_sha256: str
    """sha256 of BIG_FILE's content."""
    layer_count: int


def _write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _stamp(path: Path, t: int = _T0) -> None:
    os.utime(path, ns=(t * 10**9, t * 10**9), follow_symlinks=False)


def _stamp_tree(rootfs: Path) -> None:
    """Fixed mtimes on every directory (umoci records what it finds; keep it stable)."""
    for dirpath, _dirs, _files in os.walk(rootfs):
        _stamp(Path(dirpath))


def _layer0(rootfs: Path, big: bytes) -> None:
    _write(rootfs / "etc/keep.txt", b"kept, then replaced by GNU tar in layer 3\n")
    _write(rootfs / "etc/remove-me.txt", b"whited out in layer 1\n")
    _write(rootfs / "gone/dir/a.txt", b"a\n")
    _write(rootfs / "gone/dir/sub/b.txt", b"b\n")
    _write(rootfs / "gone/stays.txt", b"stays\n")
    _write(rootfs / "swap/f2d", b"a file that becomes a directory\n")
    _write(rootfs / "swap/d2f/child.txt", b"child\n")
    _write(rootfs / "swap/d2f/sub/deeper.txt", b"deeper\n")
    _write(rootfs / "recreate/file.txt", b"version 1\n")
    _write(rootfs / "recreate/dir/old.txt", b"old\n")
    _write(rootfs / "meta/chmod.txt", b"chmod me\n")
    _write(rootfs / "meta/chown.txt", b"chown me\n")
    _write(rootfs / "meta/touch.txt", b"touch me\n")
    (rootfs / "meta/dir").mkdir()
    _write(rootfs / "links/base.txt", b"hard-linked from upper layers\n")
    a = _write(rootfs / "links/l0-a", b"three names, one inode\n")
    os.link(a, rootfs / "links/l0-b")
    os.link(a, rootfs / "links/l0-c")
    _write(rootfs / "opq/lower.txt", b"hidden by the opaque marker\n")
    _write(rootfs / "opq/sub/lower2.txt", b"also hidden\n")
    _write(rootfs / "empty-file", b"")
    (rootfs / "empty-dir").mkdir()
    _write(rootfs / BIG_FILE, big)
    _stamp_tree(rootfs)


def _layer1(rootfs: Path) -> None:
    # whiteouts
    (rootfs / "etc/remove-me.txt").unlink()
    shutil.rmtree(rootfs / "gone/dir")
    # type changes
    (rootfs / "swap/f2d").unlink()
    _write(rootfs / "swap/f2d/inner.txt", b"now a directory\n")
    shutil.rmtree(rootfs / "swap/d2f")
    _write(rootfs / "swap/d2f", b"now a file\n")
    # deleted here, re-created in layer 2
    (rootfs / "recreate/file.txt").unlink()
    shutil.rmtree(rootfs / "recreate/dir")
    # metadata only
    (rootfs / "meta/chmod.txt").chmod(0o600)
    os.chown(rootfs / "meta/chown.txt", 4242, 4343)
    os.utime(rootfs / "meta/touch.txt", ns=(_T0 * 10**9, 1_234_567_890_123_456_789))
    (rootfs / "meta/dir").chmod(0o700)
    # symlinks
    sym = rootfs / "sym"
    sym.mkdir()
    (sym / "absolute").symlink_to("/etc/passwd")
    (sym / "relative").symlink_to("../etc/keep.txt")
    (sym / "to-dir").symlink_to("../links")
    (sym / "dangling").symlink_to("does/not/exist")
    (sym / "loop1").symlink_to("loop2")
    (sym / "loop2").symlink_to("loop1")
    (sym / "self").symlink_to("self")
    (sym / "long").symlink_to("/" + "/".join(f"component-{i:02d}" for i in range(20)))
    os.lchown(sym / "relative", 123, 456)
    # xattrs (umoci records them as PAX SCHILY.xattr.*)
    x = _write(rootfs / "xattr/file", b"with xattrs\n")
    os.setxattr(x, "user.comment", b"plain text")
    os.setxattr(x, "user.binary", bytes(range(256)))
    os.setxattr(x, "user.empty", b"")
    os.setxattr(x, "security.capability", capability_xattr())
    c = _write(rootfs / "xattr/cap-only", b"#!/bin/sh\n", 0o755)
    os.setxattr(c, "security.capability", capability_xattr((1 << 12) | (1 << 13)))
    os.setxattr(rootfs / "xattr", "user.on-a-dir", b"dir value")
    # odd names
    odd = rootfs / "odd"
    odd.mkdir()
    for name in (
        b"with space",
        b"new\nline",
        b"tab\there",
        b"non-utf8-\xff\xfe-\xe9t\xe9",
        "ünïcödé-☃".encode(),
        b"-leading-dash",
        b".hidden",
        b"back\\slash",
        b"quote\"'",
        b"n" * 255,
    ):
        _write(Path(os.fsdecode(bytes(odd) + b"/" + name)), b"odd name: " + name + b"\n")
    deep = odd / "deep"
    for i in range(6):
        deep = deep / (f"{i}" * 60)
    _write(deep / ("f" * 100), b"a path over 256 bytes\n")
    # every mode bit
    modes = rootfs / "modes"
    modes.mkdir()
    for mode in (0o4755, 0o2755, 0o1755, 0o6777, 0o7777, 0o7000, 0o0000, 0o0777, 0o0400, 0o0111):
        _write(modes / f"f-{mode:04o}", f"mode {mode:04o}\n".encode(), mode)
    for mode in (0o1777, 0o0700, 0o2775, 0o0000, 0o0555, 0o7755):
        d = modes / f"d-{mode:04o}"
        d.mkdir()
        d.chmod(mode)
    # owners
    owners = rootfs / "owners"
    owners.mkdir()
    for owner, uid, gid in (
        ("max31", 2**31 - 2, 2**31 - 2),
        ("nobody", 65534, 65534),
        ("million", 1_000_000, 1_000_001),
        ("mixed", 0, 2**31 - 2),
    ):
        os.chown(_write(owners / owner, owner.encode() + b"\n"), uid, gid)
    (owners / "dir").mkdir()
    os.chown(owners / "dir", 1_000_000, 65534)
    # devices and fifos
    dev = rootfs / "dev"
    dev.mkdir()
    os.mknod(dev / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(dev / "sda1", 0o660 | stat.S_IFBLK, os.makedev(8, 1))
    os.mknod(dev / "big-numbers", 0o600 | stat.S_IFCHR, os.makedev(254, 300_000))
    os.mkfifo(dev / "fifo", 0o644)
    os.chown(dev / "sda1", 0, 6)
    _stamp_tree(rootfs)


def _layer2(rootfs: Path) -> None:
    _write(rootfs / "recreate/file.txt", b"version 2, after a whiteout\n", 0o755)
    _write(rootfs / "recreate/dir/new.txt", b"new\n")
    a = _write(rootfs / "links/l2-a", b"linked within layer 2\n")
    os.link(a, rootfs / "links/l2-b")
    # A new name for a file of layer 0: umoci decides whether base.txt is re-emitted.
    os.link(rootfs / "links/base.txt", rootfs / "links/l2-to-base")
    _stamp_tree(rootfs)


def _gnu_layer(root: Path) -> None:
    """Layer 3, written by GNU tar (`--format=gnu`, names sorted, owner 0, mtime 0)."""
    _write(root / "opq/.wh..wh..opq", b"")
    _write(root / "opq/new.txt", b"the only child left\n")
    # a whiteout and a re-creation of the same name in one layer
    _write(root / "etc/.wh.keep.txt", b"")
    _write(root / "etc/keep.txt", b"written by GNU tar\n")
    # GNU long names (././@LongLink) and a non-UTF-8 name in GNU format
    _write(root / ("gnu/" + "g" * 150), b"long GNU name\n")
    _write(Path(os.fsdecode(bytes(root) + b"/gnu/latin1-\xe9")), b"latin-1\n")
    os.symlink("t" * 150, root / "gnu/long-link-target")
    for d in (root / "opq", root / "etc", root / "gnu"):
        d.chmod(0o755)


def _tarfile_layer(layer0_base_mtime: int) -> bytes:
    """Layer 4 (Python tarfile): what umoci and GNU tar do not write from a tree diff."""
    d = tarfile.DIRTYPE
    return tar_bytes(
        [
            TarItem("links", d, mode=0o755, mtime=layer0_base_mtime),
            # a hard link to a file of a lower layer
            TarItem("links/to-lower", tarfile.LNKTYPE, linkname="links/base.txt"),
            # the same path twice around hard links: each link keeps the version before it
            TarItem("twice", d, mode=0o755),
            TarItem("twice/t", data=b"first version\n"),
            TarItem("twice/link-to-first", tarfile.LNKTYPE, linkname="twice/t"),
            TarItem("twice/t", data=b"second version, the visible one\n", mode=0o600),
            TarItem("twice/link-to-second", tarfile.LNKTYPE, linkname="twice/t"),
            # duplicates of other kinds: last one wins
            TarItem("twice/sym", tarfile.SYMTYPE, linkname="first"),
            TarItem("twice/sym", tarfile.SYMTYPE, linkname="second"),
            TarItem("twice/dir", d, mode=0o700),
            TarItem("twice/dir", d, mode=0o750, uid=7, gid=8),
            # a header-only entry whose size field lies: readers ignore it
            TarItem("twice/fifo-with-size", tarfile.FIFOTYPE, pax={"size": "0"}, mode=0o640),
            # directories that no layer has an entry for (see IMPLICIT_NEW_DIRS)
            TarItem("implicit/only/child.txt", data=b"parents are implicit\n"),
            # PAX records umoci does not write: nanosecond mtimes, big owners by record
            TarItem(
                "pax/nanos",
                data=b"ns\n",
                pax={"mtime": "1600000000.987654321", "uid": "3000000000", "gid": "77"},
            ),
            TarItem("pax", d, mode=0o711),
        ]
    )


def build_conformance_image(workdir: Path, *, tag: str = "conformance") -> ConformanceImage:
    """Build the 5-layer conformance image in `workdir/conformance-layout` (see module doc)."""
    layout = workdir / "conformance-layout"
    big = big_file_bytes()
    image = build_umoci_image(
        layout,
        [lambda r: _layer0(r, big), _layer1, _layer2],
        tag=tag,
        cmd=["/bin/sh"],
    )
    image = layout_add_tar_layer(image, _gnu_layer)
    image = layout_append_layer(image, _tarfile_layer(_T0))
    return ConformanceImage(layout=image, big_sha256=hashlib.sha256(big).hexdigest(), layer_count=5)


# --------------------------------------------------------------------------------------------
# eStargz


def strip_root_members(tar: bytes, names: frozenset[str]) -> bytes:
    """The same tar stream without the members named `names` (exact names, headers and
    extension headers included): every other byte is kept as it was."""
    out = bytearray()
    pos = 0
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:", encoding="utf-8") as tf:
        for info in tf:
            if info.name in names:
                out += tar[pos : info.offset]
                pos = info.offset_data + (info.size + -info.size % tarfile.BLOCKSIZE)
    out += tar[pos:]
    return bytes(out)


@dataclass(frozen=True)
class EStargzImages:
    estargz: LayoutImage
    """Layers are eStargz blobs (gzip media type, TOC digest annotation)."""
    plain: LayoutImage
    """The same tar streams minus the eStargz bookkeeping members, as plain gzip layers."""
    bookkeeping: tuple[frozenset[str], ...]
    """Per layer, the root names of the eStargz tar that are not part of the image."""


def build_estargz_images(workdir: Path) -> EStargzImages:
    """Two eStargz layers written by `imagefs.layers.estargz.write_estargz`, and their twin."""
    from imagefs.layers.estargz import TOC_DIGEST_ANNOTATION, FileSpec, write_estargz

    big = big_file_bytes(300_000, seed=5)
    layers = [
        write_estargz(
            [
                FileSpec("etc", "dir", mode=0o755, mtime=_T0),
                FileSpec("etc/os-release", data=b"ID=estargz\n", mtime=_T0),
                FileSpec("etc/gone", data=b"whited out above\n", mtime=_T0),
                FileSpec("data", "dir", mode=0o750, uid=5, gid=6, mtime=_T0),
                FileSpec("data/chunked.bin", data=big, mode=0o600, mtime=_T0 + 1),
                FileSpec("data/empty", data=b"", mtime=_T0),
                FileSpec("data/link", "symlink", link_name="chunked.bin", mtime=_T0),
                FileSpec("data/hard", "hardlink", link_name="data/chunked.bin", mtime=_T0),
                FileSpec("data/xattr", data=b"x\n", xattrs={"user.k": b"v"}, mtime=_T0 + 2),
                # only the root ones are bookkeeping
                FileSpec("data/stargz.index.json", data=b"{}\n", mtime=_T0),
            ],
            chunk_size=64 * 1024,
        ),
        write_estargz(
            [
                FileSpec(".prefetch.landmark", data=b"\x0f"),
                FileSpec("etc", "dir", mode=0o755, mtime=_T0 + 10),
                FileSpec("etc/.wh.gone", data=b""),
                FileSpec("etc/os-release", data=b"ID=estargz-top\n", mtime=_T0 + 10),
            ],
            landmark=False,
        ),
    ]
    layout = workdir / "estargz-layout"
    estargz = empty_umoci_image(layout, "estargz")
    plain = empty_umoci_image(layout, "plain")
    bookkeeping = []
    for blob in layers:
        estargz = layout_append_blob(
            estargz,
            blob.blob,
            diff_id=blob.diff_id,
            media_type=_GZIP_LAYER,
            annotations={TOC_DIGEST_ANNOTATION: blob.toc_digest},
        )
        tar = gzip_decompress(blob.blob)
        with tarfile.open(fileobj=io.BytesIO(tar), mode="r:", encoding="utf-8") as tf:
            names = frozenset(
                n
                for n in tf.getnames()
                if n in ("stargz.index.json", ".prefetch.landmark", ".no.prefetch.landmark")
            )
        bookkeeping.append(names)
        plain = layout_append_layer(plain, strip_root_members(tar, names))
    return EStargzImages(estargz, plain, tuple(bookkeeping))


def gzip_decompress(blob: bytes) -> bytes:
    """All members of a multi-member gzip stream (an eStargz blob is one)."""
    import gzip

    return gzip.decompress(blob)


# --------------------------------------------------------------------------------------------
# Bad input


def set_header_field(tar: bytes, header_offset: int, start: int, value: bytes) -> bytes:
    """Overwrite bytes [start, start+len(value)) of the header block at `header_offset` and
    recompute its checksum, so the lie is well-formed."""
    block = bytearray(tar[header_offset : header_offset + tarfile.BLOCKSIZE])
    block[start : start + len(value)] = value
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % sum(block)
    return tar[:header_offset] + bytes(block) + tar[header_offset + tarfile.BLOCKSIZE :]


def _member_offsets(tar: bytes) -> dict[str, tuple[int, int]]:
    """name -> (offset of its own header block, offset of its data)."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:", encoding="utf-8") as tf:
        for info in tf:
            out[info.name] = (info.offset_data - tarfile.BLOCKSIZE, info.offset_data)
    return out


def _good_top() -> bytes:
    d = tarfile.DIRTYPE
    return tar_bytes(
        [
            TarItem(".", d, mode=0o755),
            TarItem("top", d, mode=0o755),
            TarItem("top/file.txt", data=b"decided by the top layer alone\n"),
        ]
    )


@dataclass(frozen=True)
class BadImages:
    entries: LayoutImage
    """Structurally sound top layer with entry-local defects (each skipped or contained)."""
    broken: Mapping[str, LayoutImage]
    """name -> image whose middle layer cannot be read at all, under a good top layer."""
    base_files: Mapping[str, bytes]


def build_bad_images(workdir: Path, escape_dir: Path) -> BadImages:
    """Images with bad layers on a small umoci base; `escape_dir` is a host directory that
    hostile names point into (it must stay empty)."""
    layout = workdir / "bad-layout"
    base_files = {"etc/base.txt": b"from the umoci base layer\n", "keep/dir/a": b"a\n"}

    def base_layer(rootfs: Path) -> None:
        for rel, data in base_files.items():
            _write(rootfs / rel, data)

    base = build_umoci_image(layout, [base_layer], tag="base")
    d = tarfile.DIRTYPE
    escape = str(escape_dir).lstrip("/")
    entries_tar = tar_bytes(
        [
            TarItem(".", d, mode=0o755),
            TarItem("ok.txt", data=b"a good entry among bad ones\n"),
            TarItem("../" * 30 + escape + "/dotdot", data=b"climbs with ..\n"),
            TarItem("/" + escape + "/absolute", data=b"absolute name\n"),
            TarItem("evil", tarfile.SYMTYPE, linkname=str(escape_dir)),
            TarItem("evil/through-symlink", data=b"written through a symlink parent\n"),
            TarItem("plain", data=b"a file\n"),
            TarItem("plain/below-a-file", data=b"its parent is a file\n"),
            TarItem("broken-link", tarfile.LNKTYPE, linkname="no/such/target"),
            TarItem("link-to-dir", tarfile.LNKTYPE, linkname="keep/dir"),
            TarItem("unknown-type", b"Z", data=b""),
            TarItem("bad-uid", data=b"unparsable uid field\n"),
            TarItem(".wh.", data=b""),
            TarItem("after.txt", data=b"entries after the bad ones still count\n"),
        ]
    )
    head, _ = _member_offsets(entries_tar)["bad-uid"]
    entries_tar = set_header_field(entries_tar, head, 108, b"zz?\x00\x00\x00\x00\x00")
    entries = layout_append_layer(base, entries_tar, tag="entries")

    middle = tar_bytes(
        [
            TarItem("mid", d, mode=0o755),
            TarItem("mid/first.txt", data=b"first\n" * 200),
            TarItem("mid/second.txt", data=b"second\n" * 200),
            TarItem("mid/third.txt", data=b"third\n"),
        ]
    )
    offsets = _member_offsets(middle)
    second_head, second_data = offsets["mid/second.txt"]
    corrupt = bytearray(middle)
    corrupt[second_head + 10] ^= 0xFF  # a flipped name byte: the checksum no longer holds
    broken_tars = {
        "corrupt-header": bytes(corrupt),
        "truncated-in-data": middle[: second_data + 700],
        "size-too-big": set_header_field(middle, second_head, 124, b"%011o\x00" % 5000),
        "size-too-small": set_header_field(middle, second_head, 124, b"%011o\x00" % 100),
    }
    broken: dict[str, LayoutImage] = {}
    for name, tar in broken_tars.items():
        image = layout_append_layer(base, tar, tag=name)
        broken[name] = layout_append_layer(image, _good_top())
    # A gzip stream cut short: the manifest's digest is of the cut blob, so it verifies.
    import gzip

    whole = gzip.compress(middle, mtime=0)
    cut = whole[: len(whole) // 2]
    image = layout_append_blob(
        base,
        cut,
        diff_id="sha256:" + hashlib.sha256(middle).hexdigest(),
        media_type=_GZIP_LAYER,
        tag="gzip-truncated",
    )
    broken["gzip-truncated"] = layout_append_layer(image, _good_top())
    return BadImages(entries, broken, base_files)
