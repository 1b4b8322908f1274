"""eStargz footer and TOC parsing, checked against the module's own writer and GNU tar."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import zlib
from pathlib import Path

import pytest

from imagefs.errors import IntegrityError, LayerFormatError
from imagefs.layers import estargz as es
from imagefs.layers import seekindex as si

BIG = bytes(range(256)) * 4000 + b"tail"  # 1 MiB + 4: several chunks at 300 KiB


def _files() -> list[es.FileSpec]:
    return [
        es.FileSpec("etc/", type="dir", mode=0o755),
        es.FileSpec("etc/hello.txt", data=b"hello\n", mtime=1_600_000_000),
        es.FileSpec("etc/empty", data=b""),
        es.FileSpec("etc/link", type="symlink", link_name="hello.txt", mode=0o777),
        es.FileSpec("etc/hard", type="hardlink", link_name="etc/hello.txt"),
        es.FileSpec(
            "bin/tool",
            data=BIG,
            mode=0o755,
            uid=1000,
            gid=1000,
            xattrs={"security.capability": b"\x01\x00\x00\x02\xff"},
        ),
    ]


@pytest.fixture(scope="module")
def written() -> es.EStargzBlob:
    return es.write_estargz(_files(), chunk_size=300 * 1024)


def test_blob_is_a_plain_tar_gz(written: es.EStargzBlob) -> None:
    with tarfile.open(fileobj=io.BytesIO(written.blob), mode="r:gz") as tf:
        members = {m.name: m for m in tf.getmembers()}
        f = tf.extractfile(members["bin/tool"])
        assert f is not None and f.read() == BIG
        assert members["etc/link"].linkname == "hello.txt"
        assert members["bin/tool"].pax_headers["SCHILY.xattr.security.capability"]
    assert es.TOC_TAR_NAME in members
    stream = gzip.decompress(written.blob)
    assert written.diff_id == "sha256:" + hashlib.sha256(stream).hexdigest()


def test_gnu_tar_reads_the_blob(written: es.EStargzBlob, tmp_path: Path) -> None:
    if shutil.which("tar") is None:
        pytest.skip("GNU tar not installed")
    (tmp_path / "l.tar.gz").write_bytes(written.blob)
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "-xzf", str(tmp_path / "l.tar.gz"), "-C", str(out)], check=True)
    assert (out / "bin/tool").read_bytes() == BIG
    assert (out / "etc/hello.txt").read_bytes() == b"hello\n"


def test_footer_and_toc_round_trip(written: es.EStargzBlob) -> None:
    blob = written.blob
    assert len(es.make_footer(123)) == es.FOOTER_SIZE
    offset = es.parse_footer(blob[-es.FOOTER_SIZE :])
    assert offset == written.toc_offset
    member = blob[offset : len(blob) - es.FOOTER_SIZE]
    toc_json = es.toc_json_from_member(member)
    toc = es.parse_toc(toc_json, expected_digest=written.toc_digest)
    assert toc.version == 1
    by_name = {e.name: e for e in toc.entries if e.type != "chunk"}
    tool = by_name["bin/tool"]
    assert tool.size == len(BIG) and tool.uid == 1000 and tool.mode == 0o755
    assert tool.xattrs == {"security.capability": b"\x01\x00\x00\x02\xff"}
    assert tool.digest == "sha256:" + hashlib.sha256(BIG).hexdigest()
    assert by_name["etc/link"].link_name == "hello.txt"
    assert by_name["etc/hello.txt"].modtime == "2020-09-13T12:26:40Z"
    assert es.NO_PREFETCH_LANDMARK in by_name
    assert es.read_toc(blob[offset:], len(blob)).entries == toc.entries


def test_device_numbers_reach_the_tar_and_the_toc() -> None:
    """The writer keeps a device's numbers: GNU tar lists them, the TOC carries them (the
    bench's eStargz variant is written from a Debian tree with /dev/null and friends)."""
    written = es.write_estargz(
        [
            es.FileSpec("dev/", type="dir", mode=0o755),
            es.FileSpec("dev/null", type="char", mode=0o666, dev_major=1, dev_minor=3),
            es.FileSpec("dev/loop9", type="block", mode=0o660, dev_major=7, dev_minor=9),
        ]
    )
    listing = subprocess.run(
        ["tar", "-tvzf", "-"], input=written.blob, capture_output=True, check=True
    ).stdout.decode()
    assert "1,3" in listing and "7,9" in listing, listing
    offset = es.parse_footer(written.blob[-es.FOOTER_SIZE :])
    toc = es.read_toc(written.blob[offset:], len(written.blob))
    by_name = {e.name: e for e in toc.entries}
    assert (by_name["dev/null"].dev_major, by_name["dev/null"].dev_minor) == (1, 3)
    assert (by_name["dev/loop9"].dev_major, by_name["dev/loop9"].dev_minor) == (7, 9)


def test_legacy_47_byte_footer() -> None:
    w = es.write_estargz(_files(), legacy_footer=True)
    assert len(es.make_footer(5, legacy=True)) == es.LEGACY_FOOTER_SIZE
    assert es.parse_footer(w.blob[-es.FOOTER_SIZE :]) == w.toc_offset
    assert es.footer_size(w.blob[-64:]) == es.LEGACY_FOOTER_SIZE
    with tarfile.open(fileobj=io.BytesIO(w.blob), mode="r:gz") as tf:
        assert "bin/tool" in tf.getnames()
    assert es.read_toc(w.blob, len(w.blob), expected_digest=w.toc_digest).version == 1


