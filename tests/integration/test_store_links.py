"""Symbolic links planted inside the store never make imagefs read, write or delete outside
it (issue 9.6): a victim directory and file outside the store stay intact while `pull`,
`prune`, `rmi`, `check --repair`, `mounts`, `mount` and `umount` run over a store whose
directories, blobs, partial downloads, leases, mount records, logs, lock and index.json are
links to them. Each command either ignores the link or fails with one line naming it;
`check --repair` removes the link itself and says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from imagefs.fs.lifecycle import log_path_for
from imagefs.lazy.layers import ZSTD_FLAT_THRESHOLD
from imagefs.testing.images import (
    LayoutImage,
    SampleImage,
    init_layout,
    layout_add_tar_layer,
    push,
)
from imagefs.testing.mounts import force_unmount, imagefs, mounted
from imagefs.testing.registry import LocalRegistry
from tests.integration.lazy_content import Published

pytestmark = pytest.mark.fuse

PRECIOUS = {"precious.txt": b"do not touch\n", "x.json": b'{"mountpoint": 1}', "a" * 64: b"z"}


class Victim:
    """A directory and a file outside the store that nothing may change."""

    def __init__(self, base: Path) -> None:
        self.dir = base / "victim"
        self.dir.mkdir()
        for name, data in PRECIOUS.items():
            (self.dir / name).write_bytes(data)
        self.file = base / "victim-file"
        self.file.write_bytes(b"the victim's own bytes\n" * 10)
        self.fifo = base / "victim-fifo"
        os.mkfifo(self.fifo)

    def assert_intact(self) -> None:
        assert sorted(p.name for p in self.dir.iterdir()) == sorted(PRECIOUS)
        for name, data in PRECIOUS.items():
            assert (self.dir / name).read_bytes() == data
        assert self.file.read_bytes() == b"the victim's own bytes\n" * 10


@pytest.fixture
def victim(tmp_path: Path) -> Victim:
    return Victim(tmp_path)


@pytest.fixture
def root(tmp_path: Path, sample_image: SampleImage) -> Path:
    root = tmp_path / "root"
    imagefs(root, "pull", sample_image.ref)
    return root


def one_line_error(proc: object, *needles: str) -> None:
    out = getattr(proc, "stderr", "")
    assert getattr(proc, "returncode", 0) == 1, out
    assert "Traceback" not in out and "internal error" not in out, out
    assert len(out.strip().splitlines()) == 1, out
    for needle in needles:
        assert needle in out, out


def repair_removes_the_link(root: Path, link: Path) -> None:
    found = imagefs(root, "check", check=False)
    assert found.returncode == 1 and f"symbolic link {link}" in found.stdout, found.stdout
    repaired = imagefs(root, "check", "--repair")
    assert f"symbolic link {link}" in repaired.stdout and "removed" in repaired.stdout
    assert not os.path.lexists(link)


@pytest.mark.parametrize(
    "area",
    [
        "cache/pieces/sha256",
        "indexes/layer/sha256",
        "indexes/bound/sha256",
        "cache/flat",
        "leases",
        "mounts",
        "blobs/sha256",
        "cache/chunks",  # earlier versions' areas, removed by prune
        "indexes/sha256",
        "build-cache",  # prune --build-cache and a build's sweep deleted inside it
    ],
)
def test_a_symlinked_store_directory_is_refused_and_repaired(
    root: Path, victim: Victim, area: str, sample_image: SampleImage
) -> None:
    link = root / area
    moved = root.parent / "moved"
    if link.exists():
        os.rename(link, moved)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(victim.dir)
    for args in (["prune"], ["mounts"], ["rmi", sample_image.ref], ["pull", sample_image.ref]):
        one_line_error(imagefs(root, *args, check=False), str(link), "symbolic link")
    victim.assert_intact()
    repair_removes_the_link(root, link)
    if moved.exists():
        os.rename(moved, link)
    assert imagefs(root, "check").stdout.strip().endswith("all good")
    imagefs(root, "prune")
    victim.assert_intact()


def test_links_among_pieces_and_bound_indexes_are_removed_never_followed(
    root: Path, victim: Victim
) -> None:
    piece = root / "cache" / "pieces" / "sha256" / ("e" * 64)
    piece.parent.mkdir(parents=True, exist_ok=True)
    piece.symlink_to(victim.file)
    bound = root / "indexes" / "bound" / "sha256" / ("f" * 64)
    bound.parent.mkdir(parents=True, exist_ok=True)
    bound.symlink_to(victim.dir)
    found = imagefs(root, "check", check=False)
    assert f"symbolic link {piece}" in found.stdout and f"symbolic link {bound}" in found.stdout
    victim.assert_intact()
    imagefs(root, "prune")
    victim.assert_intact()
    repaired = imagefs(root, "check", "--repair", check=False)
    assert "removed" in repaired.stdout
    assert not os.path.lexists(piece) and not os.path.lexists(bound)
    victim.assert_intact()
    assert imagefs(root, "check").stdout.strip().endswith("all good")


def test_links_inside_earlier_cache_and_index_areas_are_removed_never_followed(
    root: Path, victim: Victim, sample_image: SampleImage
) -> None:
    layer_dir = root / "cache" / "chunks" / ("b" * 64)
    layer_dir.parent.mkdir(parents=True, exist_ok=True)
    layer_dir.symlink_to(victim.dir)  # check --repair used to delete victim/* as "stray"
    index = root / "indexes" / "sha256" / ("c" * 64)
    index.parent.mkdir(parents=True, exist_ok=True)
    index.symlink_to(victim.file)
    repaired = imagefs(root, "check", "--repair", check=False)
    assert f"symbolic link {layer_dir}" in repaired.stdout
    assert f"symbolic link {index}" in repaired.stdout
    assert not os.path.lexists(layer_dir) and not os.path.lexists(index)
    victim.assert_intact()
    for link, target in ((layer_dir, victim.dir), (index, victim.file)):
        link.parent.mkdir(parents=True, exist_ok=True)  # --repair removed the old areas
        link.symlink_to(target)
    imagefs(root, "prune")  # removes the links of unused layers, not what they point at
    assert not os.path.lexists(layer_dir) and not os.path.lexists(index)
    victim.assert_intact()


def test_a_planted_blob_link_is_never_read(root: Path, victim: Victim) -> None:
    """A link to a FIFO at a blob's name: an open that followed it would hang forever."""
    link = root / "blobs" / "sha256" / ("d" * 64)
    link.symlink_to(victim.fifo)
    found = imagefs(root, "check", check=False, timeout=60)
    assert f"symbolic link {link}" in found.stdout
    imagefs(root, "prune", timeout=60)  # not a blob: ignored
    imagefs(root, "check", "--repair", timeout=60)
    assert not os.path.lexists(link)
    victim.assert_intact()


