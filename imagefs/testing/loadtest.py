"""`tools/loadtest`: many readers on live mounts while other commands churn the same root.

Everything runs on this machine: a throwaway docker-registry on 127.0.0.1, images built with
umoci (two share their base layer; one is published with an imagefs index, one is plain
gzip), three mounts (two of one image), and for `--duration` seconds:

* `--readers` reader threads: most `cat` random files and compare their sha256 with the file
  as built; some run `find` over a mount, some `grep -r`;
* one churn loop on the same root: pull / mount / read / umount / rmi / prune of a third image,
  plus `rmi` of a mounted image (must be refused);
* a sampler of each mount daemon's RSS.

It fails (exit 1) on any content mismatch, any read error, an operation stuck for longer than
`--stall`, an image lost from `imagefs images`, `imagefs check` finding damage, or daemon RSS
growing by more than `--rss-growth` MiB after the warm-up. The numbers are printed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from imagefs.testing.images import build_umoci_image, layout_add_tar_layer, push
from imagefs.testing.registry import LocalRegistry


def _imagefs(root: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imagefs", "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _content(seed: int, files: int) -> dict[str, bytes]:
    rnd = random.Random(seed)
    out: dict[str, bytes] = {}
    for k in range(files):
        size = rnd.choice([100, 3000, 20_000, 70_000, 300_000])
        text = f"needle-{k % 7} line {k}\n".encode()
        out[f"d{k % 20:02d}/f{seed}-{k:04d}.txt"] = text + rnd.randbytes(size)
    out[f"big/blob{seed}.bin"] = rnd.randbytes(6 << 20)
    return out


def _writer(files: dict[str, bytes]) -> Callable[[Path], None]:
    def write(rootfs: Path) -> None:
        for rel, data in files.items():
            path = rootfs / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

    return write


@dataclass
class Stats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    ops: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    bytes_read: int = 0
    busy_since: dict[int, tuple[float, str]] = field(default_factory=dict)
    rss: dict[int, list[tuple[float, int]]] = field(default_factory=dict)

    def op(self, kind: str, n: int = 0) -> None:
        with self.lock:
            self.ops[kind] += 1
            self.bytes_read += n

    def error(self, text: str) -> None:
        with self.lock:
            if len(self.errors) < 50:
                self.errors.append(text)


def _rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def run(
    duration: float,
    readers: int,
    workdir: Path,
    stall: float = 60.0,
    rss_growth: float = 100.0,
    log: Callable[[str], None] = print,
) -> int:
    reg = LocalRegistry(workdir / "registry", delete_enabled=True)
    with reg:
        log(f"registry {reg.url}; building images")
        base, top_a, top_b, other = (
            _content(1, 600),
            _content(2, 150),
            _content(3, 150),
            _content(4, 100),
        )
        img_base = build_umoci_image(workdir / "layout", [_writer(base)], tag="base")
        img_a = layout_add_tar_layer(img_base, _writer(top_a), tag="a")
        img_b = layout_add_tar_layer(img_base, _writer(top_b), tag="b")
        img_c = build_umoci_image(workdir / "layout", [_writer(other)], tag="c")
        ref_a = push(img_a, reg, "load/a:v1").ref
        ref_b = push(img_b, reg, "load/b:v1").ref
        ref_c = push(img_c, reg, "load/c:v1").ref
        shared = {layer["digest"] for layer in img_a.layers()} & {
            layer["digest"] for layer in img_b.layers()
        }
        assert shared, "images a and b must share their base layer"
        root = workdir / "root"
        # published from another root, so that the mounts read by ranges into the cache
        out = _imagefs(workdir / "indexer", "index", "--push", ref_a)
        if out.returncode:
            raise RuntimeError(f"imagefs index --push: {out.stderr}")
        want = {
            "a": {**base, **top_a},
            "b": {**base, **top_b},
        }
        mounts = {"a1": ("a", ref_a), "a2": ("a", ref_a), "b1": ("b", ref_b)}
        mnt_dirs = {name: workdir / "mnt" / name for name in mounts}
        for name, (_, ref) in mounts.items():
            mnt_dirs[name].mkdir(parents=True)
            res = _imagefs(root, "mount", "--trust-published-index", ref, str(mnt_dirs[name]))
            if res.returncode:
                raise RuntimeError(f"mount {ref}: {res.stderr}")
        try:
            return _load(
                root, mounts, mnt_dirs, want, ref_c, duration, readers, stall, rss_growth, log
            )
        finally:
            for d in [*mnt_dirs.values(), workdir / "mnt" / "churn"]:
                if os.path.ismount(d) and _imagefs(root, "umount", str(d)).returncode:
                    subprocess.run(["fusermount3", "-u", "-z", str(d)], capture_output=True)


def _load(
    root: Path,
    mounts: dict[str, tuple[str, str]],
    mnt_dirs: dict[str, Path],
    want: dict[str, dict[str, bytes]],
    ref_c: str,
    duration: float,
    readers: int,
    stall: float,
    rss_growth: float,
    log: Callable[[str], None],
) -> int:
    stats = Stats()
    digests = {
        img: {rel: hashlib.sha256(data).digest() for rel, data in files.items()}
        for img, files in want.items()
    }
    pids = {
        m["Mountpoint"]: int(m["PID"])
        for m in map(json.loads, _imagefs(root, "mounts", "--format", "json").stdout.splitlines())
    }
    daemon_pids = [pids[str(d)] for d in mnt_dirs.values()]
    stop = threading.Event()
    deadline = time.monotonic() + duration
    names = list(mounts)

    def busy(what: str) -> None:
        with stats.lock:
            stats.busy_since[threading.get_ident()] = (time.monotonic(), what)

    def idle() -> None:
        with stats.lock:
            stats.busy_since.pop(threading.get_ident(), None)

    def cat_loop(seed: int) -> None:
        rnd = random.Random(seed)
        while not stop.is_set():
            name = rnd.choice(names)
            img = mounts[name][0]
            rel = rnd.choice(list(digests[img]))
            busy(f"cat {name}/{rel}")
            try:
                with open(mnt_dirs[name] / rel, "rb") as f:
                    data = f.read()
                if hashlib.sha256(data).digest() != digests[img][rel]:
                    stats.error(f"CORRUPT {name}/{rel}")
                stats.op("cat", len(data))
            except OSError as exc:
                stats.error(f"cat {name}/{rel}: {exc}")
            idle()

    def tool_loop(seed: int, kind: str) -> None:
        rnd = random.Random(seed)
        while not stop.is_set():
            name = rnd.choice(names)
            args = (
                ["find", str(mnt_dirs[name]), "-type", "f"]
                if kind == "find"
                else ["grep", "-r", "-c", f"needle-{rnd.randrange(7)}", str(mnt_dirs[name] / "d03")]
            )
            busy(" ".join(args))
            proc = subprocess.run(args, capture_output=True, text=True, timeout=stall * 2)
            if kind == "find":
                count = len(proc.stdout.splitlines())
                if proc.returncode or count != len(digests[mounts[name][0]]):
                    stats.error(f"find {name}: exit {proc.returncode}, {count} files")
            elif proc.returncode not in (0, 1):
                stats.error(f"grep {name}: exit {proc.returncode}: {proc.stderr[:200]}")
            stats.op(kind)
            idle()

    def churn_loop() -> None:
        churn_mnt = mnt_dirs["a1"].parent / "churn"
        churn_mnt.mkdir(exist_ok=True)
        cycle = 0
        while not stop.is_set():
            cycle += 1
            for step, args in (
                ("pull", ["pull", ref_c]),
                ("mount", ["mount", ref_c, str(churn_mnt)]),
                ("read", []),
                ("umount", ["umount", str(churn_mnt)]),
                ("rmi", ["rmi", ref_c]),
                ("prune", ["prune"]),
                ("rmi-mounted", ["rmi", mounts["b1"][1]]),
            ):
                if stop.is_set() and step == "pull":
                    return
                busy(f"churn {step}")
                if step == "read":
                    try:
                        sample = sorted((churn_mnt / "d00").iterdir())[:3]
                        stats.op("churn-read", sum(len(p.read_bytes()) for p in sample))
                    except OSError as exc:
                        stats.error(f"churn read: {exc}")
                    idle()
                    continue
                res = _imagefs(root, *args, timeout=stall * 2)
                if step == "rmi-mounted":
                    if res.returncode == 0:
                        stats.error("rmi of a mounted image succeeded")
                elif res.returncode:
                    stats.error(f"churn {step}: {res.stderr.strip()[:200]}")
                stats.op(f"churn-{step}")
                idle()

    def sampler() -> None:
        while not stop.is_set():
            now = time.monotonic()
            for pid in daemon_pids:
                kib = _rss_kib(pid)
                if kib is not None:
                    with stats.lock:
                        stats.rss.setdefault(pid, []).append((now, kib))
            with stats.lock:
                stuck = [w for t, w in stats.busy_since.values() if now - t > stall]
            for what in stuck:
                stats.error(f"STUCK for more than {stall:.0f}s: {what}")
            ticks = int(now)
            if ticks % 5 == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK):
                # make the readers go through FUSE again, not the kernel's page cache
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
                stats.op("drop-caches")
            stop.wait(1.0)

    tools = max(2, readers // 8)
    threads = [threading.Thread(target=cat_loop, args=(k,)) for k in range(readers - 2 * tools)]
    threads += [threading.Thread(target=tool_loop, args=(k, "find")) for k in range(tools)]
    threads += [threading.Thread(target=tool_loop, args=(k, "grep")) for k in range(tools)]
    threads += [threading.Thread(target=churn_loop), threading.Thread(target=sampler)]
    for t in threads:
        t.daemon = True
        t.start()
    log(f"{readers} readers ({2 * tools} find/grep) on 3 mounts, churn on the root, {duration}s")
    started = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
        with stats.lock:
            ops = dict(stats.ops)
            errs = len(stats.errors)
        log(f"  t={time.monotonic() - started:5.0f}s ops={sum(ops.values())} errors={errs}")
    stop.set()
    for t in threads:
        t.join(stall * 2)
        if t.is_alive():
            stats.error(f"thread {t.name} did not finish: deadlock?")
    elapsed = time.monotonic() - started

    images = _imagefs(root, "images", "--format", "json").stdout
    for _, ref in mounts.values():
        if ref.split("/", 1)[1].split(":")[0] not in images:
            stats.error(f"image {ref} lost from `imagefs images`")
    for name, d in mnt_dirs.items():
        if not os.path.ismount(d):
            stats.error(f"mount {name} is gone")
    rss_report = []
    for pid, samples in stats.rss.items():
        if not samples:
            continue
        warm = [kib for t, kib in samples if t - samples[0][0] >= min(10.0, duration / 4)]
        first = warm[0] if warm else samples[0][1]
        last, peak = samples[-1][1], max(kib for _, kib in samples)
        rss_report.append((pid, first, last, peak))
        if (last - first) / 1024 > rss_growth:
            stats.error(f"daemon {pid}: RSS grew {first // 1024} -> {last // 1024} MiB")
    for d in mnt_dirs.values():
        _imagefs(root, "umount", str(d))
    check = _imagefs(root, "check")
    if check.returncode or not check.stdout.strip().endswith("all good"):
        stats.error(f"imagefs check: {check.stdout.strip()[-300:]}")

    log(f"\nran {elapsed:.0f}s; {sum(stats.ops.values())} operations:")
    for kind, n in sorted(stats.ops.items()):
        log(f"  {kind:18} {n:8}  ({n / elapsed:.1f}/s)")
    log(
        f"  bytes read by cat  {stats.bytes_read / 1e6:.0f} MB "
        f"({stats.bytes_read / elapsed / 1e6:.1f} MB/s)"
    )
    for pid, first, last, peak in rss_report:
        log(
            f"  daemon {pid}: RSS after warm-up {first / 1024:.0f} MiB, end "
            f"{last / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB"
        )
    log(f"  imagefs check: {check.stdout.strip().splitlines()[-1] if check.stdout else '?'}")
    if stats.errors:
        log(f"FAILED: {len(stats.errors)} problems")
        for e in stats.errors[:20]:
            log(f"  {e}")
        return 1
    log("OK: no corruption, no errors, nothing stuck, no image lost, memory flat")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/loadtest", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=180.0, help="seconds (default 180)")
    parser.add_argument("--readers", type=int, default=64, help="parallel readers (default 64)")
    parser.add_argument(
        "--stall", type=float, default=60.0, help="an operation this long is a hang (s)"
    )
    parser.add_argument(
        "--rss-growth", type=float, default=100.0, help="allowed daemon RSS growth (MiB)"
    )
    parser.add_argument("--workdir", type=Path, help="default: a temporary directory")
    a = parser.parse_args(argv)
    if a.readers < 6:
        parser.error("--readers must be at least 6")
    if a.workdir is not None:
        a.workdir.mkdir(parents=True, exist_ok=True)
        return run(a.duration, a.readers, a.workdir, a.stall, a.rss_growth)
    with tempfile.TemporaryDirectory(prefix="imagefs-loadtest-") as tmp:
        return run(a.duration, a.readers, Path(tmp), a.stall, a.rss_growth)


if __name__ == "__main__":
    raise SystemExit(main())
