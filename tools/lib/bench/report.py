"""Medians, the issue's targets and the markdown report."""

from __future__ import annotations

import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.images import BuiltImage

Results = dict[str, dict[str, list[float]]]
"""system name -> metric key -> one value per run (or per session)."""


@dataclass(frozen=True)
class Row:
    label: str
    key: str
    fmt: str = "{:.2f}"
    target: str = ""
    scale: float = 1.0
    total: bool = False
    """Sum over runs instead of the median."""


ROWS: tuple[Row, ...] = (
    Row("pull + extract, whole image (s)", "prepare.cold.pull_extract_s"),
    Row("mount ready, cold (s)", "mount.cold.ready_s", "{:.3f}"),
    Row("mount ready, warm (s)", "mount.warm.ready_s", "{:.3f}", "imagefs ≤ 0.5 s"),
    Row("`find -ls`, cold (s)", "find.cold.s"),
    Row("`find -ls`, warm (s)", "find.warm.s", target="imagefs ≤ 1.3× floor"),
    Row("entries listed by `find`", "find.warm.entries", "{:,.0f}"),
    Row("read-all, cold: tar only (MB/s)", "readall.cold.mbps", "{:.1f}"),
    Row(
        "read-all, cold: mount + tar (MB/s)",
        "readall.cold.e2e_mbps",
        "{:.1f}",
        "imagefs ≥ 4× ratarmount",
    ),
    Row("read-all, cold (s)", "readall.cold.s"),
    Row("read-all, warm (MB/s)", "readall.warm.mbps", "{:.1f}", "imagefs ≥ 0.8× floor"),
    Row("read-all, warm (s)", "readall.warm.s"),
    Row("bytes read by tar (MB)", "readall.warm.bytes", "{:,.1f}", scale=1e-6),
    Row("largest file, cold (MB/s)", "largest.cold.mbps", "{:.1f}"),
    Row("largest file, warm (MB/s)", "largest.warm.mbps", "{:.1f}"),
    Row("random small files, cold (files/s)", "random.cold.files_per_s", "{:,.0f}"),
    Row("random small files, cold p50 / p90 (ms)", "random.cold.p50_ms|random.cold.p90_ms"),
    Row(
        "random small files, warm (files/s)",
        "random.warm.files_per_s",
        "{:,.0f}",
        "imagefs ≥ 0.7× floor",
    ),
    Row("random small files, warm p50 / p90 (ms)", "random.warm.p50_ms|random.warm.p90_ms"),
    Row("peak RSS after cold read-all (MB)", "readall.cold.rss_mb", "{:.0f}", "imagefs ≤ 150 MB"),
    Row("peak RSS after warm read-all (MB)", "readall.warm.rss_mb", "{:.0f}", "imagefs ≤ 150 MB"),
    Row("first byte of a small file, cold, mount included (s)", "firstbyte.cold.s", "{:.3f}"),
    Row("first byte, warm store, mount included (s)", "firstbyte.warm.s", "{:.3f}"),
    Row("failed sessions, all runs (see the log)", "failed_sessions", "{:.0f}", total=True),
)

MB = 1_000_000


def median(results: Results, system: str, key: str) -> float | None:
    values = results.get(system, {}).get(key)
    return statistics.median(values) if values else None


def _cell(results: Results, system: str, row: Row) -> str:
    parts = []
    for key in row.key.split("|"):
        values = results.get(system, {}).get(key)
        value = sum(values) if row.total and values else median(results, system, key)
        if value is None:
            return "–"
        parts.append(row.fmt.format(value * row.scale))
    return " / ".join(parts)


@dataclass(frozen=True)
class Target:
    issue: int
    text: str
    check: Callable[[Results], tuple[str, bool | None]]


