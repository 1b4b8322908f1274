"""The docker-style image verbs: pull, push, images, tag, rmi, inspect."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from imagefs.cli.options import FORMAT_HELP, PROG, REF_HELP, Verb, flag, platform_of, repeatable
from imagefs.cli.output import IMAGE_HEADERS, LayerLines, image_row, pull_progress
from imagefs.errors import ImageFSError
from imagefs.formats import parse_filters, render

if TYPE_CHECKING:
    from imagefs import api


def _pull_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", metavar="NAME[:TAG|@DIGEST]", help="the image to pull")
    p.add_argument("--platform", help="os/arch[/variant] (default: this machine's)")
    flag(p, "--full", help="download every layer now")
    flag(p, "-q", "--quiet", help="print only the reference")


async def run_pull(s: api.Session, a: argparse.Namespace) -> int:
    from imagefs import api
    from imagefs.oci.reference import Reference

    platform = platform_of(a)
    ref = Reference.parse(a.reference)
    last = a.reference.rpartition("/")[2]
    if not a.quiet and ref.digest is None and ":" not in last:  # docker's first line
        print("Using default tag: latest")
    progress = None
    bars: Any = None
    if a.full and not a.quiet:
        bars = pull_progress()
        progress = bars.update
    on_resolved = None
    if isinstance(bars, LayerLines):
        store = s.store

        def on_resolved(image: Any) -> None:
            for layer in image.layers:  # a stat each, before any download starts
                if store.blobs.has(layer.digest):
                    bars.already(layer)

    try:
        result = await api.pull(
            s,
            a.reference,
            platform=platform,
            full=a.full,
            progress=progress,
            on_resolved=on_resolved,
        )
    finally:
        if bars is not None:
            bars.stop()
    if a.quiet:
        print(result.reference)
        return 0
    ref = result.reference
    if not a.full:
        n = len(result.image.layers)
        print(
            f"{ref.tag or ref.digest}: Pulled metadata ({n} layer{'' if n == 1 else 's'}, "
            "fetched lazily when read)"
        )
    print(f"Digest: {result.image.repo_digest}")
    status = "Image is up to date for" if result.up_to_date else "Downloaded newer image for"
    print(f"Status: {status} {ref.familiar}")
    print(str(ref))
    return 0


def _push_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", metavar="NAME[:TAG]", help="the local image, by the name to push")
    flag(p, "-q", "--quiet", help="print only the pushed digest line")


async def run_push(s: api.Session, a: argparse.Namespace) -> int:
    from imagefs import api

    def show(digest: Any, what: str) -> None:
        if not a.quiet:
            print(f"{digest.short}: {what}")

    result = await api.push(s, a.reference, progress=show)
    tag = result.reference.tag or "latest"
    print(f"{tag}: digest: {result.digest} size: {result.size}")
    from imagefs.build.publish import publish_built_indexes

    published = await publish_built_indexes(s, a.reference)
    if published is not None and not a.quiet:
        print(f"layer indexes: {published.layers} published ({published.manifest_digest})")
    return 0


def _images_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "reference",
        nargs="?",
        metavar="REPOSITORY[:TAG]",
        help="only these (globs allowed)",
    )
    flag(p, "-a", "--all", help="accepted as docker's (no intermediate images)")
    flag(p, "--digests", help="show repo digests")
    repeatable(
        p,
        "-f",
        "--filter",
        metavar="KEY=VALUE",
        help="dangling=true|false, reference=PATTERN, label=KEY[=VALUE], before=IMAGE, "
        "since=IMAGE (repeatable)",
    )
    flag(p, "-q", "--quiet", help="only image IDs")
    flag(p, "--no-trunc", help="full image IDs")
    p.add_argument("--format", default="table", metavar="FORMAT", help=FORMAT_HELP)


async def run_images(s: api.Session, a: argparse.Namespace) -> int:
    from imagefs import api

    filters = parse_filters(a.filter, api.IMAGE_FILTERS)
    found = await api.images(s, a.reference, all_images=a.all, filters=filters)
    if a.quiet:
        seen = []
        for item in found:
            ident = str(item.image.id) if a.no_trunc else item.image.id.short
            if ident not in seen:
                seen.append(ident)
        print("\n".join(seen)) if seen else None
        return 0
    rows = [image_row(item, no_trunc=a.no_trunc) for item in found]
    digest = "{{.Digest}}\t" if a.digests else ""
    default = (
        f"table {{{{.Repository}}}}\t{{{{.Tag}}}}\t{digest}{{{{.ID}}}}\t{{{{.CreatedSince}}}}"
        "\t{{.Size}}\t{{.Cached}}"
    )
    sys.stdout.write(render(a.format, rows, IMAGE_HEADERS, default))
    return 0


def _tag_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="name, image ID (full or short) or digest")
    p.add_argument("target", metavar="TARGET[:TAG]", help="the new name")


async def run_tag(s: api.Session, a: argparse.Namespace) -> int:
    from imagefs import api

    await api.tag(s, a.source, a.target)
    return 0


def _rmi_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("references", nargs="+", metavar="IMAGE", help=REF_HELP)
    flag(p, "-f", "--force", help="even if mounted or named in several repositories")


async def run_rmi(s: api.Session, a: argparse.Namespace) -> int:
    """docker's way: each argument on its own, an error line for each that fails, exit 1
    at the end if any did."""
    from imagefs import api

    failed = False
    for query in a.references:
        try:
            result = await api.rmi_one(s, query, force=a.force)
        except ImageFSError as exc:
            print(f"{PROG}: {exc}", file=sys.stderr, flush=True)
            failed = True
            continue
        for name in result.untagged:
            print(f"Untagged: {name}")
        for digest, _size in result.deleted:
            print(f"Deleted: {digest}")
        sys.stdout.flush()
    return 1 if failed else 0


def _inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("references", nargs="+", metavar="IMAGE", help=REF_HELP)
    p.add_argument(
        "-f",
        "--format",
        default="json",
        metavar="FORMAT",
        help="json (default), or a Go template run on each image, e.g. '{{.Config.Env}}'",
    )


async def run_inspect(s: api.Session, a: argparse.Namespace) -> int:
    """docker's way: what can be found is printed, an error for each argument that cannot."""
    from imagefs import api
    from imagefs.gotemplate import parse

    template = None if a.format == "json" else parse(a.format)
    found: list[dict[str, Any]] = []
    errors: list[str] = []
    for query in a.references:
        try:
            found.append(await api.inspect_one(s, query))
        except ImageFSError as exc:
            errors.append(f"{PROG}: {exc}")
    if template is None:
        print(api.dump_json(found))
    else:
        for obj in found:
            print(template.execute(obj))
    for line in errors:
        print(line, file=sys.stderr)
    return 1 if errors else 0


PULL = Verb(
    "pull",
    "Fetch an image's manifest and config (and its layers with --full)",
    _pull_arguments,
    run_pull,
)
PUSH = Verb(
    "push", "Push a local image to the registry its name points at", _push_arguments, run_push
)
IMAGES = Verb("images", "List local images", _images_arguments, run_images)
TAG = Verb("tag", "Give a local image another name", _tag_arguments, run_tag)
RMI = Verb(
    "rmi", "Remove images (untag; delete blobs no other image uses)", _rmi_arguments, run_rmi
)
INSPECT = Verb(
    "inspect",
    "Show image details as JSON (docker's keys plus ImageFS)",
    _inspect_arguments,
    run_inspect,
)
