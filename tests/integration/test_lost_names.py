"""A TOC that cannot carry one non-UTF-8 name costs that name's tar header, not the layer.

JSON TOCs carry only UTF-8: ctr-remote (eStargz) and skopeo (zstd:chunked) write U+FFFD for
the other bytes. One image (a big upper layer holding a file and a directory named
`caf\\xe9`, and a symlink to it) is converted by each tool; a mount from an empty store must
`cat` a small file for a small fraction of the layer (counted in the registry's access log),
list the odd names with their exact bytes and serve their content as `umoci unpack` does.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imagefs.testing.images import LayoutImage, build_umoci_image, push, skopeo_inspect
from imagefs.testing.mounts import imagefs, mounted
from imagefs.testing.registry import LocalRegistry

pytestmark = pytest.mark.fuse

ODD = b"caf\xe9"
# Sorted after data/ and etc/ (umoci writes in path order), as most of a real layer's bytes
# are somewhere else than next to the odd name; see lostnames for the eStargz worst case.
BIG = {f"opt/big{k}.bin": random.Random(k).randbytes(3 << 20) for k in range(8)}
# Small files after motd: a read fetches neighbouring pieces up to 256 KiB, and these keep
# that to small ones (a big neighbour piece is the read path's business, not this test's).
SMALL = {f"etc/zz{k:03d}": random.Random(1000 + k).randbytes(4096) for k in range(80)}
MENU = b"croissant\n"
MOTD = b"one odd name must not cost the layer\n"


def _base(rootfs: Path) -> None:
    (rootfs / "etc").mkdir()
    (rootfs / "etc" / "os-release").write_bytes(b"ID=imagefs\n")


def _upper(rootfs: Path) -> None:
    for name, data in BIG.items():
        (rootfs / name).parent.mkdir(parents=True, exist_ok=True)
        (rootfs / name).write_bytes(data)
    (rootfs / "etc" / "motd").write_bytes(MOTD)
    for name, data in SMALL.items():
        (rootfs / name).write_bytes(data)
    root = os.fsencode(rootfs)
    os.makedirs(os.path.join(root, b"data", ODD))
    with open(os.path.join(root, b"data", ODD, b"menu"), "wb") as f:
        f.write(MENU)
    os.symlink(ODD + b"/menu", os.path.join(root, b"data", b"to-menu"))


@dataclass(frozen=True)
class Published:
    ref: str
    layer_digests: list[str]
    upper_size: int


def _published(registry: LocalRegistry, ref: str) -> Published:
    repo_ref = ref.split("/", 1)[1]
    layers = skopeo_inspect(registry, repo_ref, raw=True)["layers"]
    return Published(ref, [x["digest"] for x in layers], int(layers[-1]["size"]))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> LayoutImage:
    work = tmp_path_factory.mktemp("odd")
    return build_umoci_image(work / "layout", [_base, _upper], tag="odd")


@pytest.fixture(scope="module")
def unpacked(source: LayoutImage, tmp_path_factory: pytest.TempPathFactory) -> Path:
    bundle = tmp_path_factory.mktemp("unpacked") / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--image", source.umoci_ref, str(bundle)],
        check=True,
        capture_output=True,
    )
    return bundle / "rootfs"


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private containerd for ctr-remote to convert with (its own root, state, socket)."""
    if shutil.which("containerd") is None or shutil.which("ctr-remote") is None:
        # tools/test installs both (tools/lib/setup.sh): a missing one is a broken set-up,
        # never a silent skip.
        pytest.fail("containerd / ctr-remote (Debian stargz-snapshotter) not installed")
    work = tmp_path_factory.mktemp("containerd")
    sock = work / "c.sock"
    (work / "config.toml").write_text(
        "version = 2\n"
        f'root = "{work / "root"}"\nstate = "{work / "state"}"\n'
        f'[grpc]\n  address = "{sock}"\n'
        '[plugins."io.containerd.grpc.v1.cri"]\n  disable = true\n'
    )
    with open(work / "log", "wb") as log:
        proc = subprocess.Popen(
            ["containerd", "--config", str(work / "config.toml")], stdout=log, stderr=log
        )
    try:
        for _ in range(200):
            if sock.exists():
                break
            try:
                proc.wait(0.05)
            except subprocess.TimeoutExpired:
                continue
            pytest.fail(f"containerd exited: {(work / 'log').read_text()[-500:]}")
        yield sock
    finally:
        proc.terminate()
        proc.wait(30)


