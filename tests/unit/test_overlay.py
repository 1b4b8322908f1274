"""The merged view: overlay rules, hard links and link counts, inode numbers, and laziness."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from imagefs.layers.toc import EntryType, Toc, TocBuilder, toc_from_tar
from imagefs.overlay import ROOT_INODE, Attrs, InodeError, NeedLayer, Overlay

R, D, L, S = EntryType.REG, EntryType.DIR, EntryType.HARDLINK, EntryType.SYMLINK
T = TypeVar("T")

Spec = tuple[bytes, EntryType] | tuple[bytes, EntryType, dict[str, Any]]


def layer(*specs: Spec) -> Toc:
    builder = TocBuilder()
    for path, etype, *rest in specs:
        kw: dict[str, Any] = rest[0] if rest else {}
        builder.add(path, etype, **kw)
    return builder.build()


def stack(*layers: Toc, **kw: bool) -> Overlay:
    ov = Overlay(len(layers), **kw)
    for i, toc in enumerate(layers):
        ov.set_layer(i, toc)
    return ov


def resolve(ov: Overlay, path: bytes) -> int | None:
    ino: int | None = ROOT_INODE
    for name in path.split(b"/") if path else []:
        assert ino is not None
        ino = ov.lookup(ino, name)
        if ino is None:
            return None
    return ino


def must(ino: int | None) -> int:
    assert ino is not None
    return ino


def attrs(ov: Overlay, path: bytes) -> Attrs:
    ino = resolve(ov, path)
    assert ino is not None, path
    return ov.getattr(ino)


def tree(ov: Overlay) -> dict[bytes, str]:
    """path -> kind letter (and size for files): a compact picture of the merged tree."""
    out: dict[bytes, str] = {}
    for path, ino, a in ov.walk():
        if stat.S_ISDIR(a.mode):
            # Listing and looking up decide names by separate code paths: they must agree.
            for name, child in ov.readdir(ino):
                assert ov.lookup(ino, name) == child
        if stat.S_ISDIR(a.mode):
            out[path] = "d"
        elif stat.S_ISLNK(a.mode):
            out[path] = "l"
        else:
            out[path] = f"f{a.size}"
    return out


# ---------------------------------------------------------------------- overlay rules


def test_single_layer_basics() -> None:
    ov = stack(
        layer(
            (b"etc", D, {"mode": 0o755, "mtime": 3, "mtime_ns": 4}),
            (b"etc/hosts", R, {"size": 5000, "mode": 0o644, "uid": 1, "gid": 2}),
            (b"etc/empty", R),
            (b"etc/link", S, {"linkname": b"hosts"}),
            (b"etc/longlink", S, {"linkname": b"x" * 60}),
            (b"dev/sda", EntryType.BLOCK, {"devmajor": 8, "devminor": 1, "mode": 0o660}),
            (b"run/fifo", EntryType.FIFO),
        )
    )
    assert tree(ov) == {
        b"": "d",
        b"dev": "d",
        b"dev/sda": "f0",
        b"etc": "d",
        b"etc/empty": "f0",
        b"etc/hosts": "f5000",
        b"etc/link": "l",
        b"etc/longlink": "l",
        b"run": "d",
        b"run/fifo": "f0",
    }
    hosts = attrs(ov, b"etc/hosts")
    assert hosts.mode == stat.S_IFREG | 0o644 and (hosts.uid, hosts.gid) == (1, 2)
    assert (hosts.blocks, hosts.nlink) == (16, 1)  # two 4 KiB blocks
    assert attrs(ov, b"etc/empty").blocks == 0
    etc = attrs(ov, b"etc")
    assert etc.mode == stat.S_IFDIR | 0o755 and etc.mtime_ns == 3_000_000_004
    assert (etc.size, etc.blocks, etc.nlink) == (4096, 8, 2)
    assert etc.atime_ns == etc.ctime_ns == etc.mtime_ns
    root = ov.getattr(ROOT_INODE)
    assert root.mode == stat.S_IFDIR | 0o755 and root.nlink == 5  # dev, etc, run
    link = attrs(ov, b"etc/link")
    assert link.mode == stat.S_IFLNK | 0o777 and (link.size, link.blocks) == (5, 0)
    assert attrs(ov, b"etc/longlink").blocks == 8
    sda = attrs(ov, b"dev/sda")
    assert sda.mode == stat.S_IFBLK | 0o660 and sda.rdev == os.makedev(8, 1)
    assert stat.S_ISFIFO(attrs(ov, b"run/fifo").mode)
    ino = resolve(ov, b"etc/link")
    assert ino is not None and ov.readlink(ino) == b"hosts"


def test_whiteout_hides_lower_only() -> None:
    ov = stack(
        layer((b"a/x", R), (b"a/y", R), (b"a/sub/deep", R)),
        layer((b"a/.wh.x", R), (b"a/.wh.sub", R), (b"a/.wh.y", R), (b"a/y", R, {"size": 9})),
    )
    assert tree(ov) == {b"": "d", b"a": "d", b"a/y": "f9"}


def test_opaque_directory_keeps_its_own_layer() -> None:
    ov = stack(
        layer((b"d", D, {"mode": 0o700}), (b"d/old", R), (b"d/sub/x", R)),
        layer((b"d/mid", R)),
        layer((b"d/.wh..wh..opq", R), (b"d/new", R)),
        layer((b"d/top", R)),
    )
    assert tree(ov) == {b"": "d", b"d": "d", b"d/new": "f0", b"d/top": "f0"}
    # The opaque layer had only an implicit d: the directory keeps the lowest layer's attrs.
    assert attrs(ov, b"d").mode == stat.S_IFDIR | 0o700


def test_opaque_marker_without_any_child() -> None:
    ov = stack(layer((b"d", D, {"uid": 3}), (b"d/x", R)), layer((b"d/.wh..wh..opq", R)))
    assert tree(ov) == {b"": "d", b"d": "d"}
    assert attrs(ov, b"d").uid == 3


def test_opaque_root() -> None:
    ov = stack(layer((b"old", R)), layer((b".wh..wh..opq", R), (b"new", R)))
    assert tree(ov) == {b"": "d", b"new": "f0"}


def test_whiteout_plus_directory_in_one_layer_replaces() -> None:
    ov = stack(layer((b"d/old", R)), layer((b".wh.d", R), (b"d/new", R)))
    assert tree(ov) == {b"": "d", b"d": "d", b"d/new": "f0"}
    assert attrs(ov, b"d").mode == stat.S_IFDIR | 0o755  # fresh implicit directory


def test_whiteout_order_decides_an_implicit_directorys_attributes() -> None:
    lower = layer((b"d", D, {"mode": 0o711}), (b"d/old", R))
    early = stack(lower, layer((b".wh.d", R), (b"d/new", R)))
    late = stack(lower, layer((b"d/new", R), (b".wh.d", R)))
    for ov in (early, late):
        assert tree(ov) == {b"": "d", b"d": "d", b"d/new": "f0"}
    assert attrs(early, b"d").mode == stat.S_IFDIR | 0o755  # removed, then made afresh
    assert attrs(late, b"d").mode == stat.S_IFDIR | 0o711  # kept, only emptied


def test_directory_replaced_by_file_and_back() -> None:
    ov = stack(
        layer((b"a/x", R), (b"b", R, {"size": 1}), (b"c/y", R)),
        layer((b"a", R, {"size": 2}), (b"b/z", R), (b"c", S, {"linkname": b"/"})),
        layer((b"c/w", R)),
    )
    assert tree(ov) == {
        b"": "d",
        b"a": "f2",  # file over directory hides the subtree
        b"b": "d",  # directory over file
        b"b/z": "f0",
        b"c": "d",  # the symlink layer cut c: layer 0's c/y is gone
        b"c/w": "f0",
    }


def test_non_directory_ancestor_in_upper_layer_hides_lower_subtree() -> None:
    ov = stack(layer((b"a/b/c", R)), layer((b"a", S, {"linkname": b"x"})))
    assert tree(ov) == {b"": "d", b"a": "l"}
    with pytest.raises(InodeError):
        resolve(ov, b"a/b/c")


def test_implicit_directory_takes_lower_attributes() -> None:
    ov = stack(
        layer((b"usr", D, {"mode": 0o750, "uid": 9, "mtime": 77})),
        layer((b"usr/bin/tool", R)),
    )
    usr = attrs(ov, b"usr")
    assert (usr.mode, usr.uid, usr.mtime_ns) == (stat.S_IFDIR | 0o750, 9, 77_000_000_000)
    bin_ = attrs(ov, b"usr/bin")
    assert (bin_.mode, bin_.uid, bin_.mtime_ns) == (stat.S_IFDIR | 0o755, 0, 0)


def test_upper_explicit_directory_wins_and_children_merge() -> None:
    ov = stack(
        layer((b"d", D, {"mode": 0o700}), (b"d/a", R)),
        layer((b"d", D, {"mode": 0o711}), (b"d/b", R), (b"d/sub", D)),
    )
    d = attrs(ov, b"d")
    assert d.mode == stat.S_IFDIR | 0o711 and d.nlink == 3
    ino = resolve(ov, b"d")
    assert ino is not None
    assert [name for name, _ in ov.readdir(ino)] == [b"a", b"b", b"sub"]


def test_root_attributes_from_topmost_root_entry() -> None:
    ov = stack(layer((b"./", D, {"mode": 0o700})), layer((b"x", R)))
    assert ov.getattr(ROOT_INODE).mode == stat.S_IFDIR | 0o700
    assert stack(layer((b"x", R))).getattr(ROOT_INODE).mode == stat.S_IFDIR | 0o755


def test_xattrs() -> None:
    cap = b"\x01\x00\x00\x02\xff"
    ov = stack(
        layer((b"bin/ping", R, {"xattrs": {b"security.capability": cap, b"user.a": b""}})),
        layer((b"bin", D, {"xattrs": {b"user.dir": b"1"}})),
    )
    ping = resolve(ov, b"bin/ping")
    assert ping is not None
    assert ov.listxattr(ping) == [b"security.capability", b"user.a"]
    assert ov.getxattr(ping, b"security.capability") == cap
    assert ov.getxattr(ping, b"user.a") == b""
    assert ov.getxattr(ping, b"user.none") is None
    bin_ = resolve(ov, b"bin")
    assert bin_ is not None and ov.listxattr(bin_) == [b"user.dir"]
    assert ov.listxattr(ROOT_INODE) == []


def test_duplicate_entries_last_wins_in_the_merge() -> None:
    ov = stack(layer((b"f", R, {"size": 1}), (b"f", S, {"linkname": b"t"}), (b"f", R, {"size": 3})))
    assert tree(ov) == {b"": "d", b"f": "f3"}


# ---------------------------------------------------------------------- hard links


def test_hardlinks_in_one_layer_share_an_inode() -> None:
    ov = stack(
        layer(
            (b"bin/a", R, {"size": 10, "mode": 0o755}),
            (b"bin/b", L, {"linkname": b"bin/a"}),
            (b"other/c", L, {"linkname": b"bin/b"}),
        )
    )
    a, b, c = (resolve(ov, p) for p in (b"bin/a", b"bin/b", b"other/c"))
    assert a == b == c and a is not None
    got = ov.getattr(a)
    assert (got.nlink, got.size, got.mode) == (3, 10, stat.S_IFREG | 0o755)
    assert ov.locate(a) == (0, 0)


def test_hardlink_to_an_earlier_version_keeps_the_old_file() -> None:
    ov = stack(
        layer(
            (b"f", R, {"size": 1, "offset": 512}),
            (b"keep", L, {"linkname": b"f"}),
            (b"f", R, {"size": 2, "offset": 2048}),
        )
    )
    f, keep = resolve(ov, b"f"), resolve(ov, b"keep")
    assert f is not None and keep is not None and f != keep
    assert (ov.getattr(keep).size, ov.getattr(keep).nlink) == (1, 1)
    assert (ov.getattr(f).size, ov.getattr(f).nlink) == (2, 1)
    assert ov.locate(keep) == (0, 0) and ov.locate(f) == (0, 2)


def test_hardlink_to_a_lower_layer() -> None:
    ov = stack(
        layer((b"lib/libc.so", R, {"size": 7}), (b"lib/alias", L, {"linkname": b"lib/libc.so"})),
        layer((b"usr/lib/libc.so", L, {"linkname": b"lib/libc.so"})),
        layer((b"lib/.wh.alias", R)),
    )
    lower, upper = resolve(ov, b"lib/libc.so"), resolve(ov, b"usr/lib/libc.so")
    assert lower is not None and lower == upper
    assert resolve(ov, b"lib/alias") is None
    assert ov.getattr(lower).nlink == 2  # lib/alias is whited out above
    assert ov.locate(upper) == (0, 0)


def test_link_count_drops_when_a_path_is_replaced() -> None:
    ov = stack(
        layer((b"a", R, {"size": 1}), (b"b", L, {"linkname": b"a"}), (b"c", L, {"linkname": b"a"})),
        layer((b"c", R, {"size": 5})),
    )
    a = resolve(ov, b"a")
    assert a is not None and a == resolve(ov, b"b") and ov.getattr(a).nlink == 2
    c = resolve(ov, b"c")
    assert c is not None and c != a and ov.getattr(c).nlink == 1


def test_hardlink_to_missing_target_is_skipped_with_a_warning() -> None:
    ov = stack(
        layer((b"x", R, {"size": 4}), (b"d", D)),
        layer((b"x", L, {"linkname": b"nowhere"}), (b"y", L, {"linkname": b"d"})),
    )
    x = resolve(ov, b"x")
    assert x is not None and ov.getattr(x).size == 4  # the broken link is ignored
    assert resolve(ov, b"y") is None
    assert len(ov.warnings) == 2
    assert "nowhere" in ov.warnings[0] and "directory" in ov.warnings[1]


# ---------------------------------------------------------------------- inodes and errors


def test_inode_numbers_are_stable() -> None:
    ov = stack(layer((b"a/b", R), (b"c", R)))
    a = resolve(ov, b"a")
    b = resolve(ov, b"a/b")
    assert a is not None and b is not None and len({ROOT_INODE, a, b}) == 3
    ov.forget(b, 1)
    ov.forget(a, 1)
    assert resolve(ov, b"a") == a and resolve(ov, b"a/b") == b
    listing = dict(ov.readdir(ROOT_INODE))
    assert listing[b"a"] == a
    assert ov.lookup(ROOT_INODE, b"c") == listing[b"c"]
    assert ov.path(b) == b"a/b"
    ov.remember(b)
    ov.forget(b, 2)


def test_errors() -> None:
    ov = stack(layer((b"f", R), (b"s", S, {"linkname": b"f"}), (b"d", D)))
    f, s, d = (resolve(ov, p) for p in (b"f", b"s", b"d"))
    assert f is not None and s is not None and d is not None
    with pytest.raises(InodeError) as exc:
        ov.lookup(f, b"x")
    assert exc.value.errno == errno.ENOTDIR
    with pytest.raises(InodeError) as exc:
        ov.readlink(f)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(InodeError) as exc:
        ov.locate(d)
    assert exc.value.errno == errno.EISDIR
    with pytest.raises(InodeError) as exc:
        ov.locate(s)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(InodeError) as exc:
        ov.getattr(999)
    assert exc.value.errno == errno.ENOENT
    for name in (b"", b".", b"..", b"a/b", b".wh.f"):
        assert ov.lookup(ROOT_INODE, name) is None


def test_empty_image() -> None:
    ov = Overlay(0)
    assert ov.readdir(ROOT_INODE) == []
    assert ov.getattr(ROOT_INODE).nlink == 2
    assert next(iter(ov.walk()))[0] == b""


def test_set_layer_checks() -> None:
    ov = Overlay(1)
    toc = layer((b"a", R))
    ov.set_layer(0, toc)
    ov.set_layer(0, toc)
    with pytest.raises(ValueError):
        ov.set_layer(0, layer((b"b", R)))
    with pytest.raises(ValueError):
        ov.set_layer(1, toc)


# ---------------------------------------------------------------------- laziness


class Fetcher:
    """The shell's side of the protocol: load a TOC when asked, remember what was asked."""

    def __init__(self, tocs: list[Toc], **kw: bool) -> None:
        self.tocs = tocs
        self.ov = Overlay(len(tocs), **kw)
        self.asked: list[int] = []

    def __call__(self, op: Callable[[], T]) -> T:
        while True:
            try:
                return op()
            except NeedLayer as need:
                assert not self.ov.has_layer(need.index)
                self.asked.append(need.index)
                self.ov.set_layer(need.index, self.tocs[need.index])