def _ratio(
    results: Results,
    key: str,
    other: Sequence[str],
    higher: bool,
    factor: float,
    unit: str,
    mine_system: str = "imagefs",
) -> tuple[str, bool | None]:
    mine = median(results, mine_system, key)
    ref_system = next((s for s in other if median(results, s, key) is not None), None)
    if mine is None or ref_system is None:
        return "not measured", None
    ref = median(results, ref_system, key)
    assert ref is not None
    ratio = mine / ref if ref else float("inf")
    shown = f"{mine:,.2f} vs {ref:,.2f} {unit} ({ref_system}): {ratio:.2f}×"
    return shown, ratio >= factor if higher else ratio <= factor


def _bound(
    results: Results, key: str, limit: float, higher: bool, unit: str, systems: Sequence[str] = ()
) -> tuple[str, bool | None]:
    """The worst of `key`'s medians ("a|b" for several keys) over the first of `systems`
    (default: imagefs) that measured it."""
    for system in systems or ("imagefs",):
        values = [v for k in key.split("|") if (v := median(results, system, k)) is not None]
        if values:
            value = max(values) if not higher else min(values)
            name = "" if system == "imagefs" else f" ({system})"
            return f"{value:,.3g} {unit}{name}", value >= limit if higher else value <= limit
    return "not measured", None


def _worst(results: Results, key: str, limit: float, unit: str) -> tuple[str, bool | None]:
    """The highest median of `key` ("a|b" for several keys) over every imagefs system."""
    found = [
        (v, system)
        for system in IMAGEFS_SYSTEMS
        for k in key.split("|")
        if (v := median(results, system, k)) is not None
    ]
    if not found:
        return "not measured", None
    value, system = max(found)
    return f"{value:,.3g} {unit} ({system})", value <= limit


IMAGEFS_SYSTEMS = ("imagefs", "imagefs-index")
RATARMOUNTS = ("ratarmount", "ratarmount-layer")
FLOOR = ("floor",)
TARGETS: tuple[Target, ...] = (
    Target(
        10,
        "warm random small files ≥ 0.7× the floor's files/s",
        lambda r: _ratio(r, "random.warm.files_per_s", FLOOR, True, 0.7, "files/s"),
    ),
    Target(
        10,
        "warm `tar` read-all ≥ 0.8× the floor's MB/s",
        lambda r: _ratio(r, "readall.warm.mbps", FLOOR, True, 0.8, "MB/s"),
    ),
    Target(
        10,
        "warm `find -ls` ≤ 1.3× the floor's time",
        lambda r: _ratio(r, "find.warm.s", FLOOR, False, 1.3, "s"),
    ),
    Target(
        10,
        "peak RSS ≤ 150 MB after reading the image end to end",
        lambda r: _worst(r, "readall.cold.rss_mb|readall.warm.rss_mb", 150, "MB"),
    ),
    Target(
        10,
        "first byte of a small file ≤ 0.5 s, uncached image, mount included",
        lambda r: _bound(r, "firstbyte.cold.s", 0.5, False, "s", ("imagefs-index", "imagefs")),
    ),
    Target(
        3,
        "mount ready ≤ 0.5 s with cached indexes (warm)",
        lambda r: _bound(r, "mount.warm.ready_s", 0.5, False, "s"),
    ),
    Target(
        3,
        "warm `find -ls` ≤ 2× native",
        lambda r: _ratio(r, "find.warm.s", ("native",), False, 2.0, "s"),
    ),
    Target(
        3,
        "warm read-all ≥ 400 MB/s",
        lambda r: _bound(r, "readall.warm.mbps", 400, True, "MB/s"),
    ),
    Target(
        3,
        "cold read-all ≥ 4× ratarmount's throughput (mount + tar)",
        lambda r: _ratio(r, "readall.cold.e2e_mbps", RATARMOUNTS, True, 4.0, "MB/s"),
    ),
    Target(
        3,
        "random small files ≥ 10× ratarmount's rate (warm)",
        lambda r: _ratio(r, "random.warm.files_per_s", RATARMOUNTS, True, 10.0, "files/s"),
    ),
)


def _floor_ratio(results: Results, row: Row) -> str:
    """imagefs's median over the floor's for a single-valued row, "–" where either is absent."""
    if "|" in row.key or row.total:
        return "–"
    mine, floor = median(results, "imagefs", row.key), median(results, "floor", row.key)
    if mine is None or not floor:
        return "–"
    return f"{mine / floor:.2f}×"


