"""zstd:chunked footer, annotations and TOC, checked against a real skopeo-made layer."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import tarfile

import pytest
import zstandard

from imagefs.errors import IntegrityError, LayerFormatError
from imagefs.layers import seekindex as si
from imagefs.layers import zstdchunked as zc

needs_tools = pytest.mark.skipif(
    shutil.which("skopeo") is None or shutil.which("umoci") is None,
    reason="skopeo and umoci are needed to make a real zstd:chunked layer",
)


@pytest.fixture(scope="module")
def skopeo_layer(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict[str, str]]:
    """Build an image with umoci, convert it with skopeo; return (blob, annotations)."""
    if shutil.which("skopeo") is None or shutil.which("umoci") is None:
        pytest.skip("skopeo and umoci are needed to make a real zstd:chunked layer")
    d = tmp_path_factory.mktemp("zc")

    def run(*args: str) -> None:
        subprocess.run(args, check=True, cwd=d, capture_output=True)

    run("umoci", "init", "--layout", "src")
    run("umoci", "new", "--image", "src:t")
    run("umoci", "unpack", "--rootless", "--image", "src:t", "bundle")
    root = d / "bundle" / "rootfs"
    (root / "etc").mkdir()
    (root / "data").mkdir()
    (root / "etc" / "hello.txt").write_bytes(b"hello\n")
    (root / "etc" / "link").symlink_to("hello.txt")
    (root / "data" / "random.bin").write_bytes(os.urandom(1_500_000))
    (root / "data" / "zeros-and-text").write_bytes(b"\0" * 200_000 + b"text " * 40_000)
    (root / "data" / "empty").write_bytes(b"")
    run("umoci", "repack", "--image", "src:t", "bundle")
    run("skopeo", "copy", "--dest-compress-format", "zstd:chunked", "oci:src:t", "oci:dst:t")
    index = json.loads((d / "dst" / "index.json").read_text())
    mdigest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((d / "dst" / "blobs" / "sha256" / mdigest).read_bytes())
    layer = manifest["layers"][0]
    blob = (d / "dst" / "blobs" / "sha256" / layer["digest"].split(":")[1]).read_bytes()
    return blob, layer.get("annotations", {})


def _tar_files(stream: bytes) -> dict[str, bytes]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(stream)) as tf:
        for m in tf:
            f = tf.extractfile(m) if m.isfile() else None
            if f is not None:
                out[m.name.removeprefix("./")] = f.read()
    return out


@needs_tools
def test_real_skopeo_layer(skopeo_layer: tuple[bytes, dict[str, str]]) -> None:
    blob, annotations = skopeo_layer
    found = zc.position_from_annotations(annotations)
    assert found is not None, annotations
    position, checksum = found
    footer = zc.parse_footer(blob[-zc.FOOTER_SIZE :])
    assert footer.manifest == position
    toc = zc.decode_manifest(
        blob[position.offset : position.offset + position.length],
        position,
        expected_checksum=checksum,
    )
    assert toc.version == 1
    names = {e.name.removeprefix("./") for e in toc.entries}
    assert {"etc/hello.txt", "etc/link", "data/random.bin", "data/empty"} <= names

    # The blob is a valid (multi-frame, with skippable frames) zstd stream.
    streamed: list[bytes] = []
    index = si.build_index(
        io.BytesIO(blob), "zstd", spacing=64 * 1024, on_uncompressed=streamed.append
    )
    files = _tar_files(b"".join(streamed))
    assert len(index.points) > 3

    rebuilt: dict[str, bytearray] = {}
    for ref in zc.chunks(toc):
        piece = zc.read_chunk(ref, blob[ref.start : ref.end])
        if ref.zeros:
            assert piece == b"\0" * ref.size
        buf = rebuilt.setdefault(ref.name.removeprefix("./"), bytearray())
        assert len(buf) == ref.file_offset
        buf += piece
    for name, pieces in rebuilt.items():
        assert files[name] == bytes(pieces)
    assert set(rebuilt) == {n for n, d in files.items() if d}

    whole = {e.name.removeprefix("./"): e for e in toc.entries if e.type == "reg"}
    for name, data in files.items():
        if data:
            assert whole[name].digest == "sha256:" + hashlib.sha256(data).hexdigest()


@needs_tools
def test_tampered_manifest_is_rejected(skopeo_layer: tuple[bytes, dict[str, str]]) -> None:
    blob, annotations = skopeo_layer
    found = zc.position_from_annotations(annotations)
    assert found is not None
    position, checksum = found
    toc_bytes = bytearray(blob[position.offset : position.offset + position.length])
    toc_bytes[10] ^= 1
    with pytest.raises(IntegrityError):
        zc.decode_manifest(bytes(toc_bytes), position, expected_checksum=checksum)
    ref = zc.chunks(
        zc.decode_manifest(
            blob[position.offset : position.offset + position.length],
            position,
            expected_checksum=checksum,
        )
    )[0]
    with pytest.raises((IntegrityError, LayerFormatError)):
        bad = bytearray(blob[ref.start : ref.end])
        bad[-5] ^= 0xFF
        zc.read_chunk(ref, bytes(bad))


def _frame(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def _skippable(payload: bytes) -> bytes:
    return zc.SKIPPABLE_FRAME_MAGIC + struct.pack("<I", len(payload)) + payload


def _synthetic(new_footer: bool) -> tuple[bytes, zc.ManifestPosition, str]:
    body = _frame(b"file-a contents")
    toc = {
        "version": 1,
        "entries": [
            {
                "type": "reg",
                "name": "a",
                "size": 15,
                "offset": 0,
                "endOffset": len(body),
                "digest": "sha256:" + hashlib.sha256(b"file-a contents").hexdigest(),
            }
        ],
    }
    raw = json.dumps(toc).encode()
    manifest = _frame(raw)
    offset = len(body) + 8
    pos = zc.ManifestPosition(offset, len(manifest), len(raw), 1)
    if new_footer:
        footer = struct.pack("<7Q", offset, len(manifest), len(raw), 1, 0, 0, 0) + zc.FOOTER_MAGIC
    else:
        footer = struct.pack("<4Q", offset, len(manifest), len(raw), 1) + zc.LEGACY_FOOTER_MAGIC
    blob = body + _skippable(manifest) + _skippable(footer)
    return blob, pos, "sha256:" + hashlib.sha256(manifest).hexdigest()


@pytest.mark.parametrize("new_footer", [True, False])
def test_synthetic_footers(new_footer: bool) -> None:
    blob, pos, checksum = _synthetic(new_footer)
    footer = zc.parse_footer(blob[-64:])
    assert footer.manifest == pos
    assert footer.size == (64 if new_footer else 40)
    toc = zc.decode_manifest(
        blob[pos.offset : pos.offset + pos.length], pos, expected_checksum=checksum
    )
    (ref,) = zc.chunks(toc)
    assert zc.read_chunk(ref, blob[ref.start : ref.end]) == b"file-a contents"


def test_annotations_both_generations() -> None:
    new = {zc.POSITION_KEY: "10:20:30:1", zc.CHECKSUM_KEY: "sha256:" + "1" * 64}
    old = {zc.LEGACY_POSITION_KEY: "1:2:3:1", zc.LEGACY_CHECKSUM_KEY: "sha256:" + "2" * 64}
    assert zc.position_from_annotations(new) == (
        zc.ManifestPosition(10, 20, 30, 1),
        new[zc.CHECKSUM_KEY],
    )
    assert zc.position_from_annotations(old) == (
        zc.ManifestPosition(1, 2, 3, 1),
        old[zc.LEGACY_CHECKSUM_KEY],
    )
    assert zc.position_from_annotations({}) is None
    for bad in ("1:2:3", "a:b:c:d", "1:2:3:2", ""):
        with pytest.raises(LayerFormatError):
            zc.parse_position(bad)
    with pytest.raises(LayerFormatError):
        zc.position_from_annotations({zc.POSITION_KEY: "1:2:3:1"})


def test_bad_footer_and_manifest() -> None:
    with pytest.raises(LayerFormatError):
        zc.parse_footer(b"\0" * 64)
    blob, pos, _ = _synthetic(True)
    with pytest.raises(LayerFormatError):
        zc.decode_manifest(blob[pos.offset : pos.offset + pos.length - 1], pos)
    wrong = zc.ManifestPosition(pos.offset, pos.length, pos.uncompressed_length + 1)
    with pytest.raises(LayerFormatError):
        zc.decode_manifest(blob[pos.offset : pos.offset + pos.length], wrong)


def test_toc_bomb_is_refused_in_bounded_memory() -> None:
    """A TOC frame of 64 MiB of zeros (a few KiB compressed) whose position declares 1 KiB,
    its checksum matching: refused, and never more than ~the declared size inflated (the
    old decoder inflated all 64 MiB, then compared lengths)."""
    import tracemalloc

    # No content size in the frame header: the decoder cannot size its output up front.
    cctx = zstandard.ZstdCompressor(write_content_size=False)
    bomb = cctx.compress(bytes(64 << 20))
    pos = zc.ManifestPosition(0, len(bomb), 1024)
    checksum = "sha256:" + hashlib.sha256(bomb).hexdigest()
    tracemalloc.start()
    try:
        with pytest.raises(LayerFormatError, match="more than the 1024 bytes"):
            zc.decode_manifest(bomb, pos, expected_checksum=checksum)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak
    # the same bound for one chunk of a file
    ref = zc.ChunkRef("f", 0, len(bomb), 0, 1024, "sha256:" + "0" * 64)
    tracemalloc.start()
    try:
        with pytest.raises(LayerFormatError):
            zc.read_chunk(ref, bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak
