"""imagefs mount on real FUSE, compared with `umoci unpack` of the same image."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from imagefs.testing import treecmp
from imagefs.testing.images import SampleImage, push, umoci_unpack
from imagefs.testing.mounts import imagefs, mounted
from imagefs.testing.registry import LocalRegistry, LoggedRequest

pytestmark = pytest.mark.fuse


@pytest.fixture(scope="module")
def reference_tree(sample_image: SampleImage, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample image extracted by the reference extractor."""
    return umoci_unpack(sample_image.layout, tmp_path_factory.mktemp("ref") / "bundle")


def assert_same_tree(mount: Path, reference: Path) -> None:
    got, want = treecmp.listing(mount), treecmp.listing(reference)
    problems = treecmp.diff(got, want)
    assert not problems, "\n".join(problems)
    assert len(got) > 5


def test_mount_matches_umoci_unpack(
    tmp_path: Path, sample_image: SampleImage, reference_tree: Path
) -> None:
    root = tmp_path / "root"
    with mounted(root, sample_image.ref, tmp_path / "mnt") as mnt:
        assert_same_tree(mnt, reference_tree)
        assert (mnt / "etc" / "hello.txt").read_bytes() == sample_image.files["etc/hello.txt"]
        for path in sample_image.absent:
            assert not (mnt / path).exists()


def test_directories_list_dot_and_dotdot(
    tmp_path: Path, sample_image: SampleImage, reference_tree: Path
) -> None:
    """`ls -a` shows `.` and `..` with the right inode numbers, as on every filesystem."""

    def run(*args: str, cwd: Path) -> str:
        return subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=True).stdout

    with mounted(tmp_path / "root", sample_image.ref, tmp_path / "mnt") as mnt:
        assert run("ls", "-a", cwd=mnt).split()[:2] == [".", ".."]
        # ls -R, find and diff -r over the mount read as over umoci's extraction.
        assert run("ls", "-aR", cwd=mnt) == run("ls", "-aR", cwd=reference_tree)
        found = [sorted(run("find", ".", cwd=d).splitlines()) for d in (mnt, reference_tree)]
        assert found[0] == found[1]
        subprocess.run(["diff", "-r", str(mnt), str(reference_tree)], check=True)
        root_ino = os.stat(mnt).st_ino
        etc_ino = os.stat(mnt / "etc").st_ino

        def inodes(*where: str) -> dict[str, int]:
            pairs = (line.split() for line in run("ls", "-ai1", *where, cwd=mnt).splitlines())
            return {name: int(ino) for ino, name in pairs}

        assert (inodes("etc")["."], inodes("etc")[".."]) == (etc_ino, root_ino)
        top = inodes()
        # (`..` of a mount's root is the directory it is mounted on: the kernel answers that.)
        assert top["."] == root_ino and ".." in top


@pytest.mark.parametrize(
    "fmt,compression", [("v2s2", None), ("oci", "zstd"), ("oci", "zstd:chunked")]
)
def test_recompressed_copies_match(
    tmp_path: Path,
    sample_image: SampleImage,
    reference_tree: Path,
    registry: LocalRegistry,
    repo_name: str,
    fmt: str,
    compression: str | None,
) -> None:
    pushed = push(
        sample_image.layout,
        registry,
        f"{repo_name}:x",
        format=fmt,  # type: ignore[arg-type]
        compression=compression,  # type: ignore[arg-type]
    )
    with mounted(tmp_path / "root", pushed.ref, tmp_path / "mnt") as mnt:
        assert_same_tree(mnt, reference_tree)


