"""Where a step runs: a kernel overlay of the image, and RUN commands under `runc`.

The root filesystem of a step is an overlayfs mount: lower = the earlier steps' upper
directories (newest first) over the imagefs FUSE mount of the base image (or an empty
directory for `scratch`), upper = a fresh directory that becomes the step's layer. The overlay
is mounted with `redirect_dir=off,metacopy=off,index=off` so the upper directory is always a
complete, self-contained diff (no metadata-only copy-ups, no renamed-directory redirects).

RUN runs under Debian's `runc` with a runtime spec generated here: new mount, pid, ipc and uts
namespaces (and network with `--network none`), /proc, a minimal /dev, read-only /sys, the
host's resolv.conf and hosts bind-mounted read-only, docker's default capabilities, no
`no_new_privs` (RUN may use setuid binaries), the stage's env, user and workdir.
Why runc and not crun: Debian 12's crun 1.8 refuses to start on hosts with cgroups in hybrid
mode ("cgroups in hybrid mode not supported"), which is what this project's machines have;
runc 1.1 runs there. Both take the same spec, so switching back is one word (`RUNTIME`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from imagefs.build.rootfs import resolve
from imagefs.errors import BuildError

RUNTIME = "runc"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
OVERLAY_OPTIONS = "redirect_dir=off,metacopy=off,index=off,xino=off"
# docker's default capability set for containers (and so for RUN).
CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]  # fmt: skip
HOST_FILES = ("/etc/resolv.conf", "/etc/hosts")


def require_tools() -> None:
    for tool in (RUNTIME, "mount", "umount"):
        if shutil.which(tool) is None:
            raise BuildError(f"imagefs build needs `{tool}` (Debian package {tool}), not found")


# -- overlay ------------------------------------------------------------------------------------


def _check_path(path: Path) -> str:
    text = str(path)
    if any(c in text for c in ":,\n\\"):
        raise BuildError(f"overlayfs cannot take the path {text!r} (it has ':', ',' or '\\')")
    return text


def mount_overlay(lowers: Sequence[Path], upper: Path, work: Path, merged: Path) -> None:
    """Mount overlayfs at `merged`: `lowers` (topmost first) under `upper`."""
    opts = (
        f"lowerdir={':'.join(_check_path(p) for p in lowers)},"
        f"upperdir={_check_path(upper)},workdir={_check_path(work)},{OVERLAY_OPTIONS}"
    )
    for d in (upper, work, merged):
        d.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise BuildError(f"mounting the overlay at {merged}: {proc.stderr.strip()}")


def unmount(path: Path) -> None:
    """Unmount `path` if it is a mount point; lazily if it is busy, so nothing stays."""
    if not os.path.ismount(path):
        return
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.asynccontextmanager
async def overlay(
    lowers: Sequence[Path], upper: Path, work: Path, merged: Path
) -> AsyncIterator[Path]:
    await trio.to_thread.run_sync(mount_overlay, lowers, upper, work, merged)
    try:
        yield merged
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(unmount, merged)
            # The work dir holds overlay's scratch (whiteout inodes): not part of the layer.
            await trio.to_thread.run_sync(shutil.rmtree, work, True)


# -- the runtime spec ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Process:
    args: list[str]
    env: list[str]
    uid: int = 0
    gid: int = 0
    groups: tuple[int, ...] = ()
    cwd: str = "/"


def runtime_spec(rootfs: Path, process: Process, *, network: str = "host") -> dict[str, Any]:
    """PURE. The OCI runtime spec (config.json) for one RUN."""
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if network == "none":
        namespaces.append({"type": "network"})
    caps = list(CAPABILITIES) if process.uid == 0 else []
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
    ]  # fmt: skip
    if network != "none":
        # sysfs can only be mounted in a new network namespace; share the host's read-only.
        mounts[-1] = {"destination": "/sys", "type": "bind", "source": "/sys",
                      "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]}  # fmt: skip
    for host_file in HOST_FILES:
        if os.path.exists(host_file):
            mounts.append(
                {"destination": host_file, "type": "bind", "source": host_file,
                 "options": ["rbind", "ro"]}
            )  # fmt: skip
    return {
        "ociVersion": "1.0.2",
        "root": {"path": str(rootfs), "readonly": False},
        "hostname": "imagefs",
        "process": {
            "terminal": False,
            "user": {
                "uid": process.uid,
                "gid": process.gid,
                "additionalGids": list(process.groups),
            },
            "args": process.args,
            "env": process.env,
            "cwd": process.cwd,
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "noNewPrivileges": False,
        },
        "mounts": mounts,
        "linux": {
            "namespaces": namespaces,
            "maskedPaths": [
                "/proc/acpi",
                "/proc/kcore",
                "/proc/keys",
                "/proc/latency_stats",
                "/proc/timer_list",
                "/proc/sched_debug",
                "/sys/firmware",
            ],
            "readonlyPaths": [
                "/proc/bus",
                "/proc/fs",
                "/proc/irq",
                "/proc/sys",
                "/proc/sysrq-trigger",
            ],
        },
    }


def mount_destinations(spec: dict[str, Any]) -> list[str]:
    return [m["destination"] for m in spec["mounts"]]


@dataclass(frozen=True)
class RunResult:
    exit_code: int
    tail: list[str]


async def run(
    bundle: Path,
    spec: dict[str, Any],
    on_line: Callable[[str], None],
    *,
    tail_lines: int = 10,
) -> RunResult:
    """Run the spec'd process to its end; every output line goes to `on_line`.

    Cancelled (Ctrl-C, SIGTERM): the container is killed and deleted before this returns, so
    no process or namespace outlives the build.
    """
    bundle.mkdir(parents=True, exist_ok=True)
    (bundle / "config.json").write_text(json.dumps(spec))
    cid = f"imagefs-build-{uuid.uuid4().hex[:12]}"
    tail: deque[str] = deque(maxlen=tail_lines)
    proc = await trio.lowlevel.open_process(
        [RUNTIME, "run", "--bundle", str(bundle), cid],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # our Ctrl-C reaches us; we stop the container ourselves
    )
    try:
        assert proc.stdout is not None
        pending = b""
        while True:
            chunk = await proc.stdout.receive_some(65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                tail.append(line)
                on_line(line)
            if len(pending) > 65536:  # a very long line: show it in pieces, bounded memory
                line = pending.decode(errors="replace")
                tail.append(line)
                on_line(line)
                pending = b""
        if pending:
            line = pending.decode(errors="replace")
            tail.append(line)
            on_line(line)
        code = await proc.wait()
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                await trio.to_thread.run_sync(_delete_container, cid)
                with trio.move_on_after(10):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            else:
                await trio.to_thread.run_sync(_delete_container, cid)
    return RunResult(code, list(tail))


def _delete_container(cid: str) -> None:
    subprocess.run([RUNTIME, "delete", "--force", cid], capture_output=True)


def mount_ro(lowers: str, merged: Path) -> None:
    proc = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lowers}", str(merged)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise BuildError(f"mounting a stage read-only at {merged}: {proc.stderr.strip()}")


def missing_mountpoints(root: Path, paths: Sequence[str]) -> list[str]:
    """Mount destinations (and their parents) that do not exist yet: runc will create them."""
    out: list[str] = []
    for path in paths:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            sub = "/" + "/".join(parts[:i])
            if sub not in out and not os.path.lexists(resolve(root, sub)):
                out.append(sub)
    return out


def remove_mountpoints(root: Path, created: Sequence[str]) -> None:
    """Take back the empty mount points runc made, so they are not part of the layer."""
    for path in sorted(created, key=lambda p: -p.count("/")):
        # resolved inside the rootfs: `root / path` would follow an image's `/etc -> /host`
        # link out to the host and delete a file there
        target = resolve(root, path, follow_last=False)
        with contextlib.suppress(OSError):
            if target.is_dir() and not target.is_symlink():
                target.rmdir()  # only if empty
            elif target.is_file() and target.stat().st_size == 0:
                target.unlink()