LAYERS = [
    layer((b"bin/sh", R), (b"etc/os-release", R)),
    layer((b"etc", D), (b"etc/passwd", R)),
    layer((b"app", D), (b"app/main.py", R), (b"etc/.wh.os-release", R), (b"lib/x", R)),
]


def test_lookup_decided_by_the_top_layer_asks_for_nothing_else() -> None:
    run = Fetcher(LAYERS, exact_dir_nlink=False)
    app = run(lambda: run.ov.lookup(ROOT_INODE, b"app"))
    assert app is not None
    main = run(lambda: run.ov.lookup(app, b"main.py"))
    assert main is not None
    run(lambda: run.ov.getattr(main))
    run(lambda: run.ov.getattr(app))
    assert run.asked == [2]
    assert run.ov.missing_layers() == [0, 1]


def test_lookup_goes_down_only_as_far_as_needed() -> None:
    run = Fetcher(LAYERS, exact_dir_nlink=False)
    etc = run(lambda: run.ov.lookup(ROOT_INODE, b"etc"))
    assert etc is not None and run.asked == [2, 1]  # implicit in 2, decided in 1
    assert run(lambda: run.ov.lookup(etc, b"os-release")) is None
    assert run.asked == [2, 1]  # the whiteout in layer 2 decided it
    assert run(lambda: run.ov.lookup(etc, b"passwd")) is not None
    assert run.asked == [2, 1]
    assert run(lambda: run.ov.lookup(ROOT_INODE, b"bin")) is not None
    assert run.asked == [2, 1, 0]


