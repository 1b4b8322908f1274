"""Store upkeep: check (verify, repair) and prune (reclaim space)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from imagefs.cli.options import Verb, flag
from imagefs.formats import human_size

if TYPE_CHECKING:
    from imagefs import api


def _check_arguments(p: argparse.ArgumentParser) -> None:
    flag(p, "--repair", help="delete what is damaged (it is fetched again when needed)")


async def run_check(s: api.Session, a: argparse.Namespace) -> int:
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


def _prune_arguments(p: argparse.ArgumentParser) -> None:
    flag(p, "-q", "--quiet", help="print only the total reclaimed space")
    flag(p, "--build-cache", help="also empty the build cache")


async def run_prune(s: api.Session, a: argparse.Namespace) -> int:
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


CHECK = Verb(
    "check", "Verify every blob, cache piece and index of the store", _check_arguments, run_check
)
PRUNE = Verb(
    "prune",
    "Remove dangling images no mount uses, and blobs no image references",
    _prune_arguments,
    run_prune,
)