def stored_manifest(root: Path) -> dict[str, object]:
    index = json.loads((root / "index.json").read_bytes())
    digest = index["manifests"][0]["digest"].split(":")[1]
    manifest: dict[str, object] = json.loads((root / "blobs" / "sha256" / digest).read_bytes())
    return manifest


def test_a_link_at_a_needed_blob_is_replaced_by_the_verified_blob(
    root: Path, victim: Victim, sample_image: SampleImage
) -> None:
    config = stored_manifest(root)["config"]
    assert isinstance(config, dict)
    digest = config["digest"].split(":")[1]
    blob = root / "blobs" / "sha256" / digest
    blob.unlink()
    blob.symlink_to(victim.file)
    imagefs(root, "pull", sample_image.ref)  # the link is not taken for the stored blob
    assert not blob.is_symlink()
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == digest
    victim.assert_intact()


def test_a_partial_download_linked_to_a_victim_is_not_truncated(
    root: Path, victim: Victim, sample_image: SampleImage, tmp_path: Path
) -> None:
    layers = stored_manifest(root)["layers"]
    assert isinstance(layers, list)
    (root / "ingest").mkdir(exist_ok=True)
    for layer in layers:  # a planted partial for every blob the full pull will fetch
        (root / "ingest" / f"{layer['digest'].split(':')[1]}.partial").symlink_to(victim.file)
    imagefs(root, "pull", "--full", sample_image.ref)
    victim.assert_intact()
    with mounted(root, sample_image.ref, tmp_path / "mnt") as mnt:
        assert (mnt / "etc" / "hello.txt").read_bytes() == sample_image.files["etc/hello.txt"]


