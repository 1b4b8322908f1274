"""The index store never reads, writes or deletes through a link planted anywhere under the
store root, and never reads a record without a bound (issue 9 follow-up, item 1).

Real files and real links in a temp store; the hang on a FIFO is covered with a real
subprocess in `tests/integration/test_store_links.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from imagefs.errors import StoreError
from imagefs.layers import estargz
from imagefs.oci.digest import Digest
from imagefs.store import layerindexes
from imagefs.store.fsutil import LinkInStore
from imagefs.store.layerindexes import ESTARGZ, Bound, LayerIndexStore, derive


def _bound_toc() -> tuple[Bound, dict[str, int], bytes]:
    blob = estargz.write_estargz([estargz.FileSpec("a.txt", data=b"a" * 100)])
    toc = estargz.toc_json_from_member(
        blob.blob[blob.toc_offset : len(blob.blob) - estargz.footer_size(blob.blob)]
    )
    bound = Bound(Digest.of(blob.blob), ESTARGZ, Digest.parse(blob.toc_digest))
    return bound, {"toc_offset": blob.toc_offset}, toc


def _victim(tmp_path: Path, names: list[str]) -> Path:
    victim = tmp_path / "victim"
    victim.mkdir()
    for name in names:
        (victim / name).write_bytes(b"precious")
    return victim


def _intact(victim: Path, names: list[str]) -> None:
    assert sorted(p.name for p in victim.iterdir()) == sorted(names)
    assert all((victim / n).read_bytes() == b"precious" for n in names)


def test_a_linked_bound_directory_is_never_written_read_or_deleted_through(
    tmp_path: Path,
) -> None:
    bound, params, toc = _bound_toc()
    root = tmp_path / "root"
    store = LayerIndexStore(root)
    names = [bound.name, f"{bound.name}.idx"]
    victim = _victim(tmp_path, names)
    link = store.bound_dir(bound.layer)
    link.parent.mkdir(parents=True)
    link.symlink_to(victim)
    idx = derive(bound, params, toc)
    with pytest.raises(LinkInStore, match="symbolic link"):
        store.save_bound(bound, params, toc, idx)
    with pytest.raises(LinkInStore):
        store.load_bound(bound)
    with pytest.raises(LinkInStore):
        store.refuse(bound, "lies")  # used to delete victim/<kind>-<hex>(.idx)
    with pytest.raises(LinkInStore):
        store.remove(bound)
    with pytest.raises(LinkInStore):
        store.bound_entries(bound.layer)  # used to list the victim's files as entries
    _intact(victim, names)


@pytest.mark.parametrize("area", ["indexes", "indexes/layer", "indexes/refused"])
def test_a_linked_index_area_is_refused(tmp_path: Path, area: str) -> None:
    bound, _, _ = _bound_toc()
    root = tmp_path / "root"
    store = LayerIndexStore(root)
    hexd = bound.layer.hex
    names = [hexd, f"{hexd}-{bound.name}"]
    victim = _victim(tmp_path, names)
    (root / area).parent.mkdir(parents=True, exist_ok=True)
    (root / area).symlink_to(victim)
    if area == "indexes/layer":
        (victim / "sha256").mkdir()
        (victim / "sha256" / hexd).write_bytes(b"not an index")
        with pytest.raises(LinkInStore):
            store.load_layer(bound.layer)  # used to unlink victim/sha256/<hex> as damaged
        assert (victim / "sha256" / hexd).read_bytes() == b"not an index"
        (victim / "sha256" / hexd).unlink()
        (victim / "sha256").rmdir()
    else:
        with pytest.raises(LinkInStore):
            store.refuse(bound, "lies")  # used to write victim/.../<hex>-<kind>-<hex>
        with pytest.raises(LinkInStore):
            store.refused(bound)
    _intact(victim, names)


def test_records_are_read_with_a_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layerindexes, "MAX_RECORD", 1 << 20)
    bound, _, _ = _bound_toc()
    store = LayerIndexStore(tmp_path)
    store.layer_path(bound.layer).parent.mkdir(parents=True)
    with open(store.layer_path(bound.layer), "wb") as f:
        f.truncate(2 << 20)  # sparse: a grown or planted record
    with pytest.raises(StoreError, match="larger than"):
        store.load_layer(bound.layer)
    store.referrers_path(bound.layer).parent.mkdir(parents=True)
    with open(store.referrers_path(bound.layer), "wb") as f:
        f.truncate(layerindexes.MAX_REFERRERS + 1)
    with pytest.raises(StoreError, match="larger than"):
        store.referrers(bound.layer)
