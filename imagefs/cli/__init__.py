"""Command line: argument parsing and output only; the verbs live in `imagefs.api`.

`app` assembles the parser from one module per verb group (`images`, `auth`, `mount`,
`browse`, `build`, `experiments`, `store`: each a command's arguments and its run function);
`options` declares the global options once; `output` shapes what commands print.
"""

from imagefs.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
