"""Lazy reads through a real pull-through mirror (issue 11 item 10).

Debian's docker-registry in proxy mode answers the first Range GET of a blob it has not
cached with `200` and the whole blob. That body is the layer: imagefs streams it into the
store (verified), counts it, serves the range from it and never fetches the blob again.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from imagefs.testing.mounts import imagefs, mounted
from imagefs.testing.registry import LocalRegistry
from tests.integration.lazy_content import BIG, SMALL, Published

pytestmark = pytest.mark.fuse


def via_mirror(registry: LocalRegistry, mirror_url: str) -> list[str]:
    return ["--registry-mirror", f"{registry.host}={mirror_url}"]


def test_lazy_reads_through_a_pull_through_mirror_take_each_blob_once(
    tmp_path: Path,
    estargz_image: Published,
    registry: LocalRegistry,
    pull_through_mirror: LocalRegistry,
) -> None:
    root = tmp_path / "root"
    extra = via_mirror(registry, pull_through_mirror.url)
    with mounted(root, estargz_image.ref, tmp_path / "mnt", extra=extra) as mnt:
        assert (mnt / "etc" / "motd").read_bytes() == SMALL["etc/motd"]
        assert (mnt / "data" / "big2.bin").read_bytes() == BIG["data/big2.bin"]
        stats = json.loads(imagefs(root, "stats", "--json", str(mnt)).stdout)
    layer = estargz_image.layer_digests[-1]
    gets = [r for r in pull_through_mirror.blob_gets() if r.path.endswith(layer)]
    whole = Counter(r.path for r in gets if r.status == 200)
    assert whole and max(whole.values()) == 1, [(r.status, r.bytes_written) for r in gets]
    # the whole blob was kept, verified, in the store: nothing asks for it again
    assert (root / "blobs" / "sha256" / layer.split(":")[1]).stat().st_size == (
        estargz_image.layer_size
    )
    # stats count what came over the wire, as the mirror's log does
    sent = sum(r.bytes_written or 0 for r in gets)
    assert sent >= estargz_image.layer_size
    assert abs(stats["bytes_fetched"] - sent) <= sent * 0.02, (stats["bytes_fetched"], sent)
    # and say why: the 200 to a Range request was the whole layer, once
    assert stats["fetched_by_cause"]["whole layer"] == estargz_image.layer_size


def test_mirror_down_falls_back_to_the_registry(
    tmp_path: Path,
    estargz_image: Published,
    registry: LocalRegistry,
    pull_through_mirror: LocalRegistry,
) -> None:
    pull_through_mirror.stop()
    registry.mark()
    extra = via_mirror(registry, pull_through_mirror.url)
    with mounted(tmp_path / "root", estargz_image.ref, tmp_path / "mnt", extra=extra) as mnt:
        assert (mnt / "etc" / "motd").read_bytes() == SMALL["etc/motd"]
    layer = estargz_image.layer_digests[-1]
    ranges = [r.status for r in registry.blob_gets() if r.path.endswith(layer)]
    assert ranges and set(ranges) == {206}  # lazily, from the registry itself
