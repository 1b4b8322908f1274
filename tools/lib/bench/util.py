"""Small helpers shared by the bench modules: processes, caches, mounts, /proc."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


class BenchError(Exception):
    """Something the bench needs went wrong (a tool failed, a mount did not come up)."""


def log(message: str) -> None:
    """Progress goes to stderr so stdout carries only the final table."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(
    args: Sequence[str],
    *,
    cwd: Path | None = None,
    timeout: float = 3600,
    env: dict[str, str] | None = None,
) -> str:
    """Run a command, return its stdout; BenchError with its stderr when it fails."""
    proc = subprocess.run(
        list(args),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def timed_run(args: Sequence[str], **kwargs: object) -> float:
    """Seconds `run(args)` took."""
    start = time.perf_counter()
    run(args, **kwargs)  # type: ignore[arg-type]
    return time.perf_counter() - start


def drop_caches() -> bool:
    """Write back and drop the kernel page, dentry and inode caches (root only)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def vm_hwm_mb(pid: int) -> float | None:
    """Peak resident set size (VmHWM) of a live process, in MB (10^6 bytes)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    return None


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a live process so far (all its threads), or None."""
    if pid is None:
        return None
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return None


def wait_for_mount(path: Path, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll until `path` is a mountpoint that answers a stat; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if os.path.ismount(path):
            os.stat(path)
            return
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{proc.args!r} exited {proc.returncode} before mounting {path}")
        if time.monotonic() > deadline:
            raise BenchError(f"{path} was not mounted within {timeout:.0f}s")
        time.sleep(0.005)


def force_unmount(path: Path) -> None:
    """Lazy FUSE unmount, for clean-up paths only."""
    if os.path.ismount(path):
        tool = shutil.which("fusermount3") or "fusermount3"
        subprocess.run([tool, "-u", "-z", str(path)], capture_output=True, check=False)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """Wait for a process we started to exit; terminate, then kill it if it does not."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def mounts_under(path: Path) -> list[str]:
    """Mountpoints (from /proc/self/mounts) at or below `path`."""
    prefix = str(path.resolve())
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point = line.split()[1].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return found


def remove_tree(path: Path) -> None:
    """rm -rf that refuses to descend into a mountpoint still mounted."""
    if not path.exists():
        return
    busy = mounts_under(path)
    if busy:
        raise BenchError(f"refusing to remove {path}: {', '.join(busy)} still mounted")
    shutil.rmtree(path)


def preload(*paths: Path) -> int:
    """Read every regular file under `paths` once, so it sits in the page cache; bytes read."""
    total = 0
    for top in paths:
        if top.is_file():
            total += len(top.read_bytes())
            continue
        for dirpath, _, filenames in os.walk(top):
            for name in filenames:
                path = os.path.join(dirpath, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    with open(path, "rb", buffering=0) as f:
                        while chunk := f.read(1 << 20):
                            total += len(chunk)
    return total
