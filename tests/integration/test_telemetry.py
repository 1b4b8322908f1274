"""Traces and live stats of a running mount, on the lazily read eStargz sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imagefs.testing.mounts import imagefs, mounted
from imagefs.testing.registry import LocalRegistry
from tests.integration.lazy_content import BIG, SMALL, Published

pytestmark = pytest.mark.fuse


def test_trace_records_each_operation_and_where_bytes_came_from(
    tmp_path: Path, estargz_image: Published, registry: LocalRegistry
) -> None:
    trace = tmp_path / "trace.jsonl"
    root = tmp_path / "root"
    with mounted(
        root, estargz_image.ref, tmp_path / "mnt", mount_args=["--trace", str(trace)]
    ) as mnt:
        assert (mnt / "etc" / "motd").read_bytes() == SMALL["etc/motd"]
        assert (mnt / "etc" / "motd").read_bytes() == SMALL["etc/motd"]  # kernel page cache
        assert (mnt / "data" / "big0.bin").read_bytes() == BIG["data/big0.bin"]
        sorted((mnt / "usr" / "share").iterdir())
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    assert all(isinstance(e["t"], int) for e in events)
    assert [e["t"] for e in events] == sorted(e["t"] for e in events)
    ops = {e["op"] for e in events}
    assert {"lookup", "open", "read", "readdir"} <= ops
    reads = [e for e in events if e["op"] == "read"]
    motd = [e for e in reads if e["path"] == "etc/motd"]
    # etc/motd is stored last, in the blob's last 64 KiB: those bytes came with the TOC's
    # tail fetch at mount and are not fetched again (`LayerSet.hold`)
    assert motd and motd[0]["from"] == "memory" and motd[0]["fetched"] == 0
    assert motd[0]["latency"] >= 0 and motd[0]["length"] == len(SMALL["etc/motd"])
    big = [e for e in reads if e["path"] == "data/big0.bin"]
    assert sum(e["length"] for e in big) == len(BIG["data/big0.bin"])
    assert {e["from"] for e in big} <= {"registry", "cache", "memory"}
    assert big[0]["from"] == "registry" and big[0]["fetched"] > 0 and big[0]["latency"] > 0
    assert all(e["layer"] == 0 for e in reads)


def test_stats_from_the_control_socket(
    tmp_path: Path, estargz_image: Published, registry: LocalRegistry
) -> None:
    root = tmp_path / "root"
    mnt = tmp_path / "mnt"
    with mounted(root, estargz_image.ref, mnt):
        (mnt / "data" / "big1.bin").read_bytes()
        (mnt / "etc" / "hostname").read_bytes()
        stats = json.loads(imagefs(root, "stats", "--json", str(mnt)).stdout)
        text = imagefs(root, "stats", str(mnt)).stdout
    assert stats["bytes_served"] == len(BIG["data/big1.bin"]) + len(SMALL["etc/hostname"])
    assert stats["files_touched"] == 2
    assert stats["bytes_fetched"] > len(BIG["data/big1.bin"]) // 2
    layer = stats["layers"][0]
    # the layer's bytes are all but the image's manifest and config (pulled by the mount)
    by_cause = stats["fetched_by_cause"]
    assert layer["fetched"] == stats["bytes_fetched"] - by_cause["manifest"] - by_cause["config"]
    assert 0 < layer["fetched_pct"] <= 100
    assert stats["registry_requests"] >= stats["fetches"] >= 2
    assert stats["fetch_latency"]["p50"] is not None
    assert stats["layer_sources"] == ["eStargz TOC"]
    assert "fetched" in text and "LAYER" in text
    assert "causes   manifest" in text and " toc " in text  # what the bytes were for
    # the control socket is not in the tree
    assert not any(p.suffix == ".sock" for p in mnt.rglob("*"))


def test_stats_of_a_non_mount_is_one_clear_error(tmp_path: Path) -> None:
    out = imagefs(tmp_path / "root", "stats", str(tmp_path), check=False)
    assert out.returncode == 1 and "is not an imagefs mount" in out.stderr


def test_trace_report_of_a_real_trace(
    tmp_path: Path, estargz_image: Published, registry: LocalRegistry
) -> None:
    trace = tmp_path / "trace.jsonl"
    root = tmp_path / "root"
    with mounted(
        root, estargz_image.ref, tmp_path / "mnt", mount_args=["--trace", str(trace)]
    ) as mnt:
        (mnt / "data" / "big3.bin").read_bytes()
    image_json = tmp_path / "image.json"
    image_json.write_text(imagefs(root, "inspect", estargz_image.ref).stdout)
    out = imagefs(
        root,
        "trace",
        "report",
        str(trace),
        "-o",
        str(tmp_path / "r.html"),
        "--image-json",
        str(image_json),
    )
    assert "Wrote" in out.stdout
    html = (tmp_path / "r.html").read_text()
    assert "data/big3.bin" in html and "<svg" in html
    assert f"{len(BIG['data/big3.bin']):,}" in html  # bytes read, exactly
