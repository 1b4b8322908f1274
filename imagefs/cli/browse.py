"""Looking into an image without mounting it: ls, cat (pieces fetched lazily)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from imagefs.cli.options import (
    PROG,
    REF_HELP,
    Verb,
    cache_size_of,
    flag,
    platform_of,
    trust_published_index,
)

if TYPE_CHECKING:
    from imagefs import api


def _ls_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", metavar="IMAGE", help=REF_HELP + " (pulled if not local)")
    p.add_argument("path", nargs="?", default="/", help="a path in the image (default: /)")
    flag(p, "-l", dest="long", help="long listing (numeric ids)")
    flag(p, "-R", dest="recursive", help="recursive")
    flag(p, "-A", dest="almost_all", help="show dotfiles")
    _image_arguments(p)


def _image_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--platform", help="os/arch[/variant] (default: this machine's)")
    p.add_argument("--cache-size", metavar="SIZE", help="cap of the piece cache (as mount's)")
    trust_published_index(p)


async def run_ls(s: api.Session, a: argparse.Namespace) -> int:
    from imagefs import browse

    lines = await browse.ls(
        s,
        a.reference,
        a.path,
        long=a.long,
        recursive=a.recursive,
        almost_all=a.almost_all,
        platform=platform_of(a),
        cache_size=cache_size_of(a),
        trust_published_index=a.trust_published_index,
    )
    for line in lines:
        print(line)
    return 0


def _cat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", metavar="IMAGE", help=REF_HELP + " (pulled if not local)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="files in the image")
    _image_arguments(p)


async def run_cat(s: api.Session, a: argparse.Namespace) -> int:
    from imagefs import browse
    from imagefs.browse import SymlinkLoop
    from imagefs.errors import NotAFile

    try:
        await browse.cat(
            s,
            a.reference,
            a.paths,
            sys.stdout.buffer,
            platform=platform_of(a),
            cache_size=cache_size_of(a),
            trust_published_index=a.trust_published_index,
        )
    except (NotAFile, SymlinkLoop) as exc:  # a path's own trouble: GNU cat's words and exit 1
        print(f"{PROG} cat: {exc}", file=sys.stderr)
        return 1
    return 0


LS = Verb(
    "ls",
    "List a directory of an image without mounting it (fetches lazily)",
    _ls_arguments,
    run_ls,
)
CAT = Verb(
    "cat",
    "Print files of an image without mounting it (fetches only their pieces)",
    _cat_arguments,
    run_cat,
)