def _ctr(sock: Path, *args: str) -> None:
    subprocess.run(
        ["ctr-remote", "--address", str(sock), "--namespace", "imagefs", *args],
        check=True,
        capture_output=True,
    )


@pytest.fixture(scope="module")
def estargz_image(registry: LocalRegistry, source: LayoutImage, containerd: Path) -> Published:
    plain = push(source, registry, "odd/plain:v1")
    target = f"{registry.host}/odd/estargz:v1"
    _ctr(containerd, "content", "fetch", "--plain-http", plain.ref)
    _ctr(containerd, "images", "convert", "--estargz", "--oci", plain.ref, target)
    _ctr(containerd, "images", "push", "--plain-http", target)
    pub = _published(registry, target)
    annotations = skopeo_inspect(registry, "odd/estargz:v1", raw=True)["layers"][-1]
    assert "containerd.io/snapshot/stargz/toc.digest" in annotations.get("annotations", {})
    return pub


@pytest.fixture(scope="module")
def zstd_chunked_image(registry: LocalRegistry, source: LayoutImage) -> Published:
    pushed = push(source, registry, "odd/zstd-chunked:v1", compression="zstd:chunked")
    return _published(registry, pushed.ref)


@pytest.fixture(params=["estargz", "zstd:chunked"])
def published(request: pytest.FixtureRequest) -> Published:
    name = {"estargz": "estargz_image", "zstd:chunked": "zstd_chunked_image"}[request.param]
    pub: Published = request.getfixturevalue(name)
    return pub


def test_one_odd_name_costs_its_header_not_the_layer(
    tmp_path: Path, published: Published, registry: LocalRegistry, unpacked: Path
) -> None:
    root = tmp_path / "root"
    registry.mark()
    with mounted(root, published.ref, tmp_path / "mnt") as mnt:
        m = os.fsencode(mnt)
        listed = sorted(os.listdir(os.path.join(m, b"data")))  # the layer's index, no reads
        indexing = _fetched(registry, published)
        assert (mnt / "etc" / "motd").read_bytes() == MOTD
        reading = _fetched(registry, published)
        assert ODD in listed
        assert listed == sorted(os.listdir(os.path.join(os.fsencode(unpacked), b"data")))
        with open(os.path.join(m, b"data", ODD, b"menu"), "rb") as f:
            assert f.read() == MENU
        assert os.readlink(os.path.join(m, b"data", b"to-menu")) == ODD + b"/menu"
        stats = imagefs(root, "stats", str(mnt)).stdout
    assert reading and all(status == 206 for status, _ in reading), reading
    size = published.upper_size
    # TOCs and the odd names' tar headers (the whole ~25 MB upper layer before)
    assert sum(n for _, n in indexing) < size // 100, (indexing, size, stats)
    # ... then motd's piece and its small neighbours
    assert sum(n for _, n in reading) < size // 50, (reading, size, stats)
    assert "built from the blob" not in stats, stats
    assert " lost names " in stats, stats  # the tar headers' ranges, counted for what they were
    # the kept TOC record (recovered names in its parameters) re-derives to its kept index
    assert "derived index" not in imagefs(root, "check").stdout
    # Once the whole blob is local, the TOC (recovered names included) is compared with the
    # tar stream the diff_id covers: it agrees, so it is not refused.
    imagefs(root, "pull", "--full", published.ref)
    with mounted(root, published.ref, tmp_path / "mnt2") as mnt:
        assert ODD in os.listdir(os.path.join(os.fsencode(mnt), b"data"))
    logs = "".join(p.read_text() for p in (root / "logs").glob("mount-*.log"))
    assert "disagrees with the tar stream" not in logs
    assert "TOC could not carry" in logs
    assert not list((root / "indexes").glob("refused/*"))


def _fetched(registry: LocalRegistry, pub: Published) -> list[tuple[int, int]]:
    """(status, bytes) of every GET of the image's layer blobs since the mark."""
    return [
        (r.status, r.bytes_written or 0)
        for r in registry.blob_gets()
        if r.path.rsplit("/", 1)[1] in pub.layer_digests
    ]
