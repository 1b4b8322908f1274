"""Mounts: mount (detached or foreground), umount, mounts, stats.

`imagefs mount` without -f stays light on purpose (no trio, no registry client, no thread):
it checks what it can, forks the daemon (which runs what `imagefs mount -f --ready-fd N`
runs) and returns once the mount answers. The daemon does the rest, including pulling the
image's metadata when it is not local, and reports a start-up error back through the pipe.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagefs.cli.options import (
    FORMAT_HELP,
    PROG,
    REF_HELP,
    Verb,
    cache_size_of,
    flag,
    platform_of,
    repeatable,
    trust_published_index,
)
from imagefs.cli.output import MOUNT_HEADERS, format_stats, mount_row, stats_row, warn
from imagefs.config import default_root
from imagefs.errors import ImageFSError, NotFound
from imagefs.formats import render

if TYPE_CHECKING:
    from imagefs import api


def _mount_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", metavar="IMAGE", help=REF_HELP + " (pulled if not local)")
    p.add_argument("mountpoint", type=Path, help="an empty directory")
    p.add_argument("--platform", help="os/arch[/variant] when the image must be pulled")
    flag(p, "-f", "--foreground", help="stay in the foreground, logging to stderr")
    repeatable(
        p,
        "-o",
        dest="options",
        metavar="OPTS",
        help="allow_other, suid, dev (default: nosuid,nodev; always ro)",
    )
    p.add_argument(
        "--cache-size",
        metavar="SIZE",
        help="cap of the piece cache shared by mounts of this root (default: "
        "config file `cache-size`, else 10GiB); e.g. 512MiB",
    )
    flag(
        p,
        "--background-fetch",
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
    flag(
        p, "--no-prefetch-landmark", help="ignore eStargz .prefetch.landmark (honoured by default)"
    )
    trust_published_index(p)
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)


async def run_mount(s: api.Session, a: argparse.Namespace) -> int:
    """The foreground mount: `mount -f` by a user, or the daemon `mount_detached` starts.
    It imports only what a mount needs (not `imagefs.api`, which is every verb)."""
    from imagefs.fs import lifecycle
    from imagefs.fs.daemon import serve
    from imagefs.pulling import find_or_pull

    mountpoint = a.mountpoint.absolute()
    options = lifecycle.MountOptions.parse(a.options)
    notes = lifecycle.check_mountpoint(mountpoint, s.store)
    if a.ready_fd is None:  # the detached parent already said these
        for note in notes:
            print(f"{PROG}: warning: {note}", file=sys.stderr)
    await find_or_pull(s, a.reference, platform_of(a))
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
        cache_size=cache_size_of(a),
        background_fetch=a.background_fetch,
        trace=a.trace.absolute() if a.trace else None,
        prefetch=_load_profile(a.prefetch) if a.prefetch else None,
        landmarks=not a.no_prefetch_landmark,
        log_path=log_path,
        trust_published_index=a.trust_published_index,
    )
    return 0


def _load_profile(path: Path) -> Any:
    from imagefs.api.profiles import load_profile

    return load_profile(path)


def mount_detached(a: argparse.Namespace, run: Callable[[argparse.Namespace], int]) -> int:
    """`imagefs mount` without -f: check, start the daemon, return once the mount answers
    (a start-up error the daemon reports is raised here by `fork_daemon`). The daemon is
    this process forked, running `run` (the command line's foreground path) on the same
    arguments with `-f --ready-fd N`: forked when `imagefs.cli.main` started
    (`imagefs.cli.prefork`, handed the arguments here), else now."""
    from imagefs.cli import prefork
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
        cache_size_of(a)
    log_path = lifecycle.log_path_for(root, mountpoint)
    waiting = prefork.waiting_pid()  # the daemon-to-be `imagefs.cli.main` forked, importing
    pid = lifecycle.fork_daemon(
        lambda ready_fd: run(daemon_arguments(a, root, mountpoint, ready_fd)),
        log_path,
        mountpoint,
        root,
        preforked=None
        if waiting is None
        else (waiting, lambda log, w: prefork.hand_over((a, root, mountpoint), log, w)),
    )
    print(f"Mounted {a.reference} at {mountpoint} (pid {pid}, log {log_path})", file=sys.stderr)
    return 0


def daemon_arguments(
    a: argparse.Namespace, root: Path, mountpoint: Path, ready_fd: int
) -> argparse.Namespace:
    """The daemon's arguments: the launcher's (every global option, every mount option),
    foreground, with the root and the paths made absolute as the launcher resolved them."""
    return argparse.Namespace(
        **{
            **vars(a),
            "root": root,
            "mountpoint": mountpoint,
            "foreground": True,
            "ready_fd": ready_fd,
            "trace": a.trace.absolute() if a.trace else None,
            "prefetch": a.prefetch.absolute() if a.prefetch else None,
        }
    )


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
        warn(text)


def _log_to_file(root: Path, path: Path, debug: bool) -> None:
    from imagefs.fs.lifecycle import open_log

    handler = logging.StreamHandler(os.fdopen(open_log(root, path), "a"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger("imagefs").setLevel(logging.DEBUG if debug else logging.INFO)


def _umount_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mountpoint", type=Path, help="where the image is mounted")


async def run_umount(s: api.Session, a: argparse.Namespace) -> int:
    import trio

    from imagefs.fs import lifecycle

    await trio.to_thread.run_sync(lifecycle.unmount, a.mountpoint, s.store)
    return 0


def _stats_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mountpoint", type=Path, help="where the image is mounted")
    flag(p, "--json", help="the raw JSON document")
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


async def run_stats(s: api.Session, a: argparse.Namespace) -> int:
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


def _mounts_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", default="table", metavar="FORMAT", help=FORMAT_HELP)


async def run_mounts(s: api.Session, a: argparse.Namespace) -> int:
    found = await s.disk(s.store.active_mounts)
    default = "table {{.Image}}\t{{.Digest}}\t{{.Mountpoint}}\t{{.PID}}"
    sys.stdout.write(render(a.format, [mount_row(m) for m in found], MOUNT_HEADERS, default))
    return 0


MOUNT = Verb(
    "mount",
    "Mount an image read-only; layers are fetched when first read",
    _mount_arguments,
    run_mount,
)
UMOUNT = Verb(
    "umount", "Unmount an imagefs mount (the daemon exits)", _umount_arguments, run_umount
)
STATS = Verb(
    "stats",
    "Live statistics of a running mount (from its control socket)",
    _stats_arguments,
    run_stats,
)
MOUNTS = Verb("mounts", "List active imagefs mounts", _mounts_arguments, run_mounts)
