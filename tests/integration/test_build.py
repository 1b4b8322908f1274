"""`imagefs build` end to end: cache, bad input, SIGTERM, the result as a stored image."""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from imagefs.testing.buildbase import build_base
from imagefs.testing.images import PushedImage, push
from imagefs.testing.mounts import imagefs, mounted
from imagefs.testing.registry import LocalRegistry, free_port

pytestmark = [pytest.mark.fuse, pytest.mark.registry]


@pytest.fixture(scope="module")
def base(registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory) -> PushedImage:
    if shutil.which("runc") is None:
        pytest.fail("test infrastructure: runc is missing (tools/lib/setup.sh)")
    layout = tmp_path_factory.mktemp("buildbase2") / "layout"
    return push(build_base(layout), registry, "build/base2:1")


def _ctx(tmp: Path, dockerfile: str, **files: str) -> Path:
    ctx = tmp / "ctx"
    ctx.mkdir(exist_ok=True)
    (ctx / "Dockerfile").write_text(dockerfile)
    for name, text in files.items():
        (ctx / name).write_text(text)
    return ctx


def _build(
    root: Path, base: PushedImage, ctx: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    return imagefs(root, "build", "--build-arg", f"BASE={base.ref}", *extra, str(ctx), check=False)


def _clean(root: Path) -> None:
    assert str(root) not in Path("/proc/self/mountinfo").read_text()
    assert imagefs(root, "check", check=False).returncode == 0


# `.tmp-keep` is image content in the build cache: `imagefs check` must not call it a
# leftover temporary file of the store.
DF = 'ARG BASE\nFROM $BASE\nCOPY f /f\nRUN echo ran > /r && touch /.tmp-keep\nCMD ["cat", "/r"]\n'


def test_rebuild_is_cached_and_the_image_mounts(
    base: PushedImage, registry: LocalRegistry, tmp_path: Path
) -> None:
    root = tmp_path / "store"
    ctx = _ctx(tmp_path, DF, f="one\n")
    first = _build(root, base, ctx, "-t", "built:1")
    assert first.returncode == 0, first.stderr
    assert "CACHED" not in first.stderr
    mounts_before = sorted((root / "logs").glob("mount-*.log"))
    second = _build(root, base, ctx, "-t", "built:1")
    assert second.returncode == 0, second.stderr
    assert second.stderr.count("CACHED") == 2
    # every step cached: the base was not even mounted (each mount has a log of its own)
    assert sorted((root / "logs").glob("mount-*.log")) == mounts_before
    assert second.stdout == first.stdout or "Built sha256:" in second.stdout
    (ctx / "f").write_text("two\n")  # new content: COPY and what follows run again
    third = _build(root, base, ctx, "-t", "built:1")
    assert "CACHED" not in third.stderr
    nocache = _build(root, base, ctx, "--no-cache", "-t", "built:2")
    assert nocache.returncode == 0 and "CACHED" not in nocache.stderr
    assert "built" in imagefs(root, "images").stdout
    with mounted(root, "built:1", tmp_path / "mnt") as mnt:
        assert (mnt / "f").read_text() == "two\n"
        assert (mnt / "r").read_text() == "ran\n"
        assert (mnt / "etc" / "motd").read_text() == "hello\n"  # from the lazily read base
    # push publishes the build's layer indexes: a mount from an empty store reads the new
    # layers by byte ranges, never whole (status 200) blob GETs.
    ref = f"{registry.host}/built/cached:1"
    imagefs(root, "tag", "built:1", ref)
    pushed = imagefs(root, "push", ref).stdout
    assert "layer indexes: 3 published" in pushed  # the base layer indexed by its mount too
    layers = json.loads(imagefs(root, "inspect", ref).stdout)[0]["ImageFS"]["Layers"]
    new = [layer["Digest"] for layer in layers[1:]]
    registry.mark()
    trust = ["--trust-published-index"]  # the indexes `push` published are opted into
    with mounted(tmp_path / "fresh", ref, tmp_path / "mnt2", mount_args=trust) as mnt:
        assert (mnt / "r").read_text() == "ran\n"
        assert (mnt / "f").read_text() == "two\n"
    whole = [
        r for r in registry.requests()
        if r.is_blob_get and r.status == 200 and any(d in r.path for d in new)
    ]  # fmt: skip
    assert whole == []
    _clean(root)


def test_prune_keeps_the_build_cache_unless_told(base: PushedImage, tmp_path: Path) -> None:
    root = tmp_path / "store"
    ctx = _ctx(tmp_path, DF, f="one\n")
    assert _build(root, base, ctx, "-t", "p:1").returncode == 0
    imagefs(root, "rmi", "p:1")
    imagefs(root, "prune")
    again = _build(root, base, ctx, "-t", "p:1")
    assert again.returncode == 0 and again.stderr.count("CACHED") == 2, again.stderr
    imagefs(root, "rmi", "p:1")
    imagefs(root, "prune", "--build-cache")
    assert not (root / "build-cache").exists()
    fresh = _build(root, base, ctx, "-t", "p:1")
    assert fresh.returncode == 0 and "CACHED" not in fresh.stderr
    _clean(root)


def test_onbuild_triggers_and_heredocs_run(base: PushedImage, tmp_path: Path) -> None:
    # (not in the buildah corpus: buildah 1.28 knows no heredocs)
    root = tmp_path / "store"
    parent = _ctx(
        tmp_path,
        "ARG BASE\nFROM $BASE\nONBUILD RUN echo triggered > /t\n"
        "RUN <<EOF\necho one > /h\necho two >> /h\nEOF\n"
        "COPY <<EOF /doc.txt\nhere doc\nEOF\n",
    )
    assert _build(root, base, parent, "-t", "parent:1").returncode == 0
    child = tmp_path / "child"
    child.mkdir()
    (child / "Dockerfile").write_text("FROM parent:1\nRUN cat /t > /t2\n")
    proc = imagefs(root, "build", "-t", "child:1", str(child), check=False)
    assert proc.returncode == 0, proc.stderr
    config = json.loads(imagefs(root, "inspect", "child:1").stdout)[0]["Config"]
    assert not config.get("OnBuild")
    with mounted(root, "child:1", tmp_path / "mnt") as mnt:
        assert (mnt / "h").read_text() == "one\ntwo\n"
        assert (mnt / "doc.txt").read_text() == "here doc\n"
        assert (mnt / "t2").read_text() == "triggered\n"
    _clean(root)


@pytest.mark.parametrize(
    ("dockerfile", "message"),
    [
        ("ARG BASE\nFROM $BASE\nFROBNICATE x\n", "Dockerfile:3: unknown instruction: FROBNICATE"),
        ("ARG BASE\nFROM $BASE\nCOPY missing /x\n", "Dockerfile:3: COPY failed: source 'missing'"),
        (
            "ARG BASE\nFROM $BASE\nRUN echo last words && exit 3\n",
            "exited with code 3; last output: last words",
        ),
        ("ARG BASE\nFROM ${BASE}-nosuchtag\n", "base image 127.0.0.1:"),
        ("ARG BASE\nRUN true\n", "Dockerfile:2: RUN before the first FROM"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(
    base: PushedImage, tmp_path: Path, dockerfile: str, message: str
) -> None:
    root = tmp_path / "store"
    proc = _build(root, base, _ctx(tmp_path, dockerfile), "-t", "bad:1")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("imagefs: ") and message in last, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "bad" not in imagefs(root, "images").stdout
    _clean(root)


def test_sigterm_during_run_leaves_no_mount_and_no_image(base: PushedImage, tmp_path: Path) -> None:
    root = tmp_path / "store"
    ctx = _ctx(tmp_path, "ARG BASE\nFROM $BASE\nRUN echo started && sleep 4711\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "imagefs", "--root", str(root), "build", "-t", "term:1",
         "--build-arg", f"BASE={base.ref}", str(ctx)],
        stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.rstrip().endswith("started"):
            break
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "sleep 4711" not in ps.splitlines()  # the container's process is gone too
    assert "term" not in imagefs(root, "images").stdout
    _clean(root)


def test_non_root_gets_one_clear_line() -> None:
    # Not under pytest's tmp_path: its parents are closed to other users.
    tmp_path = Path(tempfile.mkdtemp(prefix="imagefs-nonroot-"))
    tmp_path.chmod(0o755)
    ctx = _ctx(tmp_path, "FROM scratch\n")
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         sys.executable, "-m", "imagefs", "--root", str(tmp_path / "store"), "build", str(ctx)],
        capture_output=True, text=True, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    shutil.rmtree(tmp_path)
    assert proc.returncode == 1
    assert proc.stderr == (
        "imagefs: imagefs build must run as root (it mounts overlayfs and runs RUN in namespaces)\n"
    )


def test_add_of_a_url_that_fails_is_one_line(
    base: PushedImage, registry: LocalRegistry, tmp_path: Path
) -> None:
    root = tmp_path / "store"
    gone = f"{registry.url}/v2/no/such/blobs/none"  # the registry answers 404
    closed = f"http://127.0.0.1:{free_port()}/file"  # nothing listens there
    for url, why in ((gone, "HTTP 404"), (closed, "ConnectError")):
        proc = _build(root, base, _ctx(tmp_path, f"ARG BASE\nFROM $BASE\nADD {url} /x\n"))
        assert proc.returncode != 0
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"imagefs: Dockerfile:3: ADD {url}: {why}"), proc.stderr
        assert "Traceback" not in proc.stderr
    _clean(root)


def test_progress_auto_is_a_live_view_on_a_terminal_and_plain_off_it(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, "FROM scratch\nCOPY f /f\n", f="x\n")
    argv = [sys.executable, "-m", "imagefs", "--root", str(tmp_path / "store"), "build"]
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [*argv, str(ctx)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=secondary
    )
    os.close(secondary)
    raw = b""
    while True:
        try:
            data = os.read(primary, 65536)
        except OSError:  # EIO: the build exited and closed the terminal
            break
        if not data:
            break
        raw += data
    os.close(primary)
    assert proc.wait(timeout=120) == 0
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw.decode()).replace("\r", "\n")
    lines = [ln.rstrip() for ln in screen.splitlines()]
    # one permanent line per finished step, as BuildKit's tty view leaves it
    assert any(re.fullmatch(r"#\d+ \[stage-0 2/2\] COPY f /f DONE \d+\.\ds", ln) for ln in lines)
    assert any(re.fullmatch(r"#\d+ exporting to image DONE \d+\.\ds", ln) for ln in lines)
    # off a terminal `auto` stays BuildKit's plain style
    plain = subprocess.run([*argv, str(ctx)], capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr
    assert re.search(r"^#\d+ \[stage-0 2/2\] COPY f /f$", plain.stderr, re.M), plain.stderr
    assert "\x1b[" not in plain.stderr


def test_estargz_build_mounts_lazily_by_its_toc_and_equals_the_gzip_build(
    base: PushedImage, registry: LocalRegistry, tmp_path: Path
) -> None:
    from imagefs.testing import treecmp

    df = (
        "ARG BASE\nFROM $BASE\nCOPY big /big\n"
        "RUN rm /etc/motd && mkdir -p /d/e && echo x > /d/e/f && ln /d/e/f /d/hard"
        " && ln -s e/f /d/sym\n"
    )
    ctx = _ctx(tmp_path, df)
    (ctx / "big").write_bytes(os.urandom(9 * 1024 * 1024 + 7))  # three 4 MiB chunks
    root = tmp_path / "store"
    refs = {}
    for comp in ("gzip", "estargz"):
        # SOURCE_DATE_EPOCH: the two builds' RUN made their files at other times
        epoch = ("--build-arg", "SOURCE_DATE_EPOCH=1000")
        proc = _build(root, base, ctx, *epoch, "--compression", comp, "-t", f"c:{comp}")
        assert proc.returncode == 0, proc.stderr
        refs[comp] = f"{registry.host}/built/{comp}:1"
        imagefs(root, "tag", f"c:{comp}", refs[comp])
        imagefs(root, "push", refs[comp])
    layers = json.loads(imagefs(root, "inspect", refs["estargz"]).stdout)[0]["ImageFS"]["Layers"]
    new = [layer["Digest"] for layer in layers[1:]]
    assert len(new) == 2
    for layer in layers[1:]:  # as ctr-remote annotates them
        notes = layer["Annotations"]
        assert notes["containerd.io/snapshot/stargz/toc.digest"].startswith("sha256:")
        assert int(notes["io.containers.estargz.uncompressed-size"]) > 0
    registry.mark()
    with mounted(tmp_path / "fresh", refs["estargz"], tmp_path / "m1") as m1:
        got = treecmp.listing(m1)
    whole = [
        r for r in registry.requests()
        if r.is_blob_get and r.status == 200 and any(d in r.path for d in new)
    ]  # fmt: skip
    assert whole == []  # no published index, no whole blob: the TOC served the reads
    with mounted(tmp_path / "fresh2", refs["gzip"], tmp_path / "m2") as m2:
        want = treecmp.listing(m2)
    assert treecmp.diff(want, got) == []
    _clean(root)


def test_zstd_chunked_is_refused_in_one_line(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, "FROM scratch\n")
    proc = imagefs(tmp_path / "s", "build", "--compression", "zstd:chunked", str(ctx), check=False)
    assert (proc.returncode, proc.stderr) == (
        1, "imagefs: --compression zstd:chunked is not supported yet (gzip, estargz)\n",
    )  # fmt: skip
