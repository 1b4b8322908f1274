"""`tools/bench --experiment lazy`: true lazy loading of an uncached image, per layer format.

The image (`images.LAZY`, ~300 MB in 5 layers) is pushed once per format — gzip with a
published imagefs index, eStargz, zstd:chunked — and each measured mount starts on a fresh
root (nothing cached) with the page cache dropped. From `imagefs mount` start: the first byte
of one small file (`/etc/debian_version`), and what was fetched by then; then everything read
(`tar cf - . | wc -c`) in the same mount. Side by side, in the same run: pull-and-extract
(`skopeo copy` + `umoci unpack`, then the same reads on the tree). Every configuration on
loopback and under the emulated WAN (see `lazyrun`).

Before measuring, a mount of the eStargz image is compared entry by entry with one of the
gzip image (`imagefs.testing.treecmp`, as `tools/treecmp` does).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import images
from bench.lazyrun import (
    NETS,
    Imagefs,
    Net,
    pull_and_extract,
    read_all,
    read_first_byte,
    registry_get_bytes,
    stat_int,
)
from bench.util import BenchError, drop_caches, log, remove_tree
from imagefs.testing.images import PushedImage
from imagefs.testing.registry import LocalRegistry
from imagefs.testing.treecmp import diff, listing

SMALL_FILE = "etc/debian_version"
LAZY_FORMATS = ("gzip+index", "estargz", "zstd:chunked")
BASELINE = "pull+extract"
MB = 1e6

Results = dict[str, dict[str, dict[str, list[float]]]]
"""system -> net -> metric -> one value per run."""


@dataclass
class Setup:
    built: images.BuiltImage
    registry: LocalRegistry
    pushed: dict[str, PushedImage]
    imagefs: Imagefs
    work: Path


def push_variants(
    built: images.BuiltImage, registry: LocalRegistry, imagefs_bin: Path, names: Sequence[str]
) -> dict[str, PushedImage]:
    out = {}
    for name in names:
        log(f"pushing the {name} variant")
        out[name] = images.VARIANTS[name].push(built, registry, imagefs_bin)
    return out


def compare_trees(setup: Setup, a: str, b: str) -> list[str]:
    """Differences between mounts of two variants (empty: identical)."""
    log(f"treecmp: a mount of {a} against one of {b}")
    fs = setup.imagefs
    net = NETS["loopback"]
    with (
        fs.mount(setup.pushed[a].ref, net, "cmp-a") as ma,
        fs.mount(setup.pushed[b].ref, net, "cmp-b") as mb,
    ):
        return list(diff(listing(str(ma.mnt)), listing(str(mb.mnt)), 20))


def lazy_session(setup: Setup, fmt: str, net: Net) -> dict[str, float]:
    fs = setup.imagefs
    drop_caches()
    setup.registry.mark()
    with fs.mount(setup.pushed[fmt].ref, net, "lazy") as m:
        read_first_byte(m.mnt / SMALL_FILE)
        ttfb = time.perf_counter() - m.started
        first = fs.stats(m)
        first_reg = registry_get_bytes(setup.registry)
        nbytes = read_all(m.mnt)
        all_s = time.perf_counter() - m.started
        last = fs.stats(m)
        all_reg = registry_get_bytes(setup.registry)
    layers = last.get("layers")
    size = sum(int(x["size"]) for x in layers) if isinstance(layers, list) else 0
    waited = last.get("read_wait")  # reads not answered at once (an older imagefs: none)
    if not isinstance(waited, dict):
        waited = {}
    return {
        "mount_s": m.ready_s,
        "ttfb_s": ttfb,
        "first_fetched": float(stat_int(first, "bytes_fetched")),
        "first_registry": float(first_reg),
        "all_s": all_s,
        "all_fetched": float(stat_int(last, "bytes_fetched")),
        "all_registry": float(all_reg),
        "tar_bytes": float(nbytes),
        "image_bytes": float(size),
        "requests_first": float(stat_int(first, "registry_requests")),
        "requests_all": float(stat_int(last, "registry_requests")),
        "waited_reads": float(waited.get("reads", 0)),
        "wait_s": float(waited.get("seconds", 0.0)),
    }


def baseline_session(setup: Setup, net: Net) -> dict[str, float]:
    setup.registry.mark()
    home = setup.work / "pull-extract"
    try:
        start = time.perf_counter()
        tree = pull_and_extract(setup.registry, setup.pushed["gzip+index"].ref, net, home)
        # pull_and_extract dropped the page cache before it started the clock
        start = time.perf_counter() - tree.pull_s - tree.extract_s
        read_first_byte(tree.rootfs / SMALL_FILE)
        ttfb = time.perf_counter() - start
        reg = registry_get_bytes(setup.registry)
        nbytes = read_all(tree.rootfs)
        all_s = time.perf_counter() - start
    finally:
        remove_tree(home)
    return {
        "pull_s": tree.pull_s,
        "extract_s": tree.extract_s,
        "ttfb_s": ttfb,
        "first_registry": float(reg),
        "all_s": all_s,
        "all_registry": float(reg),
        "tar_bytes": float(nbytes),
    }


def run_experiment(
    setup: Setup, nets: Sequence[Net], runs: int, results: Results, systems: Sequence[str]
) -> None:
    for r in range(runs):
        for net in nets:
            for system in systems:
                try:
                    if system == BASELINE:
                        m = baseline_session(setup, net)
                    else:
                        m = lazy_session(setup, system, net)
                except BenchError as e:
                    log(f"run {r + 1}/{runs} {system} {net.name} FAILED: {e}")
                    slot = results.setdefault(system, {}).setdefault(net.name, {})
                    slot.setdefault("failed", []).append(1)
                    continue
                slot = results.setdefault(system, {}).setdefault(net.name, {})
                for k, v in m.items():
                    slot.setdefault(k, []).append(v)
                log(
                    f"run {r + 1}/{runs} {net.name} {system}: first byte {m['ttfb_s']:.2f}s, "
                    f"all {m['all_s']:.1f}s, fetched {m['all_registry'] / MB:.1f} MB"
                )


# --------------------------------------------------------------------------------------------
# the report


def _med(results: Results, system: str, net: str, key: str) -> float | None:
    values = results.get(system, {}).get(net, {}).get(key)
    return statistics.median(values) if values else None


ROWS: tuple[tuple[str, str, str, float], ...] = (
    ("mount ready (s)", "mount_s", "{:.2f}", 1),
    ("pull (s)", "pull_s", "{:.1f}", 1),
    ("extract (s)", "extract_s", "{:.1f}", 1),
    ("**first byte of /etc/debian_version (s)**", "ttfb_s", "{:.2f}", 1),
    ("fetched by then, imagefs stats (MB)", "first_fetched", "{:.2f}", 1 / MB),
    ("fetched by then, registry log (MB)", "first_registry", "{:.2f}", 1 / MB),
    ("registry requests by then", "requests_first", "{:.0f}", 1),
    ("**everything read (s)**", "all_s", "{:.1f}", 1),
    ("fetched in all, imagefs stats (MB)", "all_fetched", "{:.1f}", 1 / MB),
    ("fetched in all, registry log (MB)", "all_registry", "{:.1f}", 1 / MB),
    ("registry requests in all", "requests_all", "{:,.0f}", 1),
    ("reads that waited for their bytes", "waited_reads", "{:,.0f}", 1),
    ("their waits, summed (s)", "wait_s", "{:.2f}", 1),
    ("image in this format, compressed (MB)", "image_bytes", "{:.1f}", 1 / MB),
    ("bytes tar read (MB)", "tar_bytes", "{:.1f}", 1 / MB),
    ("failed sessions", "failed", "{:.0f}", 1),
)


def render(
    results: Results,
    setup: Setup,
    nets: Sequence[Net],
    runs: int,
    command: str,
    date: str,
    tools: Sequence[tuple[str, str]],
    treecmp: list[str],
    shaping: str,
) -> str:
    built = setup.built
    systems = [*LAZY_FORMATS, BASELINE]
    lines = [
        "## True lazy loading: an uncached image per layer format (issue 4 item 8)",
        "",
        f"Generated by `{command}` on {date}; every number is the median of {runs} run(s).",
        "",
        f"Image `{built.recipe.name}`: {len(built.layers)} layers, "
        f"{built.merged.bytes / MB:,.0f} MB in {len(built.merged.files):,} regular files "
        f"({built.merged.entries:,} entries), {built.compressed_bytes / MB:,.0f} MB as gzip.",
        "",
    ]
    for i, layer in enumerate(built.layers):
        lines.append(
            f"- layer {i}: {layer.name}: {layer.catalog.bytes / MB:,.1f} MB in "
            f"{len(layer.catalog.files):,} files, {layer.size / MB:,.1f} MB gzip"
        )
    lines.append("")
    for net in nets:
        lines += [
            f"### {net.describe()}",
            "",
            "| metric | " + " | ".join(systems) + " |",
            "|---|" + "---:|" * len(systems),
        ]
        for label, key, fmt, scale in ROWS:
            cells = []
            for s in systems:
                v = _med(results, s, net.name, key)
                cells.append("–" if v is None else fmt.format(v * scale))
            if all(c == "–" for c in cells):
                continue
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Checks and tools:", ""]
    if treecmp:
        lines.append(
            f"- treecmp, a mount of the eStargz image against one of the gzip image: "
            f"{len(treecmp)} difference(s) (first ones below)"
        )
        lines += ["", "```", *treecmp[:10], "```", ""]
    else:
        lines.append(
            "- treecmp: a mount of the eStargz image is identical, entry by entry (type, mode, "
            "owner, size, mtime, link, content, device, xattrs, hard links), to one of the "
            "gzip image"
        )
    lines += [f"- {k}: {v}" for k, v in tools]
    lines += ["", "How it is measured:", ""]
    lines += [f"- {n.format(shaping=shaping)}" for n in NOTES]
    return "\n".join(lines) + "\n"


NOTES = (
    "Formats: **gzip+index** is the umoci-built gzip image with its imagefs layer index "
    "published next to it (`imagefs --root R index --push REF` once, on a throwaway root); "
    "**eStargz** is every gzip layer's tar rewritten by `imagefs.layers.estargz.write_estargz` "
    "(4 MiB chunks, `.no.prefetch.landmark`, the `containerd.io/snapshot/stargz/toc.digest` "
    "annotation) through a tar-to-FileSpec converter (`tools/lib/bench/convert.py`); "
    "**zstd:chunked** is skopeo's conversion (`--dest-compress-format zstd:chunked`).",
    "Each imagefs session: the page cache dropped, a fresh `--root` (nothing cached, no index), "
    "the clock started just before `imagefs mount`; first byte = one `read(2)` of 1 byte of "
    "`/etc/debian_version` (the lookup walks the layers top down, so it needs the "
    "TOC/index of every layer above the one holding the file); then `tar cf - . | wc -c` in "
    "the same mount. 'imagefs stats' is `bytes_fetched` of `imagefs stats --json` (every "
    "registry response body, counted at the wire: since issue 11 manifests, referrers and "
    "published indexes too, besides ranges, TOCs and whole blobs; tables made before then "
    "counted layer bytes only); 'registry log' sums the bytes of every GET the registry "
    "answered.",
    "pull+extract: the page cache dropped, `skopeo copy docker://… oci:…` of the gzip image "
    "then `umoci unpack`, then the same first-byte read and tar on the tree (just written, "
    "so mostly in the page cache).",
    "Emulated WAN: imagefs with `--net-latency 20 --net-bandwidth 100mbit` (its registry "
    "client waits one 20 ms round trip per request; all downloads share one 100 Mbit/s link); "
    "skopeo through {shaping}. Both charge one round trip per request and share one "
    "100 Mbit/s link; neither charges TCP handshakes or slow start.",
    "The registry is Debian's docker-registry (distribution 2.8) on 127.0.0.1; the machine "
    "has 2 cores shared with other engineers' test suites, so expect tens of percent of "
    "noise; medians damp it.",
)
