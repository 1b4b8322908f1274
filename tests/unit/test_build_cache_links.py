"""The build cache never follows a link planted in it (issue 9 follow-up, item 4): an entry's
`upper` becomes an overlay lower directory of RUN steps (a link would hand RUN a host
directory), and sweeping removes directories (a link would make it delete outside the
store). Real directories and links; the real BuildCache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from imagefs.build.cache import BuildCache
from imagefs.errors import StoreError
from imagefs.store.fsutil import LinkInStore

DEAD = "partial-999999999-deadbeef"  # no such pid: what a killed build leaves


def _entry(path: Path) -> None:
    (path / "upper").mkdir(parents=True)
    (path / "upper" / "host-secret").write_text("precious\n")
    (path / "step.json").write_text(json.dumps({"layer": None}))


def test_sweep_never_deletes_through_a_linked_cache(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    victim = tmp_path / "victim"
    _entry(victim / DEAD)
    (root / "build-cache").symlink_to(victim)
    with pytest.raises(LinkInStore):
        BuildCache(root).sweep()  # used to rmtree victim/partial-…
    assert (victim / DEAD / "upper" / "host-secret").read_text() == "precious\n"


@pytest.mark.parametrize("planted", ["entry", "upper"])
def test_a_linked_entry_is_never_a_cache_hit(tmp_path: Path, planted: str) -> None:
    root = tmp_path / "root"
    cache = BuildCache(root)
    key = "a" * 64
    victim = tmp_path / "victim"
    _entry(victim)
    if planted == "entry":
        cache.dir.mkdir(parents=True)
        (cache.dir / key).symlink_to(victim)
    else:
        (cache.dir / key).mkdir(parents=True)
        (cache.dir / key / "step.json").write_text(json.dumps({"layer": None}))
        (cache.dir / key / "upper").symlink_to(victim / "upper")
    assert cache.get(key, lambda _: True) is None  # used to return victim/upper
    tmp = cache.new_dir()
    (tmp / "upper").mkdir()
    with pytest.raises(StoreError, match="not a build cache entry"):
        cache.commit(tmp, key, None, keep=True)  # the rename fails on the planted name
    assert not tmp.exists()
    assert (victim / "upper" / "host-secret").read_text() == "precious\n"


def test_an_honest_entry_still_hits(tmp_path: Path) -> None:
    cache = BuildCache(tmp_path)
    tmp = cache.new_dir()
    (tmp / "upper").mkdir()
    entry = cache.commit(tmp, "b" * 64, None, keep=True)
    got = cache.get("b" * 64, lambda _: True)
    assert got is not None and got.upper == entry.upper and os.path.isdir(got.upper)
    cache.sweep()
    assert cache.get("b" * 64, lambda _: True) is not None
