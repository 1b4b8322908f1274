"""A TOC verified by its annotation can still lie about what the tar stream carries besides
the bytes; once the blob is local, `tocverify` compares what a mount would show (issue 9
follow-up, item 8): a setuid file owned by uid 1000 in the tar must not be served as
root's. Real eStargz blobs, the TOC rewritten as an attacker would."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from imagefs.layers import chunks, estargz, tocverify
from imagefs.layers.layerindex import LayerIndex, build_from_blob
from imagefs.oci.digest import Digest
from imagefs.testing.hostile import estargz_retoc

CAP = base64.b64encode(b"\x01\x00\x00\x02\x00\x04\x00\x00").decode()  # a file capability


@pytest.mark.parametrize(
    "lie",
    [
        {"uid": 0},
        {"gid": 0},
        {"xattrs": {"security.capability": CAP}},
        {"uid": 0, "gid": 0, "xattrs": {}},
    ],
    ids=["uid", "gid", "xattr-added", "root-and-xattr-dropped"],
)
def test_a_toc_lying_about_owner_or_xattrs_disagrees(
    tmp_path: Path, lie: dict[str, object]
) -> None:
    honest = estargz.write_estargz(
        [
            estargz.FileSpec("bin/", type="dir", mode=0o755),
            estargz.FileSpec(
                "bin/tool",
                data=b"\x7fELF" + b"x" * 5000,
                mode=0o4755,
                uid=1000,
                gid=1000,
                xattrs={"user.note": b"kept"},
            ),
        ]
    )
    forged, toc_json = estargz_retoc(honest, {"bin/tool": lie})
    path = tmp_path / "blob"
    path.write_bytes(forged.blob)
    digest = Digest.of(forged.blob)
    built = build_from_blob(path, digest, "gzip", estargz=True)
    t, table, _ = chunks.from_estargz(estargz.parse_toc(toc_json), honest.toc_offset)
    toc_idx = LayerIndex(digest, t, chunks=table)
    problem = tocverify.disagreement(built, toc_idx, path)
    assert problem is not None and problem.startswith("bin/tool: tar stream has"), problem
    # the honest TOC of the same stream agrees
    _, honest_json = estargz_retoc(honest, {})
    t, table, _ = chunks.from_estargz(estargz.parse_toc(honest_json), honest.toc_offset)
    assert tocverify.disagreement(built, LayerIndex(digest, t, chunks=table), path) is None
