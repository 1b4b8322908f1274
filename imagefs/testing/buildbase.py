"""A small base image for build tests, made from files on this machine (no network).

busybox-static gives a shell and the usual tools; `setfattr` (Debian `attr`) with the
libraries it needs lets a RUN set xattrs; /etc/passwd and /etc/group name a user and a group
for USER and --chown. Built by umoci, so imagefs did not write its own base.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from imagefs.testing.images import LayoutImage, build_umoci_image
from imagefs.testing.registry import require_binary

APPLETS = [
    "sh",
    "ash",
    "cat",
    "chmod",
    "chown",
    "cp",
    "echo",
    "env",
    "id",
    "ln",
    "ls",
    "mkdir",
    "mkfifo",
    "mknod",
    "mv",
    "rm",
    "rmdir",
    "sed",
    "sleep",
    "stat",
    "tar",
    "test",
    "touch",
    "true",
    "false",
    "printf",
    "wc",
    "head",
    "sort",
    "find",
    "xargs",
]


def _with_libraries(rootfs: Path, binary: str) -> None:
    dest = rootfs / binary.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(binary, dest)
    out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
    for line in out.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/") and os.path.exists(path):
            lib = rootfs / path.lstrip("/")
            lib.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(path), lib)


def populate(rootfs: Path) -> None:
    busybox = require_binary("busybox")
    (rootfs / "bin").mkdir(exist_ok=True)
    shutil.copy2(busybox, rootfs / "bin" / "busybox")
    for applet in APPLETS:
        os.symlink("busybox", rootfs / "bin" / applet)
    setfattr = shutil.which("setfattr")
    if setfattr:
        _with_libraries(rootfs, setfattr)
    etc = rootfs / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"
    )
    (etc / "group").write_text("root:x:0:\napp:x:1000:\nstaff:x:50:app\n")
    for d in ("tmp", "root", "var/lib/data", "usr/share/doc/base"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    os.chmod(rootfs / "tmp", 0o1777)
    (rootfs / "usr/share/doc/base/README").write_text("base image\n")
    (rootfs / "var/lib/data/a").write_text("a\n")
    (rootfs / "var/lib/data/b").write_text("b\n")
    (rootfs / "etc/motd").write_text("hello\n")


def build_base(layout: Path, tag: str = "base") -> LayoutImage:
    return build_umoci_image(
        layout,
        [populate],
        tag=tag,
        env=("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",),
        cmd=("/bin/sh",),
    )
