"""Prefetch profiles (record, mount --prefetch, push/pull) and eStargz prefetch landmarks."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagefs.layers import estargz
from imagefs.profiles import Profile
from imagefs.testing.mounts import imagefs, mounted
from imagefs.testing.proxy import FaultProxy
from imagefs.testing.registry import LocalRegistry
from tests.integration.lazy_content import BIG, SMALL, Published, push_estargz

pytestmark = pytest.mark.fuse


def _wait_fetched(root: Path, mnt: Path, at_least: int, timeout: float = 30) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    stats: dict[str, object] = {}
    while time.monotonic() < deadline:
        stats = json.loads(imagefs(root, "stats", "--json", str(mnt)).stdout)
        if int(str(stats["bytes_fetched"])) >= at_least:
            return stats
        time.sleep(0.1)
    raise AssertionError(f"prefetch did not happen: {stats}")


def test_record_then_prefetch_makes_the_workload_run_offline(
    tmp_path: Path, estargz_image: Published, registry: LocalRegistry
) -> None:
    profile_path = tmp_path / "workload.profile"
    workload = "cat $IMAGEFS_MOUNT/etc/motd $IMAGEFS_MOUNT/data/big2.bin > /dev/null"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "imagefs",
            "--root",
            str(tmp_path / "rec"),
            "profile",
            "record",
            estargz_image.ref,
            "-o",
            str(profile_path),
            "--",
            "sh",
            "-c",
            workload,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    profile = Profile.from_json(profile_path.read_bytes())
    assert [f.path for f in profile.files] == ["etc/motd", "data/big2.bin"]
    assert profile.total_bytes == len(SMALL["etc/motd"]) + len(BIG["data/big2.bin"])
    # a fresh store, through a proxy we can pull the plug on
    with FaultProxy(registry.url) as proxy:
        ref = estargz_image.ref.replace(estargz_image.ref.split("/")[0], proxy.host, 1)
        root = tmp_path / "root"
        imagefs(root, "pull", ref)
        # the profile names the manifest digest, which is the same through the proxy
        with mounted(
            root, ref, tmp_path / "mnt", mount_args=["--prefetch", str(profile_path)]
        ) as mnt:
            stats = _wait_fetched(root, mnt, len(BIG["data/big2.bin"]))
            assert stats["reads"] == 0  # fetched before anything read it
            time.sleep(0.5)
            proxy.stop()
            assert (mnt / "etc" / "motd").read_bytes() == SMALL["etc/motd"]
            assert (mnt / "data" / "big2.bin").read_bytes() == BIG["data/big2.bin"]


def test_profile_push_and_pull(
    tmp_path: Path, estargz_image: Published, registry: LocalRegistry
) -> None:
    root = tmp_path / "root"
    imagefs(root, "pull", estargz_image.ref)
    info = json.loads(imagefs(root, "inspect", estargz_image.ref).stdout)[0]["ImageFS"]
    profile = Profile(info["ManifestDigest"], tuple(x["Digest"] for x in info["Layers"]), ())
    path = tmp_path / "p.json"
    path.write_bytes(profile.to_json())
    imagefs(root, "profile", "push", estargz_image.ref, str(path))
    imagefs(tmp_path / "other", "pull", estargz_image.ref)
    imagefs(tmp_path / "other", "profile", "pull", estargz_image.ref, "-o", str(tmp_path / "q"))
    assert Profile.from_json((tmp_path / "q").read_bytes()) == profile
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    out = imagefs(root, "profile", "push", estargz_image.ref, str(bad), check=False)
    assert out.returncode == 2 and "not an imagefs prefetch profile" in out.stderr
    gone = tmp_path / "gone.json"  # was: "internal error: FileNotFoundError", exit 1
    out = imagefs(root, "profile", "push", estargz_image.ref, str(gone), check=False)
    assert (
        out.returncode == 2
        and out.stderr == f"imagefs: cannot read profile {gone}: No such file or directory\n"
    )


def test_estargz_prefetch_landmark_is_honoured(tmp_path: Path, registry: LocalRegistry) -> None:
    first = estargz.FileSpec(name="hot.bin", data=BIG["data/big0.bin"])
    rest = [estargz.FileSpec(name=f"cold{k}.bin", data=BIG[f"data/big{k}.bin"]) for k in (1, 2, 3)]
    pushed, _ = push_estargz(registry, tmp_path, "lazy/landmark:v1", [first, *rest], prefetch=1)
    root = tmp_path / "root"
    with mounted(root, pushed.ref, tmp_path / "mnt") as mnt:
        stats = _wait_fetched(root, mnt, len(BIG["data/big0.bin"]))
        time.sleep(0.5)
        stats = json.loads(imagefs(root, "stats", "--json", str(mnt)).stdout)
        # the hot file (and the TOC), not the cold ones
        assert int(str(stats["bytes_fetched"])) < 2 * len(BIG["data/big0.bin"])
        assert sorted(p.name for p in mnt.iterdir()) == [
            "cold1.bin",
            "cold2.bin",
            "cold3.bin",
            "hot.bin",
        ]
    with mounted(root, pushed.ref, tmp_path / "mnt2", mount_args=["--no-prefetch-landmark"]) as mnt:
        time.sleep(1.0)
        stats = json.loads(imagefs(root, "stats", "--json", str(mnt)).stdout)
        assert stats["bytes_fetched"] == 0
