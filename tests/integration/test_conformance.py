"""Mount conformance (issue 3): a mount of an image, entry by entry, against `umoci unpack`.

The images come from tools that are not imagefs (umoci, GNU tar, Python's tarfile, skopeo for
the zstd / zstd:chunked / Docker v2s2 copies); see `imagefs.testing.conformance`. The
reference is always `umoci unpack` of the gzip OCI layout the registry copies were made from.
treecmp compares type, mode, owner, size, mtime, symlink target, content sha256 (every byte
is read through the mount, the 50 MiB file included), device numbers, xattrs and hard-link
groups of every path.

Each comparison is also backed by explicit expectations on both trees (`check_expectations`)
so that a umoci regression cannot silently redefine "correct".
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import tarfile
from collections.abc import Mapping
from pathlib import Path

import pytest

from imagefs.testing import treecmp
from imagefs.testing.conformance import (
    BIG_FILE,
    IMPLICIT_NEW_DIRS,
    BadImages,
    ConformanceImage,
    build_bad_images,
    build_conformance_image,
    build_estargz_images,
    capability_xattr,
)
from imagefs.testing.images import LayoutImage, push, push_multiplatform, umoci_unpack
from imagefs.testing.mounts import imagefs, mounted
from imagefs.testing.registry import InfraError, LocalRegistry

pytestmark = pytest.mark.fuse


# --------------------------------------------------------------------------------------------
# helpers


def _comparable(
    entries: list[treecmp.Entry], drop: Mapping[bytes, frozenset[str]]
) -> list[treecmp.Entry]:
    """The listing with the named fields of the named paths blanked (and only those)."""
    out = []
    for e in entries:
        fields = drop.get(e.path)
        if fields:
            e = treecmp.Entry(e.path, tuple((k, "*" if k in fields else v) for k, v in e.fields))
        out.append(e)
    return out


def assert_same(
    got: list[treecmp.Entry],
    want: list[treecmp.Entry],
    drop: Mapping[bytes, frozenset[str]] | None = None,
) -> None:
    drop = drop or {}
    problems = treecmp.diff(_comparable(got, drop), _comparable(want, drop))
    assert not problems, "mount differs from umoci unpack:\n" + "\n".join(problems)


def by_path(entries: list[treecmp.Entry]) -> dict[bytes, dict[str, str]]:
    return {e.path: dict(e.fields) for e in entries}


def _xattrs(value: str) -> dict[str, bytes]:
    out = {}
    for part in filter(None, value.split(",")):
        name, _, hexval = part.partition("=")
        out[name] = bytes.fromhex(hexval)
    return out


# Implicit directories that no lower layer had: umoci makes them with MkdirAll when it
# extracts `implicit/only/child.txt` and never sets their mtime, so it is the wall-clock time
# of the extraction; the mount shows 0 (there is no timestamp anywhere in the image). Only
# the mtime of only these two paths is left out; mode and owner (0755 root:root) still count.
UMOCI_EXTRACTION_TIME = {p: frozenset({"mtime"}) for p in IMPLICIT_NEW_DIRS}


def check_expectations(tree: dict[bytes, dict[str, str]], big_sha256: str) -> None:
    """What the conformance image must look like, whoever extracted it."""

    def kind(p: bytes) -> str | None:
        e = tree.get(p)
        return e["type"] if e else None

    # whiteouts, opaque directory, dir<->file replacement, delete and re-create
    for gone in (
        b"etc/remove-me.txt",
        b"gone/dir",
        b"gone/dir/a.txt",
        b"swap/d2f/child.txt",
        b"opq/lower.txt",
        b"opq/sub",
        b"recreate/dir/old.txt",
    ):
        assert gone not in tree, gone
    assert not any(b".wh." in p for p in tree)
    assert kind(b"gone/stays.txt") == "file"
    assert sorted(p for p in tree if p.startswith(b"opq/")) == [b"opq/new.txt"]
    assert kind(b"swap/d2f") == "file" and kind(b"swap/f2d") == "dir"
    assert kind(b"swap/f2d/inner.txt") == "file"
    assert tree[b"recreate/file.txt"]["mode"] == "0755"
    assert tree[b"recreate/file.txt"]["sha256"] == _sha(b"version 2, after a whiteout\n")
    assert tree[b"etc/keep.txt"]["sha256"] == _sha(b"written by GNU tar\n")
    # metadata-only changes
    assert tree[b"meta/chmod.txt"]["mode"] == "0600"
    assert (tree[b"meta/chown.txt"]["uid"], tree[b"meta/chown.txt"]["gid"]) == ("4242", "4343")
    assert tree[b"meta/touch.txt"]["mtime"] == str(1_234_567_890 * 10**9)
    assert tree[b"meta/dir"]["mode"] == "0700"
    # hard links: within a layer, across layers, around a path written twice
    assert tree[b"links/l0-a"]["hardlinks"] == "links/l0-b,links/l0-c"
    assert tree[b"links/l2-a"]["hardlinks"] == "links/l2-b"
    assert tree[b"links/to-lower"]["hardlinks"] == "links/base.txt,links/l2-to-base"
    assert tree[b"twice/link-to-first"]["sha256"] == _sha(b"first version\n")
    assert tree[b"twice/link-to-first"]["hardlinks"] == ""
    assert tree[b"twice/t"]["hardlinks"] == "twice/link-to-second"
    assert tree[b"twice/t"]["mode"] == "0600"
    assert bytes.fromhex(tree[b"twice/sym"]["link"]) == b"second"
    assert (tree[b"twice/dir"]["mode"], tree[b"twice/dir"]["uid"]) == ("0750", "7")
    # symlinks are stored verbatim
    for name, target in (
        (b"sym/absolute", b"/etc/passwd"),
        (b"sym/dangling", b"does/not/exist"),
        (b"sym/loop1", b"loop2"),
        (b"sym/self", b"self"),
    ):
        assert bytes.fromhex(tree[name]["link"]) == target
    assert len(bytes.fromhex(tree[b"sym/long"]["link"])) > 200
    assert (tree[b"sym/relative"]["uid"], tree[b"sym/relative"]["gid"]) == ("123", "456")
    # xattrs, binary ones included
    xa = _xattrs(tree[b"xattr/file"]["xattrs"])
    assert xa["user.binary"] == bytes(range(256))
    assert xa["user.comment"] == b"plain text"
    assert xa["security.capability"] == capability_xattr()
    assert _xattrs(tree[b"xattr"]["xattrs"]) == {"user.on-a-dir": b"dir value"}
    # odd names
    for name in (
        b"odd/new\nline",
        b"odd/non-utf8-\xff\xfe-\xe9t\xe9",
        b"odd/" + b"n" * 255,
        b"gnu/latin1-\xe9",
        b"gnu/" + b"g" * 150,
    ):
        assert kind(name) == "file", name
    assert any(len(p) > 256 for p in tree if p.startswith(b"odd/deep/"))
    # modes, owners, devices
    for mode in ("4755", "2755", "1755", "6777", "7777", "7000", "0000", "0777", "0400"):
        assert tree[b"modes/f-" + mode.encode()]["mode"] == mode
    for mode in ("1777", "0700", "2775", "0000", "7755"):
        assert tree[b"modes/d-" + mode.encode()]["mode"] == mode
    assert tree[b"owners/max31"]["uid"] == str(2**31 - 2)
    assert tree[b"owners/million"]["gid"] == "1000001"
    assert tree[b"pax/nanos"]["uid"] == "3000000000"
    assert tree[b"dev/null"]["type"] == "char" and tree[b"dev/null"]["rdev"] == "1:3"
    assert tree[b"dev/sda1"]["type"] == "block" and tree[b"dev/sda1"]["rdev"] == "8:1"
    assert tree[b"dev/big-numbers"]["rdev"] == "254:300000"
    assert tree[b"dev/fifo"]["type"] == "fifo"
    # the big file, read in full
    assert tree[BIG_FILE.encode()]["sha256"] == big_sha256
    assert tree[BIG_FILE.encode()]["size"] == str(50 << 20)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# fixtures: one image and one reference extraction per module


@pytest.fixture(scope="module")
def conformance(tmp_path_factory: pytest.TempPathFactory) -> ConformanceImage:
    try:
        return build_conformance_image(tmp_path_factory.mktemp("conformance"))
    except InfraError as e:
        pytest.fail(f"test infrastructure: {e}", pytrace=False)


@pytest.fixture(scope="module")
def reference(
    conformance: ConformanceImage, tmp_path_factory: pytest.TempPathFactory
) -> list[treecmp.Entry]:
    rootfs = umoci_unpack(conformance.layout, tmp_path_factory.mktemp("reference") / "bundle")
    return treecmp.listing(rootfs)


def test_reference_extraction_is_what_the_image_means(
    conformance: ConformanceImage, reference: list[treecmp.Entry]
) -> None:
    """The reference is only as good as umoci: check it against the expectations first."""
    check_expectations(by_path(reference), conformance.big_sha256)
    # umoci carries xattrs as PAX SCHILY.xattr.* records (binary values included)
    layer1 = conformance.layout.layers()[1]["digest"]
    tar = gzip.decompress(conformance.layout.blob(layer1))
    with tarfile.open(fileobj=io.BytesIO(tar), encoding="utf-8", errors="surrogateescape") as tf:
        pax = tf.getmember("xattr/file").pax_headers
    assert pax["SCHILY.xattr.user.comment"] == "plain text"
    cap = pax["SCHILY.xattr.security.capability"].encode("utf-8", "surrogateescape")
    assert cap == capability_xattr()


# --------------------------------------------------------------------------------------------
# 1-3: umoci / GNU tar / tarfile layers, as gzip, zstd, zstd:chunked and Docker v2s2


@pytest.mark.parametrize(
    ("fmt", "compression"),
    [(None, None), ("oci", "zstd"), ("oci", "zstd:chunked"), ("v2s2", None)],
    ids=["gzip", "zstd", "zstd-chunked", "v2s2"],
)
def test_mount_matches_umoci_unpack(
    tmp_path: Path,
    registry: LocalRegistry,
    repo_name: str,
    conformance: ConformanceImage,
    reference: list[treecmp.Entry],
    fmt: str | None,
    compression: str | None,
) -> None:
    pushed = push(
        conformance.layout,
        registry,
        f"{repo_name}:x",
        format=fmt,  # type: ignore[arg-type]
        compression=compression,  # type: ignore[arg-type]
    )
    with mounted(tmp_path / "root", pushed.ref, tmp_path / "mnt") as mnt:
        got = treecmp.listing(mnt)
    assert_same(got, reference, UMOCI_EXTRACTION_TIME)
    check_expectations(by_path(got), conformance.big_sha256)


# --------------------------------------------------------------------------------------------
# 4: eStargz layers


def test_estargz_layers_hide_their_bookkeeping(
    tmp_path: Path, registry: LocalRegistry, repo_name: str
) -> None:
    images = build_estargz_images(tmp_path / "build")
    # The premise: the eStargz tar streams really carry the three bookkeeping files.
    assert images.bookkeeping[0] == {"stargz.index.json", ".no.prefetch.landmark"}
    assert images.bookkeeping[1] == {"stargz.index.json", ".prefetch.landmark"}
    for desc in images.estargz.layers():
        assert desc["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
        assert desc["annotations"]["containerd.io/snapshot/stargz/toc.digest"].startswith("sha256:")
    # Reference: umoci unpack of the same tar streams without those members, as plain gzip.
    want = treecmp.listing(umoci_unpack(images.plain, tmp_path / "ref"))
    pushed = push(images.estargz, registry, f"{repo_name}:estargz")
    with mounted(tmp_path / "root", pushed.ref, tmp_path / "mnt") as mnt:
        names = set(os.listdir(mnt))
        got = treecmp.listing(mnt)
    for hidden in ("stargz.index.json", ".prefetch.landmark", ".no.prefetch.landmark"):
        assert hidden not in names
    assert_same(got, want)
    tree = by_path(got)
    assert tree[b"data/stargz.index.json"]["type"] == "file"  # not at the root: a plain file
    assert tree[b"etc/os-release"]["sha256"] == _sha(b"ID=estargz-top\n")
    assert b"etc/gone" not in tree
    assert tree[b"data/chunked.bin"]["hardlinks"] == "data/hard"


# --------------------------------------------------------------------------------------------
# 5: a multi-platform index


def test_platform_selects_the_image_of_an_index(
    tmp_path: Path, registry: LocalRegistry, repo_name: str
) -> None:
    index = push_multiplatform(tmp_path / "build", registry, f"{repo_name}:multi")
    layout = tmp_path / "build" / "multiplatform-layout"
    want = treecmp.listing(umoci_unpack(LayoutImage(layout, "linux-arm64"), tmp_path / "ref"))
    # `imagefs mount --platform` pulls the arm64 image itself ...
    with mounted(
        tmp_path / "root1",
        index.image.ref,
        tmp_path / "mnt1",
        mount_args=("--platform", "linux/arm64"),
    ) as mnt:
        assert (mnt / "etc" / "platform").read_bytes() == b"linux/arm64\n"
        assert_same(treecmp.listing(mnt), want)
    # ... and so does `imagefs pull --platform` followed by a plain mount.
    root2 = tmp_path / "root2"
    imagefs(root2, "pull", "--platform", "linux/arm64", index.image.ref)
    with mounted(root2, index.image.ref, tmp_path / "mnt2") as mnt:
        assert (mnt / "etc" / "platform").read_bytes() == b"linux/arm64\n"
    # The other platform, asked for by name, is the other image.
    with mounted(
        tmp_path / "root3",
        index.image.ref,
        tmp_path / "mnt3",
        mount_args=("--platform", "linux/amd64"),
    ) as mnt:
        assert (mnt / "etc" / "platform").read_bytes() == b"linux/amd64\n"


# --------------------------------------------------------------------------------------------
# 6: bad input


@pytest.fixture(scope="module")
def escape_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A host directory hostile entries aim at; it must stay empty."""
    return tmp_path_factory.mktemp("escape-target")


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory, escape_dir: Path) -> BadImages:
    return build_bad_images(tmp_path_factory.mktemp("bad"), escape_dir)


