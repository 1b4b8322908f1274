"""fsutil's no-follow primitives: nothing under a store root is reached through a link."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imagefs.errors import StoreError
from imagefs.fs.mountinfo import mount_at, parse_mountinfo
from imagefs.oci.digest import Digest
from imagefs.store import Store, fsutil, locks


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    (d / "victim").write_bytes(b"victim")
    return d


def test_walks_refuse_a_symlinked_directory_anywhere_below_the_root(
    tmp_path: Path, outside: Path
) -> None:
    root = tmp_path / "root"
    (root / "cache").mkdir(parents=True)
    (root / "cache" / "chunks").symlink_to(outside)
    target = root / "cache" / "chunks" / "abc"
    with pytest.raises(fsutil.LinkInStore, match="cache/chunks is a symbolic link"):
        fsutil.ensure_dir(target, root=root)
    with pytest.raises(fsutil.LinkInStore):
        fsutil.atomic_write(target / "piece", b"x", root=root)
    with pytest.raises(fsutil.LinkInStore):
        fsutil.scan(root / "cache" / "chunks", root=root)
    assert not (outside / "abc").exists()
    # without a root the directory is the caller's to trust (a path on the command line)
    fsutil.atomic_write(root / "cache" / "chunks" / "out", b"x")
    assert (outside / "out").read_bytes() == b"x"


def test_a_symlinked_root_is_refused(tmp_path: Path, outside: Path) -> None:
    (tmp_path / "root").symlink_to(outside)
    with pytest.raises(fsutil.LinkInStore, match="root is a symbolic link"):
        Store(tmp_path / "root")
    with pytest.raises(fsutil.LinkInStore):
        fsutil.read_bytes(tmp_path / "root" / "victim", root=tmp_path / "root")


def test_files_are_never_opened_through_a_link_or_as_a_fifo(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside / "victim")
    os.mkfifo(root / "fifo")
    for name in ("link", "fifo"):
        with pytest.raises(fsutil.LinkInStore, match=name):
            fsutil.read_bytes(root / name, root=root)
        with pytest.raises(fsutil.LinkInStore):
            locks.try_lock(root / name, root=root)
    assert fsutil.read_bytes(root / "missing", root=root) is None
    with pytest.raises(StoreError, match="larger than"):
        (root / "big").write_bytes(b"x" * 10)
        fsutil.read_bytes(root / "big", root=root, limit=5)


def test_writes_replace_a_link_and_never_write_through_it(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "index.json").symlink_to(outside / "victim")
    fsutil.atomic_write(root / "index.json", b"new", root=root)
    assert not (root / "index.json").is_symlink()
    assert (root / "index.json").read_bytes() == b"new"
    assert (outside / "victim").read_bytes() == b"victim"


def test_unlink_and_rmtree_remove_links_never_their_targets(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "root"
    (root / "area" / "layer").mkdir(parents=True)
    (root / "area" / "layer" / "piece").write_bytes(b"12345")
    (root / "area" / "layer" / "into-outside").symlink_to(outside)
    (root / "area" / "dirlink").symlink_to(outside)
    (root / "area" / "filelink").symlink_to(outside / "victim")
    kinds = {e.name: e.kind for e in fsutil.scan(root / "area", root=root)}
    assert kinds == {"layer": "dir", "dirlink": "link", "filelink": "link"}
    assert fsutil.safe_unlink(root / "area" / "filelink", root=root)
    assert fsutil.safe_rmtree(root / "area" / "dirlink", root=root) == 0
    assert fsutil.safe_rmtree(root / "area" / "layer", root=root) == 5
    assert fsutil.scan(root / "area", root=root) == []
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert (outside / "victim").read_bytes() == b"victim"
    assert not fsutil.safe_unlink(root / "area" / "gone", root=root)


def test_blob_store_treats_a_planted_link_as_absent(tmp_path: Path, outside: Path) -> None:
    store = Store(tmp_path / "root")
    digest = Digest.of(b"victim")
    path = store.blobs.path(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(outside / "victim")  # even with the right content: not ours
    assert not store.blobs.has(digest) and store.blobs.size(digest) is None
    assert list(store.blobs.iter_digests()) == []
    assert store.blobs.put(b"victim") == digest
    assert not path.is_symlink() and path.read_bytes() == b"victim"


def test_ingest_replaces_a_linked_or_hardlinked_partial(tmp_path: Path, outside: Path) -> None:
    store = Store(tmp_path / "root")
    data = b"the blob" * 100
    digest = Digest.of(data)
    ingest_dir = store.blobs.ingest_dir
    ingest_dir.mkdir(exist_ok=True)
    (ingest_dir / f"{digest.hex}.partial").symlink_to(outside / "victim")
    with store.blobs.ingest(digest, len(data)) as ing:
        assert ing is not None and ing.offset == 0
        ing.write(data)
        ing.commit()
    assert (outside / "victim").read_bytes() == b"victim"
    other = Digest.of(b"other")
    os.link(outside / "victim", ingest_dir / f"{other.hex}.partial")  # same filesystem
    with store.blobs.ingest(other, 5) as ing:
        assert ing is not None and ing.offset == 0
        ing.write(b"other")
        ing.commit()
    assert (outside / "victim").read_bytes() == b"victim"


def test_a_symlinked_store_directory_is_refused_with_one_line(
    tmp_path: Path, outside: Path
) -> None:
    root = tmp_path / "root"
    Store(root)
    (root / "leases").symlink_to(outside)
    with pytest.raises(fsutil.LinkInStore, match=r"store directory .*leases is a symbolic link"):
        Store(root)


MOUNTINFO = (
    "22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw\n"
    "90 22 0:44 / /tmp/a\\040dir rw,relatime - tmpfs tmpfs rw,size=1024k\n"
    "91 90 0:45 / /tmp/a\\040dir ro,nosuid,nodev,relatime shared:1 master:2 - fuse.imagefs "
    "imagefs ro,user_id=0,group_id=0,default_permissions\n"
    "garbage line\n"
)


def test_mountinfo_names_the_topmost_mount_and_unescapes_paths() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert [m.mount_id for m in mounts] == [22, 90, 91]
    top = mount_at(mounts, "/tmp/a dir")
    assert top is not None and top.is_imagefs and top.source == "imagefs"
    proc = mount_at(mounts, "/proc")
    assert proc is not None and not proc.is_imagefs and proc.fstype == "proc"
    assert mount_at(mounts, "/tmp") is None
