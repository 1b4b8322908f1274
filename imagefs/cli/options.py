"""The parsers' shape: the eight global options, declared once, and the parser classes.

A global option is one row of `GLOBALS`: from that row it is added to the top-level parser,
to every command's "global options" group (accepted before or after the command name), and
passed on to the daemon or recorder process `imagefs` starts (`global_argv`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from imagefs import api

PROG = "imagefs"
REF_HELP = "NAME[:TAG], NAME@DIGEST or image ID"
FORMAT_HELP = (
    "table (default), json (a JSON object per line), 'table TEMPLATE' or a Go TEMPLATE, "
    "e.g. '{{.ID}}\\t{{.Repository}}'"
)


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(f"want 0 < SECONDS < 86400, not {text!r}")
    return value


@dataclass(frozen=True)
class Verb:
    """One command: its name and help, what adds its arguments, and what runs it."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[api.Session, argparse.Namespace], Awaitable[int]]


@dataclass(frozen=True)
class GlobalOption:
    flag: str
    default: object
    help: str
    extra: dict[str, Any] = field(default_factory=dict)  # type, action, metavar

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def argv(self, value: object) -> list[str]:
        """The option again on another process's command line; unset values are left out."""
        if isinstance(value, list):
            return [word for item in value for word in (self.flag, str(item))]
        if value is True:
            return [self.flag]
        return [self.flag, str(value)] if value else []


GLOBALS = (
    GlobalOption(
        "--root",
        None,
        "store directory (default: $IMAGEFS_ROOT, /var/lib/imagefs as root, "
        "else $XDG_DATA_HOME/imagefs)",
        {"type": Path},
    ),
    GlobalOption(
        "--config",
        None,
        "config directory (default: $IMAGEFS_CONFIG, /etc/imagefs as root, "
        "else $XDG_CONFIG_HOME/imagefs)",
        {"type": Path},
    ),
    GlobalOption(
        "--insecure-registry",
        [],
        "allow plain HTTP and unverified TLS for this registry (repeatable)",
        {"action": "append", "metavar": "HOST[:PORT]"},
    ),
    GlobalOption(
        "--registry-mirror",
        [],
        "try this mirror first for reads (docker.io unless REGISTRY= is given)",
        {"action": "append", "metavar": "[REGISTRY=]URL"},
    ),
    GlobalOption(
        "--net-latency",
        None,
        "emulate a network: add MS milliseconds to every registry request",
        {"type": float, "metavar": "MS"},
    ),
    GlobalOption(
        "--net-bandwidth",
        None,
        "emulate a network: share RATE (e.g. 100mbit) among all downloads",
        {"metavar": "RATE"},
    ),
    GlobalOption(
        "--registry-timeout",
        None,
        "give up on a registry request (retries included) that has not answered within "
        "SECONDS; a mount then answers EIO for the read that needed it (default: no overall "
        "limit; 10s connect and 60s read timeouts, 5 attempts)",
        {"type": seconds, "metavar": "SECONDS"},
    ),
    GlobalOption("--debug", False, "log details and show tracebacks", {"action": "store_true"}),
)


def add_globals(p: argparse.ArgumentParser, *, top: bool) -> None:
    """Global options, accepted before or after the command name.

    On the commands they default to SUPPRESS so that an option given before the command
    is not overwritten by the command's default; there they form a group of their own,
    listed after the command's own options.
    """
    group: Any = p if top else p.add_argument_group("global options")
    for opt in GLOBALS:
        default = opt.default if top else argparse.SUPPRESS
        if isinstance(default, list):
            default = []  # a list of its own per parser, as argparse's append wants
        group.add_argument(opt.flag, default=default, help=opt.help, **opt.extra)


def global_argv(a: argparse.Namespace, root: Path) -> list[str]:
    """This run's global options for a child `imagefs` process, with the root made explicit."""
    argv = ["--root", str(root)]
    for opt in GLOBALS[1:]:
        argv += opt.argv(getattr(a, opt.dest))
    return argv


def platform_of(a: argparse.Namespace) -> Any:
    """`--platform` parsed (None when not given): a `Platform`."""
    from imagefs.oci.platform import Platform

    return Platform.parse(a.platform) if getattr(a, "platform", None) else None


def cache_size_of(a: argparse.Namespace) -> int:
    """`--cache-size` (where the command has it), else the config file's, else the default."""
    from imagefs.config import default_config_dir
    from imagefs.settings import cache_size

    return cache_size(getattr(a, "cache_size", None), a.config or default_config_dir())


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


class CommandParser(Parser):
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


def add_actions(p: argparse.ArgumentParser, dest: str) -> Any:
    """A command that only chooses an action (`profile record`, `trace report`)."""
    sub = p.add_subparsers(dest=dest, metavar="ACTION", parser_class=CommandParser)
    sub.required = True
    return sub


def add_action(sub: Any, name: str, help_: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_)
    add_globals(p, top=False)
    return p


def short_usages(parser: argparse.ArgumentParser) -> None:
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
                    short_usages(sub)
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


def flag(p: argparse.ArgumentParser, *names: str, help: str, dest: str | None = None) -> None:
    """An on/off option: False unless given."""
    p.add_argument(*names, action="store_true", help=help, dest=dest)  # None: from the name


def trust_published_index(p: argparse.ArgumentParser) -> None:
    """mount, ls, cat, build: opt in to layer indexes found through the image's referrers."""
    flag(
        p,
        "--trust-published-index",
        help="use an imagefs index published next to the image (`index --push`) for plain "
        "gzip/zstd layers; off by default: referrers are not covered by the image digest, so "
        "anyone who can push to the repository could attach one",
    )


def repeatable(
    p: argparse.ArgumentParser, *names: str, metavar: str, help: str, dest: str | None = None
) -> None:
    """An option that may be given many times: its values in order (none: an empty list)."""
    p.add_argument(*names, action="append", default=[], metavar=metavar, help=help, dest=dest)


def subcommand_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every command's parser under `parser`, nested ones included, by its `prog` (for the
    tests that check every command's options and help)."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(p: argparse.ArgumentParser) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    found[sub.prog] = sub
                    walk(sub)

    walk(parser)
    return found