def test_implicit_directory_attributes_are_looked_up_on_getattr_only() -> None:
    run = Fetcher(LAYERS, exact_dir_nlink=False)
    lib = run(lambda: run.ov.lookup(ROOT_INODE, b"lib"))
    assert lib is not None and run.asked == [2]
    assert run(lambda: run.ov.getattr(lib)).mode == stat.S_IFDIR | 0o755
    assert run.asked == [2, 1, 0]


def test_listing_needs_every_layer_in_range() -> None:
    run = Fetcher(LAYERS)
    names = [name for name, _ in run(lambda: run.ov.readdir(ROOT_INODE))]
    assert names == [b"app", b"bin", b"etc", b"lib"]
    assert sorted(run.asked) == [0, 1, 2]


def test_opaque_layer_stops_the_descent() -> None:
    tocs = [layer((b"d/x", R)), layer((b"d/.wh..wh..opq", R), (b"d/y", R))]
    run = Fetcher(tocs)
    d = must(run(lambda: run.ov.lookup(ROOT_INODE, b"d")))
    assert [n for n, _ in run(lambda: run.ov.readdir(d))] == [b"y"]
    assert run(lambda: run.ov.lookup(d, b"x")) is None
    assert run.asked == [1]
    # d is implicit in layer 1: only its attributes may come from layer 0.
    run(lambda: run.ov.getattr(d))
    assert run.asked == [1, 0]

    run = Fetcher([layer((b"d/x", R)), layer((b"d", D), (b"d/.wh..wh..opq", R), (b"d/y", R))])
    d = must(run(lambda: run.ov.lookup(ROOT_INODE, b"d")))
    assert [n for n, _ in run(lambda: run.ov.readdir(d))] == [b"y"]
    assert run(lambda: run.ov.lookup(d, b"x")) is None
    assert run(lambda: run.ov.getattr(d)).nlink == 2
    assert run.asked == [1]


