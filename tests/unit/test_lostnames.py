"""A TOC that lost non-UTF-8 names: the names come back from the tar headers by range.

The eStargz blobs are made by the module's own writer, which lays members out as ctr-remote
does (a file's data starts a member; the headers that follow go after it) and, as Go's JSON
encoder does, puts U+FFFD in the TOC for bytes that are not UTF-8.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from imagefs.errors import LayerFormatError
from imagefs.layers import chunks, lostnames
from imagefs.layers import estargz as es
from imagefs.layers.layerindex import build_from_blob
from imagefs.oci.digest import Digest

ODD = os.fsdecode(b"caf\xe9")  # surrogate-escaped: the true name is b"caf\xe9"
BIG = random.Random(7).randbytes(700_000)


def _files() -> list[es.FileSpec]:
    return [
        es.FileSpec("etc/", type="dir", mode=0o755),
        es.FileSpec("etc/motd", data=b"hello\n"),
        es.FileSpec("data/big.bin", data=BIG),  # chunked: the odd names follow its last piece
        es.FileSpec(f"data/{ODD}/", type="dir", mode=0o755),
        es.FileSpec(f"data/{ODD}/menu", data=b"croissant\n"),
        es.FileSpec("data/\udcff\udcfe", data=b""),  # empty: no payload of its own
        es.FileSpec("data/to-menu", type="symlink", link_name=f"{ODD}/menu", mode=0o777),
        es.FileSpec("etc/zz", data=b"after\n"),
    ]


def _blob() -> es.EStargzBlob:
    return es.write_estargz(_files(), chunk_size=256 << 10)


def _names_from_blob(blob: es.EStargzBlob) -> tuple[es.TOC, lostnames.Names, int]:
    toc = es.parse_toc(es.read_toc(blob.blob, len(blob.blob)).raw)
    with pytest.raises(lostnames.LostNames) as lost:
        chunks.from_estargz(toc, blob.toc_offset)
    gaps = lostnames.gaps(lost.value.entries, "gzip", blob.toc_offset)
    names: dict[int, tuple[bytes, bytes]] = {}
    fetched = 0
    for gap in gaps:
        fetched += gap.end - gap.start
        names.update(lostnames.recover(gap, "gzip", blob.blob[gap.start : gap.end], toc.entries))
    return toc, names, fetched


def test_the_toc_loses_the_names_and_the_headers_give_them_back(tmp_path: Path) -> None:
    blob = _blob()
    toc, names, fetched = _names_from_blob(blob)
    assert sorted(n for n, _ in names.values()) == [
        b"data/caf\xe9",
        b"data/caf\xe9/menu",
        b"data/to-menu",
        b"data/\xff\xfe",
    ]
    assert (b"data/to-menu", b"caf\xe9/menu") in names.values()
    # only the member after big.bin's last piece (its data and the headers), and the one
    # before etc/zz's data: not the layer
    assert fetched < 256 << 10 + 8192 + 2 * 4096, fetched
    t, _, _ = chunks.from_estargz(toc, blob.toc_offset, names)
    # the same tree the whole tar stream gives
    path = tmp_path / "blob"
    path.write_bytes(blob.blob)
    built = build_from_blob(path, Digest.of(blob.blob), "gzip", estargz=True).toc
    want = sorted(built.path(i) for i in range(len(built)) if built.find(built.path(i)) == i)
    got = sorted(t.path(i) for i in range(len(t)) if t.find(t.path(i)) == i)
    assert got == want
    assert b"data/caf\xe9/menu" in got and b"data/\xff\xfe" in got
    link = t.find(b"data/to-menu")
    assert link is not None and t.linkname(link) == b"caf\xe9/menu"


def test_header_bytes_that_disagree_with_the_toc_are_refused() -> None:
    blob = _blob()
    toc = es.parse_toc(es.read_toc(blob.blob, len(blob.blob)).raw)
    gaps = lostnames.gaps(toc.entries, "gzip", blob.toc_offset)
    assert gaps
    gap = gaps[0]
    # the same range of another blob, where the odd directory is a file
    other = es.write_estargz(
        [
            es.FileSpec(f"data/{ODD}/", data=b"x") if f.name == f"data/{ODD}/" else f
            for f in _files()
        ],
        chunk_size=256 << 10,
    )
    with pytest.raises(LayerFormatError):
        lostnames.recover(gap, "gzip", other.blob[gap.start : gap.end], toc.entries)
    # a range starting elsewhere: the piece before the headers fails its digest
    shifted = lostnames.Gap(gap.start, gap.end, gap.skip, "sha256:" + "0" * 64, gap.pad, gap.expect)
    with pytest.raises(LayerFormatError):
        lostnames.recover(shifted, "gzip", blob.blob[gap.start : gap.end], toc.entries)
    # cut short: fewer headers than the TOC places there
    cut = lostnames.Gap(gap.start, gap.end - 40, gap.skip, gap.skip_digest, gap.pad, gap.expect)
    with pytest.raises(LayerFormatError):
        lostnames.recover(cut, "gzip", blob.blob[gap.start : gap.end - 40], toc.entries)


def test_recovered_names_survive_the_kept_record() -> None:
    names = {3: (b"a\xff", b""), 9: (b"l", b"t\xfe")}
    assert lostnames.from_params(lostnames.to_params(names)) == names
    with pytest.raises(LayerFormatError):
        lostnames.from_params({"x": ["zz", ""]})
