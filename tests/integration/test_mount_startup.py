"""Start-up of `imagefs mount` (issue 10.5): the daemon is the launcher forked, detached as a
fresh process would be; a mount imports only the modules its layers' formats need."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path

import pytest

from imagefs.fs.lifecycle import log_path_for
from imagefs.testing.images import SampleImage
from imagefs.testing.mounts import imagefs
from tests.integration.lazy_content import SMALL, Published

pytestmark = pytest.mark.fuse

# What a mount of a plain gzip image, read through a published or stored index, never needs.
FORMAT_MODULES = {
    "imagefs.layers.estargz",
    "imagefs.layers.zstdchunked",
    "imagefs.layers.lostnames",
    "imagefs.layers.tocverify",
    "imagefs.layers.toc.builder",
    "imagefs.layers.seekindex.building",
}
ON_DEMAND = {
    "imagefs.api",  # every verb: push, index, rmi...
    "imagefs.published",  # only with --trust-published-index
    "imagefs.artifacts",
    "imagefs.registry.credentials",  # only after a 401
    "imagefs.registry.netem",  # only with --net-latency/--net-bandwidth
    "imagefs.profiles",  # only with --prefetch
}


def _daemon_pid(root: Path) -> int:
    return int(imagefs(root, "mounts").stdout.splitlines()[1].split()[-1])


def test_the_daemon_is_the_launcher_forked_and_detached(
    tmp_path: Path, sample_image: SampleImage
) -> None:
    """No second interpreter (its command line is the launcher's, not `python -m imagefs
    mount -f --ready-fd N`), yet detached as before: its own session, stdin /dev/null,
    stdout and stderr the mount's log, and nothing else the launcher inherited kept open
    (a caller waiting for EOF on a pipe the launcher inherited gets it when it exits)."""
    root, mnt = tmp_path / "root", tmp_path / "mnt"
    mnt.mkdir()
    r, w = os.pipe()
    argv = [sys.executable, "-m", "imagefs", "--root", str(root), "mount"]
    try:
        proc = subprocess.run(
            [*argv, sample_image.ref, str(mnt)],
            pass_fds=(w,),
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.close(w)
        assert proc.returncode == 0, proc.stderr
        ready, _, _ = select.select([r], [], [], 30)
        assert ready and os.read(r, 1) == b"", "the daemon kept the launcher's inherited pipe"
        pid = _daemon_pid(root)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        assert [c.decode() for c in cmdline] == [*argv, sample_image.ref, str(mnt)]
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        assert int(stat[3]) == pid  # the session id: its own session, as setsid leaves it
        fds = {int(n): os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")}
        assert fds[0] == os.devnull
        log = str(log_path_for(root, mnt))
        assert fds[1] == fds[2] == log
        assert os.path.realpath(f"/proc/{pid}/cwd") == os.getcwd()
        assert (mnt / "etc/hello.txt").read_bytes() == sample_image.files["etc/hello.txt"]
        assert "mounted" in Path(log).read_text()
    finally:
        os.close(r)
        imagefs(root, "umount", str(mnt), check=False)


def test_the_daemon_is_forked_before_the_launcher_parses_and_handed_its_arguments(
    tmp_path: Path, sample_image: SampleImage
) -> None:
    """`imagefs mount` forks the daemon-to-be first thing (it imports the mount's modules
    while the launcher parses and checks), then hands it the arguments: the mount it serves
    is the one asked for, with the options given."""
    root, mnt = tmp_path / "root", tmp_path / "mnt"
    mnt.mkdir()
    argv = [sys.executable, "-m", "imagefs", "--root", str(root), "mount", "-o", "allow_other"]
    proc = subprocess.run(
        [*argv, sample_image.ref, str(mnt)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        assert proc.returncode == 0, proc.stderr
        log = log_path_for(root, mnt).read_text()
        assert "daemon forked as the launcher started" in log
        assert (mnt / "etc/hello.txt").read_bytes() == sample_image.files["etc/hello.txt"]
        mounts = Path("/proc/mounts").read_text().splitlines()
        options = next(line.split()[3] for line in mounts if str(mnt) in line)
        assert "allow_other" in options.split(",")
    finally:
        imagefs(root, "umount", str(mnt), check=False)


@pytest.mark.parametrize(
    "words",
    [["-o", "no_such_option"], ["--cache-size", "lots"]],
    ids=["bad -o", "bad --cache-size"],
)
def test_a_launcher_that_fails_its_checks_leaves_no_forked_child(
    tmp_path: Path, sample_image: SampleImage, words: list[str]
) -> None:
    """The daemon-to-be of a launcher that stops before handing over is killed on the way
    out: nothing with this command line is left running, and nothing was mounted."""
    root, mnt = tmp_path / "root", tmp_path / "mnt-unique-to-this-test"
    mnt.mkdir()
    argv = [sys.executable, "-m", "imagefs", "--root", str(root), "mount", *words]
    proc = subprocess.run(
        [*argv, sample_image.ref, str(mnt)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(mnt).encode() in cmdline:
            left.append(pid)
    assert left == []
    assert not os.path.ismount(mnt)


def test_a_daemon_start_up_error_is_one_line_from_the_launcher(tmp_path: Path) -> None:
    """An error the forked daemon meets (here: a registry that is not there) is printed by
    the launcher, one line, with the daemon's exit code; no mount is left behind."""
    root, mnt = tmp_path / "root", tmp_path / "mnt"
    mnt.mkdir()
    proc = imagefs(root, "mount", "127.0.0.1:9/nothing/here:v1", str(mnt), check=False)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "127.0.0.1:9" in lines[0]
    assert not os.path.ismount(mnt)
    assert imagefs(root, "mounts").stdout.splitlines()[1:] == []


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_the_mount_daemon_s_imports_leave_the_formats_and_the_rest_for_later() -> None:
    """What the daemon imports before it can mount (the mount verb, the session, the pull,
    the FUSE server) includes no layer format module and none of the on-demand pieces."""
    loaded = _modules_after(
        "import trio\n"
        "from imagefs.cli.app import session_from_args\n"
        "from imagefs.cli.mount import run_mount\n"
        "from imagefs.fs.daemon import serve\n"
        "from imagefs.pulling import find_or_pull\n"
    )
    assert "pyfuse3" in loaded and "imagefs.lazy.layers" in loaded  # it did import the server
    assert not (FORMAT_MODULES | ON_DEMAND) & loaded


def _cat_modules(root: Path, image: Published, path: str) -> set[str]:
    code = (
        "from imagefs.cli import main\n"
        f"rc = main(['--root', {str(root)!r}, 'cat', *{list(image.flags)!r}, "
        f"{image.ref!r}, {path!r}])\n"
        "assert rc == 0, rc\n"
    )
    return _modules_after(code)


def test_reading_a_gzip_image_imports_no_other_format(
    tmp_path: Path, gzip_image: Published, estargz_image: Published
) -> None:
    """A read through the published index of a gzip image (the mount's read path:
    `lazy_layer_set`, the index loader, the seek index) imports none of the eStargz,
    zstd:chunked or index-building modules; reading an eStargz image does import eStargz's."""
    path = next(iter(SMALL))
    loaded = _cat_modules(tmp_path / "gz", gzip_image, path)
    assert "imagefs.layers.seekindex.reading" in loaded
    assert not FORMAT_MODULES & loaded, FORMAT_MODULES & loaded
    esgz = _cat_modules(tmp_path / "esgz", estargz_image, path)
    assert "imagefs.layers.estargz" in esgz
    assert "imagefs.layers.zstdchunked" not in esgz
