"""`imagefs build`: a Dockerfile built on lazily mounted bases."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from imagefs.cli.options import PROG, Verb, flag, global_argv, repeatable, trust_published_index
from imagefs.errors import UsageError

if TYPE_CHECKING:
    from imagefs import api
    from imagefs.build.builder import BuildOptions


def _build_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("context", type=Path, help="the build context directory")
    repeatable(
        p, "-t", "--tag", dest="tags", metavar="NAME", help="name the image NAME[:TAG] (repeatable)"
    )
    p.add_argument(
        "-f", "--file", metavar="DOCKERFILE", help="default CONTEXT/Dockerfile; - = stdin"
    )
    repeatable(
        p,
        "--build-arg",
        metavar="K[=V]",
        help="set a build-time variable (K alone: from the environment)",
    )
    p.add_argument("--target", metavar="STAGE", help="build up to this stage")
    flag(p, "--no-cache", help="do not use the build cache")
    flag(p, "--pull", help="resolve base images again")
    p.add_argument("--network", choices=["host", "none"], default="host", help="for RUN")
    repeatable(p, "--label", metavar="K=V", help="add a label to the image")
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
    flag(p, "-q", "--quiet", help="print only the image ID")
    trust_published_index(p)  # for the base images' lazy mounts


def _pairs(items: list[str], what: str, env_default: bool) -> dict[str, str]:
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


def _dockerfile(a: argparse.Namespace) -> str:
    if a.file == "-":
        return sys.stdin.read()
    path = Path(a.file) if a.file else a.context / "Dockerfile"
    try:
        return path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read Dockerfile {path}: {exc.strerror}") from None


def build_options(a: argparse.Namespace, root: Path) -> BuildOptions:
    """The build's options from the command line; the base images' mount daemons get this
    run's global options (`root` the store's absolute path)."""
    from imagefs.build.builder import BuildOptions

    return BuildOptions(
        context=a.context,
        dockerfile=_dockerfile(a),
        tags=a.tags,
        build_args=_pairs(a.build_arg, "--build-arg", True),
        target=a.target,
        no_cache=a.no_cache,
        pull=a.pull,
        network=a.network,
        labels=_pairs(a.label, "--label", False),
        compression=a.compression,
        platform=a.platform,
        global_argv=global_argv(a, root),
        trust_published_index=a.trust_published_index,
    )


async def run_build(s: api.Session, a: argparse.Namespace) -> int:
    import signal

    import trio

    from imagefs.build.builder import build
    from imagefs.build.progress import Progress

    opts = build_options(a, s.root.absolute())
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


BUILD = Verb(
    "build",
    "Build an image from a Dockerfile, on lazily mounted bases (root)",
    _build_arguments,
    run_build,
)
