"""Each command's --help: its own options first, the global ones after, every argument
explained; an option a command does not know is that command's error (issue 11, items 5, 7)."""

from __future__ import annotations

import argparse

import pytest

from imagefs.cli import build_parser
from imagefs.cli.options import subcommand_parsers

COMMANDS = subcommand_parsers(build_parser())
LEAVES = sorted(  # `profile` and `trace` only choose an action, which has its own help
    prog
    for prog, p in COMMANDS.items()
    if not any(isinstance(a, argparse._SubParsersAction) for a in p._actions)
)


@pytest.mark.parametrize("prog", LEAVES)
def test_help_lists_own_options_then_global_ones(prog: str) -> None:
    parser = COMMANDS[prog]
    text = parser.format_help()
    assert text.startswith(f"usage: {prog} [OPTIONS]")
    own, _, globals_ = text.partition("\nglobal options:\n")
    assert "--root ROOT" in globals_ and "--root" not in own.split("\noptions:\n", 1)[1]
    assert "--debug" in globals_
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:
            continue
        assert action.help, f"{prog}: {action.option_strings or action.dest} has no help"


def test_quiet_flags_say_what_they_print() -> None:
    assert "digest" in COMMANDS["imagefs push"].format_help().split("-q, --quiet")[1]
    assert "reclaimed" in COMMANDS["imagefs prune"].format_help().split("-q, --quiet")[1]


@pytest.mark.parametrize("command", ["images", "rmi", "inspect", "mounts", "pull"])
def test_an_unknown_option_is_the_command_s_error(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = (
        [command, "x", "--bogus"] if command in ("rmi", "inspect", "pull") else [command, "--bogus"]
    )
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: imagefs {command} [OPTIONS]")
    assert err.splitlines()[-1] == f"imagefs {command}: error: unknown flag: --bogus"
