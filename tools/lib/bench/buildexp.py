"""`tools/bench --experiment build` (issue 12): `imagefs build` on a lazily mounted base
against `buildah bud` (vfs storage, chroot isolation), which pulls every base layer first.

From an empty store / empty buildah storage each time: a 3-step Dockerfile on the Debian
image of the lazy experiment (gzip layers with published imagefs indexes), whose RUN reads
little. Measured per network (loopback; emulated WAN as in the lazy experiment: imagefs
emulates the link itself, buildah goes through tc netem on lo): wall time and bytes the
registry sent; then a rebuild on the warm store (every step CACHED). Finally the built image
is pushed, mounted lazily from an empty store and compared with `umoci unpack` of it.
The section goes to docs/bench.md between markers.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import time
from pathlib import Path

from bench import images, lazy, lazyrun
from bench.lazyrun import Imagefs, Net, registry_get_bytes, shaped_registry
from bench.util import drop_caches, log, remove_tree, run
from imagefs.testing.images import LayoutImage, skopeo_copy, umoci_unpack
from imagefs.testing.registry import LocalRegistry
from imagefs.testing.treecmp import diff, listing

BEGIN = "<!-- tools/bench --experiment build: begin -->"
END = "<!-- tools/bench --experiment build: end -->"
DOCKERFILE = """\
ARG BASE
FROM $BASE
RUN cat /etc/os-release > /built-info && ls /usr/bin | wc -l >> /built-info
COPY note.txt /note.txt
"""


def _context(home: Path) -> Path:
    ctx = home / "ctx"
    remove_tree(ctx)
    ctx.mkdir(parents=True)
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    (ctx / "note.txt").write_text("built by tools/bench --experiment build\n")
    return ctx


def imagefs_build(fs: Imagefs, root: Path, ctx: Path, base: str, net: Net, tag: str) -> float:
    start = time.perf_counter()
    fs.run(
        root, "build", "-q", "--trust-published-index", "-t", tag, "--build-arg", f"BASE={base}",
        str(ctx), net=net,
    )  # fmt: skip
    return time.perf_counter() - start


def buildah_build(home: Path, ctx: Path, base: str, registry: LocalRegistry, net: Net) -> float:
    store = ["--root", str(home / "root"), "--runroot", str(home / "run"),
             "--storage-driver", "vfs"]  # fmt: skip
    remove_tree(home)
    try:
        start = time.perf_counter()
        with shaped_registry(net, registry.host) as host:
            shaped = host + base.removeprefix(registry.host)
            run(["buildah", *store, "bud", "--isolation", "chroot", "--tls-verify=false",
                 "--layers=false", "-q", "-t", "localhost/bench:1", "--build-arg",
                 f"BASE={shaped}", str(ctx)])  # fmt: skip
        return time.perf_counter() - start
    finally:
        subprocess.run(["buildah", *store, "rmi", "--all", "--force"], capture_output=True)
        remove_tree(home)


def run_experiment(
    built: images.BuiltImage,
    registry: LocalRegistry,
    imagefs_bin: Path,
    nets: list[Net],
    runs: int,
    scratch: Path,
) -> str:
    base = lazy.push_variants(built, registry, imagefs_bin, ["gzip+index"])["gzip+index"]
    fs = Imagefs(imagefs_bin, scratch / "imagefs")
    ctx = _context(scratch)
    rows = []
    for net in nets:
        cold: list[float] = []
        warm: list[float] = []
        theirs: list[float] = []
        fetched: list[int] = []
        buildah_bytes: list[int] = []
        for i in range(runs):
            root = fs.fresh_root(f"build-{net.name}")
            drop_caches()
            registry.mark()
            cold.append(imagefs_build(fs, root, ctx, base.ref, net, "bench/built:1"))
            fetched.append(registry_get_bytes(registry))
            warm.append(imagefs_build(fs, root, ctx, base.ref, net, "bench/built:1"))
            log(f"{net.name} run {i + 1}: imagefs {cold[-1]:.2f}s ({fetched[-1]:,} B), "
                f"rebuild {warm[-1]:.2f}s")  # fmt: skip
            if i == runs - 1 and net is nets[0]:
                check_result(fs, root, registry, scratch)
            remove_tree(root)
            drop_caches()
            registry.mark()
            theirs.append(buildah_build(scratch / "buildah", ctx, base.ref, registry, net))
            buildah_bytes.append(registry_get_bytes(registry))
            log(f"{net.name} run {i + 1}: buildah {theirs[-1]:.2f}s ({buildah_bytes[-1]:,} B)")
        med = statistics.median
        rows.append(
            f"| {net.describe()} | {med(cold):.2f} s | {med(fetched) / 1e6:.1f} MB "
            f"({100 * med(fetched) / built.compressed_bytes:.1f}% of the base) | "
            f"{med(warm):.2f} s | {med(theirs):.2f} s | {med(buildah_bytes) / 1e6:.1f} MB | "
            f"{med(theirs) / med(cold):.1f}x |"
        )
    return "\n".join(
        [
            BEGIN,
            "## `imagefs build` on a lazily mounted base (issue 12)",
            "",
            f"`tools/bench --experiment build`: base `{built.recipe.name}` "
            f"({built.compressed_bytes / 1e6:.0f} MB of gzip layers, imagefs indexes "
            f"published), medians of {runs} run(s), from an empty store and an empty buildah "
            "storage each time, page cache dropped. Dockerfile:",
            "",
            "```dockerfile",
            DOCKERFILE.rstrip(),
            "```",
            "",
            "| network | imagefs build | fetched by imagefs | rebuild (warm cache) | "
            "buildah bud | fetched by buildah | speed-up |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            "The built image, pushed and mounted lazily from an empty store, lists identically "
            "to `umoci unpack` of it (treecmp, every field). WAN for imagefs: its own link "
            "emulation (`--net-latency 20 --net-bandwidth 100mbit`, passed on to the base "
            f"mount); for buildah: {lazyrun.shaping_note(lazyrun.SHAPING_USED)}. The machine "
            "is shared (2 cores, other builds running), so single runs vary by ~2x.",
            END,
        ]
    )


def check_result(fs: Imagefs, root: Path, registry: LocalRegistry, scratch: Path) -> None:
    """Push the built image, mount it from an empty store, compare with umoci unpack."""
    ref = f"{registry.host}/bench/built:1"
    fs.run(root, "tag", "bench/built:1", ref)
    fs.run(root, "push", ref)
    layout = scratch / "check-layout"
    bundle = scratch / "check-bundle"
    remove_tree(layout)
    remove_tree(bundle)
    skopeo_copy(f"docker://{ref}", f"oci:{layout}:img", ["--src-tls-verify=false"])
    reference = umoci_unpack(LayoutImage(layout, "img"), bundle)
    with fs.mount(ref, Net("loopback"), "check") as m:
        differences = list(diff(listing(str(m.mnt)), listing(str(reference)), 20))
    shutil.rmtree(bundle, ignore_errors=True)
    if differences:
        raise SystemExit("tools/bench: the built image's mount differs from umoci unpack:\n"
                         + "\n".join(differences))  # fmt: skip
    log("treecmp: the pushed build mounts identically to umoci unpack")


def splice(text: str, section: str) -> str:
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        return head + section + tail
    return text.rstrip("\n") + "\n\n" + section + "\n"
