"""An upper directory -> an eStargz layer: the same tar as the gzip layer, plus its TOC."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import zlib
from pathlib import Path

from imagefs.build.layerdiff import write_tar
from imagefs.build.stargzlayer import CHUNK_SIZE, write_estargz_layer
from imagefs.layers.estargz import TOC_DIGEST_ANNOTATION, read_toc, verify_chunk


def test_estargz_layer_has_the_gzip_layers_entries_and_a_toc_that_verifies(
    tmp_path: Path,
) -> None:
    up = tmp_path / "upper"
    (up / "d").mkdir(parents=True)
    os.mknod(up / "d" / "gone", 0o600 | 0o020000, os.makedev(0, 0))  # a whiteout
    big = os.urandom(2 * CHUNK_SIZE + 5)
    (up / "big").write_bytes(big)
    (up / "small").write_text("s")
    os.link(up / "small", up / "hard")
    os.setxattr(up / "small", "user.k", b"\xff\x00bin")
    (up / "empty").write_bytes(b"")
    buf = io.BytesIO()
    layer = write_estargz_layer(up, buf, epoch=1_000)
    blob = buf.getvalue()
    assert layer.size == len(blob)
    assert str(layer.digest) == "sha256:" + hashlib.sha256(blob).hexdigest()
    tar_bytes = gzip.decompress(blob)
    assert str(layer.diff_id) == "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
    plain = io.BytesIO()
    write_tar(up, plain, epoch=1_000)
    plain.seek(0)
    with tarfile.open(fileobj=plain) as a, tarfile.open(fileobj=io.BytesIO(tar_bytes)) as b:
        want = [(m.name, m.type, m.size, m.mode, m.mtime, m.linkname) for m in a.getmembers()]
        got = [(m.name, m.type, m.size, m.mode, m.mtime, m.linkname) for m in b.getmembers()]
        assert b.extractfile("big").read() == big  # type: ignore[union-attr]
    assert got[0][0] == ".no.prefetch.landmark" and got[-1][0] == "stargz.index.json"
    assert got[1:-1] == want
    toc = read_toc(blob, len(blob), expected_digest=layer.annotations[TOC_DIGEST_ANNOTATION])
    chunks = [e for e in toc.entries if e.name == "big"]
    assert [c.chunk_offset for c in chunks] == [0, CHUNK_SIZE, 2 * CHUNK_SIZE]
    for c in chunks:  # each chunk starts a gzip member: decompressing that one member gives it
        data = zlib.decompressobj(31).decompress(blob[c.offset :])
        verify_chunk(c, data[: c.chunk_size or len(big) - c.chunk_offset])
    (link,) = [e for e in toc.entries if e.type == "hardlink"]  # "hard" and "small" are one
    target = next(e for e in toc.entries if e.name == link.link_name)
    assert target.type == "reg" and target.xattrs == {"user.k": b"\xff\x00bin"}
    assert int(layer.annotations["io.containers.estargz.uncompressed-size"]) == len(tar_bytes)
