"""`imagefs build` against an independent builder: Debian's `buildah bud` (issue 12).

Each Dockerfile of the corpus is built twice from the same context on the same base image
(busybox-static + setfattr, made by umoci and pushed to the test registry): by `imagefs
build` (the result pushed by `imagefs push` and copied back by skopeo) and by `buildah bud
--storage-driver vfs --isolation chroot --format docker`. Both are unpacked by `umoci
unpack` and compared with treecmp, and their config fields must be equal.

Expected differences (the written-down list):
- mtimes are not compared: files a RUN writes get the time they were written, which differs
  between two builds by construction (content, mode, owner, links, xattrs all are compared);
- buildah's `history`, `created` and layer digests differ (its own created_by text and
  timestamps); only the config fields below are compared, less the `io.buildah.version`
  label buildah adds;
- buildah 1.28 leaves the mount points of a RUN in the layer (empty `/dev`, `/proc`, `/sys`,
  `/run`, `/etc/hosts`, `/etc/hostname`, `/etc/resolv.conf`) where BuildKit and imagefs take
  them back; those paths are ignored when they are empty and only buildah has them;
- `mknod` is not in the corpus: buildah's chroot isolation forbids it (imagefs allows it).
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from imagefs.testing import treecmp
from imagefs.testing.buildbase import build_base
from imagefs.testing.images import LayoutImage, PushedImage, push, skopeo_copy, umoci_unpack
from imagefs.testing.registry import LocalRegistry

pytestmark = [pytest.mark.fuse, pytest.mark.registry]

FIELDS = tuple(f for f in treecmp.ALL_FIELDS if f != "mtime")
CONFIG_KEYS = (
    "Env", "Cmd", "Entrypoint", "WorkingDir", "User", "Labels", "ExposedPorts", "Volumes",
    "StopSignal", "Healthcheck", "OnBuild", "Shell",
)  # fmt: skip


BUILDAH_MOUNTPOINTS = frozenset(b"dev proc sys run etc/hosts etc/hostname etc/resolv.conf".split())


def _empty(root: Path, rel: bytes) -> bool:
    path = os.path.join(os.fsencode(root), rel)
    return not os.listdir(path) if os.path.isdir(path) else os.path.getsize(path) == 0


@dataclass
class Case:
    dockerfile: str
    files: dict[str, bytes] = field(default_factory=dict)
    build_args: dict[str, str] = field(default_factory=dict)
    target: str | None = None


def _tarball() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("pkg/bin/tool", b"#!/bin/sh\necho tool\n"), ("pkg/README", b"r\n")):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o755, 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


CORPUS: dict[str, Case] = {
    "metadata": Case(
        'FROM $BASE\nENV A=1 B="two words"\nENV C=${A}x\nLABEL org.example.a=1 b="x y"\n'
        'EXPOSE 80 53/udp\nVOLUME /data ["/cache"]\nSTOPSIGNAL SIGINT\n'
        "HEALTHCHECK --interval=5s --retries=3 CMD test -e /etc/motd\n"
        'ENTRYPOINT ["/bin/sh", "-c"]\nCMD ["echo hi"]\nUSER app\nWORKDIR /srv/app\n'
        "ONBUILD RUN echo child\n"
    ),
    # rm and chmod/chown of lower files, in two layers (a file changed, then removed)
    "lower_files": Case(
        "FROM $BASE\nRUN chmod 600 /etc/motd && chown 1000:50 /usr/share/doc/base/README "
        "&& chmod 700 /var/lib/data && echo more >> /var/lib/data/b\n"
        "RUN rm /etc/motd /var/lib/data/a\n"
    ),
    "opaque": Case(
        "FROM $BASE\nRUN rm -rf /var/lib/data && mkdir /var/lib/data && echo c > /var/lib/data/c\n"
    ),
    # hard links, symlinks (absolute, dangling), xattrs set in RUN, a fifo, a file created
    # and deleted in one step (must not appear, not even as a whiteout)
    "links_xattrs_special": Case(
        "FROM $BASE\nRUN echo x > /h1 && ln /h1 /h2 && mkdir /d && ln /h1 /d/h3 "
        "&& ln -s /etc/motd /lnk && ln -s ../nowhere /dangling "
        "&& touch /x && setfattr -n user.foo -v bar /x && setfattr -n user.bin -v 0xff00 /x "
        "&& mkfifo /fifo && echo t > /tmp/t && rm /tmp/t\n"
    ),
    "copy": Case(
        "FROM $BASE\nWORKDIR /app\nCOPY a.txt b.txt ./\nCOPY dir /app/dir/\n"
        "COPY --chown=app:staff --chmod=640 a.txt /owned/a\nCOPY *.md /docs/\n"
        "COPY a.txt /renamed.txt\n",
        {"a.txt": b"a\n", "b.txt": b"b\n", "dir/sub/c": b"c\n", "x.md": b"x\n", "y.md": b"y\n"},
    ),
    "dockerignore": Case(
        "FROM $BASE\nCOPY . /ctx/\n",
        {
            ".dockerignore": b"**/*.log\nsecret\n!keep.log\nbuild/*\n",
            "a.log": b"no\n",
            "keep.log": b"yes\n",
            "sub/deep/b.log": b"no\n",
            "sub/deep/ok": b"ok\n",
            "secret/key": b"no\n",
            "build/out": b"no\n",
            "src/main": b"m\n",
        },
    ),
    "build_args": Case(
        "ARG BASE\nARG V=1\nFROM $BASE\nARG V\nARG W=w-${V}\nARG EMPTY\n"
        "ENV X=${V:-none} Y=${EMPTY:-dflt} Z=${V:+set}\nRUN echo $V $W > /args\n",
        build_args={"V": "7"},
    ),
    "multistage": Case(
        "FROM $BASE AS builder\nRUN mkdir /out && echo built > /out/bin && chmod 755 /out/bin\n"
        "FROM $BASE AS unused\nRUN false\n"
        "FROM $BASE\nCOPY --from=builder /out/bin /usr/local/bin/tool\n"
        "COPY --from=0 /out /copied\n",
    ),
    "target": Case(
        "FROM $BASE AS first\nRUN echo one > /one\nFROM first AS second\nRUN echo two > /two\n"
        "FROM $BASE\nRUN echo three > /three\n",
        target="second",
    ),
    "add_tar": Case(
        "FROM $BASE\nADD pkg.tar.gz /opt/\nADD a.txt /opt/a\n",
        {"pkg.tar.gz": _tarball(), "a.txt": b"a\n"},
    ),
    "add_url": Case(
        "ARG BASE\nFROM $BASE\nARG WEB\nADD $WEB/remote.txt /dl/\nADD $WEB/remote.tar.gz /dl/\n"
        "ADD $WEB/remote.txt /named.txt\n",
        build_args={"WEB": "{web}"},
    ),
    "user_workdir": Case(
        "FROM $BASE\nWORKDIR /work/dir\nRUN pwd > here\nUSER app\nRUN id -u > /tmp/uid\n"
        "USER 0\nRUN cat /tmp/uid > /uid\n"
    ),
    # (heredocs are not in the corpus: buildah 1.28 does not know them)
    "shell_exec": Case(
        'FROM $BASE\nSHELL ["/bin/sh", "-ec"]\nRUN ["/bin/sh", "-c", "echo exec > /e"]\n'
        "RUN echo one > /h && echo two >> /h\n"
    ),
}


@pytest.fixture(scope="module")
def base(registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory) -> PushedImage:
    for tool in ("buildah", "runc", "busybox"):
        if shutil.which(tool) is None:
            pytest.fail(f"test infrastructure: {tool} is missing (tools/lib/setup.sh)")
    layout = tmp_path_factory.mktemp("buildbase") / "layout"
    return push(build_base(layout), registry, "build/base:1")


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A plain HTTP server on loopback for ADD URL: a text file and a tarball."""
    root = tmp_path_factory.mktemp("web")
    (root / "remote.txt").write_text("from the web\n")
    (root / "remote.tar.gz").write_bytes(_tarball())  # ADD of a URL does not extract it
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _imagefs(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imagefs", "--root", str(root), *args],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _context(tmp: Path, case: Case) -> Path:
    ctx = tmp / "ctx"
    ctx.mkdir()
    text = case.dockerfile
    (ctx / "Dockerfile").write_text(text if text.startswith("ARG BASE") else "ARG BASE\n" + text)
    for name, data in case.files.items():
        path = ctx / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (1_600_000_000, 1_600_000_000))
    return ctx


