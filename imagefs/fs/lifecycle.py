"""Mount lifecycle: start a mount daemon, know which mounts are alive, unmount.

`imagefs mount` (without `-f`) starts `python -m imagefs mount -f ...` as a detached child in
its own session — a fresh process rather than a fork, because forking a process that already
ran trio and its worker threads is asking for trouble — and waits on a pipe until the child
says the mount answers (or says why it failed, which the parent prints). That is how sshfs
behaves: the command returns when the mount is usable, and a startup error is not lost in a
log.

Each live daemon keeps `ROOT/mounts/<id>.json` locked with flock; a record whose lock is free
belongs to a dead daemon and is ignored and removed (see `Store.active_mounts`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from imagefs.errors import ImageFSError, ImageInUse, NotFound, UsageError
from imagefs.store import MountRecord, Store


@dataclass(frozen=True)
class MountOptions:
    allow_other: bool = False
    suid: bool = False
    dev: bool = False

    @classmethod
    def parse(cls, values: list[str]) -> MountOptions:
        """`-o` values, comma separated, as mount(8) takes them."""
        allow_other = suid = dev = False
        for value in values:
            for opt in filter(None, (o.strip() for o in value.split(","))):
                if opt == "allow_other":
                    allow_other = True
                elif opt in ("suid", "nosuid"):
                    suid = opt == "suid"
                elif opt in ("dev", "nodev"):
                    dev = opt == "dev"
                elif opt in ("ro", "default_permissions"):
                    pass  # always so
                elif opt == "rw":
                    raise UsageError("imagefs mounts are read-only: -o rw is not possible")
                else:
                    raise UsageError(
                        f"unknown mount option {opt!r} (known: allow_other, "
                        "suid, nosuid, dev, nodev, ro)"
                    )
        return cls(allow_other, suid, dev)

    def as_list(self) -> list[str]:
        return [",".join(o for o in self.fuse_options() if o != "default_permissions")]

    def fuse_options(self) -> set[str]:
        opts = {"ro", "default_permissions", "fsname=imagefs", "subtype=imagefs"}
        opts.add("suid" if self.suid else "nosuid")
        opts.add("dev" if self.dev else "nodev")
        if self.allow_other:
            opts.add("allow_other")
        return opts


READY = b"READY\n"
STARTUP_TIMEOUT = 120.0


def mount_id(mountpoint: Path) -> str:
    return hashlib.sha256(str(mountpoint).encode()).hexdigest()[:16]


def control_socket(store: Store, mountpoint: Path) -> Path:
    """Where a mount answers `imagefs stats`: beside its record, never inside the tree."""
    return store.mounts_dir / f"{mount_id(mountpoint)}.sock"


class MountRegistration:
    """The daemon's record in ROOT/mounts, locked for as long as the daemon lives."""

    def __init__(self, store: Store, record: MountRecord) -> None:
        self.path = store.mounts_dir / f"{mount_id(Path(record.mountpoint))}.json"
        store.mounts_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)  # locked before it becomes visible under its name
        os.write(fd, json.dumps(dataclasses.asdict(record)).encode())
        os.replace(tmp, self.path)
        self._fd = fd

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)


def check_mountpoint(mountpoint: Path, store: Store) -> None:
    if not mountpoint.is_dir():
        raise UsageError(f"mountpoint {mountpoint} is not a directory")
    for m in store.active_mounts():
        if Path(m.mountpoint) == mountpoint:
            raise ImageInUse(f"{mountpoint} is already an imagefs mount of {m.image} (pid {m.pid})")
    if os.path.ismount(mountpoint):
        raise ImageInUse(f"{mountpoint} is already a mountpoint")


def spawn_daemon(argv: Sequence[str], log_path: Path, mountpoint: Path) -> int:
    """Start the foreground mount in a detached child; return its pid once the mount answers."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    r, w = os.pipe()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "imagefs", *argv, "--ready-fd", str(w)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=(w,),
            start_new_session=True,
            close_fds=True,
        )
    os.close(w)
    message = b""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    try:
        while not message.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                raise ImageFSError(
                    f"mount did not come up within {STARTUP_TIMEOUT:.0f}s; see {log_path}"
                )
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            chunk = os.read(r, 4096)
            if not chunk:
                break
            message += chunk
    finally:
        os.close(r)
    if message == READY:
        os.statvfs(mountpoint)  # answers only once the daemon serves requests; needs no layer
        return proc.pid
    proc.wait(timeout=10)
    text = message.decode(errors="replace").strip()
    if text.startswith("ERROR "):
        code, _, msg = text[6:].partition(" ")
        err = ImageFSError(msg)
        err.exit_code = int(code) if code.isdigit() else 1
        raise err
    tail = _log_tail(log_path)
    raise ImageFSError(f"mount daemon exited with status {proc.returncode}: {tail}")


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return lines[-1] if lines else f"(empty log {path})"


def report_ready(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.write(fd, READY)
            os.close(fd)


def report_error(fd: int | None, err: ImageFSError) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            line = str(err).replace("\n", " ")
            os.write(fd, f"ERROR {err.exit_code} {line}\n".encode())
            os.close(fd)


def unmount(mountpoint: Path, store: Store, *, wait: float = 10.0) -> MountRecord | None:
    """`fusermount3 -u`; says so when the mount is busy; waits for the daemon to exit."""
    mountpoint = mountpoint.absolute()
    record = next((m for m in store.active_mounts() if Path(m.mountpoint) == mountpoint), None)
    if record is None and not os.path.ismount(mountpoint):
        raise NotFound(f"{mountpoint} is not mounted")
    tool = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"
    proc = subprocess.run([tool, "-u", str(mountpoint)], capture_output=True, text=True)
    if proc.returncode != 0:
        err = proc.stderr.strip()
        if "busy" in err.lower():
            raise ImageInUse(
                f"{mountpoint} is busy (a process has a file or directory open "
                "there); close it, or use `umount -l`"
            )
        raise ImageFSError(f"unmounting {mountpoint}: {err or 'fusermount3 failed'}")
    if record is not None:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _alive(record.pid):
            time.sleep(0.02)
    return record


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still "exists"; treat it as gone.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True