def _verdict(ok: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "–"}[ok]


def fuse_requests(results: Results, names: Sequence[str]) -> list[str]:
    """With `--fuse-trace`: per workload and FUSE request, each system's count, median
    latency and total, as the kernel timed them (`fusetrace.py`). Nothing without it."""
    found: dict[tuple[str, str], set[str]] = {}  # (workload.phase, opcode) -> systems
    for name in names:
        for key in results.get(name, {}):
            head, sep, rest = key.partition(".fuse.")
            if sep and rest.endswith(".n"):
                found.setdefault((head, rest[: -len(".n")]), set()).add(name)
    if not found:
        return []
    shown = [n for n in names if any(n in s for s in found.values())]
    lines = [
        "",
        "### FUSE requests, as the kernel timed them",
        "",
        "`--fuse-trace`: every request of each session, from queued to answered "
        "(`fuse_request_send` / `fuse_request_end` tracepoints); per system: requests, "
        "median latency, total. Answers from pyfuse3's own overhead and the handler alike: "
        "the floor's column is what a request costs when its handler does nothing.",
        "",
        "| workload | request | " + " | ".join(shown) + " |",
        "|---|---|" + "---:|" * len(shown),
    ]
    for (workload, op), _systems in sorted(found.items()):
        cells = []
        for name in shown:
            base = f"{workload}.fuse.{op}"
            n, p50, total = (median(results, name, f"{base}.{m}") for m in ("n", "p50_us", "sum_s"))
            cells.append(
                "–"
                if n is None or p50 is None or total is None
                else f"{n:,.0f} × {p50:.0f} µs = {total:.2f} s"
            )
        lines.append(f"| {workload} | {op} | " + " | ".join(cells) + " |")
    return lines


def machine_facts() -> list[tuple[str, str]]:
    mem = "?"
    cpu = "?"
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return [
        ("nproc", str(os.cpu_count())),
        ("CPU", cpu),
        ("memory", mem),
        ("kernel", platform.release()),
        ("python", sys.version.split()[0]),
        ("load average (1, 5, 15 min) at the end", " ".join(f"{x:.2f}" for x in os.getloadavg())),
    ]


def render(
    results: Results,
    systems: Sequence[tuple[str, str]],
    image: BuiltImage,
    runs: int,
    command: str,
    date: str,
    tools: Sequence[tuple[str, str]],
    notes: Sequence[str],
) -> str:
    names = [name for name, _ in systems]
    lines = [
        "# imagefs benchmark",
        "",
        f"Generated by `tools/bench` on {date}. Every number is the median of {runs} run(s).",
        "",
        "Reproduce (as root, on Debian bookworm; builds and caches the image under `.bench/`):",
        "",
        "```sh",
        command,
        "```",
        "",
        "## Targets",
        "",
        "The floor is a minimal in-memory pyfuse3 filesystem serving the same tree, measured "
        "in the same run (see Systems).",
        "",
        "| issue | target | measured (imagefs vs reference) | verdict |",
        "|---:|---|---|---|",
    ]
    for target in TARGETS:
        shown, ok = target.check(results)
        lines.append(f"| {target.issue} | {target.text} | {shown} | {_verdict(ok)} |")
    ratio = "imagefs" in names and "floor" in names
    lines += [
        "",
        "## Measurements",
        "",
        "| metric | " + " | ".join(names) + (" | imagefs ÷ floor" if ratio else "") + " | target |",
        "|---|" + "---:|" * (len(names) + ratio) + "---|",
    ]
    for row in ROWS:
        cells = [_cell(results, name, row) for name in names]
        if all(c == "–" for c in cells):
            continue
        if ratio:
            cells.append(_floor_ratio(results, row))
        lines.append(f"| {row.label} | " + " | ".join(cells) + f" | {row.target} |")
    lines += fuse_requests(results, names)
    lines += ["", "Systems:", ""]
    lines += [f"- **{name}**: {desc}" for name, desc in systems]
    merged = image.merged
    lines += [
        "",
        "## Image",
        "",
        f"- recipe `{image.recipe.name}`: {len(image.layers)} gzip layers built by umoci, "
        f"{merged.bytes / MB:,.0f} MB in {len(merged.files):,} regular files "
        f"({merged.entries:,} entries), {image.compressed_bytes / MB:,.0f} MB compressed",
    ]
    for i, layer in enumerate(image.layers):
        lines.append(
            f"- layer {i}: {layer.name}: {layer.size / MB:,.1f} MB compressed, "
            f"{layer.catalog.bytes / MB:,.1f} MB in {len(layer.catalog.files):,} files"
        )
    lines += ["", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in [*machine_facts(), *tools]]
    lines += ["", "## How it is measured", ""]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


