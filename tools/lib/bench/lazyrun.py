"""What the lazy-loading experiments share: networks, shaped loopback, fresh imagefs mounts,
the pull-and-extract baseline and the registry's byte counts.

Two networks: `loopback` (the registry on 127.0.0.1 as it is) and `wan` (20 ms round trip,
100 Mbit/s). imagefs emulates the WAN itself (`--net-latency 20 --net-bandwidth 100mbit`,
global options: every request waits one round trip, all downloads of the process share one
link). skopeo has no such option, so for the pull-and-extract baseline the loopback
interface itself is shaped with `tc qdisc add dev lo root netem delay 10ms rate 100mbit`
(10 ms each way) — only around `skopeo copy`, and always removed again in a `finally`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.shaper import ShapingProxy
from bench.util import BenchError, drop_caches, force_unmount, log, remove_tree, run
from imagefs.registry.netem import parse_rate
from imagefs.testing.images import registry_args, skopeo_copy
from imagefs.testing.registry import LocalRegistry

MOUNT_TIMEOUT = 600.0


@dataclass(frozen=True)
class Net:
    name: str
    latency_ms: int = 0
    """One round trip."""
    bandwidth: str | None = None

    @property
    def shaped(self) -> bool:
        return bool(self.latency_ms or self.bandwidth)

    def imagefs_args(self) -> list[str]:
        out = []
        if self.latency_ms:
            out += ["--net-latency", str(self.latency_ms)]
        if self.bandwidth:
            out += ["--net-bandwidth", self.bandwidth]
        return out

    def describe(self) -> str:
        if not self.shaped:
            return "loopback (no shaping)"
        return f"emulated WAN: {self.latency_ms} ms RTT, {self.bandwidth}"


LOOPBACK = Net("loopback")
WAN = Net("wan", 20, "100mbit")
NETS = {n.name: n for n in (LOOPBACK, WAN)}


# --------------------------------------------------------------------------------------------
# tc netem on lo


def _lo_qdisc() -> str:
    return run(["tc", "qdisc", "show", "dev", "lo"]).strip()


def check_loopback_clean() -> None:
    """Refuse to start when lo already carries a netem qdisc (someone else's, or a leftover
    of a killed run: `tc qdisc del dev lo root` removes it)."""
    global _netem_missing
    if shutil.which("tc") is None:
        _netem_missing = True  # the shaping proxy stands in
        return
    if "netem" in _lo_qdisc():
        raise BenchError(f"lo already has a netem qdisc ({_lo_qdisc()}); not touching it")


SHAPING_USED: set[str] = set()
"""How the baseline's WAN was made in this run: 'tc netem on lo' and/or 'shaping proxy'."""
_netem_missing = False