def test_no_partial_state_after_need_layer() -> None:
    ov = Overlay(2)
    ov.set_layer(1, LAYERS[1])
    with pytest.raises(NeedLayer) as need:
        ov.readdir(ROOT_INODE)
    assert need.value.index == 0
    ov.set_layer(0, LAYERS[0])
    assert [n for n, _ in ov.readdir(ROOT_INODE)] == [b"bin", b"etc"]


# ---------------------------------------------------------------------- from real tars

needs_gnu_tar = pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")


@needs_gnu_tar
def test_layers_made_by_gnu_tar(tmp_path: Path) -> None:
    def make(name: str, files: dict[str, bytes | None]) -> Toc:
        root = tmp_path / name
        root.mkdir()
        for rel, data in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if data is None:
                path.mkdir()
            else:
                path.write_bytes(data)
        out = tmp_path / f"{name}.tar"
        subprocess.run(["tar", "--format=posix", "-C", str(root), "-cf", str(out), "."], check=True)
        toc, warnings = toc_from_tar(out.read_bytes())
        assert warnings == []
        return toc

    base = make(
        "base",
        {"etc/passwd": b"root", "etc/group": b"g", "var/cache/x": b"xx", "opt/tool": b"t"},
    )
    upper = make(
        "upper",
        {
            "etc/.wh.group": b"",
            "var/cache/.wh..wh..opq": b"",
            "var/cache/y": b"yyy",
            "opt": b"now a file",
        },
    )
    os.link(tmp_path / "upper" / "var" / "cache" / "y", tmp_path / "upper" / "y-link")
    ov = stack(base, upper)
    assert tree(ov) == {
        b"": "d",
        b"etc": "d",
        b"etc/passwd": "f4",
        b"opt": "f10",
        b"var": "d",
        b"var/cache": "d",
        b"var/cache/y": "f3",
    }