def _build_args(case: Case, base: PushedImage, web: str) -> Iterator[str]:
    for k, v in {"BASE": base.ref, **case.build_args}.items():
        v = v.replace("{web}", web)
        yield from ("--build-arg", f"{k}={v}")


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[str]]]:
    """One imagefs store and one buildah storage for the module: each pulls the base once."""
    tmp = tmp_path_factory.mktemp("stores")
    buildah = ["--root", str(tmp / "bh-root"), "--runroot", str(tmp / "bh-run"),
               "--storage-driver", "vfs"]  # fmt: skip
    yield tmp / "imagefs", buildah
    subprocess.run(["buildah", *buildah, "rmi", "--all", "--force"], capture_output=True)
    shutil.rmtree(tmp / "bh-root", ignore_errors=True)


def build_with_imagefs(
    root: Path, tmp: Path, ctx: Path, case: Case, args: list[str], registry: LocalRegistry
) -> tuple[Path, dict[str, object]]:
    ref = f"{registry.host}/built/imagefs:{tmp.name}"
    extra = ["--target", case.target] if case.target else []
    proc = _imagefs(root, "build", "-t", ref, *args, *extra, str(ctx))
    assert proc.returncode == 0, proc.stderr
    assert _imagefs(root, "push", ref).returncode == 0
    assert str(root) not in Path("/proc/self/mountinfo").read_text()  # nothing left mounted
    layout = tmp / "imagefs-layout"
    skopeo_copy(f"docker://{ref}", f"oci:{layout}:img", ["--src-tls-verify=false"])
    image = LayoutImage(layout, "img")
    return umoci_unpack(image, tmp / "imagefs-bundle"), image.config()["config"]