@contextlib.contextmanager
def shaped_registry(net: Net, host: str) -> Iterator[str]:
    """`host` (HOST:PORT of the loopback registry) as seen across `net`, for the block:
    the same host with lo shaped by tc netem (half the RTT each way), or, where the kernel
    has no netem, the address of a `ShapingProxy` in front of it."""
    global _netem_missing
    if not net.shaped:
        yield host
        return
    args = ["tc", "qdisc", "add", "dev", "lo", "root", "netem"]
    if net.latency_ms:
        args += ["delay", f"{net.latency_ms / 2:g}ms"]
    if net.bandwidth:
        args += ["rate", net.bandwidth]
    if not _netem_missing:
        proc = subprocess.run(args, capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            SHAPING_USED.add("tc netem on lo")
            try:
                yield host
            finally:
                _remove_netem()
            return
        if "unknown" not in proc.stderr.lower():
            raise BenchError(f"{' '.join(args)}: {proc.stderr.strip()}")
        log(f"tc netem unavailable ({proc.stderr.strip()}): using the shaping proxy")
        _netem_missing = True
    upstream, _, port = host.rpartition(":")
    rate = parse_rate(net.bandwidth) if net.bandwidth else None
    with ShapingProxy(upstream, int(port), rtt_s=net.latency_ms / 1000, rate_bytes_per_s=rate) as p:
        SHAPING_USED.add("shaping proxy")
        yield f"127.0.0.1:{p.port}"


def shaping_note(used: set[str] | None = None) -> str:
    """How the pull-and-extract baseline's WAN was made, for the reports."""
    used = SHAPING_USED if used is None else used
    proxy = (
        "a shaping TCP proxy in front of the registry (`tools/lib/bench/shaper.py`: 10 ms "
        "each way per chunk, all connections sharing one 100 Mbit/s link per direction; "
        "used because this kernel has no sch_netem: `tc qdisc add ... netem` answers "
        "'Specified qdisc kind is unknown')"
    )
    netem = (
        "`tc qdisc add dev lo root netem delay 10ms rate 100mbit` around `skopeo copy` only, "
        "removed in a `finally`"
    )
    parts = [t for k, t in (("tc netem on lo", netem), ("shaping proxy", proxy)) if k in used]
    return "; ".join(parts) if parts else "not measured"


def _remove_netem() -> None:
    proc = subprocess.run(
        ["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0 or "netem" in _lo_qdisc():
        log(f"WARNING: could not remove the netem qdisc on lo: {proc.stderr.strip()}")


# --------------------------------------------------------------------------------------------
# imagefs mounts on fresh roots


@dataclass
class Mounted:
    root: Path
    mnt: Path
    started: float
    """perf_counter() when `imagefs mount` was started."""
    ready_s: float


class Imagefs:
    """Runs the imagefs CLI with a root of its own per mount under `work`."""

    def __init__(self, binary: Path, work: Path) -> None:
        self.binary = binary
        self.work = work
        self._count = 0

    def run(self, root: Path, *args: str, net: Net = LOOPBACK, timeout: float = 3600) -> str:
        # cwd: the daemon runs `python -m imagefs`, which puts the cwd first on sys.path.
        self.work.mkdir(parents=True, exist_ok=True)
        return run(
            [str(self.binary), "--root", str(root), *net.imagefs_args(), *args],
            cwd=self.work,
            timeout=timeout,
        )

    def fresh_root(self, label: str) -> Path:
        self._count += 1
        root = self.work / f"root-{label}-{self._count}"
        remove_tree(root)
        return root

    @contextlib.contextmanager
    def mount(self, ref: str, net: Net, label: str, extra: Sequence[str] = ()) -> Iterator[Mounted]:
        """`imagefs mount` of `ref` on a fresh root (nothing cached), unmounted and deleted
        afterwards."""
        root = self.fresh_root(label)
        mnt = self.work / f"mnt-{label}"
        mnt.mkdir(parents=True, exist_ok=True)
        try:
            start = time.perf_counter()
            # the bench publishes its gzip variants' indexes itself: it opts into them
            trust = "--trust-published-index"
            argv = ["mount", trust, *extra, ref, str(mnt)]
            self.run(root, *argv, net=net, timeout=MOUNT_TIMEOUT)
            ready = time.perf_counter() - start
            yield Mounted(root, mnt, start, ready)
        finally:
            try:
                self.run(root, "umount", str(mnt))
            except BenchError as e:
                log(f"{e}; forcing the unmount")
                force_unmount(mnt)
            remove_tree(root)

    def stats(self, m: Mounted) -> dict[str, object]:
        out: dict[str, object] = json.loads(self.run(m.root, "stats", "--json", str(m.mnt)))
        return out


def stat_int(stats: dict[str, object], key: str) -> int:
    value = stats.get(key)
    if not isinstance(value, int):
        raise BenchError(f"imagefs stats: no integer {key!r} in {sorted(stats)}")
    return value


def layer_fetches(stats: dict[str, object]) -> list[tuple[int, int]]:
    """(layer size, bytes fetched) per layer, from `imagefs stats --json`."""
    layers = stats.get("layers")
    if not isinstance(layers, list):
        raise BenchError("imagefs stats: no layers")
    return [(int(x["size"]), int(x["fetched"])) for x in layers]


def wait_quiet(imagefs: Imagefs, m: Mounted, quiet_s: float = 1.0, limit_s: float = 300) -> float:
    """Wait until the mount's bytes_fetched has not moved for `quiet_s` (a background
    prefetch is done: stats have no "prefetch finished" field); returns seconds waited."""
    start = time.perf_counter()
    last = -1
    last_change = start
    while True:
        now = time.perf_counter()
        fetched = stat_int(imagefs.stats(m), "bytes_fetched")
        if fetched != last:
            last, last_change = fetched, now
        elif now - last_change >= quiet_s and fetched > 0:
            return last_change - start
        if now - start > limit_s:
            raise BenchError(f"prefetch still fetching after {limit_s:.0f}s")
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# the registry's view


def registry_get_bytes(registry: LocalRegistry) -> int:
    """Response bytes of every GET since the last `registry.mark()` (blobs, manifests,
    referrers, index artifacts): what crossed the network, from the access log."""
    return sum(r.bytes_written or 0 for r in registry.requests() if r.method == "GET")


# --------------------------------------------------------------------------------------------
# pull and extract


@dataclass
class Extracted:
    rootfs: Path
    pull_s: float
    extract_s: float


def pull_and_extract(registry: LocalRegistry, ref: str, net: Net, home: Path) -> Extracted:
    """`skopeo copy docker://REF oci:…` (under `net`, loopback shaped by tc) then
    `umoci unpack`; the page cache dropped first."""
    layout = home / "layout"
    bundle = home / "bundle"
    remove_tree(layout)
    remove_tree(bundle)
    home.mkdir(parents=True, exist_ok=True)
    drop_caches()
    start = time.perf_counter()
    with shaped_registry(net, registry.host) as host:
        shaped_ref = host + ref.removeprefix(registry.host)
        skopeo_copy(f"docker://{shaped_ref}", f"oci:{layout}:bench", registry_args(registry, "src"))
    pulled = time.perf_counter()
    run(["umoci", "unpack", "--image", f"{layout}:bench", str(bundle)])
    done = time.perf_counter()
    return Extracted(bundle / "rootfs", pulled - start, done - pulled)


def read_first_byte(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if not os.read(fd, 1):
            raise BenchError(f"{path}: empty")
    finally:
        os.close(fd)


def read_all(tree: Path) -> int:
    """`tar cf - . | wc -c` in `tree`: every file read once; bytes tar wrote."""
    proc = subprocess.run(
        ["bash", "-c", "set -o pipefail; tar cf - . | wc -c"],
        cwd=tree,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise BenchError(f"tar in {tree} exited {proc.returncode}: {proc.stderr.strip()}")
    return int(proc.stdout.strip())
