"""imagefs check [--repair]: finds what is damaged in a real store, removes it, recovers."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagefs.testing.images import SampleImage
from imagefs.testing.mounts import imagefs, mounted
from tests.integration.lazy_content import BIG, Published, rot_piece

pytestmark = pytest.mark.fuse


def _flip_last_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))


def test_check_finds_and_repairs_damage(
    tmp_path: Path, sample_image: SampleImage, estargz_image: Published
) -> None:
    root = tmp_path / "root"
    imagefs(root, "pull", "--full", sample_image.ref)
    with mounted(root, sample_image.ref, tmp_path / "m1") as mnt:
        (mnt / "etc" / "hello.txt").read_bytes()  # indexes built
    with mounted(root, estargz_image.ref, tmp_path / "m2") as mnt:
        assert (mnt / "data" / "big1.bin").read_bytes() == BIG["data/big1.bin"]  # pieces
    assert imagefs(root, "check").stdout.strip().endswith("all good")

    blob = max((root / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    piece = next((root / "cache" / "pieces" / "sha256").iterdir())
    index = next((root / "indexes" / "layer" / "sha256").iterdir())
    for damaged in (blob, index):
        _flip_last_byte(damaged)
    rot_piece(piece)
    (root / "blobs" / "sha256" / ".tmp-left-by-a-crash").write_bytes(b"x")
    # what earlier versions kept, keyed by layer alone / by offsets: bound to nothing
    old_index = root / "indexes" / "sha256" / index.name
    old_index.parent.mkdir(parents=True)
    old_index.write_bytes(index.read_bytes())
    old_piece = root / "cache" / "chunks" / index.name / "0-10"
    old_piece.parent.mkdir(parents=True)
    old_piece.write_bytes(b"0123456789")

    found = imagefs(root, "check", check=False)
    assert found.returncode == 1
    for name in (blob.name, str(piece), str(index), ".tmp-left-by-a-crash", "indexes/sha256"):
        assert name in found.stdout
    assert "cache/chunks" in found.stdout
    assert blob.exists()  # report only

    repaired = imagefs(root, "check", "--repair")
    assert "6 removed" in repaired.stdout
    assert not blob.exists() and not piece.exists() and not index.exists()
    assert not old_index.exists() and not old_piece.exists()
    assert imagefs(root, "check").stdout.strip().endswith("all good")
    # everything comes back on demand
    imagefs(root, "pull", "--full", sample_image.ref)
    with mounted(root, estargz_image.ref, tmp_path / "m3") as mnt:
        assert (mnt / "data" / "big1.bin").read_bytes() == BIG["data/big1.bin"]
    with mounted(root, sample_image.ref, tmp_path / "m4") as mnt:
        assert (mnt / "etc" / "hello.txt").read_bytes() == sample_image.files["etc/hello.txt"]