def build_with_buildah(
    store: list[str], tmp: Path, ctx: Path, case: Case, args: list[str]
) -> tuple[Path, dict[str, object]]:
    extra = ["--target", case.target] if case.target else []
    proc = subprocess.run(
        ["buildah", *store, "bud", "--isolation", "chroot", "--format", "docker",
         "--tls-verify=false", "--layers=false", "-t", "localhost/ref:1",
         *args, *extra, str(ctx)],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    layout = tmp / "buildah-layout"
    proc = subprocess.run(
        ["buildah", *store, "push", "localhost/ref:1", f"oci:{layout}:img"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    image = LayoutImage(layout, "img")
    # The docker-format config (an OCI push drops Healthcheck, Shell and OnBuild).
    inspect = subprocess.run(
        ["buildah", *store, "inspect", "--type", "image", "localhost/ref:1"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    config = json.loads(inspect.stdout)["Docker"]["config"]
    subprocess.run(["buildah", *store, "rmi", "localhost/ref:1"], capture_output=True)
    return umoci_unpack(image, tmp / "buildah-bundle"), config


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_build_matches_buildah(
    name: str,
    base: PushedImage,
    registry: LocalRegistry,
    stores: tuple[Path, list[str]],
    web: str,
    tmp_path: Path,
) -> None:
    case = CORPUS[name]
    ctx = _context(tmp_path, case)
    args = list(_build_args(case, base, web))
    ours, our_config = build_with_imagefs(stores[0], tmp_path, ctx, case, args, registry)
    theirs, their_config = build_with_buildah(stores[1], tmp_path, ctx, case, args)
    mine = treecmp.listing(ours, FIELDS)
    have = {e.path for e in mine}
    reference = [
        e for e in treecmp.listing(theirs, FIELDS)
        if not (e.path in BUILDAH_MOUNTPOINTS and e.path not in have and _empty(theirs, e.path))
    ]  # fmt: skip
    differences = treecmp.diff(mine, reference)
    assert differences == [], "\n".join(differences)
    labels = dict(their_config.get("Labels") or {})  # type: ignore[call-overload]
    labels.pop("io.buildah.version", None)
    their_config["Labels"] = labels or None
    for key in CONFIG_KEYS:
        # docker's config writes empty values ("", [], null) where OCI leaves keys out.
        assert (our_config.get(key) or None) == (their_config.get(key) or None), key
