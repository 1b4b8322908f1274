"""The lazy-loading tools: index (seek indexes), profile (prefetch profiles), trace (reports)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from imagefs.cli.options import (
    REF_HELP,
    Verb,
    add_action,
    add_actions,
    flag,
    global_argv,
    platform_of,
)
from imagefs.cli.output import index_table
from imagefs.formats import human_size

if TYPE_CHECKING:
    from imagefs import api


def _index_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", metavar="IMAGE", help=REF_HELP)
    flag(p, "--push", help="publish them next to the image (OCI artifact, referrers or tag)")
    p.add_argument("--platform", help="os/arch[/variant] when the image must be pulled")


async def run_index(s: api.Session, a: argparse.Namespace) -> int:
    from imagefs import api

    result = await api.index(s, a.reference, push=a.push, platform=platform_of(a))
    print(index_table(result))
    if result.pushed is not None:
        how = f"tag {result.reference.name}:sha256-…" if result.pushed.via_tag else "referrers"
        print(
            f"Pushed {result.pushed.layers} layer indexes as {result.pushed.manifest_digest} "
            f"(found through {how})"
        )
    return 0


def _profile_arguments(p: argparse.ArgumentParser) -> None:
    actions = add_actions(p, "profile_command")
    pr = add_action(
        actions,
        "record",
        "mount REF, run COMMAND with $IMAGEFS_MOUNT set, write what it read to PROFILE",
    )
    pr.add_argument("reference", metavar="IMAGE", help=REF_HELP)
    pr.add_argument(
        "-o", "--output", type=Path, required=True, metavar="PROFILE", help="the profile to write"
    )
    pr.add_argument("--platform", help="os/arch[/variant] when the image must be pulled")
    pr.set_defaults(workload=[])  # what follows `--` on the command line (see main)
    pp = add_action(actions, "push", "store PROFILE next to the image (OCI artifact)")
    pp.add_argument("reference", metavar="IMAGE", help=REF_HELP)
    pp.add_argument("profile", type=Path, help="the profile file to publish")
    pl = add_action(actions, "pull", "fetch the newest published profile of the image")
    pl.add_argument("reference", metavar="IMAGE", help=REF_HELP)
    pl.add_argument(
        "-o", "--output", type=Path, required=True, metavar="PROFILE", help="where to write it"
    )


async def run_profile(s: api.Session, a: argparse.Namespace) -> int:
    from imagefs import api

    if a.profile_command == "record":
        result = await api.record_profile(
            s,
            a.reference,
            a.output,
            a.workload,
            global_argv=global_argv(a, s.root.absolute()),
            platform=platform_of(a),
        )
        p = result.profile
        print(
            f"Recorded {len(p.files)} files, {human_size(p.total_bytes)} read, to "
            f"{result.output} (command exited with {result.exit_code})",
            file=sys.stderr,
        )
        return result.exit_code
    if a.profile_command == "push":
        digest = await api.push_profile(s, a.reference, a.profile)
        print(f"Pushed profile as {digest}")
        return 0
    await api.pull_profile(s, a.reference, a.output)
    print(f"Wrote {a.output}")
    return 0


def _trace_arguments(p: argparse.ArgumentParser) -> None:
    actions = add_actions(p, "trace_command")
    tr = add_action(actions, "report", "an HTML report with plots of a trace")
    tr.add_argument("trace", type=Path, help="a trace written by `mount --trace`")
    tr.add_argument("-o", "--output", type=Path, help="default: TRACE with .html")
    tr.add_argument(
        "--image-json",
        type=Path,
        metavar="FILE",
        help="`imagefs inspect REF` output, for image and layer sizes",
    )


async def run_trace(s: api.Session, a: argparse.Namespace) -> int:
    import trio

    from imagefs.report import load_image_json, write_report

    image = load_image_json(a.image_json) if a.image_json else None
    output = a.output or a.trace.with_suffix(".html")
    await trio.to_thread.run_sync(write_report, a.trace, output, image)
    print(f"Wrote {output}")
    return 0


INDEX = Verb(
    "index",
    "Build the random-access indexes of an image's gzip/zstd layers",
    _index_arguments,
    run_index,
)
PROFILE = Verb(
    "profile",
    "Prefetch profiles: record what a workload reads; publish them",
    _profile_arguments,
    run_profile,
)
TRACE = Verb("trace", "Work with mount traces (mount --trace FILE)", _trace_arguments, run_trace)
