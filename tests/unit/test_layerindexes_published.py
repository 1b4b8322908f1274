"""A published index is kept as the verified bytes it came as: its derived form is those
bytes, not a second serialisation of their parse (which cost ~90 ms per 40k-entry layer on
a mount's first read, issue 10)."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest

from imagefs.layers.layerindex import LayerIndex, build_from_blob
from imagefs.oci.digest import Digest
from imagefs.store.layerindexes import PUBLISHED, Bound, LayerIndexStore, derive


def _published(tmp_path: Path) -> tuple[Bound, dict[str, int], bytes]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for k in range(50):
            data = bytes([k]) * (1000 + k)
            info = tarfile.TarInfo(f"d/f{k}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    blob = gzip.compress(buf.getvalue())
    path = tmp_path / "layer.tar.gz"
    path.write_bytes(blob)
    layer = Digest.of(blob)
    raw = build_from_blob(path, layer, "gzip").to_bytes()
    return Bound(layer, PUBLISHED, Digest.of(raw)), {"layer_size": len(blob)}, raw


def test_a_published_index_is_kept_as_its_raw_bytes_and_never_reserialised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bound, params, raw = _published(tmp_path)
    idx = derive(bound, params, raw)
    store = LayerIndexStore(tmp_path / "root")

    def refuse(self: LayerIndex) -> bytes:
        raise AssertionError("a published index was serialised again")

    monkeypatch.setattr(LayerIndex, "to_bytes", refuse)
    store.save_bound(bound, params, raw, idx)
    assert store.derived_path(bound).read_bytes() == raw
    again = store.load_bound(bound)
    assert again is not None and len(again.toc) == len(idx.toc)
    # the derived form lost (a crash, a clean-up): rebuilt from the raw bytes, as they are
    store.derived_path(bound).unlink()
    rebuilt = store.load_bound(bound)
    assert rebuilt is not None and len(rebuilt.toc) == len(idx.toc)
    assert store.derived_path(bound).read_bytes() == raw
