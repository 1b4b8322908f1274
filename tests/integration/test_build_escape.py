"""A base image's symlinks point into the image, never at the host (`/etc -> /victim`)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from imagefs.testing.buildbase import populate
from imagefs.testing.images import build_umoci_image, push
from imagefs.testing.mounts import imagefs
from imagefs.testing.registry import LocalRegistry
from tests.integration.test_build import _clean, _ctx

pytestmark = [pytest.mark.fuse, pytest.mark.registry]


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A host directory the image's links point at: a user the image does not know, an empty
    `hosts` (an unguarded clean-up of runc's mount point would delete it)."""
    victim = tmp_path_factory.mktemp("victim")
    (victim / "passwd").write_text("hostonly:x:4242:4242::/:/bin/sh\n")
    (victim / "hosts").write_text("")
    return victim


@pytest.fixture(scope="module")
def evil(registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory, victim: Path) -> str:
    """An image whose /esc, /esc2 and /etc lead (absolutely, by `..`) to `victim` on the host."""
    up = "../" * 40 + str(victim).lstrip("/")

    def links(rootfs: Path) -> None:
        shutil.rmtree(rootfs / "etc")
        os.symlink(up, rootfs / "etc")
        os.symlink(str(victim), rootfs / "esc")
        os.symlink(up, rootfs / "esc2")

    layout = tmp_path_factory.mktemp("evilbase") / "layout"
    image = build_umoci_image(layout, [populate, links], tag="evil", cmd=("/bin/sh",))
    return push(image, registry, "build/evil:1").ref


@pytest.mark.parametrize(
    "steps",
    [
        "COPY f /esc/\n",
        "COPY f /esc2/f\n",
        "COPY f /etc/hosts\n",
        "WORKDIR /esc/w\nRUN true\n",
        "WORKDIR /esc2/w\n",
        "ADD a.tar /esc/\n",
        "ADD a.tar /esc2/\n",
        "USER hostonly\nRUN true\n",
        "USER app\nRUN true\n",
        "RUN echo x > /f\n",  # runc's /etc/hosts mount point lies behind the /etc link
    ],
)
def test_symlinks_in_the_base_never_reach_the_host(
    evil: str, victim: Path, tmp_path: Path, steps: str
) -> None:
    root = tmp_path / "store"
    (victim / "hosts").write_text("")  # each case on its own, whatever ran before
    before = sorted((p.name, p.stat().st_size) for p in victim.iterdir())
    ctx = _ctx(tmp_path, f"FROM {evil}\n" + steps, f="file\n")
    (ctx / "m").write_text("member\n")
    subprocess.run(["tar", "-cf", str(ctx / "a.tar"), "-C", str(ctx), "m"], check=True)
    proc = imagefs(root, "build", "-t", "out:1", str(ctx), check=False)
    assert sorted((p.name, p.stat().st_size) for p in victim.iterdir()) == before
    assert "Traceback" not in proc.stderr
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("imagefs: "), proc.stderr
        assert "hostonly" not in steps or "unable to find user hostonly" in last, last
    else:
        assert "hostonly" not in steps, "the host's passwd was read"
    _clean(root)