def _tar(entries: list[tuple[str, bytes | None]]) -> bytes:
    """A layer tar with explicit directories (name ending in /) and files, as docker writes."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name.rstrip("/") or ".")
            info.mtime = 1_700_000_000
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_mount_is_lazy_and_reuses_indexes(
    tmp_path: Path, sample_image: SampleImage, registry: LocalRegistry, repo_name: str
) -> None:
    import shutil

    from imagefs.testing.images import LayoutImage, layout_append_layer

    layout = tmp_path / "layout"
    shutil.copytree(sample_image.layout.layout, layout)
    image = LayoutImage(layout, sample_image.layout.tag)
    top = _tar([("./", None), ("opt/", None), ("opt/lazy/", None), ("opt/lazy/top.txt", b"top\n")])
    image = layout_append_layer(image, top)
    pushed = push(image, registry, f"{repo_name}:lazy")
    root = tmp_path / "root"
    imagefs(root, "pull", pushed.ref)
    layers = _layers(root)
    registry.mark()
    with mounted(root, pushed.ref, tmp_path / "mnt") as mnt:
        assert not _fetched_layers(registry, layers)  # mounting fetched no layer
        # every step of this path is decided by the top layer: nothing below is fetched
        assert (mnt / "opt" / "lazy" / "top.txt").read_bytes() == b"top\n"
        assert set(_fetched_layers(registry, layers, {layers[-1]})) == {layers[-1]}
        # etc/hello.txt is in layer 1, but etc/ there is only implied (no entry of its
        # own), so etc's attributes come from layer 0: every layer is needed for this one
        assert (mnt / "etc" / "hello.txt").read_bytes() == sample_image.files["etc/hello.txt"]
        assert sorted(_fetched_layers(registry, layers, set(layers))) == sorted(layers)
    # the next mount of the same layers starts from the stored indexes: nothing fetched
    registry.mark()
    for digest in layers:
        assert (root / "indexes" / "layer" / "sha256" / digest.split(":")[1]).is_file()
    with mounted(root, pushed.ref, tmp_path / "mnt2") as mnt:
        assert (mnt / "etc" / "hello.txt").read_bytes() == sample_image.files["etc/hello.txt"]
    assert not registry.blob_gets()


def _fetched_layers(
    registry: LocalRegistry, layers: list[str], expect: set[str] | None = None
) -> list[str]:
    """The layers fetched since the mark; with `expect`, waits for the log to show them."""

    def fetched(gets: list[LoggedRequest]) -> list[str]:
        got = [r.path.rsplit("/", 1)[1] for r in gets if r.status in (200, 206)]
        return [d for d in got if d in layers]

    if expect is None:
        return fetched(registry.blob_gets())
    return fetched(registry.blob_gets_until(lambda gets: set(fetched(gets)) >= expect))


def test_writes_are_refused(tmp_path: Path, sample_image: SampleImage) -> None:
    with mounted(tmp_path / "root", sample_image.ref, tmp_path / "mnt") as mnt:
        for attempt in (
            lambda: (mnt / "new").write_text("x"),
            lambda: (mnt / "etc" / "hello.txt").write_text("x"),
            lambda: (mnt / "etc").rmdir(),
            lambda: (mnt / "etc" / "hello.txt").unlink(),
            lambda: os.mkdir(mnt / "d"),
            lambda: os.setxattr(mnt / "etc" / "hello.txt", "user.x", b"1"),
            lambda: os.chmod(mnt / "etc" / "hello.txt", 0o600),
        ):
            with pytest.raises(OSError) as info:
                attempt()
            assert info.value.errno == errno.EROFS
        opts = _mount_options(mnt)
        assert {"ro", "nosuid", "nodev"} <= opts


def test_mount_lists_and_umount_ends_daemon(tmp_path: Path, sample_image: SampleImage) -> None:
    root = tmp_path / "root"
    mnt = tmp_path / "mnt"
    with mounted(root, sample_image.ref, mnt):
        out = imagefs(root, "mounts").stdout.splitlines()
        assert len(out) == 2 and str(mnt) in out[1] and sample_image.ref in out[1]
        pid = int(out[1].split()[-1])
        busy = subprocess.Popen(["sleep", "30"], cwd=mnt)
        try:
            refused = imagefs(root, "umount", str(mnt), check=False)
            assert refused.returncode == 1 and "busy" in refused.stderr
        finally:
            busy.kill()
            busy.wait()
    assert not os.path.ismount(mnt)
    _wait_gone(pid)
    assert imagefs(root, "mounts").stdout.splitlines()[1:] == []


def test_plain_fusermount_ends_the_daemon_cleanly(
    tmp_path: Path, sample_image: SampleImage
) -> None:
    root = tmp_path / "root"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    imagefs(root, "mount", sample_image.ref, str(mnt))
    pid = int(imagefs(root, "mounts").stdout.splitlines()[1].split()[-1])
    subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    _wait_gone(pid)
    assert imagefs(root, "mounts").stdout.splitlines()[1:] == []


def test_sigterm_unmounts(tmp_path: Path, sample_image: SampleImage) -> None:
    root = tmp_path / "root"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    imagefs(root, "mount", sample_image.ref, str(mnt))
    pid = int(imagefs(root, "mounts").stdout.splitlines()[1].split()[-1])
    os.kill(pid, signal.SIGTERM)
    _wait_gone(pid)
    assert not os.path.ismount(mnt)


def test_mount_errors_are_printed_by_the_command(tmp_path: Path, registry: LocalRegistry) -> None:
    root = tmp_path / "root"
    (tmp_path / "mnt").mkdir()
    unknown = imagefs(
        root, "mount", f"{registry.host}/no/such:img", str(tmp_path / "mnt"), check=False
    )
    assert unknown.returncode == 1 and "not found" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    missing = imagefs(root, "mount", "whatever:1", str(tmp_path / "nodir"), check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    bad_opt = imagefs(root, "mount", "-o", "rw", "x:1", str(tmp_path / "mnt"), check=False)
    assert bad_opt.returncode == 2 and "read-only" in bad_opt.stderr


def test_registry_failure_gives_eio_then_recovers(
    tmp_path: Path, fresh_registry: LocalRegistry
) -> None:
    from imagefs.testing.images import small_sample_image

    sample = small_sample_image(tmp_path / "b", fresh_registry, "flaky/app:v1")
    root = tmp_path / "root"
    imagefs(root, "pull", sample.ref)
    fresh_registry.stop()
    try:
        with mounted(root, sample.ref, tmp_path / "mnt") as mnt:
            with pytest.raises(OSError) as info:
                os.listdir(mnt)
            assert info.value.errno == errno.EIO
            fresh_registry.start()
            assert "etc" in os.listdir(mnt)  # the same mount, retried: works now
            assert (mnt / "etc" / "hello.txt").read_bytes() == sample.files["etc/hello.txt"]
    finally:
        if not fresh_registry.running:
            fresh_registry.start()


def _mount_options(mnt: Path) -> set[str]:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        parts = line.split()
        if parts[4] == str(mnt):
            return set(parts[5].split(","))
    raise AssertionError(f"{mnt} not in mountinfo")


def _wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"mount daemon {pid} still running")


def _layers(root: Path) -> list[str]:
    import json

    index = json.loads((root / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((root / "blobs" / "sha256" / manifest_digest).read_text())
    return [layer["digest"] for layer in manifest["layers"]]