def test_lease_and_mount_record_links_are_skipped(
    root: Path, victim: Victim, sample_image: SampleImage, tmp_path: Path
) -> None:
    (root / "leases").mkdir(exist_ok=True)
    (root / "leases" / "1-0").symlink_to(victim.file)
    (root / "mounts").mkdir(exist_ok=True)
    (root / "mounts" / "0123456789abcdef.json").symlink_to(victim.dir / "x.json")
    assert imagefs(root, "mounts").stdout.strip().splitlines()[1:] == []
    imagefs(root, "prune")
    with mounted(root, sample_image.ref, tmp_path / "mnt"):
        assert "sample" in imagefs(root, "mounts").stdout
    victim.assert_intact()
    repaired = imagefs(root, "check", "--repair")
    assert repaired.stdout.count("symbolic link") == 2
    victim.assert_intact()


@pytest.mark.parametrize("name", ["index.json", "lock"])
def test_top_level_files_as_links_fail_cleanly(
    root: Path, victim: Victim, name: str, sample_image: SampleImage
) -> None:
    path = root / name
    path.unlink(missing_ok=True)
    path.symlink_to(victim.file)
    one_line_error(imagefs(root, "rmi", sample_image.ref, check=False), str(path))
    one_line_error(imagefs(root, "prune", check=False), str(path))
    victim.assert_intact()
    repaired = imagefs(root, "check", "--repair", check=False)
    assert f"symbolic link {path}" in repaired.stdout
    assert not path.is_symlink()
    victim.assert_intact()


def test_a_log_link_is_never_appended_to(
    root: Path, victim: Victim, sample_image: SampleImage, tmp_path: Path
) -> None:
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log_path_for(root, mnt.absolute()).symlink_to(victim.file)
    try:
        proc = imagefs(root, "mount", sample_image.ref, str(mnt), check=False)
        one_line_error(proc, "symbolic link")
        assert not os.path.ismount(mnt)
    finally:
        force_unmount(mnt)
    victim.assert_intact()


@pytest.mark.parametrize("planted", ["file", "directory"])
def test_a_flattened_zstd_layer_is_never_written_through_a_link(
    tmp_path: Path, registry: LocalRegistry, victim: Victim, planted: str
) -> None:
    """A single-frame zstd layer bigger than `ZSTD_FLAT_THRESHOLD`, whole in the store, is
    decompressed once into `cache/flat/<hex>`: a link planted at that name is replaced, never
    written through; a link planted as `cache/flat` itself is refused in one line."""
    big = random.Random(7).randbytes(ZSTD_FLAT_THRESHOLD + (1 << 20))
    layout = init_layout(tmp_path / "layout")
    subprocess.run(["umoci", "new", "--image", f"{layout}:flat"], check=True)

    def populate(tree: Path) -> None:
        (tree / "big.bin").write_bytes(big)

    image = layout_add_tar_layer(LayoutImage(layout, "flat"), populate, compression="zstd")
    pushed = push(image, registry, "links/flat:v1")
    root = tmp_path / "root"
    imagefs(root, "pull", "--full", pushed.ref)
    layer = image.layers()[-1]["digest"].split(":")[1]
    flat = root / "cache" / "flat"
    if planted == "file":
        flat.mkdir(parents=True, exist_ok=True)
        (flat / layer).symlink_to(victim.file)
    else:
        flat.parent.mkdir(parents=True, exist_ok=True)
        flat.symlink_to(victim.dir)
    argv = [sys.executable, "-m", "imagefs", "--root", str(root), "cat", pushed.ref, "/big.bin"]
    got = subprocess.run(argv, capture_output=True, check=False)
    victim.assert_intact()
    if planted == "file":
        assert got.returncode == 0, got.stderr
        assert hashlib.sha256(got.stdout).digest() == hashlib.sha256(big).digest()
        assert not (flat / layer).is_symlink()  # replaced by the decompressed stream
    else:
        one_line_error(
            type("P", (), {"returncode": got.returncode, "stderr": got.stderr.decode()})(),
            "symbolic link",
        )


