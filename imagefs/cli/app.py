"""The `imagefs` command: the parser assembled from the verbs, and `main`.

Errors are translated here, once: an `ImageFSError` becomes one line on stderr and its exit
code (2 for usage errors, 1 otherwise); `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING

from imagefs.cli import auth, browse, build, experiments, images, mount, store
from imagefs.cli.options import PROG, CommandParser, Parser, Verb, add_globals, short_usages
from imagefs.cli.output import safe_streams, warn
from imagefs.config import default_config_dir, default_root
from imagefs.errors import ImageFSError, unwrap_groups

# trio, the registry client and the rest are imported where a command needs them: the CLI
# stays light so that `imagefs mount` can start its daemon without paying for them.
if TYPE_CHECKING:
    from imagefs import api

# In the order `imagefs --help` lists them.
VERBS: tuple[Verb, ...] = (
    images.PULL,
    images.PUSH,
    images.IMAGES,
    images.TAG,
    images.RMI,
    images.INSPECT,
    auth.LOGIN,
    auth.LOGOUT,
    mount.MOUNT,
    experiments.INDEX,
    build.BUILD,
    experiments.PROFILE,
    experiments.TRACE,
    browse.LS,
    browse.CAT,
    mount.UMOUNT,
    mount.STATS,
    mount.MOUNTS,
    store.CHECK,
    store.PRUNE,
)
COMMANDS = {verb.name: verb for verb in VERBS}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="Mount and manage OCI/Docker images, lazily.")
    add_globals(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    sub.required = True
    for verb in VERBS:
        p = sub.add_parser(verb.name, help=verb.help, description=verb.help)
        add_globals(p, top=False)
        verb.arguments(p)
    short_usages(parser)
    return parser


def session_from_args(a: argparse.Namespace) -> api.Session:
    # the Session itself, not through `imagefs.api`: that would import every verb (push,
    # index, rmi...) into each command, the mount daemon too
    from imagefs.session import Session
    from imagefs.settings import transport_options

    options = transport_options(
        a.config or default_config_dir(),
        insecure_registries=a.insecure_registry,
        mirror_flags=a.registry_mirror,
        net_latency_ms=a.net_latency,
        net_bandwidth=a.net_bandwidth,
        timeout=a.registry_timeout,
    )
    return Session(root=a.root or default_root(), options=options, warn=warn)


async def _run(a: argparse.Namespace) -> int:
    async with session_from_args(a) as session:
        return await COMMANDS[a.command].run(session, a)


def main(argv: Sequence[str] | None = None) -> int:
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
    configure_logging(a)
    safe_streams()
    return run_command(a)


def configure_logging(a: argparse.Namespace) -> None:
    logging.basicConfig(
        level=logging.DEBUG if a.debug else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if not a.debug:
        # httpx logs every request at INFO; keep them for --debug only.
        logging.getLogger("httpx").setLevel(logging.WARNING)


def run_command(a: argparse.Namespace) -> int:
    """Run the parsed command: its exit status, an error as one line (the daemon of a
    detached mount, forked by `mount_detached`, runs its foreground mount through here)."""
    try:
        with unwrap_groups():
            if a.command == "mount" and not a.foreground:
                return mount.mount_detached(a, run_command)  # no trio: the daemon runs one
            import trio  # here, not at the top: a detached mount's launcher never needs it

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