def _mount_log(root: Path) -> str:
    logs = sorted((root / "logs").glob("mount-*.log"))
    assert logs, f"no mount log under {root / 'logs'}"
    return "\n".join(p.read_text(errors="replace") for p in logs)


def _snapshot(path: Path, skip: tuple[Path, ...]) -> set[str]:
    out: set[str] = set()
    for dirpath, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if Path(dirpath, d) not in skip]
        out.update(os.path.join(dirpath, n) for n in dirs + files)
    return out


def test_bad_entries_are_skipped_or_contained(
    tmp_path: Path,
    registry: LocalRegistry,
    repo_name: str,
    bad: BadImages,
    escape_dir: Path,
) -> None:
    pushed = push(bad.entries, registry, f"{repo_name}:entries")
    root, mnt_dir = tmp_path / "root", tmp_path / "mnt"
    before = _snapshot(tmp_path, (root, mnt_dir))
    with mounted(root, pushed.ref, mnt_dir) as mnt:
        got = by_path(treecmp.listing(mnt))  # reads every file
        assert os.path.ismount(mnt)
        # contained: the hostile names are cleaned into the image, as umoci and containerd do
        inside = Path(str(escape_dir).lstrip("/"))
        assert (mnt / inside / "dotdot").read_bytes() == b"climbs with ..\n"
        assert (mnt / inside / "absolute").read_bytes() == b"absolute name\n"
        assert os.readlink(mnt / "evil") == str(escape_dir)
        # skipped: an entry below a symlink or a file, links to nothing or to a directory,
        # an unknown type, an unreadable uid, a bare whiteout
        for skipped in (
            b"evil/through-symlink",
            b"plain/below-a-file",
            b"broken-link",
            b"link-to-dir",
            b"unknown-type",
            b"bad-uid",
        ):
            assert skipped not in got, skipped
        assert not any(p.startswith(b".wh.") for p in got)
        # the rest of the layer, and the layer below, are all there
        assert got[b"ok.txt"]["sha256"] == _sha(b"a good entry among bad ones\n")
        assert got[b"after.txt"]["type"] == "file" and got[b"plain"]["type"] == "file"
        for rel, data in bad.base_files.items():
            assert (mnt / rel).read_bytes() == data
        with pytest.raises(FileNotFoundError):
            os.lstat(mnt / "broken-link")
    # one log line per bad entry, naming the layer and the entry
    log = _mount_log(root).splitlines()
    for name in (
        "evil/through-symlink",
        "plain/below-a-file",
        "broken-link",
        "link-to-dir",
        "unknown-type",
        "bad-uid",
        ".wh.",
        "../" * 30 + str(escape_dir).lstrip("/") + "/dotdot",
        str(escape_dir) + "/absolute",
    ):
        lines = [line for line in log if f"'{name}'" in line and "layer 1" in line]
        assert lines, f"no log line names layer 1 and {name!r}:\n" + "\n".join(log)
    # nothing outside the mountpoint and the store was touched
    assert list(escape_dir.iterdir()) == []
    assert _snapshot(tmp_path, (root, mnt_dir)) == before


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("corrupt-header", "checksum mismatch"),
        ("truncated-in-data", "truncated"),
        # the size says 5000: the stream ends inside that entry's "data"
        ("size-too-big", "entry 'mid/second.txt' (header at offset 2560) needs"),
        # the size says 100: the next "header" is file data
        ("size-too-small", "checksum mismatch at offset 3584"),
        ("gzip-truncated", "gzip"),
    ],
)
def test_unreadable_layer_gives_eio_and_the_mount_stays_up(
    tmp_path: Path,
    registry: LocalRegistry,
    repo_name: str,
    bad: BadImages,
    escape_dir: Path,
    case: str,
    message: str,
) -> None:
    image = bad.broken[case]
    pushed = push(image, registry, f"{repo_name}:{case}")
    root, mnt_dir = tmp_path / "root", tmp_path / "mnt"
    before = _snapshot(tmp_path, (root, mnt_dir))
    with mounted(root, pushed.ref, mnt_dir) as mnt:
        # The root directory merges all layers: the broken one makes its listing fail ...
        for _ in range(2):  # ... every time (a retry reads the layer again), without a crash
            with pytest.raises(OSError) as info:
                os.listdir(mnt)
            assert info.value.errno == errno.EIO
        # ... while a path the good top layer decides alone is still served.
        assert (mnt / "top" / "file.txt").read_bytes() == b"decided by the top layer alone\n"
        assert os.path.ismount(mnt)
    log = _mount_log(root)
    digest = image.layers()[1]["digest"]
    lines = [line for line in log.splitlines() if f"layer 1 ({digest})" in line]
    assert lines, log
    assert message in lines[0], lines[0]
    assert list(escape_dir.iterdir()) == []
    assert _snapshot(tmp_path, (root, mnt_dir)) == before
