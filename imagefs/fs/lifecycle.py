"""Mount lifecycle: start a mount daemon, know which mounts are alive, unmount.

`imagefs mount` (without `-f`) forks itself: the child detaches (its own session, stdin
/dev/null, stdout and stderr the mount's log) and runs the foreground mount, and the parent
waits on a pipe until the child says the mount answers (or says why it failed, which the
parent prints). A fork, not a fresh `python -m imagefs mount -f`: the launcher has imported
only the light command line and started no thread, so forking it is safe, and it saves the
second interpreter start and command-line import (~0.1 s quiet, far more under load).
Callers that already run trio and worker threads (`profile record`, a build's base images)
must not fork: `spawn_daemon` starts a fresh interpreter for them. That is how sshfs
behaves: the command returns when the mount is usable, and a startup error is not lost in a
log.

Each live daemon keeps `ROOT/mounts/<id>.json` locked with flock; a record whose lock is free
belongs to a dead daemon and is ignored and removed (see `Store.active_mounts`).

A daemon killed with `kill -9` leaves a dead FUSE mount behind (every access: ENOTCONN).
`umount DIR` and `mount ... DIR` recognise it — the kernel's mount table says `fuse.imagefs`
there, and either the access fails with ENOTCONN or only a dead daemon's record names it —
and clear it with `fusermount3 -u` (lazily, `-z`, if something still holds it open). Whether
a directory holds an imagefs mount is decided by `/proc/self/mountinfo` (see `mountinfo`):
`umount` refuses a tmpfs, `/proc` or anything else imagefs did not mount.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from imagefs.errors import ImageFSError, ImageInUse, NotFound, UsageError
from imagefs.fs import mountinfo
from imagefs.store import Layout, MountRecord, Store, fsutil


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
    return store.paths.control_socket(mount_id(mountpoint))


class MountRegistration:
    """The daemon's record in ROOT/mounts, locked for as long as the daemon lives."""

    def __init__(self, store: Store, record: MountRecord) -> None:
        self.root = store.root
        self.path = store.paths.mount_record(mount_id(Path(record.mountpoint)))
        with fsutil.dir_fd(store.mounts_dir, root=store.root, create=True) as d:
            # A fresh temp name (O_EXCL, no link followed), locked before it becomes
            # visible under its name, then renamed over whatever sat there.
            fd, tmp = fsutil.create_temp(d)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.write(fd, json.dumps(dataclasses.asdict(record)).encode())
                os.replace(tmp, self.path.name, src_dir_fd=d, dst_dir_fd=d)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=d)
                raise
        self._fd = fd

    def close(self) -> None:
        with contextlib.suppress(ImageFSError):
            fsutil.safe_unlink(self.path, root=self.root)
        os.close(self._fd)


def _stat_error(path: Path) -> int | None:
    """The errno of statvfs(path), or None when it answers. statvfs, not stat: the kernel
    answers stat from its attribute cache (a day, for an immutable image) even when the
    daemon is gone; statfs always asks the daemon."""
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno
    return None


def _kernel_mount(path: Path) -> mountinfo.MountInfo | None:
    return mountinfo.mount_at(mountinfo.read_mounts(), os.path.realpath(path))


def _is_dead(path: Path, store: Store) -> bool:
    """An imagefs mount at `path` whose daemon is gone: ENOTCONN, or only dead records."""
    if _stat_error(path) == errno.ENOTCONN:
        return True
    records = [(m, alive) for m, alive in store.mount_records() if Path(m.mountpoint) == path]
    return bool(records) and not any(alive for _, alive in records)