def test_each_chunk_member_decompresses_alone(written: es.EStargzBlob) -> None:
    blob = written.blob
    toc = es.read_toc(blob, len(blob))
    rebuilt: dict[str, bytearray] = {}
    sizes = {e.name: e.size for e in toc.entries if e.type == "reg"}
    chunked = [e for e in toc.entries if e.type in ("reg", "chunk") and e.chunk_digest]
    assert sum(1 for e in chunked if e.name == "bin/tool") == 4
    for e in chunked:
        d = zlib.decompressobj(31)
        out = d.decompress(blob[e.offset :])  # one member only: stops at its end
        assert d.eof
        size = e.chunk_size or sizes[e.name] - e.chunk_offset
        chunk = out[:size]
        es.verify_chunk(e, chunk)
        assert len(rebuilt.setdefault(e.name, bytearray())) == e.chunk_offset
        rebuilt[e.name] += chunk
    assert bytes(rebuilt["bin/tool"]) == BIG
    assert bytes(rebuilt["etc/hello.txt"]) == b"hello\n"
    with pytest.raises(IntegrityError):
        es.verify_chunk(chunked[0], b"not it")


def test_seek_index_over_estargz(written: es.EStargzBlob) -> None:
    """An eStargz blob is multi-member gzip: the generic seek index reads it too."""
    stream = gzip.decompress(written.blob)
    index = si.build_index(io.BytesIO(written.blob), "gzip", spacing=64 * 1024)
    blob = written.blob
    for off in range(0, len(stream), 9973):
        got = si.read_at(index, lambda a, b: blob[a:b], off, 5000)
        assert got == stream[off : off + 5000]


def test_toc_digest_mismatch(written: es.EStargzBlob) -> None:
    blob = written.blob
    toc_json = es.toc_json_from_member(blob[written.toc_offset : -es.FOOTER_SIZE])
    with pytest.raises(IntegrityError):
        es.parse_toc(toc_json, expected_digest="sha256:" + "0" * 64)
    with pytest.raises(IntegrityError):
        es.verify_toc_digest(toc_json, "md5:abc")


def test_bad_footers_and_tocs() -> None:
    with pytest.raises(LayerFormatError):
        es.parse_footer(b"\x00" * 51)
    with pytest.raises(LayerFormatError):
        es.parse_footer(gzip.compress(b"x" * 100)[-51:])
    bad_hex = bytearray(es.make_footer(10))
    bad_hex[16] = ord("z")
    with pytest.raises(LayerFormatError):
        es.parse_footer(bytes(bad_hex))
    with pytest.raises(LayerFormatError):
        es.parse_toc(b"[1, 2]")
    with pytest.raises(LayerFormatError):
        es.parse_toc(b"{not json")
    with pytest.raises(LayerFormatError):
        es.parse_toc(json.dumps({"version": 1, "entries": [{"name": "a"}]}).encode())
    with pytest.raises(LayerFormatError):
        es.parse_toc(
            json.dumps(
                {"version": 1, "entries": [{"name": "a", "type": "reg", "size": -1}]}
            ).encode()
        )
    with pytest.raises(LayerFormatError):
        es.toc_json_from_member(gzip.compress(b"\x00" * 1024)[:-20])


def test_toc_fields_from_json() -> None:
    doc = {
        "version": 1,
        "entries": [
            {
                "name": "f",
                "type": "chunk",
                "offset": 10,
                "chunkOffset": 4,
                "chunkSize": 3,
                "chunkDigest": "sha256:" + "a" * 64,
                "innerOffset": 7,
                "devMajor": 1,
                "devMinor": 2,
                "userName": "u",
                "groupName": "g",
                "xattrs": {"user.x": "AAE="},
            }
        ],
    }
    (e,) = es.parse_toc(json.dumps(doc).encode()).entries
    assert (e.offset, e.chunk_offset, e.chunk_size, e.inner_offset) == (10, 4, 3, 7)
    assert (e.dev_major, e.dev_minor, e.user_name, e.group_name) == (1, 2, "u", "g")
    assert e.xattrs == {"user.x": b"\x00\x01"}


_PLAIN_ENTRY = {
    "name": "usr/lib/libz.so.1",
    "type": "reg",
    "size": 120,
    "modtime": "2024-01-02T03:04:05Z",
    "linkName": "",
    "mode": 0o644,
    "uid": 1,
    "gid": 2,
    "userName": "u",
    "groupName": "g",
    "digest": "sha256:" + "b" * 64,
    "offset": 10,
    "endOffset": 99,
    "chunkOffset": 0,
    "chunkSize": 0,
    "chunkDigest": "sha256:" + "b" * 64,
    "innerOffset": 0,
}


@pytest.mark.parametrize(
    "change",
    [
        {},  # plain: the fast path
        {"chunkDigest": "sha256:" + "c" * 64, "type": "chunk"},
        {"devMajor": 8, "devMinor": 1, "type": "block"},
        {"xattrs": {"user.x": "AAE="}},  # xattrs: the field-by-field path
        {"uid": None, "linkName": None},  # nulls read as 0 and "" there
        {"size": 1 << 40},
    ],
)
def test_an_entry_parses_alike_on_the_fast_and_checked_paths(change: dict[str, object]) -> None:
    obj = {**_PLAIN_ENTRY, **change}
    assert es.parse_entry(obj) == es._parse_entry_checked(obj)


@pytest.mark.parametrize(
    "change",
    [
        {"size": -1},
        {"mode": True},  # a bool is not a number here
        {"uid": 1.5},
        {"name": 7},
        {"name": ""},
        {"type": ""},
        {"digest": 5},
        {"modtime": []},
        {"xattrs": {"user.x": "not base64!"}},
        {"xattrs": [1]},
    ],
)
def test_a_bad_entry_is_refused_whichever_path_it_takes(change: dict[str, object]) -> None:
    with pytest.raises(LayerFormatError):
        es.parse_entry({**_PLAIN_ENTRY, **change})