# ---------------------------------------------------------------------- against umoci


def _tar(entries: list[tuple[str, str, dict[str, Any]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, kw in entries:
            info = tarfile.TarInfo(name)
            info.mtime = kw.get("mtime", 1000)
            info.mode = kw.get("mode", 0o755 if kind == "d" else 0o644)
            info.uid = kw.get("uid", 0)
            data: bytes = kw.get("data", b"")
            info.type = {
                "f": tarfile.REGTYPE,
                "d": tarfile.DIRTYPE,
                "l": tarfile.LNKTYPE,
                "s": tarfile.SYMTYPE,
            }[kind]
            info.linkname = kw.get("to", "")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


UMOCI_LAYERS: list[list[tuple[str, str, dict[str, Any]]]] = [
    [
        ("etc", "d", {"mode": 0o750, "uid": 5, "mtime": 111}),
        ("etc/a", "f", {"data": b"aaa"}),
        ("etc/b", "l", {"to": "etc/a"}),
        ("etc/c", "l", {"to": "etc/a"}),
        ("usr/x/y/z", "f", {"data": b"z"}),
        ("d1", "d", {}),
        ("d1/k", "f", {}),
        ("o", "d", {"mode": 0o700}),
        ("o/old", "f", {}),
        ("rep", "d", {"mode": 0o700}),
        ("rep/inner", "f", {}),
        ("s", "s", {"to": "etc"}),
    ],
    [
        ("etc/c", "f", {"data": b"new c"}),
        ("usr/x/n", "f", {}),
        ("d1", "f", {"data": b"d1 now file"}),
        ("o/.wh..wh..opq", "f", {}),
        ("o/new", "f", {}),
        ("etc/.wh.b", "f", {}),
        ("bin/ln", "l", {"to": "etc/a"}),
        (".wh.rep", "f", {}),
        ("rep/fresh", "f", {}),
        ("self", "f", {"data": b"v1"}),
        ("keep", "l", {"to": "self"}),
        ("self", "f", {"data": b"v2!"}),
    ],
]


@pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci not installed")
def test_matches_umoci_unpack(tmp_path: Path) -> None:
    """Same tree, types, modes, owners, sizes, link counts and shared inodes as umoci unpack.

    mtimes are left out: umoci stamps directories it creates (or whose children it creates)
    with the time of extraction, where the mount shows the layer's value or 0.
    """
    layout = tmp_path / "layout"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    tars = [_tar(entries) for entries in UMOCI_LAYERS]
    layers = [
        {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **put(gzip.compress(t))}
        for t in tars
    ]
    diff_ids = [f"sha256:{hashlib.sha256(t).hexdigest()}" for t in tars]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            **put(json.dumps(config).encode()),
        },
        "layers": layers,
    }
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **put(json.dumps(manifest).encode()),
                "annotations": {"org.opencontainers.image.ref.name": "t"},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    bundle = tmp_path / "bundle"
    cmd = ["umoci", "unpack", "--image", f"{layout}:t", str(bundle)]
    if os.geteuid() != 0:
        cmd.insert(2, "--rootless")
    subprocess.run(cmd, check=True, capture_output=True)
    rootfs = bundle / "rootfs"

    def key(mode: int, uid: int, nlink: int, size: int) -> tuple[int, ...]:
        return (mode, uid if os.geteuid() == 0 else 0, nlink, size if stat.S_ISREG(mode) else 0)

    disk: dict[bytes, tuple[int, ...]] = {}
    disk_inodes: dict[int, set[bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(rootfs)):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = os.path.relpath(full, os.fsencode(rootfs))
            disk[rel] = key(st.st_mode, st.st_uid, st.st_nlink, st.st_size)
            disk_inodes.setdefault(st.st_ino, set()).add(rel)

    ov = stack(*(toc_from_tar(t)[0] for t in tars))
    mount: dict[bytes, tuple[int, ...]] = {}
    mount_inodes: dict[int, set[bytes]] = {}
    for path, ino, a in ov.walk():
        if path:
            uid = a.uid if os.geteuid() == 0 else 0
            mount[path] = key(a.mode, uid, a.nlink, a.size)
            mount_inodes.setdefault(ino, set()).add(path)
    assert mount == disk
    shared = sorted(sorted(s) for s in disk_inodes.values() if len(s) > 1)
    assert sorted(sorted(s) for s in mount_inodes.values() if len(s) > 1) == shared
    assert shared == [[b"bin/ln", b"etc/a"]]


def test_device_numbers_beyond_what_a_dev_t_holds_are_refused() -> None:
    """A tar or TOC entry whose device numbers `os.makedev` cannot take is skipped with a
    warning (as an impossible size is); a published index holding one (not built here)
    makes that entry's attributes a LayerFormatError, never an OverflowError."""
    from array import array

    from imagefs.errors import LayerFormatError
    from imagefs.layers.toc import ondisk
    from imagefs.layers.toc.packed import DEV_MAX, X_DEV, varint, write_record

    C = EntryType.CHAR
    builder = TocBuilder()
    builder.add(b"ok", C, devmajor=DEV_MAX, devminor=DEV_MAX)
    assert builder.add(b"big", C, devmajor=DEV_MAX + 1, devminor=1) is None
    assert builder.add(b"huge", C, devmajor=1, devminor=1 << 70) is None
    toc = builder.build()
    assert [w.split(":")[0] for w in builder.warnings] == ["'big'", "'huge'"]
    assert "impossible device numbers" in builder.warnings[0]
    ov = stack(toc)
    assert attrs(ov, b"ok").rdev == os.makedev(DEV_MAX, DEV_MAX)
    assert resolve(ov, b"big") is None

    # the same entry, its device record rewritten past the limit, as a foreign index holds it
    payload = bytearray()
    varint(1 << 40, payload)
    varint(1, payload)
    record = bytearray()
    write_record(X_DEV, bytes(payload), record)
    parts = layer((b"x", C, {"devmajor": 1, "devminor": 1}))._parts()
    foreign = Toc.from_bytes(
        ondisk.encode(parts._replace(extras=bytes(record), extra_offs=array("I", [0, len(record)])))
    )
    ov = stack(foreign)
    ino = must(resolve(ov, b"x"))
    with pytest.raises(LayerFormatError, match=r"'x': device numbers 1099511627776:1 are out of"):
        ov.getattr(ino)


def test_file_sizes_beyond_an_off_t_are_refused() -> None:
    """The same for a size no off_t holds (a zstd:chunked file of "zeros" chunks can
    declare one without a byte behind it)."""
    from array import array

    from imagefs.errors import LayerFormatError
    from imagefs.layers.toc import ondisk
    from imagefs.layers.toc.packed import SIZE_MAX

    builder = TocBuilder()
    builder.add(b"ok", R, size=SIZE_MAX)
    assert builder.add(b"big", R, size=SIZE_MAX + 1) is None
    toc = builder.build()
    assert len(builder.warnings) == 1 and "impossible size" in builder.warnings[0]
    ov = stack(toc)
    assert attrs(ov, b"ok").size == SIZE_MAX
    assert resolve(ov, b"big") is None

    parts = layer((b"x", R, {"size": 5}))._parts()
    foreign = Toc.from_bytes(ondisk.encode(parts._replace(sizes=array("Q", [SIZE_MAX + 1]))))
    ov = stack(foreign)
    with pytest.raises(LayerFormatError, match=r"'x': size 9223372036854775808 is out of range"):
        ov.getattr(must(resolve(ov, b"x")))