def test_a_fifo_at_a_layer_index_fails_in_one_line_never_hangs(
    root: Path, victim: Victim, sample_image: SampleImage
) -> None:
    """`load_layer` opened `indexes/layer/sha256/<hex>` blocking: a FIFO there hung ls, cat,
    mount and images forever."""
    layers = stored_manifest(root)["layers"]
    assert isinstance(layers, list)
    index = root / "indexes" / "layer" / "sha256" / layers[0]["digest"].split(":")[1]
    index.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(index)
    proc = imagefs(root, "ls", sample_image.ref, "/", check=False, timeout=60)
    one_line_error(proc, str(index), "not a regular file")
    imagefs(root, "check", "--repair", timeout=60)
    assert not os.path.lexists(index)
    assert "etc" in imagefs(root, "ls", sample_image.ref, "/", timeout=60).stdout


def test_a_toc_is_never_kept_through_a_linked_bound_directory(
    tmp_path: Path, victim: Victim, estargz_image: Published
) -> None:
    """`indexes/bound/sha256/<layer> -> victim`: the lazily fetched eStargz TOC used to be
    written into the victim directory (and `refuse()` deleted from it)."""
    root = tmp_path / "root"
    imagefs(root, "pull", estargz_image.ref)
    bound = root / "indexes" / "bound" / "sha256" / estargz_image.layer_digests[-1][7:]
    bound.parent.mkdir(parents=True, exist_ok=True)
    bound.symlink_to(victim.dir)
    proc = imagefs(root, "ls", estargz_image.ref, "/etc", check=False, timeout=60)
    one_line_error(proc, str(bound), "symbolic link")
    victim.assert_intact()
    repair_removes_the_link(root, bound)
    assert "motd" in imagefs(root, "ls", estargz_image.ref, "/etc", timeout=60).stdout


def test_check_never_reads_a_derived_index_through_a_link_or_a_fifo(
    tmp_path: Path, victim: Victim, estargz_image: Published
) -> None:
    """`check` compared `<kind>-<hex>.idx` with its verified bytes by `read_bytes()` on the
    path: a FIFO there hung it, a link to /dev/zero exhausted memory."""
    root = tmp_path / "root"
    imagefs(root, "ls", estargz_image.ref, "/etc")  # keeps the TOC, raw and derived
    bound = root / "indexes" / "bound" / "sha256" / estargz_image.layer_digests[-1][7:]
    (derived,) = bound.glob("*.idx")
    derived.unlink()
    os.mkfifo(derived)
    found = imagefs(root, "check", check=False, timeout=60)
    assert f"{derived} is not a regular file" in found.stdout, found.stdout
    imagefs(root, "check", "--repair", timeout=60)
    assert not os.path.lexists(derived)
    derived.symlink_to(victim.file)
    found = imagefs(root, "check", check=False, timeout=60)
    assert f"symbolic link {derived}" in found.stdout
    assert "derived index is not what" not in found.stdout  # the victim was never read
    imagefs(root, "check", "--repair", timeout=60)
    assert not os.path.lexists(derived)
    victim.assert_intact()
    assert imagefs(root, "check").stdout.strip().endswith("all good")
