"""tools/bench: see `tools/bench --help`. Run it through tools/bench, not directly."""

from __future__ import annotations

import argparse
import compileall
import contextlib
import datetime as dt
import hashlib
import json
import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` is tools/lib/bench

from bench import fusetrace, images, profiling, report
from bench.convert import converted_tag
from bench.systems import SYSTEMS, Context, Phase, System
from bench.util import BenchError, cpu_seconds, drop_caches, log, remove_tree, run
from bench.workloads import WORKLOADS
from imagefs.testing.images import PushedImage
from imagefs.testing.registry import LocalRegistry

REPO = Path(__file__).resolve().parents[3]
PY_SPY = REPO / ".bench" / "venv" / "bin" / "py-spy"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="tools/bench",
        description="imagefs against a native extraction and ratarmount: medians of N runs, "
        "written as a markdown table to docs/bench.md and stdout.",
    )
    p.add_argument(
        "--experiment",
        choices=("issue3", "lazy", "slacker", "build"),
        default="issue3",
        help="issue3: the systems and workloads below (default); lazy: an uncached image per "
        "lazy format against pull-and-extract, loopback and emulated WAN (a section of "
        "docs/bench.md); slacker: real workloads, lazy / profile / pull-and-extract "
        "(docs/slacker.md and docs/slacker.svg); build: `imagefs build` on a lazily mounted "
        "base against `buildah bud` (a section of docs/bench.md)",
    )
    p.add_argument(
        "--nets", default="loopback,wan", help="lazy/slacker: loopback, wan or both (default)"
    )
    p.add_argument(
        "--variants",
        default="estargz,gzip+index",
        help="slacker: image variants for the lazy runs, the first one is the headline "
        "(default: estargz,gzip+index)",
    )
    p.add_argument(
        "--only",
        help="lazy: comma-separated systems to (re)run, from gzip+index, estargz, "
        "zstd:chunked, pull+extract; the others' numbers are kept from "
        ".bench/results-lazy.json",
    )
    p.add_argument("--quick", action="store_true", help="small image, 1 run: a smoke check")
    p.add_argument("--runs", type=int, help="runs per system (default 3; 1 with --quick)")
    p.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated, from: {', '.join(SYSTEMS)} (default: all)",
    )
    p.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"comma-separated, from: {', '.join(WORKLOADS)} (default: all)",
    )
    p.add_argument("--phases", default="cold,warm", help="cold, warm or both (default)")
    p.add_argument("--work", type=Path, default=REPO / ".bench", help="work and cache dir")
    p.add_argument(
        "--output",
        type=Path,
        help="markdown file to write (default: docs/bench.md; with --quick .bench/quick.md)",
    )
    p.add_argument("--ratarmount", type=Path, help="ratarmount binary (default: .bench venv)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the imagefs daemon during each workload (to .bench/profiles/); "
        "timings are perturbed, so the table goes to .bench/profile.md",
    )
    p.add_argument(
        "--fuse-trace",
        action="store_true",
        help="record every FUSE request of each mount's sessions with the kernel's "
        "tracepoints: per opcode, count, median latency and total (`fusetrace.py`)",
    )
    p.add_argument(
        "--add",
        action="store_true",
        help="keep the numbers of the previous run written to the same output (its raw "
        ".bench/results-<name>.json) for every system and metric this run does not measure, "
        "so one table can be made in parts (e.g. warm workloads, then cold first byte)",
    )
    p.add_argument(
        "--imagefs-src",
        type=Path,
        default=REPO,
        help="the checkout whose imagefs/ is measured (default: this one); e.g. a "
        "`git worktree` of an older commit, to compare before and after",
    )
    p.add_argument(
        "--live",
        action="store_true",
        help="run imagefs from the work tree as it changes (default: a snapshot taken at start)",
    )
    return p.parse_args(argv)


def snapshot_imagefs(dest: Path, source: Path = REPO) -> str:
    """Copy the imagefs package (from `source`, a checkout) to `dest` and put it first on
    PYTHONPATH for every imagefs process we start, so edits made to the work tree during a
    long run do not mix versions. Returns a short hash of the copied sources.

    The copy is byte-compiled here, as an installed package is: a process started with
    PYTHONDONTWRITEBYTECODE=1 (set in some shells and CI images) would otherwise compile
    every imagefs module from source at each start, ~0.15 s of each mount's start-up that
    no installed imagefs pays."""
    remove_tree(dest)
    shutil.copytree(
        source / "imagefs", dest / "imagefs", ignore=shutil.ignore_patterns("__pycache__")
    )
    compileall.compile_dir(dest / "imagefs", quiet=1)
    digest = hashlib.sha256()
    for path in sorted((dest / "imagefs").rglob("*.py")):
        digest.update(str(path.relative_to(dest)).encode() + b"\0" + path.read_bytes())
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(dest), os.environ.get("PYTHONPATH", "")) if p
    )
    return digest.hexdigest()[:12]


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def tool_versions(ratarmount: Path, sources: str, src: Path = REPO) -> list[tuple[str, str]]:
    def first(args: list[str]) -> str:
        with contextlib.suppress(BenchError, OSError):
            lines = run(args).strip().splitlines()
            return lines[0] if lines else ""
        return "?"

    rev = first(["git", "-C", str(src), "rev-parse", "--short", "HEAD"])
    dirty = first(["git", "-C", str(src), "status", "--porcelain", "--", "imagefs"])
    return [
        (
            "imagefs",
            f"commit {rev}{' + uncommitted changes in imagefs/' if dirty else ''}"
            f" (sources {sources})",
        ),
        ("ratarmount", first([str(ratarmount), "--version"])),
        ("umoci", first(["umoci", "--version"])),
        ("skopeo", first(["skopeo", "--version"])),
        ("registry", first(["docker-registry", "--version"])),
    ]


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.experiment != "issue3":
        return lazy_main(args, argv)
    runs = args.runs or (1 if args.quick else 3)
    system_names = [s for s in args.systems.split(",") if s]
    workload_names = [w for w in args.workloads.split(",") if w]
    phases: list[Phase] = []
    for ph in args.phases.split(","):
        if ph not in ("cold", "warm"):
            raise SystemExit(f"tools/bench: unknown phase {ph!r}")
        phases.append("cold" if ph == "cold" else "warm")
    for name in system_names:
        if name not in SYSTEMS:
            raise SystemExit(f"tools/bench: unknown system {name!r} (known: {', '.join(SYSTEMS)})")
    for name in workload_names:
        if name not in WORKLOADS:
            raise SystemExit(f"tools/bench: unknown workload {name!r}")
    work: Path = args.work.resolve()
    default_output = (
        work / "profile.md"
        if args.profile
        else work / "quick.md"
        if args.quick
        else REPO / "docs" / "bench.md"
    )
    output: Path = args.output or default_output
    profile_dir = work / "profiles" if args.profile else None
    fuse_trace = args.fuse_trace and fusetrace.available()
    if args.fuse_trace and not fuse_trace:
        log("--fuse-trace: no FUSE request tracepoints here (or not root); not recorded")
    ratarmount = args.ratarmount or REPO / ".bench" / "venv" / "bin" / "ratarmount"
    imagefs_bin = Path(sys.executable).parent / "imagefs"
    command = "tools/bench" + "".join(f" {shlex.quote(a)}" for a in argv)
    if not drop_caches():
        log("cannot drop the page cache (not root?): cold numbers will flatter everyone")
    signal.signal(signal.SIGTERM, _on_sigterm)

    recipe = images.QUICK if args.quick else images.FULL
    built = images.build_image(recipe, work / "cache")
    log(
        f"image {recipe.name}: {len(built.layers)} layers, {built.merged.bytes / 1e6:,.0f} MB in "
        f"{len(built.merged.files):,} files, {built.compressed_bytes / 1e6:,.0f} MB compressed"
    )
    results: report.Results = {}
    raw = work / f"results-{output.stem}.json"
    kept: report.Results = json.loads(raw.read_text()) if args.add and raw.exists() else {}
    commands_file = raw.with_suffix(".commands.json")
    commands = json.loads(commands_file.read_text()) if kept and commands_file.exists() else []
    commands.append(command)
    commands_file.write_text(json.dumps(commands))
    started: list[System] = []
    scratch = work / "run"
    with contextlib.ExitStack() as stack:
        remove_tree(scratch)
        stack.callback(remove_tree, scratch)
        sources = (
            "live work tree" if args.live else snapshot_imagefs(scratch / "src", args.imagefs_src)
        )
        registry = stack.enter_context(LocalRegistry(scratch / "registry"))
        log(f"registry at {registry.url}; pushing")
        pushed = images.VARIANTS["gzip"].push(built, registry)
        ctx = Context(scratch, built, registry, pushed, imagefs_bin, ratarmount)
        systems = [SYSTEMS[name](ctx) for name in system_names]
        for system in systems:
            stack.callback(system.teardown)
            system.setup()
            started.append(system)
        for r in range(runs):
            for system in systems:
                _one_run(
                    system, r, runs, phases, workload_names, built, results, profile_dir, fuse_trace
                )
                _save_raw(raw, _merged(kept, results))
        results = _merged(kept, results)
        names = [s.name for s in started]
        described = [(s.name, s.description) for s in started] + [
            (name, SYSTEMS[name](ctx).description)
            for name in SYSTEMS
            if name in results and name not in names
        ]
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = report.render(
        results,
        described,
        built,
        runs,
        "\n".join(commands),
        date,
        tool_versions(ratarmount, sources, args.imagefs_src),
        report.NOTES,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.exists():  # keep the lazy-loading section another experiment wrote
        text += lazy_section(output.read_text())
    output.write_text(text)
    sys.stdout.write(text)
    log(f"written to {output}")
    return 0


LAZY_BEGIN = "<!-- tools/bench --experiment lazy: begin -->"
LAZY_END = "<!-- tools/bench --experiment lazy: end -->"


NOTES_MARK = "<!-- hand-written notes: kept when tools/bench rewrites this file -->"


def lazy_section(text: str) -> str:
    """The lazy-loading section of docs/bench.md, from its begin marker to the end of the
    file (its hand-written notes follow the end marker); "" when there is none."""
    start = text.find(LAZY_BEGIN)
    if start < 0:
        return ""
    return "\n" + text[start:].rstrip("\n") + "\n"


def kept_notes(path: Path) -> str:
    """What follows NOTES_MARK in `path` (hand-written analysis), mark included."""
    text = path.read_text() if path.exists() else ""
    at = text.find(NOTES_MARK)
    return "" if at < 0 else "\n" + text[at:].rstrip("\n") + "\n"


def lazy_main(args: argparse.Namespace, argv: list[str]) -> int:
    """`--experiment lazy` and `--experiment slacker`."""
    from bench import lazy, lazyrun, slacker
    from bench.lazyrun import NETS, Imagefs, check_loopback_clean

    runs = args.runs or (1 if args.quick else 3)
    nets = [NETS[n] for n in args.nets.split(",") if n]
    work: Path = args.work.resolve()
    imagefs_bin = Path(sys.executable).parent / "imagefs"
    command = "tools/bench" + "".join(f" {shlex.quote(a)}" for a in argv)
    if any(n.shaped for n in nets):
        check_loopback_clean()
    if not drop_caches():
        raise SystemExit("tools/bench: the lazy experiments need root (drop_caches, chroot, tc)")
    signal.signal(signal.SIGTERM, _on_sigterm)
    built = images.build_image(images.LAZY, work / "cache")
    log(
        f"image {built.recipe.name}: {len(built.layers)} layers, "
        f"{built.merged.bytes / 1e6:,.0f} MB in {len(built.merged.files):,} files, "
        f"{built.compressed_bytes / 1e6:,.0f} MB compressed"
    )
    scratch = work / f"run-{args.experiment}"
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    with contextlib.ExitStack() as stack:
        remove_tree(scratch)
        stack.callback(remove_tree, scratch)
        sources = "live work tree" if args.live else snapshot_imagefs(scratch / "src")
        tools = [t for t in tool_versions(Path("ratarmount"), sources) if t[0] != "ratarmount"]
        tools += report.machine_facts()
        registry = stack.enter_context(LocalRegistry(scratch / "registry"))
        fs = Imagefs(imagefs_bin, scratch / "imagefs")
        if args.experiment == "build":
            from bench import buildexp

            section = buildexp.run_experiment(built, registry, imagefs_bin, nets, runs, scratch)
            output: Path = args.output or REPO / "docs" / "bench.md"
            old = output.read_text() if output.exists() else ""
            output.write_text(buildexp.splice(old, section))
            sys.stdout.write(section + "\n")
            log(f"written to {output}")
            return 0
        if args.experiment == "lazy":
            names = ["gzip+index", "estargz", "zstd:chunked"]
            pushed = lazy.push_variants(built, registry, imagefs_bin, names)
            setup = lazy.Setup(built, registry, pushed, fs, scratch)
            differences = lazy.compare_trees(setup, "estargz", "gzip+index")
            log(f"treecmp: {len(differences)} difference(s)")
            for line in differences[:20]:
                log(f"  {line}")
            results: lazy.Results = {}
            systems = [*lazy.LAZY_FORMATS, lazy.BASELINE]
            raw = work / "results-lazy.json"
            shaping_used: set[str] = set()
            if args.only:
                systems = [s for s in args.only.split(",") if s]
                if raw.exists():
                    saved = json.loads(raw.read_text())
                    if "results" not in saved:  # written before the shaping was recorded
                        saved = {"results": saved}
                    results = {k: v for k, v in saved["results"].items() if k not in systems}
                    shaping_used = set(saved.get("shaping", []))
            lazy.run_experiment(setup, nets, runs, results, systems)
            shaping_used |= lazyrun.SHAPING_USED
            raw.write_text(
                json.dumps({"results": results, "shaping": sorted(shaping_used)}, indent=1)
            )
            section = lazy.render(
                results,
                setup,
                nets,
                runs,
                command,
                date,
                tools,
                differences,
                lazyrun.shaping_note(shaping_used),
            )
            output = args.output or REPO / "docs" / "bench.md"
            old = output.read_text() if output.exists() else ""
            block = f"{LAZY_BEGIN}\n{section}{LAZY_END}"
            start, end = old.find(LAZY_BEGIN), old.find(LAZY_END)
            if start >= 0 and end > start:
                new = old[:start] + block + old[end + len(LAZY_END) :]
            else:
                new = old.rstrip("\n") + "\n\n" + block + "\n"
            output.write_text(new)
            sys.stdout.write(section)
            log(f"written to {output}")
            return 0
        variants = [v for v in args.variants.split(",") if v]
        pushed = slacker_push(built, registry, imagefs_bin, variants)
        toc = {
            v: slacker.lazy_toc_bytes(built, v, converted_tag(built.recipe.name)) for v in variants
        }
        setup_s = slacker.Setup(built, registry, pushed, fs, scratch, toc)
        sresults: slacker.Results = {}
        try:
            slacker.run_experiment(setup_s, variants, nets, runs, sresults)
        finally:
            _save_raw(work / "results-slacker.json", sresults)  # type: ignore[arg-type]
        output = args.output or REPO / "docs" / "slacker.md"
        plot = output.with_suffix(".svg")
        slacker.plot(sresults, variants[0], nets, plot)
        text = slacker.render(
            sresults,
            setup_s,
            variants,
            nets,
            runs,
            command,
            date,
            tools,
            plot.name,
            lazyrun.shaping_note(),
        )
        output.write_text(text + kept_notes(output))
        sys.stdout.write(text)
        log(f"written to {output} and {plot}")
    return 0


def slacker_push(
    built: images.BuiltImage, registry: LocalRegistry, imagefs_bin: Path, variants: list[str]
) -> dict[str, PushedImage]:
    """The lazy variants, and plain gzip for pull-and-extract (shares gzip+index's blobs)."""
    out = {}
    for name in dict.fromkeys([*variants, "gzip"]):
        log(f"pushing the {name} variant")
        out[name] = images.VARIANTS[name].push(built, registry, imagefs_bin)
    return out


def _one_run(
    system: System,
    r: int,
    runs: int,
    phases: list[Phase],
    workload_names: list[str],
    built: images.BuiltImage,
    results: report.Results,
    profile_dir: Path | None,
    fuse_trace: bool = False,
) -> None:
    mine = results.setdefault(system.name, {})

    def add(key: str, value: float) -> None:
        mine.setdefault(key, []).append(value)

    for phase in phases:
        if phase not in system.phases:
            continue
        if phase == "cold":
            for key, value in system.prepare_run().items():
                add(f"prepare.cold.{key}", value)
        else:
            system.warm_up()
        for name in workload_names:
            workload = WORKLOADS[name]
            if phase not in workload.phases:
                continue
            if phase == "cold":
                drop_caches()
            start = time.perf_counter()
            try:
                with system.session(phase) as tree, contextlib.ExitStack() as spy:
                    if profile_dir is not None and tree.pid is not None:
                        out = profile_dir / f"{system.name}-{phase}-{name}-run{r + 1}"
                        spy.enter_context(profiling.py_spy(PY_SPY, tree.pid, out))
                    # not first byte (timed from the mount command), not a plain directory
                    traced = fuse_trace and workload.daemon_cpu and os.path.ismount(tree.root)
                    requests = spy.enter_context(fusetrace.record(tree.root)) if traced else None
                    cpu = cpu_seconds(tree.pid) if workload.daemon_cpu else None
                    metrics = workload.run(tree, built, phase)
                    if cpu is not None and (after := cpu_seconds(tree.pid)) is not None:
                        # the serving process's own CPU (user + system): what it costs apart
                        # from the kernel's FUSE work and the client's
                        metrics["daemon_cpu_s"] = after - cpu
                if requests is not None:
                    metrics.update(requests.metrics)  # filled as the session's recording ended
            except BenchError as e:
                # One failed session costs its numbers, not the whole (long) bench.
                log(f"run {r + 1}/{runs} {system.name} {phase} {name} FAILED: {e}")
                add("failed_sessions", 1)
                continue
            if tree.ready_s is not None:
                add(f"mount.{phase}.ready_s", tree.ready_s)
            for key, value in metrics.items():
                add(f"{name}.{phase}.{key}", value)
            shown = ", ".join(
                f"{k}={v:,.3f}" for k, v in metrics.items() if not k.startswith("fuse.")
            )
            log(
                f"run {r + 1}/{runs} {system.name} {phase} {name}: {shown} "
                f"(session {time.perf_counter() - start:.1f}s)"
            )


def _merged(kept: report.Results, new: report.Results) -> report.Results:
    """`new`, plus every (system, metric) of `kept` that `new` did not measure."""
    out = {system: dict(metrics) for system, metrics in kept.items()}
    for system, metrics in new.items():
        out.setdefault(system, {}).update(metrics)
    return out


def _save_raw(path: Path, results: report.Results) -> None:
    """Every run's raw numbers, rewritten after each system's run (a crash keeps them)."""
    path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        log("interrupted; mounts and the registry were cleaned up")
        sys.exit(130)
    except BenchError as e:
        log(f"failed: {e}")
        sys.exit(1)
