"""Command line: argument parsing and output only; the verbs live in `imagefs.api`.

Errors are translated here, once: an `ImageFSError` becomes one line on stderr and its exit
code (2 for usage errors, 1 otherwise); `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from imagefs.config import (
    default_config_dir,
    default_root,
    load_file_config,
    parse_mirror_flag,
)
from imagefs.errors import ImageFSError, NotFound, UsageError, unwrap_groups
from imagefs.formats import docker_time, human_ago, human_size, parse_filters, render

# trio, the registry client and the rest are imported where a command needs them: the CLI
# module stays light so that `imagefs mount` can start its daemon without paying for them.
if TYPE_CHECKING:
    from imagefs import api

PROG = "imagefs"
REF_HELP = "NAME[:TAG], NAME@DIGEST or image ID"
FORMAT_HELP = (
    "table (default), json (a JSON object per line), 'table TEMPLATE' or a Go TEMPLATE, "
    "e.g. '{{.ID}}\\t{{.Repository}}'"
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


class _CommandParser(_Parser):
    """A command's parser: what it does not know is its own error (`imagefs images: error:
    unknown flag: --bogus` with the usage of `images`), not the top-level usage."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        ns, extra = super().parse_known_args(args, namespace)
        if extra:
            flag = next((x for x in extra if x.startswith("-")), None)
            self.error(
                f"unknown flag: {flag}" if flag else f"unexpected argument: {' '.join(extra)}"
            )
        return ns, extra


def _common(p: argparse.ArgumentParser, *, top: bool) -> None:
    """Global options, accepted before or after the command name.

    On the subcommands they default to SUPPRESS so that an option given before the command
    is not overwritten by the subcommand's default.
    """

    def d(value: object) -> object:
        return value if top else argparse.SUPPRESS

    # On a command they form a group of their own, listed after the command's own options.
    g: Any = p if top else p.add_argument_group("global options")
    g.add_argument(
        "--root",
        type=Path,
        default=d(None),
        help="store directory (default: $IMAGEFS_ROOT, /var/lib/imagefs as root, "
        "else $XDG_DATA_HOME/imagefs)",
    )
    g.add_argument(
        "--config",
        type=Path,
        default=d(None),
        help="config directory (default: $IMAGEFS_CONFIG, /etc/imagefs as root, "
        "else $XDG_CONFIG_HOME/imagefs)",
    )
    g.add_argument(
        "--insecure-registry",
        action="append",
        default=d([]),
        metavar="HOST[:PORT]",
        help="allow plain HTTP and unverified TLS for this registry (repeatable)",
    )
    g.add_argument(
        "--registry-mirror",
        action="append",
        default=d([]),
        metavar="[REGISTRY=]URL",
        help="try this mirror first for reads (docker.io unless REGISTRY= is given)",
    )
    g.add_argument(
        "--net-latency",
        type=float,
        default=d(None),
        metavar="MS",
        help="emulate a network: add MS milliseconds to every registry request",
    )
    g.add_argument(
        "--net-bandwidth",
        default=d(None),
        metavar="RATE",
        help="emulate a network: share RATE (e.g. 100mbit) among all downloads",
    )
    g.add_argument(
        "--registry-timeout",
        type=_seconds,
        default=d(None),
        metavar="SECONDS",
        help="give up on a registry request (retries included) that has not answered within "
        "SECONDS; a mount then answers EIO for the read that needed it (default: no overall "
        "limit; 10s connect and 60s read timeouts, 5 attempts)",
    )
    g.add_argument(
        "--debug", action="store_true", default=d(False), help="log details and show tracebacks"
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(f"want 0 < SECONDS < 86400, not {text!r}")
    return value


def _build_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("context", type=Path, help="the build context directory")
    p.add_argument(
        "-t",
        "--tag",
        dest="tags",
        action="append",
        default=[],
        metavar="NAME",
        help="name the image NAME[:TAG] (repeatable)",
    )
    p.add_argument(
        "-f", "--file", metavar="DOCKERFILE", help="default CONTEXT/Dockerfile; - = stdin"
    )
    p.add_argument(
        "--build-arg",
        action="append",
        default=[],
        metavar="K[=V]",
        help="set a build-time variable (K alone: from the environment)",
    )
    p.add_argument("--target", metavar="STAGE", help="build up to this stage")
    p.add_argument("--no-cache", action="store_true", help="do not use the build cache")
    p.add_argument("--pull", action="store_true", help="resolve base images again")
    p.add_argument("--network", choices=["host", "none"], default="host", help="for RUN")
    p.add_argument(
        "--label", action="append", default=[], metavar="K=V", help="add a label to the image"
    )
    p.add_argument(
        "--compression",
        default="gzip",
        choices=["gzip", "estargz", "zstd:chunked"],
        help="layer compression (gzip or estargz; zstd:chunked not yet)",
    )
    p.add_argument(
        "--progress",
        choices=["auto", "plain", "quiet"],
        default="auto",
        help="progress output (auto: a live view on a terminal, plain otherwise)",
    )
    p.add_argument("--platform", help="os/arch[/variant] of base images to pull")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the image ID")


async def cmd_build(s: api.Session, a: argparse.Namespace) -> int:
    from imagefs.build.builder import BuildOptions, build
    from imagefs.build.progress import Progress

    def pairs(items: list[str], what: str, env_default: bool) -> dict[str, str]:
        out = {}
        for item in items:
            k, eq, v = item.partition("=")
            if not k:
                raise UsageError(f"{what} wants K=V, not {item!r}")
            if eq:
                out[k] = v
            elif env_default and k in os.environ:  # docker: `--build-arg K` takes $K
                out[k] = os.environ[k]
        return out

    if a.file == "-":
        text = sys.stdin.read()
    else:
        path = Path(a.file) if a.file else a.context / "Dockerfile"
        try:
            text = path.read_text()
        except OSError as exc:
            raise UsageError(f"cannot read Dockerfile {path}: {exc.strerror}") from None
    opts = BuildOptions(
        context=a.context,
        dockerfile=text,
        tags=a.tags,
        build_args=pairs(a.build_arg, "--build-arg", True),
        target=a.target,
        no_cache=a.no_cache,
        pull=a.pull,
        network=a.network,
        labels=pairs(a.label, "--label", False),
        compression=a.compression,
        platform=a.platform,
    )
    import signal

    import trio

    tty = a.progress == "auto" and sys.stderr.isatty()
    mode = "quiet" if a.quiet or a.progress == "quiet" else "tty" if tty else "plain"
    progress = Progress(mode)
    result = None
    # SIGTERM cancels the build like Ctrl-C: mounts and containers are undone on the way out.
    with progress, trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def on_term() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

            async def run() -> None:
                nonlocal result
                result = await build(s, opts, progress)
                nursery.cancel_scope.cancel()

            nursery.start_soon(on_term)
            nursery.start_soon(run)
    if result is None:
        print(f"{PROG}: build terminated", file=sys.stderr)
        return 143
    print(result.image_id if a.quiet else f"Built {result.image_id}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Mount and manage OCI/Docker images, lazily.")
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_CommandParser)
    sub.required = True

    def cmd(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        _common(p, top=False)
        return p

    p = cmd("pull", "Fetch an image's manifest and config (and its layers with --full)")
    p.add_argument("reference", metavar="NAME[:TAG|@DIGEST]", help="the image to pull")
    p.add_argument("--platform", help="os/arch[/variant] (default: this machine's)")
    p.add_argument("--full", action="store_true", help="download every layer now")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the reference")

    p = cmd("push", "Push a local image to the registry its name points at")
    p.add_argument("reference", metavar="NAME[:TAG]", help="the local image, by the name to push")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the pushed digest line")

    p = cmd("images", "List local images")
    p.add_argument(
        "reference",
        nargs="?",
        metavar="REPOSITORY[:TAG]",
        help="only these (globs allowed)",
    )
    p.add_argument(
        "-a", "--all", action="store_true", help="accepted as docker's (no intermediate images)"
    )
    p.add_argument("--digests", action="store_true", help="show repo digests")
    p.add_argument(
        "-f",
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dangling=true|false, reference=PATTERN, label=KEY[=VALUE], before=IMAGE, "
        "since=IMAGE (repeatable)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="only image IDs")
    p.add_argument("--no-trunc", action="store_true", help="full image IDs")
    p.add_argument("--format", default="table", metavar="FORMAT", help=FORMAT_HELP)

    p = cmd("tag", "Give a local image another name")
    p.add_argument("source", help="name, image ID (full or short) or digest")
    p.add_argument("target", metavar="TARGET[:TAG]", help="the new name")

    p = cmd("rmi", "Remove images (untag; delete blobs no other image uses)")
    p.add_argument("references", nargs="+", metavar="IMAGE", help=REF_HELP)
    p.add_argument(
        "-f",
        "--force",
        action="store_true",
        help="even if mounted or named in several repositories",
    )

    p = cmd("inspect", "Show image details as JSON (docker's keys plus ImageFS)")
    p.add_argument("references", nargs="+", metavar="IMAGE", help=REF_HELP)
    p.add_argument(
        "-f",
        "--format",
        default="json",
        metavar="FORMAT",
        help="json (default), or a Go template run on each image, e.g. '{{.Config.Env}}'",
    )

    p = cmd("login", "Store credentials for a registry (docker's config.json)")
    p.add_argument("registry", nargs="?", default="docker.io", help="default: docker.io")
    p.add_argument("-u", "--username", help="asked for on a terminal when not given")
    p.add_argument("-p", "--password", help="insecure: prefer --password-stdin")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")

    p = cmd("logout", "Remove stored credentials for a registry")
    p.add_argument("registry", nargs="?", default="docker.io", help="default: docker.io")

    p = cmd("mount", "Mount an image read-only; layers are fetched when first read")
    p.add_argument("reference", metavar="IMAGE", help=REF_HELP + " (pulled if not local)")
    p.add_argument("mountpoint", type=Path, help="an empty directory")
    p.add_argument("--platform", help="os/arch[/variant] when the image must be pulled")
    p.add_argument(
        "-f", "--foreground", action="store_true", help="stay in the foreground, logging to stderr"
    )
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTS",
        help="allow_other, suid, dev (default: nosuid,nodev; always ro)",
    )
    p.add_argument(
        "--cache-size",
        metavar="SIZE",
        help="cap of the piece cache shared by mounts of this root (default: "
        "config file `cache-size`, else 10GiB); e.g. 512MiB",
    )
    p.add_argument(
        "--background-fetch",
        action="store_true",
        help="fetch the rest of the image in the background, below reads in priority",
    )
    p.add_argument(
        "--trace",
        type=Path,
        metavar="FILE",
        help="write one JSON line per filesystem operation to FILE",
    )
    p.add_argument(
        "--prefetch",
        type=Path,
        metavar="PROFILE",
        help="fetch what PROFILE lists, in order, in the background after mounting",
    )
    p.add_argument(
        "--no-prefetch-landmark",
        action="store_true",
        help="ignore eStargz .prefetch.landmark (honoured by default)",
    )
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    p = cmd("index", "Build the random-access indexes of an image's gzip/zstd layers")
    p.add_argument("reference", metavar="IMAGE", help=REF_HELP)
    p.add_argument(
        "--push",
        action="store_true",
        help="publish them next to the image (OCI artifact, referrers or tag)",
    )
    p.add_argument("--platform", help="os/arch[/variant] when the image must be pulled")

    _build_parser(cmd("build", "Build an image from a Dockerfile, on lazily mounted bases (root)"))

    p = cmd("profile", "Prefetch profiles: record what a workload reads; publish them")
    psub = p.add_subparsers(dest="profile_command", metavar="ACTION", parser_class=_CommandParser)
    psub.required = True
    pr = psub.add_parser(
        "record",
        help="mount REF, run COMMAND with $IMAGEFS_MOUNT set, write what it read to PROFILE",
    )
    _common(pr, top=False)
    pr.add_argument("reference", metavar="IMAGE", help=REF_HELP)
    pr.add_argument(
        "-o", "--output", type=Path, required=True, metavar="PROFILE", help="the profile to write"
    )
    pr.add_argument("--platform", help="os/arch[/variant] when the image must be pulled")
    pr.set_defaults(workload=[])  # what follows `--` on the command line (see main)
    pp = psub.add_parser("push", help="store PROFILE next to the image (OCI artifact)")
    _common(pp, top=False)
    pp.add_argument("reference", metavar="IMAGE", help=REF_HELP)
    pp.add_argument("profile", type=Path, help="the profile file to publish")
    pl = psub.add_parser("pull", help="fetch the newest published profile of the image")
    _common(pl, top=False)
    pl.add_argument("reference", metavar="IMAGE", help=REF_HELP)
    pl.add_argument(
        "-o", "--output", type=Path, required=True, metavar="PROFILE", help="where to write it"
    )

    p = cmd("trace", "Work with mount traces (mount --trace FILE)")
    tsub = p.add_subparsers(dest="trace_command", metavar="ACTION", parser_class=_CommandParser)
    tsub.required = True
    tr = tsub.add_parser("report", help="an HTML report with plots of a trace")
    _common(tr, top=False)
    tr.add_argument("trace", type=Path, help="a trace written by `mount --trace`")
    tr.add_argument("-o", "--output", type=Path, help="default: TRACE with .html")
    tr.add_argument(
        "--image-json",
        type=Path,
        metavar="FILE",
        help="`imagefs inspect REF` output, for image and layer sizes",
    )

    p = cmd("ls", "List a directory of an image without mounting it (fetches lazily)")
    p.add_argument("reference", metavar="IMAGE", help=REF_HELP + " (pulled if not local)")
    p.add_argument("path", nargs="?", default="/", help="a path in the image (default: /)")
    p.add_argument("-l", dest="long", action="store_true", help="long listing (numeric ids)")
    p.add_argument("-R", dest="recursive", action="store_true", help="recursive")
    p.add_argument("-A", dest="almost_all", action="store_true", help="show dotfiles")
    p.add_argument("--platform", help="os/arch[/variant] (default: this machine's)")
    p.add_argument("--cache-size", metavar="SIZE", help="cap of the piece cache (as mount's)")

    p = cmd("cat", "Print files of an image without mounting it (fetches only their pieces)")
    p.add_argument("reference", metavar="IMAGE", help=REF_HELP + " (pulled if not local)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="files in the image")
    p.add_argument("--platform", help="os/arch[/variant] (default: this machine's)")
    p.add_argument("--cache-size", metavar="SIZE", help="cap of the piece cache (as mount's)")

    p = cmd("umount", "Unmount an imagefs mount (the daemon exits)")
    p.add_argument("mountpoint", type=Path, help="where the image is mounted")

    p = cmd("stats", "Live statistics of a running mount (from its control socket)")
    p.add_argument("mountpoint", type=Path, help="where the image is mounted")
    p.add_argument("--json", action="store_true", help="the raw JSON document")
    p.add_argument(
        "--format",
        default="table",
        metavar="FORMAT",
        help="table (default), json, or a Go template, e.g. '{{.BytesFetched}}'",
    )
    p.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=1.0,
        metavar="SECONDS",
        help="print again every SECONDS (default 1) until interrupted",
    )

    p = cmd("mounts", "List active imagefs mounts")
    p.add_argument("--format", default="table", metavar="FORMAT", help=FORMAT_HELP)

    p = cmd("check", "Verify every blob, cache piece and index of the store")
    p.add_argument(
        "--repair",
        action="store_true",
        help="delete what is damaged (it is fetched again when needed)",
    )

    p = cmd("prune", "Remove dangling images no mount uses, and blobs no image references")
    p.add_argument(
        "-q", "--quiet", action="store_true", help="print only the total reclaimed space"
    )
    p.add_argument("--build-cache", action="store_true", help="also empty the build cache")
    _short_usages(parser)
    return parser


def _short_usages(parser: argparse.ArgumentParser) -> None:
    """docker's usage line, `imagefs images [OPTIONS] [REPOSITORY[:TAG]]`: the options are
    listed (the command's own first) under it, not spelled out in it."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for sub in dict.fromkeys(action.choices.values()):
            words = []
            for a in sub._actions:
                if a.option_strings:
                    continue
                if isinstance(a, argparse._SubParsersAction):
                    words.append("ACTION ...")
                    _short_usages(sub)
                    continue
                name = a.metavar if isinstance(a.metavar, str) else a.dest.upper()
                words.append(
                    f"[{name}]"
                    if a.nargs == "?"
                    else f"{name} [{name} ...]"
                    if a.nargs == "+"
                    else name
                )
            sub.usage = " ".join(["%(prog)s [OPTIONS]", *words])


# -- formatting -------------------------------------------------------------------------------


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def cached_column(cached: int, size: int) -> str:
    total = size or 1
    return f"{human_size(cached)} ({100 * cached // total}%)"


# -- commands ---------------------------------------------------------------------------------


async def cmd_pull(s: api.Session, a: argparse.Namespace) -> int:
    from imagefs import api
    from imagefs.oci.reference import Reference

    platform = _platform(a)
    ref = Reference.parse(a.reference)
    last = a.reference.rpartition("/")[2]
    if not a.quiet and ref.digest is None and ":" not in last:  # docker's first line
        print("Using default tag: latest")
    progress = None
    bars: Any = None
    if a.full and not a.quiet:
        bars = _pull_progress()
        progress = bars.update
    on_resolved = None
    if isinstance(bars, _LayerLines):
        store = s.store

        def on_resolved(image: Any) -> None:
            for layer in image.layers:  # a stat each, before any download starts
                if store.blobs.has(layer.digest):
                    bars.already(layer)

    try:
        result = await api.pull(
            s,
            a.reference,
            platform=platform,
            full=a.full,
            progress=progress,
            on_resolved=on_resolved,
        )
    finally:
        if bars is not None:
            bars.stop()
    if a.quiet:
        print(result.reference)
        return 0
    ref = result.reference
    if not a.full:
        n = len(result.image.layers)
        print(
            f"{ref.tag or ref.digest}: Pulled metadata ({n} layer{'' if n == 1 else 's'}, "
            "fetched lazily when read)"
        )
    print(f"Digest: {result.image.repo_digest}")
    status = "Image is up to date for" if result.up_to_date else "Downloaded newer image for"
    print(f"Status: {status} {ref.familiar}")
    print(str(ref))
    return 0


class _LayerLines:
    """`pull --full` off a terminal: a line per layer, as docker prints them to a pipe."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def already(self, layer: Any) -> None:
        print(f"{layer.digest.short}: Already exists", flush=True)

    def update(self, layer: Any, n: int) -> None:
        key = str(layer.digest)
        if key not in self.seen:
            self.seen[key] = 0
            print(f"{layer.digest.short}: Pulling fs layer", flush=True)
        self.seen[key] += n
        if self.seen[key] >= layer.size:
            print(f"{layer.digest.short}: Pull complete", flush=True)

    def stop(self) -> None:
        pass


class _LayerBars:
    """`pull --full` on a terminal: a progress bar per layer."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TransferSpeedColumn,
        )

        self.bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            transient=False,
        )
        self.tasks: dict[str, Any] = {}
        self.bars.start()

    def update(self, layer: Any, n: int) -> None:
        key = str(layer.digest)
        if key not in self.tasks:
            self.tasks[key] = self.bars.add_task(layer.digest.short, total=layer.size)
        self.bars.advance(self.tasks[key], n)

    def stop(self) -> None:
        self.bars.stop()


def _pull_progress() -> _LayerLines | _LayerBars:
    return _LayerBars() if sys.stderr.isatty() else _LayerLines()


def _platform(a: argparse.Namespace) -> Any:
    from imagefs.oci.platform import Platform

    return Platform.parse(a.platform) if getattr(a, "platform", None) else None


async def cmd_push(s: api.Session, a: argparse.Namespace) -> int:
    from imagefs import api

    def show(digest: Any, what: str) -> None:
        if not a.quiet:
            print(f"{digest.short}: {what}")

    result = await api.push(s, a.reference, progress=show)
    tag = result.reference.tag or "latest"
    print(f"{tag}: digest: {result.digest} size: {result.size}")
    from imagefs.build.publish import publish_built_indexes

    published = await publish_built_indexes(s, a.reference)
    if published is not None and not a.quiet:
        print(f"layer indexes: {published.layers} published ({published.manifest_digest})")
    return 0


IMAGE_HEADERS = {
    "Repository": "REPOSITORY",
    "Tag": "TAG",
    "Digest": "DIGEST",
    "ID": "IMAGE ID",
    "CreatedSince": "CREATED",
    "CreatedAt": "CREATED AT",
    "Size": "SIZE",
    "Cached": "CACHED",
    "ManifestDigest": "MANIFEST DIGEST",
}


async def cmd_images(s: api.Session, a: argparse.Namespace) -> int:
    from imagefs import api

    filters = parse_filters(a.filter, api.IMAGE_FILTERS)
    found = await api.images(s, a.reference, all_images=a.all, filters=filters)
    if a.quiet:
        seen = []
        for item in found:
            ident = str(item.image.id) if a.no_trunc else item.image.id.short
            if ident not in seen:
                seen.append(ident)
        print("\n".join(seen)) if seen else None
        return 0
    rows = [image_row(item, no_trunc=a.no_trunc) for item in found]
    digest = "{{.Digest}}\t" if a.digests else ""
    default = (
        f"table {{{{.Repository}}}}\t{{{{.Tag}}}}\t{digest}{{{{.ID}}}}\t{{{{.CreatedSince}}}}"
        "\t{{.Size}}\t{{.Cached}}"
    )
    sys.stdout.write(render(a.format, rows, IMAGE_HEADERS, default))
    return 0


def image_row(item: api.ImageSummary, *, no_trunc: bool = False) -> dict[str, Any]:
    """What `images --format` templates see, by docker's field names (keys sorted, as docker's
    `{{json .}}` prints them); Cached and ManifestDigest are imagefs's own."""
    rd = item.record.repo_digest
    created = item.image.config.created
    row = {
        "Repository": item.repository,
        "Tag": item.tag,
        "Digest": str(rd.digest) if rd and rd.digest else "<none>",
        "ID": str(item.image.id) if no_trunc else item.image.id.short,
        "CreatedAt": docker_time(created),
        "CreatedSince": human_ago(created),
        "Size": human_size(item.size),
        "Cached": cached_column(item.cached, item.size - item.image.manifest.config.size),
        "ManifestDigest": str(item.image.manifest_digest),
    }
    return dict(sorted(row.items()))


async def cmd_tag(s: api.Session, a: argparse.Namespace) -> int:
    from imagefs import api

    await api.tag(s, a.source, a.target)
    return 0


async def cmd_rmi(s: api.Session, a: argparse.Namespace) -> int:
    """docker's way: each argument on its own, an error line for each that fails, exit 1
    at the end if any did."""
    from imagefs import api

    failed = False
    for query in a.references:
        try:
            result = await api.rmi_one(s, query, force=a.force)
        except ImageFSError as exc:
            print(f"{PROG}: {exc}", file=sys.stderr, flush=True)
            failed = True
            continue
        for name in result.untagged:
            print(f"Untagged: {name}")
        for digest, _size in result.deleted:
            print(f"Deleted: {digest}")
        sys.stdout.flush()
    return 1 if failed else 0


async def cmd_inspect(s: api.Session, a: argparse.Namespace) -> int:
    """docker's way: what can be found is printed, an error for each argument that cannot."""
    from imagefs import api
    from imagefs.gotemplate import parse

    template = None if a.format == "json" else parse(a.format)
    found: list[dict[str, Any]] = []
    errors: list[str] = []
    for query in a.references:
        try:
            found.append(await api.inspect_one(s, query))
        except ImageFSError as exc:
            errors.append(f"{PROG}: {exc}")
    if template is None:
        print(api.dump_json(found))
    else:
        for obj in found:
            print(template.execute(obj))
    for line in errors:
        print(line, file=sys.stderr)
    return 1 if errors else 0


async def cmd_login(s: api.Session, a: argparse.Namespace) -> int:
    from imagefs import api

    username = a.username
    if username is None:
        if not sys.stdin.isatty() or a.password_stdin:
            raise UsageError("login: --username is required when not on a terminal")
        username = input("Username: ")
    if a.password_stdin:
        password = sys.stdin.read().rstrip("\r\n")
    elif a.password is not None:
        print(
            "WARNING! Using --password via the CLI is insecure. Use --password-stdin.",
            file=sys.stderr,
        )
        password = a.password
    elif sys.stdin.isatty():
        password = api.read_password_interactively()
    else:
        raise UsageError("login: give the password with --password-stdin")
    if not password:
        raise UsageError("login: empty password")
    await api.login(s, a.registry, username, password)
    print("Login Succeeded")
    return 0


async def cmd_logout(s: api.Session, a: argparse.Namespace) -> int:
    from imagefs import api

    host = api.normalize_registry_host(a.registry)
    if await api.logout(s, a.registry):
        print(f"Removing login credentials for {host}")
    else:
        print(f"Not logged in to {host}")
    return 0


async def cmd_trace(s: api.Session, a: argparse.Namespace) -> int:
    import trio

    from imagefs.report import load_image_json, write_report

    image = load_image_json(a.image_json) if a.image_json else None
    output = a.output or a.trace.with_suffix(".html")
    summary = await trio.to_thread.run_sync(write_report, a.trace, output, image)
    del summary
    print(f"Wrote {output}")
    return 0


async def cmd_ls(s: api.Session, a: argparse.Namespace) -> int:
    from imagefs import browse
    from imagefs.oci.platform import Platform

    platform = Platform.parse(a.platform) if a.platform else None
    lines = await browse.ls(
        s,
        a.reference,
        a.path,
        long=a.long,
        recursive=a.recursive,
        almost_all=a.almost_all,
        platform=platform,
        cache_size=_cache_size(a),
    )
    for line in lines:
        print(line)
    return 0


async def cmd_cat(s: api.Session, a: argparse.Namespace) -> int:
    from imagefs import browse
    from imagefs.browse import SymlinkLoop
    from imagefs.errors import NotAFile
    from imagefs.oci.platform import Platform

    platform = Platform.parse(a.platform) if a.platform else None
    try:
        await browse.cat(
            s, a.reference, a.paths, sys.stdout.buffer, platform=platform, cache_size=_cache_size(a)
        )
    except (NotAFile, SymlinkLoop) as exc:  # a path's own trouble: GNU cat's words and exit 1
        print(f"{PROG} cat: {exc}", file=sys.stderr)
        return 1
    return 0


async def cmd_check(s: api.Session, a: argparse.Namespace) -> int:
    import trio

    from imagefs.check import check_store

    report = await trio.to_thread.run_sync(check_store, s.root, a.repair)
    for problem in report.problems:
        print(problem)
    print(
        f"Checked {report.blobs} blobs, {report.pieces} cache pieces, {report.indexes} "
        f"indexes, {report.images} images: "
        + ("all good" if report.ok else f"{len(report.problems)} problems")
        + (f", {len(report.removed)} removed" if report.removed else "")
    )
    return 0 if report.ok or a.repair else 1


async def cmd_prune(s: api.Session, a: argparse.Namespace) -> int:
    from imagefs import api

    result = await api.prune(s, build_cache=a.build_cache)
    if not a.quiet:
        for digest, _ in result.blobs:
            print(f"Deleted: {digest}")
        if result.derived_bytes:
            print(
                f"Deleted cache pieces and indexes of unused layers: "
                f"{human_size(result.derived_bytes)}"
            )
    print(f"Total reclaimed space: {human_size(result.total)}")
    return 0


async def _ensure_local(s: api.Session, a: argparse.Namespace) -> None:
    """`imagefs mount alpine DIR` works alone: pull the metadata when the image is not local."""
    from imagefs import api
    from imagefs.oci.platform import Platform

    platform = Platform.parse(a.platform) if a.platform else None
    await api.local_image(s, a.reference, platform)


def _daemon_argv(a: argparse.Namespace, root: Path, mountpoint: Path) -> list[str]:
    argv = _global_argv(a, root)
    argv += ["mount", "-f"]
    if a.platform:  # the daemon pulls the image's metadata when it is not local
        argv += ["--platform", a.platform]
    if a.cache_size:
        argv += ["--cache-size", a.cache_size]
    if a.background_fetch:
        argv.append("--background-fetch")
    if a.trace:
        argv += ["--trace", str(a.trace.absolute())]
    if a.prefetch:
        argv += ["--prefetch", str(a.prefetch.absolute())]
    if a.no_prefetch_landmark:
        argv.append("--no-prefetch-landmark")
    for opt in a.options:
        argv += ["-o", opt]
    return [*argv, a.reference, str(mountpoint)]


async def cmd_mount(s: api.Session, a: argparse.Namespace) -> int:
    """The foreground mount: `mount -f` by a user, or the daemon `mount_detached` starts."""
    from imagefs.fs import lifecycle
    from imagefs.fs.daemon import serve

    mountpoint = a.mountpoint.absolute()
    options = lifecycle.MountOptions.parse(a.options)
    notes = lifecycle.check_mountpoint(mountpoint, s.store)
    if a.ready_fd is None:  # the detached parent already said these
        for note in notes:
            print(f"{PROG}: warning: {note}", file=sys.stderr)
    await _ensure_local(s, a)
    log_path = lifecycle.log_path_for(s.root, mountpoint)
    if a.ready_fd is None:  # a daemon's stderr already is this log file
        _log_to_file(s.root, log_path, a.debug)
    else:
        logging.getLogger("imagefs").setLevel(logging.DEBUG if a.debug else logging.INFO)
    await serve(
        s,
        a.reference,
        mountpoint,
        options,
        a.ready_fd,
        cache_size=_cache_size(a),
        background_fetch=a.background_fetch,
        trace=a.trace.absolute() if a.trace else None,
        prefetch=_load_profile(a.prefetch) if a.prefetch else None,
        landmarks=not a.no_prefetch_landmark,
        log_path=log_path,
    )
    return 0


def mount_detached(a: argparse.Namespace) -> int:
    """`imagefs mount` without -f: check, start the daemon, return once the mount answers.

    Synchronous and light on purpose (no trio, no registry client here): the daemon does
    the rest — including pulling the image's metadata when it is not local — and reports a
    startup error back through a pipe, which `spawn_daemon` raises here.
    """
    from imagefs.fs import lifecycle
    from imagefs.store import Store

    root = (a.root or default_root()).absolute()
    mountpoint = a.mountpoint.absolute()
    if not a.platform:
        _warn_local_platform(Store(root), a.reference)
    lifecycle.MountOptions.parse(a.options)  # a bad -o fails here, before any process starts
    for note in lifecycle.check_mountpoint(mountpoint, Store(root)):
        print(f"{PROG}: warning: {note}", file=sys.stderr)
    if a.cache_size:
        _cache_size(a)
    log_path = lifecycle.log_path_for(root, mountpoint)
    pid = lifecycle.spawn_daemon(_daemon_argv(a, root, mountpoint), log_path, mountpoint, root)
    print(f"Mounted {a.reference} at {mountpoint} (pid {pid}, log {log_path})", file=sys.stderr)
    return 0


def _warn_local_platform(store: Any, reference: str) -> None:
    """docker's warning when the local image is for another platform than this machine's
    (the daemon's own stderr is its log, so the launcher says it)."""
    from imagefs.store.lookup import find_records, image_platform, platform_warning

    try:
        found = find_records(store, reference)
        text = platform_warning(image_platform(store, found[0])) if found else None
    except ImageFSError:
        return  # not local (the daemon pulls it) or unreadable (the daemon says why)
    if text:
        _warn(text)


def _load_profile(path: Path) -> Any:
    from imagefs.profiles import Profile

    try:
        return Profile.from_json(path.read_bytes(), str(path))
    except OSError as exc:
        raise UsageError(f"cannot read profile {path}: {exc.strerror}") from None


def _global_argv(a: argparse.Namespace, root: Path) -> list[str]:
    argv = ["--root", str(root)]
    if a.config:
        argv += ["--config", str(a.config)]
    for host in a.insecure_registry:
        argv += ["--insecure-registry", host]
    for mirror in a.registry_mirror:
        argv += ["--registry-mirror", mirror]
    if a.net_latency:
        argv += ["--net-latency", str(a.net_latency)]
    if a.net_bandwidth:
        argv += ["--net-bandwidth", a.net_bandwidth]
    if a.registry_timeout:
        argv += ["--registry-timeout", str(a.registry_timeout)]
    if a.debug:
        argv.append("--debug")
    return argv


async def cmd_profile(s: api.Session, a: argparse.Namespace) -> int:
    import trio

    from imagefs import api
    from imagefs.artifacts import Payload, find_artifacts, push_artifact
    from imagefs.image import load_resolved
    from imagefs.oci.reference import Reference
    from imagefs.profiles import ARTIFACT_TYPE, MEDIA_TYPE
    from imagefs.record import record_profile

    if a.profile_command == "record":
        await _ensure_local(s, a)
    record = await s.disk(api.find_record, s.store, a.reference)
    image = await s.disk(load_resolved, s.store, record.manifest.digest, record.index_digest)
    if a.profile_command == "record":
        command = a.workload
        result = await trio.to_thread.run_sync(
            record_profile,
            s.root.absolute(),
            _global_argv(a, s.root.absolute()),
            a.reference,
            str(record.manifest.digest),
            [str(layer.digest) for layer in image.layers],
            a.output.absolute(),
            command,
        )
        p = result.profile
        print(
            f"Recorded {len(p.files)} files, {human_size(p.total_bytes)} read, to "
            f"{result.output} (command exited with {result.exit_code})",
            file=sys.stderr,
        )
        return result.exit_code
    ref = record.name or (Reference.parse(record.source) if record.source else None)
    if ref is None:
        raise NotFound(f"{a.reference}: no repository to keep the profile in")
    client = s.client(ref)
    if a.profile_command == "push":
        data = await trio.Path(a.profile).read_bytes()
        _load_profile(a.profile)  # refuse what is not a profile before uploading it
        pushed = await push_artifact(
            client,
            ref.repository,
            image.manifest_descriptor,
            ARTIFACT_TYPE,
            [Payload(MEDIA_TYPE, data, {})],
        )
        print(f"Pushed profile as {pushed.manifest_digest}")
        return 0
    found = await find_artifacts(client, ref.repository, image.manifest_digest, ARTIFACT_TYPE)
    if not found or not found[-1].layers:
        raise NotFound(f"no prefetch profile is published for {a.reference}")
    blob = found[-1].layers[0]
    data = await client.get_blob(ref.repository, blob.digest, blob.size)
    from imagefs.store import fsutil

    await s.disk(fsutil.atomic_write, a.output, data)
    print(f"Wrote {a.output}")
    return 0


def _cache_size(a: argparse.Namespace) -> int:
    from imagefs.lazy.cache import DEFAULT_CACHE_SIZE, parse_size

    value = getattr(a, "cache_size", None)
    if value is None:
        cfg = load_file_config(a.config or default_config_dir()).extra.get("cache-size")
        value = str(cfg) if cfg is not None else None
    if value is None:
        return DEFAULT_CACHE_SIZE
    try:
        return parse_size(value)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _log_to_file(root: Path, path: Path, debug: bool) -> None:
    from imagefs.fs.lifecycle import open_log

    handler = logging.StreamHandler(os.fdopen(open_log(root, path), "a"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger("imagefs").setLevel(logging.DEBUG if debug else logging.INFO)


async def cmd_index(s: api.Session, a: argparse.Namespace) -> int:
    from imagefs import api
    from imagefs.oci.platform import Platform

    platform = Platform.parse(a.platform) if a.platform else None
    result = await api.index(s, a.reference, push=a.push, platform=platform)
    rows = [["LAYER", "ENTRIES", "SPANS", "COMPRESSED", "UNCOMPRESSED", "BUILD", "MB/s"]]
    for item in result.layers:
        speed = (
            f"{item.uncompressed / item.seconds / 1e6:.0f}"
            if item.built and item.seconds > 0
            else "-"
        )
        rows.append(
            [
                item.layer.digest.short,
                str(item.entries),
                str(item.spans),
                human_size(item.layer.size),
                human_size(item.uncompressed),
                f"{item.seconds:.2f}s" if item.built else "cached",
                speed,
            ]
        )
    for layer in result.skipped:
        rows.append([layer.digest.short, "-", "-", human_size(layer.size), "-", "own TOC", "-"])
    print(table(rows))
    if result.pushed is not None:
        how = f"tag {result.reference.name}:sha256-…" if result.pushed.via_tag else "referrers"
        print(
            f"Pushed {result.pushed.layers} layer indexes as {result.pushed.manifest_digest} "
            f"(found through {how})"
        )
    return 0


async def cmd_umount(s: api.Session, a: argparse.Namespace) -> int:
    import trio

    from imagefs.fs import lifecycle

    await trio.to_thread.run_sync(lifecycle.unmount, a.mountpoint, s.store)
    return 0


async def cmd_stats(s: api.Session, a: argparse.Namespace) -> int:
    import trio

    from imagefs.fs.lifecycle import control_socket
    from imagefs.lazy.telemetry import ask_stats

    path = control_socket(s.store, a.mountpoint.absolute())
    while True:
        try:
            stats = await trio.to_thread.run_sync(ask_stats, path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotFound(f"{a.mountpoint} is not an imagefs mount of {s.root}") from None
        if "error" in stats:  # the daemon could not make its snapshot (it says why in its log)
            raise ImageFSError(f"{a.mountpoint}: the mount could not answer: {stats['error']}")
        if a.json:
            text = json.dumps(stats, indent=2) + "\n"
        elif a.format == "table":
            text = format_stats(stats) + "\n"
        else:
            text = render(a.format, [stats_row(stats)], {}, "")
        sys.stdout.write(text)
        sys.stdout.flush()
        if a.watch is None:
            return 0
        await trio.sleep(a.watch)


def format_stats(st: dict[str, Any]) -> str:
    lat = st["fetch_latency"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{1000 * v:.1f}ms"

    src = st["served_from"]
    lines = [
        f"{st['image']} at {st['mountpoint']} (up {st['uptime']:.0f}s)",
        f"served   {human_size(st['bytes_served'])} in {st['reads']} reads "
        f"(memory {src['memory']}, cache {src['cache']}, registry {src['registry']}); "
        f"{st['files_touched']} files touched",
        f"fetched  {human_size(st['bytes_fetched'])} in {st['fetches']} fetches, "
        f"{st['registry_requests']} registry requests; latency p50 {ms(lat['p50'])} "
        f"p90 {ms(lat['p90'])} p99 {ms(lat['p99'])}",
        f"cache    {st['cache']['hits']} hits, {st['cache']['misses']} misses",
    ]
    rows = [["LAYER", "SIZE", "FETCHED", "%", "TOC FROM"]]
    for layer, source in zip(st["layers"], st["layer_sources"], strict=False):
        rows.append(
            [
                str(layer["index"]),
                human_size(layer["size"]),
                human_size(layer["fetched"]),
                f"{layer['fetched_pct']:.1f}",
                source or "-",
            ]
        )
    return "\n".join(lines) + "\n" + table(rows)


def stats_row(stats: dict[str, Any]) -> dict[str, Any]:
    """The stats document with docker-style field names: `bytes_fetched` is `.BytesFetched`."""

    def camel(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                "".join(w[:1].upper() + w[1:] for w in str(k).split("_")): camel(v)
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [camel(v) for v in value]
        return value

    row: dict[str, Any] = camel(stats)
    return row


MOUNT_HEADERS = {
    "Image": "IMAGE",
    "Digest": "DIGEST",
    "Mountpoint": "MOUNTPOINT",
    "PID": "PID",
    "Started": "STARTED",
}


async def cmd_mounts(s: api.Session, a: argparse.Namespace) -> int:
    found = await s.disk(s.store.active_mounts)
    rows = [
        {
            "Image": m.image,
            "Digest": m.manifest_digest,
            "Mountpoint": m.mountpoint,
            "PID": m.pid,
            "Started": m.started,
        }
        for m in found
    ]
    default = "table {{.Image}}\t{{.Digest}}\t{{.Mountpoint}}\t{{.PID}}"
    sys.stdout.write(render(a.format, rows, MOUNT_HEADERS, default))
    return 0


COMMANDS: dict[str, Callable[[api.Session, argparse.Namespace], Any]] = {
    "pull": cmd_pull,
    "push": cmd_push,
    "images": cmd_images,
    "tag": cmd_tag,
    "rmi": cmd_rmi,
    "inspect": cmd_inspect,
    "login": cmd_login,
    "logout": cmd_logout,
    "prune": cmd_prune,
    "mount": cmd_mount,
    "index": cmd_index,
    "umount": cmd_umount,
    "mounts": cmd_mounts,
    "stats": cmd_stats,
    "profile": cmd_profile,
    "build": cmd_build,
    "check": cmd_check,
    "ls": cmd_ls,
    "trace": cmd_trace,
    "cat": cmd_cat,
}


def session_from_args(a: argparse.Namespace) -> api.Session:
    from imagefs import api
    from imagefs.registry.transport import TransportOptions

    config_dir = a.config or default_config_dir()
    file_cfg = load_file_config(config_dir)
    mirrors: dict[str, list[str]] = {k: list(v) for k, v in file_cfg.mirrors.items()}
    for flag in a.registry_mirror:
        host, url = parse_mirror_flag(flag)
        mirrors.setdefault(host, []).insert(0, url)
    link = None
    if a.net_latency or a.net_bandwidth:
        from imagefs.registry.netem import Link, parse_rate

        try:
            rate = parse_rate(a.net_bandwidth) if a.net_bandwidth else None
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        link = Link(latency=(a.net_latency or 0) / 1000, bandwidth=rate)
    options = TransportOptions(
        insecure_registries=frozenset([*file_cfg.insecure_registries, *a.insecure_registry]),
        mirrors=mirrors,
        config_dir=config_dir,
        link=link,
        timeout=a.registry_timeout,
    )
    return api.Session(root=a.root or default_root(), options=options, warn=_warn)


def _warn(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def _run(a: argparse.Namespace) -> int:
    async with session_from_args(a) as session:
        code: int = await COMMANDS[a.command](session, a)
        return code


def main(argv: Sequence[str] | None = None) -> int:
    import trio

    parser = build_parser()
    args = list(sys.argv[1:] if argv is None else argv)
    # `profile record REF -o P -- COMMAND ARGS...`: everything after `--` is the workload.
    command: list[str] = []
    if "--" in args:
        cut = args.index("--")
        args, command = args[:cut], args[cut + 1 :]
    a = parser.parse_args(args)
    if command:
        if getattr(a, "profile_command", None) != "record":
            parser.error("`-- COMMAND` is only for `imagefs profile record`")
        a.workload = command
    logging.basicConfig(
        level=logging.DEBUG if a.debug else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if not a.debug:
        # httpx logs every request at INFO; keep them for --debug only.
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        with unwrap_groups():
            if a.command == "mount" and not a.foreground:
                return mount_detached(a)
            return trio.run(_run, a)
    except ImageFSError as exc:
        if a.debug:
            traceback.print_exc()
        print(f"{PROG}: {exc}", file=sys.stderr)
        if getattr(a, "ready_fd", None) is not None:
            from imagefs.fs.lifecycle import report_error

            report_error(a.ready_fd, exc)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # a bug: still one line unless --debug
        if a.debug:
            traceback.print_exc()
        print(
            f"{PROG}: internal error: {type(exc).__name__}: {exc} (rerun with --debug)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
