"""Decompression bombs while indexing: bounded output per step, refused beyond a ratio."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import zstandard

from imagefs.errors import LayerFormatError
from imagefs.layers import layerindex as layer_index
from imagefs.layers.seekindex import build_index
from imagefs.oci.digest import Digest
from imagefs.testing.hostile import END, gzip_bomb, header

ZEROS = 512 << 20


def zstd_bomb(zeros: int) -> bytes:
    comp = zstandard.ZstdCompressor(level=3).compressobj()
    parts = [comp.compress(header(b"z.bin", size=zeros))]
    block = bytes(64 << 20)
    for _ in range(zeros // len(block)):
        parts.append(comp.compress(block))
    parts += [comp.compress(END), comp.flush()]
    return b"".join(parts)


def test_zstd_bomb_is_inflated_in_bounded_pieces() -> None:
    blob = zstd_bomb(ZEROS)
    assert len(blob) < 64 << 10  # 512 MiB of zeros in a few KiB
    biggest = 0
    total = 0

    def sink(data: bytes) -> None:
        nonlocal biggest, total
        biggest = max(biggest, len(data))
        total += len(data)

    build_index(io.BytesIO(blob), "zstd", on_uncompressed=sink)
    assert total == 512 + ZEROS + len(END)
    # before: the whole 1 MiB read chunk was handed to the decompressor at once, which
    # produced all 512 MiB in one piece (and a 64 KiB bomb could ask for 32 GiB)
    assert biggest <= 64 << 20, biggest


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_layer_inflating_past_the_ratio_cap_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    monkeypatch.setattr(layer_index, "INFLATE_FLOOR", 64 << 20)
    blob = gzip_bomb(256 << 20)[0] if kind == "gzip" else zstd_bomb(256 << 20)
    path = tmp_path / "blob"
    path.write_bytes(blob)
    digest = Digest.parse("sha256:" + "0" * 64)
    with pytest.raises(LayerFormatError, match="decompression bomb"):
        layer_index.build_from_blob(path, digest, kind)  # type: ignore[arg-type]


def test_honest_layer_under_the_cap_is_indexed(tmp_path: Path) -> None:
    blob, _ = gzip_bomb(16 << 20)  # 16 MiB of zeros: under the 1 GiB floor
    path = tmp_path / "blob"
    path.write_bytes(blob)
    idx = layer_index.build_from_blob(path, Digest.parse("sha256:" + "0" * 64), "gzip")
    assert len(idx.toc) >= 1
