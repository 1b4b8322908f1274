"""`tools/bench --experiment slacker`: how much of an image real workloads read, what lazy
loading fetches for them, and how long they take (after Harter et al., "Slacker: Fast
Distribution with Lazy Docker Containers", FAST '16).

Workloads run with `chroot` in the Debian image of `images.LAZY` (minbase + python3):
python imports, `apt-get --version`, `bash -c true`. Modes, each on loopback and under the
emulated WAN (`lazyrun.WAN`):

* **lazy cold**: `imagefs mount` on a fresh root, then the workload;
* **lazy + profile**: `imagefs mount --prefetch P` on a fresh root, the workload started
  as soon as the mount returns (the prefetch runs beside it);
* **lazy + profile, prefetched**: the same, but the clock of the workload starts only once
  `imagefs stats` shows no more fetching (the prefetch done);
* **pull + extract**: `skopeo copy` + `umoci unpack` of the gzip image, then the workload
  on the tree; and the **local** run: the workload alone on the extracted tree, page cache
  dropped (cold) or not (warm).

The profile P of each workload is recorded once, on loopback, on a throwaway root:
`imagefs --root R profile record REF -o P -- sh -c 'chroot "$IMAGEFS_MOUNT" …'`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import svgplot
from bench.convert import toc_fetch_bytes
from bench.images import BuiltImage
from bench.lazyrun import (
    LOOPBACK,
    Imagefs,
    Mounted,
    Net,
    layer_fetches,
    pull_and_extract,
    registry_get_bytes,
    stat_int,
    wait_quiet,
)
from bench.util import BenchError, drop_caches, log, remove_tree, run
from imagefs.testing.images import PushedImage
from imagefs.testing.registry import LocalRegistry

MB = 1e6


@dataclass(frozen=True)
class Workload:
    name: str
    label: str
    argv: tuple[str, ...]
    """Run inside the image: `chroot ROOT *argv`."""


WORKLOADS = (
    Workload(
        "python",
        "python3 -c 'import json, email, http.client, sqlite3'",
        ("/usr/bin/python3", "-c", "import json, email, http.client, sqlite3"),
    ),
    Workload("apt", "apt-get --version", ("/usr/bin/apt-get", "--version")),
    Workload("bash", "bash -c true", ("/bin/bash", "-c", "true")),
)

MODES = ("lazy", "profile", "prefetched", "pull", "local-cold", "local-warm")
MODE_LABELS = {
    "lazy": "lazy cold",
    "profile": "lazy + profile",
    "prefetched": "lazy + profile, prefetched",
    "pull": "pull + extract",
    "local-cold": "local (extracted), cold cache",
    "local-warm": "local (extracted), warm cache",
}

Results = dict[str, dict[str, dict[str, dict[str, list[float]]]]]
"""variant -> net -> workload -> metric -> values."""


@dataclass
class Setup:
    built: BuiltImage
    registry: LocalRegistry
    pushed: dict[str, PushedImage]
    imagefs: Imagefs
    work: Path
    toc_bytes: dict[str, list[int]]
    """variant -> per layer, bytes a TOC/index load fetches (eStargz: footer + TOC)."""


def run_workload(root: Path, w: Workload) -> float:
    start = time.perf_counter()
    run(["chroot", str(root), *w.argv], timeout=600)
    return time.perf_counter() - start


def record_profiles(setup: Setup, variant: str) -> dict[str, Path]:
    out = {}
    ref = setup.pushed[variant].ref
    for w in WORKLOADS:
        path = setup.work / "profiles" / f"{variant.replace(':', '-')}-{w.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        root = setup.imagefs.fresh_root("record")
        inner = " ".join(f"'{a}'" for a in w.argv)
        try:
            setup.imagefs.run(
                root,
                "profile",
                "record",
                ref,
                "-o",
                str(path),
                "--",
                "sh",
                "-c",
                f'chroot "$IMAGEFS_MOUNT" {inner}',
            )
        finally:
            remove_tree(root)
        log(f"profile of {w.name} ({variant}): {path.stat().st_size:,} bytes")
        out[w.name] = path
    return out


def _lazy_metrics(
    setup: Setup, variant: str, m: Mounted, stats: dict[str, object], seconds: float
) -> dict[str, float]:
    fetched = stat_int(stats, "bytes_fetched")
    tocs = sum(
        toc
        for toc, (_, got) in zip(
            setup.toc_bytes.get(variant, []), layer_fetches(stats), strict=False
        )
        if got > 0
    )
    return {
        "mount_s": m.ready_s,
        "workload_s": seconds,
        "total_s": m.ready_s + seconds,
        "served": float(stat_int(stats, "bytes_served")),
        "fetched": float(fetched),
        "toc_fetched": float(tocs),
        "registry": float(registry_get_bytes(setup.registry)),
        "files": float(stat_int(stats, "files_touched")),
        "requests": float(stat_int(stats, "registry_requests")),
    }


def lazy_session(
    setup: Setup, variant: str, net: Net, w: Workload, profile: Path | None, wait: bool
) -> dict[str, float]:
    drop_caches()
    setup.registry.mark()
    extra = ["--prefetch", str(profile)] if profile is not None else []
    with setup.imagefs.mount(setup.pushed[variant].ref, net, "slacker", extra) as m:
        waited = wait_quiet(setup.imagefs, m) if wait else 0.0
        seconds = run_workload(m.mnt, w)
        stats = setup.imagefs.stats(m)
        out = _lazy_metrics(setup, variant, m, stats, seconds)
    out["prefetch_wait_s"] = waited
    return out


def run_experiment(
    setup: Setup,
    variants: Sequence[str],
    nets: Sequence[Net],
    runs: int,
    results: Results,
) -> None:
    profiles = {v: record_profiles(setup, v) for v in variants}

    def add(variant: str, net: Net, w: Workload, mode: str, metrics: dict[str, float]) -> None:
        slot = results.setdefault(variant, {}).setdefault(net.name, {}).setdefault(w.name, {})
        for k, v in metrics.items():
            slot.setdefault(f"{mode}.{k}", []).append(v)

    for r in range(runs):
        for net in nets:
            for variant in variants:
                for w in WORKLOADS:
                    for mode in ("lazy", "profile", "prefetched"):
                        prof = profiles[variant][w.name] if mode != "lazy" else None
                        try:
                            got = lazy_session(setup, variant, net, w, prof, mode == "prefetched")
                        except BenchError as e:
                            log(f"run {r + 1} {net.name} {variant} {w.name} {mode} FAILED: {e}")
                            add(variant, net, w, mode, {"failed": 1})
                            continue
                        add(variant, net, w, mode, got)
                        log(
                            f"run {r + 1}/{runs} {net.name} {variant} {w.name} {mode}: "
                            f"mount {got['mount_s']:.2f}s + workload {got['workload_s']:.2f}s, "
                            f"served {got['served'] / MB:.2f} MB, fetched "
                            f"{got['fetched'] / MB:.2f} MB (TOCs {got['toc_fetched'] / MB:.2f})"
                        )
            # pull + extract once per run and network; every workload on the tree
            setup.registry.mark()
            home = setup.work / "pull-extract"
            try:
                tree = pull_and_extract(setup.registry, setup.pushed["gzip"].ref, net, home)
                reg = registry_get_bytes(setup.registry)
                for w in WORKLOADS:
                    drop_caches()
                    cold = run_workload(tree.rootfs, w)
                    warm = statistics.median(run_workload(tree.rootfs, w) for _ in range(3))
                    for variant in variants:
                        add(
                            variant,
                            net,
                            w,
                            "pull",
                            {
                                "pull_s": tree.pull_s,
                                "extract_s": tree.extract_s,
                                "workload_s": cold,
                                "total_s": tree.pull_s + tree.extract_s + cold,
                                "registry": float(reg),
                                "fetched": float(reg),
                            },
                        )
                        add(variant, net, w, "local-cold", {"workload_s": cold, "total_s": cold})
                        add(variant, net, w, "local-warm", {"workload_s": warm, "total_s": warm})
                    log(
                        f"run {r + 1}/{runs} {net.name} pull+extract {tree.pull_s:.1f}+"
                        f"{tree.extract_s:.1f}s; {w.name}: cold {cold:.3f}s, warm {warm:.3f}s"
                    )
            finally:
                remove_tree(home)


# --------------------------------------------------------------------------------------------
# the report


def med(results: Results, variant: str, net: str, w: str, key: str) -> float | None:
    values = results.get(variant, {}).get(net, {}).get(w, {}).get(key)
    return statistics.median(values) if values else None


def _f(v: float | None, fmt: str, scale: float = 1) -> str:
    return "–" if v is None else fmt.format(v * scale)


def render(
    results: Results,
    setup: Setup,
    variants: Sequence[str],
    nets: Sequence[Net],
    runs: int,
    command: str,
    date: str,
    tools: Sequence[tuple[str, str]],
    plot_name: str,
    shaping: str,
) -> str:
    built = setup.built
    image_bytes = built.merged.bytes
    main_variant = variants[0]
    lines = [
        "# Slacker-style experiment: what real workloads read, what lazy loading fetches",
        "",
        f"Generated by `{command}` on {date}; every number is the median of {runs} run(s).",
        "Reproduce (as root, Debian bookworm; builds and caches the image under `.bench/`):",
        "",
        "```sh",
        command,
        "```",
        "",
        f"Image `{built.recipe.name}`: Debian bookworm minbase + python3 and three more layers, "
        f"{len(built.layers)} layers, {image_bytes / MB:,.0f} MB in "
        f"{len(built.merged.files):,} regular files, {built.compressed_bytes / MB:,.0f} MB as "
        f"gzip. The lazy runs mount the **{main_variant}** variant "
        "(every file its own gzip member: the finest-grained fetches)"
        + (f"; {', '.join(variants[1:])} below it." if len(variants) > 1 else "."),
        "",
        f"![time to completion and bytes per workload]({plot_name})",
        "",
        "## Targets (issue 5)",
        "",
        "| workload | with a profile under WAN vs local (≤ 1.2×) | prefetched, same | "
        "fetched ÷ read, TOCs aside (≤ 1.3×) |",
        "|---|---|---|---|",
    ]
    wan = next((n.name for n in nets if n.shaped), nets[-1].name)
    for w in WORKLOADS:
        local = med(results, main_variant, wan, w.name, "local-cold.workload_s")
        warm = med(results, main_variant, wan, w.name, "local-warm.workload_s")
        cells = [w.label]
        for mode in ("profile", "prefetched"):
            t = med(results, main_variant, wan, w.name, f"{mode}.workload_s")
            if t is None or not local or not warm:
                cells.append("not measured")
                continue
            ok = t <= 1.2 * local
            cells.append(
                f"{t:.3f} s vs {local:.3f} s cold ({t / local:.2f}×), {warm:.3f} s warm "
                f"({t / warm:.2f}×): {'met' if ok else '**missed**'}"
            )
        served = med(results, main_variant, wan, w.name, "lazy.served")
        fetched = med(results, main_variant, wan, w.name, "lazy.fetched")
        tocs = med(results, main_variant, wan, w.name, "lazy.toc_fetched")
        needed = med(results, main_variant, wan, w.name, "prefetched.fetched")
        if served and fetched is not None and tocs is not None:
            ratio = (fetched - tocs) / served
            text = (
                f"lazy cold: ({fetched / MB:.2f} − {tocs / MB:.2f} TOC) ÷ {served / MB:.2f} MB "
                f"= {ratio:.2f}×: {'met' if ratio <= 1.3 else '**missed**'}"
            )
            if needed is not None:
                text += (
                    f"; the pieces holding what was read (the profile's fetch) "
                    f"{(needed - tocs) / MB:.2f} MB, so cold fetched "
                    f"{(fetched - tocs) / max(needed - tocs, 1):.2f}× of the minimum"
                )
            cells.append(text)
        else:
            cells.append("not measured")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "The 1.2× targets compare the workload's own run time (clock started when `imagefs "
        "mount` has returned; the mount itself is in the tables below) with the same "
        "workload on the extracted tree: *cold* (page cache dropped, what the verdict uses) "
        "and *warm*.",
        "",
    ]
    for variant in variants:
        for net in nets:
            lines += _table(results, variant, net, image_bytes)
    lines += ["## Machine and tools", ""]
    lines += [f"- {k}: {v}" for k, v in tools]
    lines += ["", "## How it is measured", ""]
    lines += [f"- {n.format(shaping=shaping)}" for n in NOTES]
    return "\n".join(lines) + "\n"


def _table(results: Results, variant: str, net: Net, image_bytes: int) -> list[str]:
    lines = [
        f"## {variant}, {net.describe()}",
        "",
        "| workload | mode | mount (s) | workload (s) | total (s) | read (MB, % of image) | "
        "fetched (MB) | of which TOCs (MB) | files | requests |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in WORKLOADS:
        for mode in MODES:

            def g(key: str, mode: str = mode, w: Workload = w) -> float | None:
                return med(results, variant, net.name, w.name, f"{mode}.{key}")

            if g("total_s") is None:
                continue
            served = g("served")
            read = (
                "–" if served is None else f"{served / MB:.2f} ({100 * served / image_bytes:.2f}%)"
            )
            mount = g("mount_s")
            if mode == "pull":
                mount = (g("pull_s") or 0) + (g("extract_s") or 0)
            lines.append(
                f"| {w.label if mode == 'lazy' else ''} | {MODE_LABELS[mode]} | "
                f"{_f(mount, '{:.2f}')} | {_f(g('workload_s'), '{:.3f}')} | "
                f"{_f(g('total_s'), '{:.2f}')} | {read} | {_f(g('fetched'), '{:.2f}', 1 / MB)} | "
                f"{_f(g('toc_fetched'), '{:.2f}', 1 / MB)} | {_f(g('files'), '{:.0f}')} | "
                f"{_f(g('requests'), '{:.0f}')} |"
            )
    lines.append("")
    return lines


def plot(results: Results, variant: str, nets: Sequence[Net], out: Path) -> None:
    """Two panels: time to completion per workload and mode (log scale), and bytes read
    vs fetched vs the image."""
    groups: list[svgplot.Group] = []
    for net in nets:
        for w in WORKLOADS:
            bars = []
            for mode in ("lazy", "profile", "prefetched", "pull", "local-cold"):
                v = med(results, variant, net.name, w.name, f"{mode}.total_s")
                if mode == "prefetched":
                    v = med(results, variant, net.name, w.name, "prefetched.workload_s")
                if v is not None:
                    bars.append((MODE_LABELS[mode], v))
            groups.append(svgplot.Group(f"{w.name}, {net.name}", bars))
    byte_groups: list[svgplot.Group] = []
    for w in WORKLOADS:
        bars = []
        for label, key in (
            ("read by the workload", "lazy.served"),
            ("fetched, lazy cold", "lazy.fetched"),
            ("fetched, lazy + profile", "profile.fetched"),
            ("fetched, pull + extract", "pull.fetched"),
        ):
            v = med(results, variant, nets[0].name, w.name, key)
            if v is not None:
                bars.append((label, v / MB))
        byte_groups.append(svgplot.Group(w.name, bars))
    svg = svgplot.render(
        [
            svgplot.Panel(
                f"Time to completion, s, log scale ({variant}): mount or pull + workload; "
                "'prefetched', 'local': workload only",
                groups,
                "s",
            ),
            svgplot.Panel("Bytes, MB (log scale): read vs fetched", byte_groups, "MB"),
        ]
    )
    out.write_text(svg)


NOTES = (
    "Workloads: `chroot MNT /usr/bin/python3 -c 'import json, email, http.client, sqlite3'`, "
    "`chroot MNT /usr/bin/apt-get --version`, `chroot MNT /bin/bash -c true`.",
    "Every lazy session: page cache dropped, a fresh `--root` (nothing cached), `imagefs "
    "mount` timed to its return ('mount'), then the workload timed ('workload'); 'total' is "
    "both. 'read' is `bytes_served` of `imagefs stats --json` after the workload (bytes the "
    "kernel asked the mount for: file reads, including the kernel's own read-ahead within "
    "files), as a share of the image's regular-file bytes; 'fetched' is `bytes_fetched` "
    "(every registry response body, counted at the wire: since issue 11 also the manifest, "
    "config, referrers and published indexes, a few KB here; TOCs, chunk ranges, read-ahead, "
    "prefetch; `fetched_by_cause` splits it); 'of which "
    "TOCs' is the footer + TOC bytes of every layer that was touched (eStargz: the last 64 "
    "KiB of the blob, plus the TOC member if it starts earlier — computed from the blobs).",
    "'lazy + profile': `imagefs mount --prefetch P`, workload started as soon as the mount "
    "returns, so the background prefetch and the workload's own reads race. 'prefetched': "
    "the same, but the workload starts once `bytes_fetched` in `imagefs stats` has not "
    "moved for 1 s (stats has no 'prefetch finished' field); its wait is not in 'total'.",
    "The profile of each workload is recorded once on loopback with `imagefs --root R "
    "profile record REF -o P -- sh -c 'chroot \"$IMAGEFS_MOUNT\" …'` on a throwaway root.",
    "pull + extract: `skopeo copy docker://… oci:…` of the gzip image, `umoci unpack`, "
    "then the workload on the tree with the page cache dropped ('workload' = the *local "
    "cold* run); 'fetched' is the registry log's GET bytes. local warm: median of three "
    "more runs right after.",
    "Emulated WAN: imagefs `--net-latency 20 --net-bandwidth 100mbit`; skopeo through {shaping}.",
    "2 cores shared with other engineers' test suites: expect tens of percent of noise; "
    "medians of the runs damp it.",
)


def lazy_toc_bytes(built: BuiltImage, variant: str, tag: str) -> list[int]:
    """Per layer: what loading the layer's TOC fetches (eStargz only; 0 otherwise)."""
    if variant != "estargz":
        return [0] * len(built.layers)
    layout = built.image.layout
    from imagefs.testing.images import LayoutImage

    image = LayoutImage(layout, tag)
    return [
        toc_fetch_bytes(layout / "blobs" / "sha256" / str(d["digest"]).split(":", 1)[1])
        for d in image.layers()
    ]


__all__ = ["LOOPBACK", "Setup", "lazy_toc_bytes", "plot", "render", "run_experiment"]
