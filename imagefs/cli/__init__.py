"""Command line: argument parsing and output only; the verbs live in `imagefs.api`.

`app` assembles the parser from one module per verb group (`images`, `auth`, `mount`,
`browse`, `build`, `experiments`, `store`: each a command's arguments and its run function);
`options` declares the global options once; `output` shapes what commands print.

This package's own import is light: `main` forks a detached mount's daemon-to-be
(`imagefs.cli.prefork`) before the command line's modules are imported.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """The `imagefs` command (`argv`: the arguments; None: this process's command line)."""
    if argv is None:  # the command line itself, never a caller's process (a test's)
        from imagefs.cli import prefork

        prefork.start(sys.argv[1:], _serve_preforked)
    from imagefs.cli.app import main as run

    return run(argv)


def _serve_preforked(arguments: Any, ready_fd: int) -> int:
    """What the pre-forked daemon runs once handed `(args, root, mountpoint)` by
    `mount_detached`: what the launcher's own fork runs, with the logging it set up."""
    import logging

    from imagefs.cli.app import configure_logging, run_command
    from imagefs.cli.mount import daemon_arguments
    from imagefs.cli.output import safe_streams

    a, root, mountpoint = arguments
    configure_logging(a)
    safe_streams()  # as `app.main` does: its log is its stderr
    log = logging.getLogger("imagefs")
    log.setLevel(logging.DEBUG if a.debug else logging.INFO)  # as `run_mount` sets it
    log.info("daemon forked as the launcher started (imagefs.cli.prefork)")
    return run_command(daemon_arguments(a, root, mountpoint, ready_fd))


def __getattr__(name: str) -> Any:
    if name == "build_parser":
        from imagefs.cli.app import build_parser

        return build_parser
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
