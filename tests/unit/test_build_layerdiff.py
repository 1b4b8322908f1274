"""An upper directory -> a layer tar: whiteouts, opaque dirs, hard links, xattrs, epoch."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from imagefs.build.layerdiff import write_layer, write_tar


def test_upper_dir_becomes_a_layer(tmp_path: Path) -> None:
    up = tmp_path / "upper"
    (up / "d").mkdir(parents=True)
    os.mknod(up / "gone", 0o600 | 0o020000, os.makedev(0, 0))  # a whiteout
    os.mknod(up / "d" / "gone2", 0o600 | 0o020000, os.makedev(0, 0))
    os.link(up / "gone", up / "d" / "wh-shares-inode")  # overlay shares whiteout inodes
    (up / "opq").mkdir()
    os.setxattr(up / "opq", "trusted.overlay.opaque", b"y")
    (up / "opq" / "new").write_text("n")
    (up / "f").write_text("f")
    os.link(up / "f", up / "hard")
    os.setxattr(up / "f", "user.k", b"\xff\x00bin")
    os.utime(up / "f", (2_000_000_000, 2_000_000_000))
    buf = io.BytesIO()
    write_tar(up, buf, epoch=1_000)
    buf.seek(0)
    with tarfile.open(fileobj=buf, encoding="utf-8", errors="surrogateescape") as tar:
        members = {m.name: m for m in tar.getmembers()}
    names = list(members)
    assert names.index("d") < names.index("d/.wh.gone2")  # parents first
    assert ".wh.gone" in members and "d/.wh.gone2" in members
    assert "d/.wh.wh-shares-inode" in members  # not a hard link to a whiteout
    assert "opq/.wh..wh..opq" in members and "opq/new" in members
    assert "trusted.overlay.opaque" not in str(members["opq"].pax_headers)
    assert members["hard"].islnk() and members["hard"].linkname == "f"
    xattr = members["f"].pax_headers["SCHILY.xattr.user.k"]
    assert xattr.encode("utf-8", "surrogateescape") == b"\xff\x00bin"
    assert members["f"].mtime == 1_000  # clamped to SOURCE_DATE_EPOCH
    out1, out2 = io.BytesIO(), io.BytesIO()
    a, b = write_layer(up, out1, 1_000), write_layer(up, out2, 1_000)
    assert a == b and out1.getvalue() == out2.getvalue()  # reproducible bytes


def test_whiteouts_are_written_as_buildkit_writes_them(tmp_path: Path) -> None:
    # containerd 2 (BuildKit's differ): a zero-size regular file, mode 0, owner 0:0, mtime
    # 1970-01-01 -- whoever deleted it and whenever, so the layer does not depend on either.
    up = tmp_path / "upper"
    up.mkdir()
    os.mknod(up / "gone", 0o600 | 0o020000, os.makedev(0, 0))
    os.chown(up / "gone", 1000, 1000, follow_symlinks=False)
    os.utime(up / "gone", (1_700_000_000, 1_700_000_000), follow_symlinks=False)
    for epoch in (None, 1_000):
        buf = io.BytesIO()
        write_tar(up, buf, epoch=epoch)
        buf.seek(0)
        with tarfile.open(fileobj=buf) as tar:
            (wh,) = tar.getmembers()
        assert wh.name == ".wh.gone" and wh.isreg() and wh.size == 0
        assert (wh.mode, wh.uid, wh.gid, wh.mtime) == (0, 0, 0, 0)
        assert (wh.uname, wh.gname) == ("", "")