def _fusermount(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"
    return subprocess.run([tool, *args], capture_output=True, text=True)


def clear_dead_mount(path: Path) -> None:
    """Unmount a dead imagefs mount: `fusermount3 -u`, or `-u -z` when something (a shell's
    cwd) still holds it — lazily detaching a mount that cannot serve anything loses nothing."""
    if _fusermount("-u", str(path)).returncode == 0:
        return
    proc = _fusermount("-u", "-z", str(path))
    if proc.returncode != 0:
        raise ImageFSError(
            f"cannot clear the dead imagefs mount at {path}: "
            f"{proc.stderr.strip() or 'fusermount3 failed'}"
        )


def check_mountpoint(mountpoint: Path, store: Store) -> list[str]:
    """Refuse a mountpoint that cannot take a mount; returns warnings to show the user.

    A dead imagefs mount left by a killed daemon is cleared first (and says so)."""
    notes: list[str] = []
    kernel = _kernel_mount(mountpoint)
    if kernel is not None:
        if not kernel.is_imagefs:
            raise ImageInUse(f"{mountpoint} is already a mountpoint ({kernel.fstype})")
        if not _is_dead(mountpoint, store):
            owner = next(
                (m for m in store.active_mounts() if Path(m.mountpoint) == mountpoint), None
            )
            what = f" of {owner.image} (pid {owner.pid})" if owner else ""
            raise ImageInUse(f"{mountpoint} is already an imagefs mount{what}")
        clear_dead_mount(mountpoint)
        notes.append(f"cleared the dead imagefs mount left at {mountpoint} by a killed daemon")
    if not os.path.lexists(mountpoint):
        raise UsageError(f"mountpoint {mountpoint} does not exist")
    if not mountpoint.is_dir():
        raise UsageError(f"mountpoint {mountpoint} is not a directory")
    try:
        with os.scandir(mountpoint) as it:
            nonempty = next(it, None) is not None
    except OSError as exc:
        raise ImageFSError(f"mountpoint {mountpoint}: {exc.strerror}") from None
    if nonempty:
        notes.append(
            f"{mountpoint} is not empty: the mount hides its contents until it is unmounted"
        )
    return notes


def log_path_for(root: Path, mountpoint: Path) -> Path:
    return Layout(root).mount_log(mount_id(mountpoint))


def open_log(root: Path, log_path: Path) -> int:
    """The mount's log for appending, under the store: never through a planted link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    try:
        return fsutil.safe_open(log_path.parent, log_path.name, flags, root=root)
    except OSError as exc:
        raise fsutil.os_error(exc, log_path, "opening") from exc


def spawn_daemon(
    argv: Sequence[str], log_path: Path, mountpoint: Path, root: Path | None = None
) -> int:
    """Start `python -m imagefs ARGV` (a foreground mount) as a detached child; return its
    pid once the mount answers. A fresh interpreter: for callers that already run trio and
    its worker threads (`profile record`, a build's base images), which must not fork.
    `root` (default: ROOT of `ROOT/logs/<log>`) is where the log is reached without links."""

    def start(log: int, w: int) -> _Child:
        proc = _popen_daemon(argv, log, w)
        return _Child(proc.pid, proc)

    return _start_daemon(start, log_path, mountpoint, root)


def fork_daemon(
    serve: Callable[[int], int],
    log_path: Path,
    mountpoint: Path,
    root: Path | None = None,
    *,
    preforked: tuple[int, Callable[[int, int], bool]] | None = None,
) -> int:
    """`spawn_daemon` for the `imagefs mount` launcher: the daemon is this process forked,
    and runs `serve(ready_fd)` (its exit status) — no second interpreter start and no second
    import of the command line (a third of a cold mount's start-up). Only from a process
    that has no threads and has not imported trio: the launcher, which stays light for it.

    `preforked`: a child forked earlier (`imagefs.cli.prefork`), its pid and how to hand it
    the log and the ready pipe's write end (False: it cannot take them: this one forks)."""

    def start(log: int, w: int) -> _Child:
        if preforked is not None:
            pid, hand_over = preforked
            if hand_over(log, w):
                return _Child(pid)
        for stream in (sys.stdout, sys.stderr):  # or the child writes them a second time
            stream.flush()
        pid = os.fork()
        if pid == 0:
            run_daemon(serve, log, w)
        return _Child(pid)

    return _start_daemon(start, log_path, mountpoint, root)


def run_daemon(serve: Callable[[int], int], log: int, w: int) -> NoReturn:
    """The forked daemon: detached as `Popen(start_new_session=True, stdin=DEVNULL,
    stdout=log, stderr=log, close_fds=True, pass_fds=(w,))` would leave it; never returns."""
    code = 1
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        # Nothing the launcher inherited stays open (a caller's pipe would never see EOF);
        # the launcher holds no Python file object above fd 2 at this point.
        os.closerange(3, w)
        os.closerange(w + 1, os.sysconf("SC_OPEN_MAX"))
        code = serve(w)
    except BaseException:
        traceback.print_exc()  # a bug (serve reports errors itself): the log says where
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


class _Child:
    """The daemon process as the launcher waits on it (a fork or a Popen child)."""

    def __init__(self, pid: int, popen: object = None) -> None:
        self.pid = pid
        self._popen = popen  # held: a dropped Popen may reap the child behind our back

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float) -> int | None:
        """Its exit status (negative: the signal), None if it still runs after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return None
            if pid:
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.01)


def _start_daemon(
    start: Callable[[int, int], _Child],
    log_path: Path,
    mountpoint: Path,
    root: Path | None,
) -> int:
    """Start the daemon with `start(log, w)`, wait on the pipe until it says READY (the
    mount answers) or ERROR <code> <message> (raised here), or dies."""
    root = log_path.parent.parent if root is None else root
    log = open_log(root, log_path)
    r, w = os.pipe()
    try:
        proc = start(log, w)
    except OSError as exc:
        os.close(r)
        raise ImageFSError(
            f"cannot start the mount daemon {sys.executable}: {exc.strerror or exc}"
        ) from None
    finally:
        os.close(log)
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
    status = proc.wait(timeout=10)
    text = message.decode(errors="replace").strip()
    if text.startswith("ERROR "):
        code, _, msg = text[6:].partition(" ")
        err = ImageFSError(msg)
        err.exit_code = int(code) if code.isdigit() else 1
        raise err
    tail = _log_tail(root, log_path)
    raise ImageFSError(f"mount daemon exited with status {status}: {tail} (log: {log_path})")


def _popen_daemon(argv: Sequence[str], log: int, w: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "imagefs", *argv, "--ready-fd", str(w)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        pass_fds=(w,),
        start_new_session=True,
        close_fds=True,
    )


def _log_tail(root: Path, path: Path) -> str:
    try:
        fd = fsutil.safe_open(path.parent, path.name, os.O_RDONLY, root=root)
        with os.fdopen(fd, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except (OSError, ImageFSError):
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


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
    """Unmount the imagefs mount at `mountpoint` (a dead one too); refuse anything else.

    `fusermount3 -u`; says so when the mount is busy; waits for the daemon to exit.
    """
    mountpoint = mountpoint.absolute()
    kernel = _kernel_mount(mountpoint)
    if kernel is None:
        raise NotFound(f"{mountpoint} is not mounted")
    if not kernel.is_imagefs:
        raise NotFound(
            f"{mountpoint} is not an imagefs mount (it is {kernel.fstype} from "
            f"{kernel.source}); not unmounting it"
        )
    record = next((m for m in store.active_mounts() if Path(m.mountpoint) == mountpoint), None)
    if record is None and _is_dead(mountpoint, store):
        clear_dead_mount(mountpoint)
        store.active_mounts()  # drops the dead daemon's record
        return None
    proc = _fusermount("-u", str(mountpoint))
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