NOTES = (
    "Each workload runs in its own session (a fresh mount), so none inherits the kernel's "
    "FUSE caches from the one before. *Cold*: the page cache dropped "
    "(`echo 3 > /proc/sys/vm/drop_caches`) and nothing local: a fresh imagefs store (the "
    "layers come from the registry), no ratarmount index (it is built before the mount "
    "answers), the native tree just pulled and extracted. *Warm*: a second mount on the "
    "same store or index (imagefs: every layer fetched and indexed by a warm-up read-all), "
    "its local files (store, index, tree) read into the page cache before each run's warm "
    "sessions.",
    "mount ready: from starting the command to the mount answering a stat of its root "
    "(imagefs returns when its daemon answers statfs; ratarmount runs with `-f` and is "
    "polled). The stat is part of it on purpose: it is what `ls MNT` needs, and on a cold "
    "imagefs store that first stat of / is what fetches and indexes the layers.",
    "read-all: `tar cf - . | wc -c` in the tree's root; MB/s counts tar's output bytes. "
    '"mount + tar" divides by the mount-ready time plus the tar time, which is the fair '
    "cold comparison: ratarmount decompresses everything to index before it mounts, imagefs "
    "fetches and indexes a layer when first touched.",
    "largest file: the view's largest regular file read sequentially in 1 MiB reads.",
    "floor: `tools/lib/bench/floorfs.py` loads a `umoci unpack` of the image into memory "
    "(names, modes, owners, sizes, mtimes, symlinks, devices, xattrs, hard links, every byte) "
    "and serves it through pyfuse3 with imagefs's mount options and kernel-cache settings "
    "(imported from `imagefs.fs`: 1-day entry/attr timeouts, cached negative lookups, "
    "`keep_cache`, readdirplus, no writeback cache, no direct_io). Every answer is a "
    "dictionary look-up of an object built before mounting, so its time is what FUSE and "
    "pyfuse3 themselves cost; it runs warm sessions only (nothing of it is cold), and its "
    "RSS (the whole tree) is not shown. `imagefs ÷ floor` divides imagefs's median by the "
    "floor's, measured in the same run.",
    "first byte: from starting `imagefs mount` to the first byte of `/etc/debian_version` "
    "(else the first of the random small files) read with one read(2) right after the mount "
    "answered, in a session of its own. The issue 10 target is checked on the cold session "
    "of `imagefs-index` (the same gzip image with its imagefs index published next to it: "
    "truly lazy, nothing local); plain `imagefs` (no index) must fetch whole layers first.",
    "random small files: 2000 regular files of 1 B to 64 KiB, drawn with a fixed seed from "
    "the image's catalog, each opened and read whole, one after another in one process.",
    "peak RSS: VmHWM of the process serving the mount (the imagefs daemon from "
    "`imagefs mounts --format json`, the ratarmount process), read right after read-all.",
    "The registry is Debian's docker-registry on 127.0.0.1 (no network latency); "
    "ratarmount reads the same gzip blobs from a local file, so its cold numbers include "
    "no download at all.",
    "ratarmount (all layers) union-mounts the layer blobs; it does not apply OCI whiteouts, "
    "so its tree holds a few more files than the image.",
)
