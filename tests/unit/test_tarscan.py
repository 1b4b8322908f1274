"""The incremental tar scanner against GNU tar output, Python's tarfile, and hand-made damage."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from imagefs.errors import LayerFormatError
from imagefs.layers.tarfields import leaves_root, parse_number, parse_pax_time
from imagefs.layers.tarscan import (
    MAX_EXTENSION_SIZE,
    EntryType,
    TarEntry,
    TarScanner,
    clean_path,
    scan_tar,
)

needs_gnu_tar = pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")

# ---------------------------------------------------------------------- raw tar building


def header(
    name: bytes,
    typeflag: bytes = b"0",
    size: int = 0,
    *,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: int = 0,
    linkname: bytes = b"",
    magic: bytes = b"ustar\x0000",
    prefix: bytes = b"",
    devmajor: int = 0,
    devminor: int = 0,
    size_field: bytes | None = None,
    uid_field: bytes | None = None,
) -> bytes:
    """One 512-byte header block with a correct checksum (fields overridable raw)."""

    def octal(value: int, width: int) -> bytes:
        return b"%0*o\x00" % (width - 1, value)

    block = bytearray(512)
    block[0:100] = name.ljust(100, b"\x00")[:100]
    block[100:108] = octal(mode, 8)
    block[108:116] = uid_field if uid_field is not None else octal(uid, 8)
    block[116:124] = octal(gid, 8)
    block[124:136] = size_field if size_field is not None else octal(size, 12)
    block[136:148] = octal(mtime, 12)
    block[148:156] = b" " * 8
    block[156:157] = typeflag
    block[157:257] = linkname.ljust(100, b"\x00")[:100]
    block[257:265] = magic
    block[265:269] = b"root"
    block[297:301] = b"root"
    block[329:337] = octal(devmajor, 8)
    block[337:345] = octal(devminor, 8)
    block[345:500] = prefix.ljust(155, b"\x00")[:155]
    block[148:156] = b"%06o\x00 " % sum(block)
    return bytes(block)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def member(name: bytes, data: bytes = b"", typeflag: bytes = b"0", **kw: object) -> bytes:
    return header(name, typeflag, len(data), **kw) + padded(data)  # type: ignore[arg-type]


def pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length).encode()) + len(body) != length:
        length += 1
    return str(length).encode() + body


def pax(records: dict[bytes, bytes], kind: bytes = b"x") -> bytes:
    payload = b"".join(pax_record(k, v) for k, v in records.items())
    return header(b"PaxHeaders/x", kind, len(payload)) + padded(payload)


END = bytes(1024)


def by_path(entries: list[TarEntry]) -> dict[bytes, TarEntry]:
    return {e.path: e for e in entries}


def scan_ok(data: bytes) -> list[TarEntry]:
    entries, warnings = scan_tar(data)
    assert warnings == []
    return entries


# ---------------------------------------------------------------------- GNU tar output


def make_tree(root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_bytes(b"hello\n")
    os.utime(root / "a" / "b" / "f", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    os.link(root / "a" / "b" / "f", root / "a" / "hl")
    os.symlink("../x/y", root / "a" / "sl")
    os.mkfifo(root / "fifo")
    long_dir = root / ("d" * 120) / ("e" * 150)
    long_dir.mkdir(parents=True)
    (long_dir / ("g" * 100)).write_bytes(b"deep")
    os.makedirs(root / "x", exist_ok=True)
    with open(os.path.join(os.fsencode(root / "x"), b"caf\xe9\nline"), "wb") as fh:
        fh.write(b"latin-1 and a newline")


def gnu_tar(src: Path, out: Path, *args: str) -> bytes:
    subprocess.run(["tar", *args, "-C", str(src), "-cf", str(out), "."], check=True)
    return out.read_bytes()


@needs_gnu_tar
@pytest.mark.parametrize("fmt", ["posix", "gnu"])
def test_gnu_tar_tree(tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    data = gnu_tar(src, tmp_path / "t.tar", f"--format={fmt}")
    entries = by_path(scan_ok(data))

    assert entries[b""].type is EntryType.DIR
    f = entries[b"a/b/f"]
    assert f.type is EntryType.REG and f.size == 6
    assert data[f.offset : f.offset + f.size] == b"hello\n"
    assert f.mtime == 1_600_000_000
    assert f.mtime_ns == (123_456_789 if fmt == "posix" else 0)
    assert (f.mode == 0o644 and f.uname == b"root") or f.uid == os.getuid()

    hl = entries[b"a/hl"]
    assert hl.type is EntryType.HARDLINK and hl.linkname == b"a/b/f" and hl.size == 0
    sl = entries[b"a/sl"]
    assert sl.type is EntryType.SYMLINK and sl.linkname == b"../x/y"
    assert entries[b"fifo"].type is EntryType.FIFO

    deep_path = b"d" * 120 + b"/" + b"e" * 150 + b"/" + b"g" * 100
    deep = entries[deep_path]
    assert data[deep.offset : deep.offset + deep.size] == b"deep"

    odd = entries[b"x/caf\xe9\nline"]
    assert data[odd.offset : odd.offset + odd.size] == b"latin-1 and a newline"


@needs_gnu_tar
def test_gnu_tar_xattrs(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    target = src / "cap"
    target.write_bytes(b"")
    value = b"\x01\x00\x00\x02\x00\x20\x00\x00" + bytes(12)
    try:
        os.setxattr(target, "user.blob", b"\x00\xff\n=")
        os.setxattr(target, "security.capability", value)
    except OSError as exc:
        pytest.skip(f"cannot set xattrs here: {exc}")
    data = gnu_tar(src, tmp_path / "t.tar", "--format=posix", "--xattrs", "--xattrs-include=*")
    xattrs = dict(by_path(scan_ok(data))[b"cap"].xattrs)
    assert xattrs[b"user.blob"] == b"\x00\xff\n="
    assert xattrs[b"security.capability"] == value


@needs_gnu_tar
def test_gnu_sparse_files_are_skipped_with_a_warning(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as fh:
        # Many data islands: old GNU sparse headers then need extension blocks for the map.
        for i in range(1, 12):
            fh.seek(i << 20)
            fh.write(b"island")
    (src / "after").write_bytes(b"still here")
    for fmt in ("gnu", "posix"):
        data = gnu_tar(src, tmp_path / f"{fmt}.tar", f"--format={fmt}", "--sparse")
        entries, warnings = scan_tar(data)
        paths = {e.path for e in entries}
        assert b"after" in paths and not any(b"sparse" in p for p in paths)
        assert len(warnings) == 1 and "sparse" in warnings[0]


# ---------------------------------------------------------------------- tarfile output


def tarfile_bytes(members: list[tuple[tarfile.TarInfo, bytes]], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8") as tf:
        for info, data in members:
            info.size = len(data) if info.type == tarfile.REGTYPE else 0
            tf.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def test_devices_and_binary_xattrs_and_big_ids() -> None:
    chr_ = tarfile.TarInfo("dev/null")
    chr_.type, chr_.devmajor, chr_.devminor = tarfile.CHRTYPE, 1, 3
    blk = tarfile.TarInfo("dev/sda")
    blk.type, blk.devmajor, blk.devminor = tarfile.BLKTYPE, 8, 0
    cap = tarfile.TarInfo("bin/ping")
    cap.mode = 0o4755
    cap.uid = 3_000_000_000
    cap.gid = 2**31 + 7
    cap.mtime = 1_700_000_000.5
    cap.pax_headers = {
        "SCHILY.xattr.security.capability": b"\x01\x00\x00\x02\xff\x00".decode(
            "utf-8", "surrogateescape"
        )
    }
    data = tarfile_bytes([(chr_, b""), (blk, b""), (cap, b"elf")], tarfile.PAX_FORMAT)
    entries = by_path(scan_ok(data))
    assert (entries[b"dev/null"].type, entries[b"dev/null"].devmajor) == (EntryType.CHAR, 1)
    assert entries[b"dev/null"].devminor == 3
    assert entries[b"dev/sda"].type is EntryType.BLOCK and entries[b"dev/sda"].devmajor == 8
    ping = entries[b"bin/ping"]
    assert ping.mode == 0o4755
    assert (ping.uid, ping.gid) == (3_000_000_000, 2**31 + 7)
    assert (ping.mtime, ping.mtime_ns) == (1_700_000_000, 500_000_000)
    assert dict(ping.xattrs) == {b"security.capability": b"\x01\x00\x00\x02\xff\x00"}


def test_gnu_base256_numbers() -> None:
    info = tarfile.TarInfo("big")
    info.uid = 2**40 + 5
    info.gid = 3_000_000_000
    info.mtime = -1000
    data = tarfile_bytes([(info, b"x")], tarfile.GNU_FORMAT)
    big = scan_ok(data)[0]
    assert (big.uid, big.gid, big.mtime) == (2**40 + 5, 3_000_000_000, -1000)


def test_base256_parser() -> None:
    assert parse_number(b"\x80" + bytes(10) + b"\x05") == 5
    assert parse_number(b"\xff" * 12) == -1
    assert parse_number(b"0000644\x00") == 0o644
    assert parse_number(b"  644 \x00") == 0o644
    assert parse_number(b"\x00" * 8) == 0
    with pytest.raises(ValueError):
        parse_number(b"00009\x00")


def test_pax_time() -> None:
    assert parse_pax_time(b"1700000000.123456789123") == (1_700_000_000, 123_456_789)
    assert parse_pax_time(b"5.5") == (5, 500_000_000)
    assert parse_pax_time(b"-1.25") == (-2, 750_000_000)
    assert parse_pax_time(b"-3") == (-3, 0)
    with pytest.raises(ValueError):
        parse_pax_time(b"12e3")


def test_pax_records_are_bytes_and_override_the_header() -> None:
    data = (
        pax(
            {
                b"path": b"\xff\xfe/long\nname" + b"n" * 300,
                b"uid": b"123456789",
                b"gname": b"wheel",
                b"mtime": b"1.000000001",
                b"SCHILY.xattr.user.k\xff": b"v\x00=\n",
            }
        )
        + member(b"short", b"abc")
        + pax({b"linkpath": b"t" * 200})
        + header(b"link", b"2")
        + END
    )
    first, link = scan_ok(data)
    assert first.path == b"\xff\xfe/long\nname" + b"n" * 300
    assert (first.uid, first.gname, first.mtime, first.mtime_ns) == (123456789, b"wheel", 1, 1)
    assert first.xattrs == ((b"user.k\xff", b"v\x00=\n"),)
    assert data[first.offset : first.offset + 3] == b"abc"
    assert link.linkname == b"t" * 200 and link.type is EntryType.SYMLINK


def test_global_pax_header_applies_to_later_entries() -> None:
    data = (
        member(b"before", b"1")
        + pax({b"uid": b"42", b"path": b"ignored", b"mtime": b"7"}, kind=b"g")
        + member(b"one", b"2")
        + pax({b"uid": b"9"})
        + member(b"two", b"3")
        + pax({b"uid": b""}, kind=b"g")
        + member(b"three", b"4", uid=5)
        + END
    )
    entries = by_path(scan_ok(data))
    assert entries[b"before"].uid == 0
    assert (entries[b"one"].uid, entries[b"one"].mtime) == (42, 7)
    assert entries[b"two"].uid == 9
    assert entries[b"three"].uid == 5
    assert b"ignored" not in entries


def test_gnu_longname_and_longlink() -> None:
    long_name = b"dir/" + b"n" * 250 + b"\xe9"
    long_link = b"target/" + b"l" * 300
    data = (
        member(b"././@LongLink", long_name + b"\x00", b"L", magic=b"ustar  \x00")
        + member(b"././@LongLink", long_link + b"\x00", b"K", magic=b"ustar  \x00")
        + header(b"truncated", b"1", linkname=b"trunc", magic=b"ustar  \x00")
        + END
    )
    (entry,) = scan_ok(data)
    assert entry.path == long_name and entry.linkname == long_link
    assert entry.type is EntryType.HARDLINK


def test_ustar_prefix_field() -> None:
    data = member(b"file", b"x", prefix=b"some/prefix") + END
    assert scan_ok(data)[0].path == b"some/prefix/file"


def test_v7_directory_by_trailing_slash() -> None:
    data = (
        header(b"olddir/", b"\x00", magic=bytes(8))
        + member(b"olddir/f", b"z", b"\x00", magic=bytes(8))
        + END
    )
    d, f = scan_ok(data)
    assert d.type is EntryType.DIR and d.path == b"olddir"
    assert f.type is EntryType.REG and f.uname == b""


def test_header_only_types_ignore_their_size_field() -> None:
    data = (
        header(b"link", b"1", 1000, linkname=b"file")
        + header(b"dir", b"5", 700)
        + member(b"after", b"ok")
        + END
    )
    link, d, after = scan_ok(data)
    assert link.size == 0 and d.size == 0
    assert data[after.offset : after.offset + 2] == b"ok"


def test_contiguous_files_are_regular() -> None:
    (entry,) = scan_ok(member(b"c", b"data", b"7") + END)
    assert entry.type is EntryType.REG and entry.size == 4


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        (b"../../etc/x", b"etc/x"),
        (b"/abs/y", b"abs/y"),
        (b"./a/./b/../c/", b"a/c"),
        (b"a//b///", b"a/b"),
        (b"./", b""),
        (b"/", b""),
        (b"..", b""),
        (b"a/../../../b", b"b"),
        (b"\xff/../\xfe", b"\xfe"),
    ],
)
def test_clean_path(raw: bytes, clean: bytes) -> None:
    assert clean_path(raw) == clean


def test_clean_path_agrees_with_normpath_from_the_root() -> None:
    """Every name made of these components, cleaned, is what `posixpath.normpath` makes of
    it under `/`, made relative: the fast path for names that are clean already included."""
    import itertools
    import posixpath

    comps = [b"a", b".", b"..", b"", b".hidden", b"b.c", b"..x", b"x.."]
    for n in range(1, 5):
        for parts in itertools.product(comps, repeat=n):
            raw = b"/".join(parts)
            assert clean_path(raw) == posixpath.normpath(b"/" + raw).lstrip(b"/"), raw


def test_hostile_names_are_contained_and_link_targets_cleaned() -> None:
    data = (
        member(b"../../etc/passwd", b"x")
        + header(b"/abs/link", b"1", linkname=b"../../etc/passwd")
        + header(b"sym", b"2", linkname=b"../../outside")
        + END
    )
    (f, link, sym), warnings = scan_tar(data)
    assert f.path == b"etc/passwd"
    assert (link.path, link.linkname) == (b"abs/link", b"etc/passwd")
    assert sym.linkname == b"../../outside"  # symlink targets are resolved at run time
    # contained, and said so in a warning naming each entry (not the symlink: its target
    # is only ever interpreted inside the mount)
    assert len(warnings) == 3
    assert "'../../etc/passwd'" in warnings[0] and "kept as 'etc/passwd'" in warnings[0]
    assert "'/abs/link'" in warnings[1] and "outside the root" in warnings[1]
    assert "'/abs/link'" in warnings[2] and "hard link target '../../etc/passwd'" in warnings[2]


@pytest.mark.parametrize(
    ("raw", "leaves"),
    [
        (b"../x", True),
        (b"/x", True),
        (b"//x/y", True),
        (b"a/../../x", True),
        (b"./../x", True),
        (b"a/../b", False),
        (b"./a/./b", False),
        (b"a/b/../../c", False),
        (b"./", False),
        (b"/", False),
        (b".", False),
        (b"..foo/x", False),
    ],
)
def test_leaves_root(raw: bytes, leaves: bool) -> None:
    assert leaves_root(raw) is leaves


def test_names_that_stay_inside_give_no_warning() -> None:
    entries = scan_ok(member(b"./a/../b", b"x") + header(b"l", b"1", linkname=b"./b") + END)
    assert [e.path for e in entries] == [b"b", b"l"]


def test_one_byte_chunks_give_the_same_result(tmp_path: Path) -> None:
    data = (
        pax({b"path": b"p" * 300, b"SCHILY.xattr.user.a": b"1"})
        + member(b"x", b"12345")
        + member(b"././@LongLink", b"q" * 200 + b"\x00", b"L", magic=b"ustar  \x00")
        + member(b"short", b"y" * 1000, magic=b"ustar  \x00")
        + header(b"d", b"5")
        + END
        + b"\x00" * 2048
    )
    whole = scan_ok(data)
    scanner = TarScanner()
    pieces: list[TarEntry] = []
    for i in range(len(data)):
        pieces.extend(scanner.feed(data[i : i + 1]))
    pieces.extend(scanner.close())
    assert pieces == whole
    assert scanner.done and scanner.end_offset == len(data) - 2048
    assert scanner.offset == len(data)


def test_stream_without_end_marker_is_accepted() -> None:
    entries = scan_ok(member(b"a", b"1"))
    assert [e.path for e in entries] == [b"a"]
    assert scan_ok(b"") == []
    assert scan_ok(member(b"a", b"1") + bytes(512)) == entries  # one zero block, then EOF


def test_data_after_the_end_marker_is_ignored() -> None:
    data = member(b"a", b"1") + END + b"garbage" * 100
    assert [e.path for e in scan_ok(data)] == [b"a"]


# ---------------------------------------------------------------------- bad input


def test_truncated_payload_names_the_entry() -> None:
    data = member(b"victim", b"x" * 2000) + END
    scanner = TarScanner()
    scanner.feed(data[:1000])
    with pytest.raises(LayerFormatError, match=r"truncated.*'victim'.*offset 0"):
        scanner.close()


def test_truncated_header() -> None:
    scanner = TarScanner()
    scanner.feed(member(b"a", b"1") + b"x" * 100)
    with pytest.raises(LayerFormatError, match=r"truncated.*header at offset 1024"):
        scanner.close()


def test_size_running_past_the_end() -> None:
    data = header(b"liar", b"0", 10**9) + b"short"
    with pytest.raises(LayerFormatError, match="liar"):
        scan_tar(data)


def test_extended_header_without_entry() -> None:
    with pytest.raises(LayerFormatError, match="no entry after it"):
        scan_tar(pax({b"path": b"x"}))


def test_bad_checksum() -> None:
    block = bytearray(member(b"a", b"1"))
    block[0] = ord("b")
    with pytest.raises(LayerFormatError, match="checksum mismatch at offset 0"):
        scan_tar(bytes(block) + END)


def test_garbage() -> None:
    with pytest.raises(LayerFormatError, match="checksum"):
        scan_tar(os.urandom(4096) + b"\x01")


def test_lone_zero_block_then_header() -> None:
    with pytest.raises(LayerFormatError, match="lone zero block"):
        scan_tar(member(b"a", b"1") + bytes(512) + member(b"b", b"2"))


@pytest.mark.parametrize(
    "size", [b"99999999999999999999999999", b"-5", b"12x", b"9223372036854775808"]
)
def test_bad_pax_size_is_fatal(size: bytes) -> None:
    data = pax({b"size": size}) + member(b"a", b"1") + END
    with pytest.raises(LayerFormatError, match="size"):
        scan_tar(data)


def test_huge_pax_header_is_refused() -> None:
    data = header(b"PaxHeaders/x", b"x", MAX_EXTENSION_SIZE + 1)
    scanner = TarScanner()
    with pytest.raises(LayerFormatError, match="extended header"):
        scanner.feed(data)


@pytest.mark.parametrize(
    "payload",
    [b"garbage", b"5 a=b\n", b"100 path=x\n", b"12 path=abc", b"9 =value\n", b"x" * 30],
)
def test_malformed_pax_records_are_fatal(payload: bytes) -> None:
    data = header(b"PaxHeaders/x", b"x", len(payload)) + padded(payload) + member(b"a") + END
    with pytest.raises(LayerFormatError, match="PAX"):
        scan_tar(data)


def test_negative_header_size_is_fatal() -> None:
    data = header(b"neg", size_field=b"\xff" * 12) + END
    with pytest.raises(LayerFormatError, match="impossible size"):
        scan_tar(data)


def test_entry_local_problems_skip_the_entry() -> None:
    data = (
        member(b"bad-uid", b"12", uid_field=b"zzzzzzz\x00")
        + pax({b"gid": b"notanumber"})
        + member(b"bad-pax-gid", b"34")
        + member(b"vendor", b"56", b"X")
        + header(b"emptylink", b"2")
        + member(b"good", b"78")
        + END
    )
    entries, warnings = scan_tar(data)
    assert [e.path for e in entries] == [b"good"]
    assert data[entries[0].offset : entries[0].offset + 2] == b"78"
    assert len(warnings) == 4
    assert "'bad-uid'" in warnings[0] and "'vendor'" in warnings[2]


def test_feed_after_close_is_a_bug() -> None:
    scanner = TarScanner()
    scanner.close()
    with pytest.raises(RuntimeError):
        scanner.feed(b"x")
