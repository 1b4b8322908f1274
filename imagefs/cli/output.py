"""What the commands print: tables, `--format` rows, stats, pull progress, warnings.

`--format` itself (table / json / Go template) is `imagefs.formats.render`; this module
shapes the values the verbs return into the rows and lines it renders.
"""

from __future__ import annotations

import codecs
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from imagefs.formats import docker_time, human_ago, human_size

if TYPE_CHECKING:
    from imagefs import api

IMAGE_HEADERS = {
    "Repository": "REPOSITORY",
    "Tag": "TAG",
    "Digest": "DIGEST",
    "ID": "IMAGE ID",
    "CreatedSince": "CREATED",
    "CreatedAt": "CREATED AT",
    "Size": "SIZE",
    "Cached": "CACHED",
    "ManifestDigest": "MANIFEST DIGEST",
}

MOUNT_HEADERS = {
    "Image": "IMAGE",
    "Digest": "DIGEST",
    "Mountpoint": "MOUNTPOINT",
    "PID": "PID",
    "Started": "STARTED",
}


def _unencodable(exc: UnicodeError) -> tuple[bytes, int]:
    r"""Characters UTF-8 cannot write: a lone surrogate. \udc80-\udcff are bytes a path held
    that were not UTF-8 (decoded with surrogateescape): written back as those bytes, as `ls`
    does. Any other (a `\ud800` escape in a registry's JSON) as its `\uXXXX` escape, so
    one bad label costs its own look, not the command."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    out = bytearray()
    for ch in exc.object[exc.start : exc.end]:
        code = ord(ch)
        out += bytes([code - 0xDC00]) if 0xDC80 <= code <= 0xDCFF else b"\\u%04x" % code
    return bytes(out), exc.end


def safe_streams() -> None:
    """Let stdout and stderr write any str the commands print (see `_unencodable`)."""
    codecs.register_error("imagefs-unencodable", _unencodable)
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)  # not on a test's capture
        if reconfigure is not None:
            reconfigure(errors="imagefs-unencodable")


def warn(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def cached_column(cached: int, size: int) -> str:
    total = size or 1
    return f"{human_size(cached)} ({100 * cached // total}%)"


def image_row(item: api.ImageSummary, *, no_trunc: bool = False) -> dict[str, Any]:
    """What `images --format` templates see, by docker's field names (keys sorted, as docker's
    `{{json .}}` prints them); Cached and ManifestDigest are imagefs's own."""
    rd = item.record.repo_digest
    created = item.image.config.created
    row = {
        "Repository": item.repository,
        "Tag": item.tag,
        "Digest": str(rd.digest) if rd and rd.digest else "<none>",
        "ID": str(item.image.id) if no_trunc else item.image.id.short,
        "CreatedAt": docker_time(created),
        "CreatedSince": human_ago(created),
        "Size": human_size(item.size),
        "Cached": cached_column(item.cached, item.size - item.image.manifest.config.size),
        "ManifestDigest": str(item.image.manifest_digest),
    }
    return dict(sorted(row.items()))


def mount_row(m: Any) -> dict[str, Any]:
    return {
        "Image": m.image,
        "Digest": m.manifest_digest,
        "Mountpoint": m.mountpoint,
        "PID": m.pid,
        "Started": m.started,
    }


def index_table(result: api.IndexResult) -> str:
    rows = [["LAYER", "ENTRIES", "SPANS", "COMPRESSED", "UNCOMPRESSED", "BUILD", "MB/s"]]
    for item in result.layers:
        speed = (
            f"{item.uncompressed / item.seconds / 1e6:.0f}"
            if item.built and item.seconds > 0
            else "-"
        )
        rows.append(
            [
                item.layer.digest.short,
                str(item.entries),
                str(item.spans),
                human_size(item.layer.size),
                human_size(item.uncompressed),
                f"{item.seconds:.2f}s" if item.built else "cached",
                speed,
            ]
        )
    for layer in result.skipped:
        rows.append([layer.digest.short, "-", "-", human_size(layer.size), "-", "own TOC", "-"])
    return table(rows)


def format_stats(st: dict[str, Any]) -> str:
    lat = st["fetch_latency"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{1000 * v:.1f}ms"

    src = st["served_from"]
    lines = [
        f"{st['image']} at {st['mountpoint']} (up {st['uptime']:.0f}s)",
        f"served   {human_size(st['bytes_served'])} in {st['reads']} reads "
        f"(memory {src['memory']}, cache {src['cache']}, registry {src['registry']}); "
        f"{st['files_touched']} files touched",
    ]
    waited = st.get("read_wait") or {}
    if waited.get("reads"):  # reads not answered at once: what the workload waited for
        lines.append(
            f"waited   {waited['reads']} reads for their bytes, {waited['seconds']:.2f}s in "
            f"all; p50 {ms(waited['p50'])} p99 {ms(waited['p99'])} max {ms(waited['max'])}"
        )
    lines.append(
        f"fetched  {human_size(st['bytes_fetched'])} in {st['fetches']} fetches, "
        f"{st['registry_requests']} registry requests; latency p50 {ms(lat['p50'])} "
        f"p90 {ms(lat['p90'])} p99 {ms(lat['p99'])}"
    )
    causes = st.get("fetched_by_cause") or {}
    if causes:  # what the fetched bytes were for (registry/wire.py's causes)
        lines.append("causes   " + ", ".join(f"{c} {human_size(n)}" for c, n in causes.items()))
    lines.append(_cache_line(st["cache"]))
    rows = [["LAYER", "SIZE", "FETCHED", "%", "TOC FROM"]]
    for layer, source in zip(st["layers"], st["layer_sources"], strict=False):
        rows.append(
            [
                str(layer["index"]),
                human_size(layer["size"]),
                human_size(layer["fetched"]),
                f"{layer['fetched_pct']:.1f}",
                source or "-",
            ]
        )
    return "\n".join(lines) + "\n" + table(rows)


def _cache_line(cache: dict[str, Any]) -> str:
    """The piece cache's counters: reads answered from pieces (from memory: just made, not
    yet on disk), lookups that found none, damaged pieces dropped (then fetched again)."""
    line = f"cache    {cache['hits']} hits, {cache['misses']} misses"
    if cache.get("held_reads"):
        line += f" ({cache['held_reads']} hits from pieces just made, in memory)"
    if cache.get("corrupt"):
        line += f"; {cache['corrupt']} damaged pieces dropped and fetched again"
    return line


def stats_row(stats: dict[str, Any]) -> dict[str, Any]:
    """The stats document with docker-style field names: `bytes_fetched` is `.BytesFetched`."""

    def camel(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                "".join(w[:1].upper() + w[1:] for w in str(k).split("_")): camel(v)
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [camel(v) for v in value]
        return value

    row: dict[str, Any] = camel(stats)
    return row


class LayerLines:
    """`pull --full` off a terminal: a line per layer, as docker prints them to a pipe."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def already(self, layer: Any) -> None:
        print(f"{layer.digest.short}: Already exists", flush=True)

    def update(self, layer: Any, n: int) -> None:
        key = str(layer.digest)
        if key not in self.seen:
            self.seen[key] = 0
            print(f"{layer.digest.short}: Pulling fs layer", flush=True)
        self.seen[key] += n
        if self.seen[key] >= layer.size:
            print(f"{layer.digest.short}: Pull complete", flush=True)

    def stop(self) -> None:
        pass


class LayerBars:
    """`pull --full` on a terminal: a progress bar per layer."""

    def __init__(self) -> None:
        from rich.progress import (  # rich is slow to import: only here
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TransferSpeedColumn,
        )

        self.bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            transient=False,
        )
        self.tasks: dict[str, Any] = {}
        self.bars.start()

    def update(self, layer: Any, n: int) -> None:
        key = str(layer.digest)
        if key not in self.tasks:
            self.tasks[key] = self.bars.add_task(layer.digest.short, total=layer.size)
        self.bars.advance(self.tasks[key], n)

    def stop(self) -> None:
        self.bars.stop()


def pull_progress() -> LayerLines | LayerBars:
    return LayerBars() if sys.stderr.isatty() else LayerLines()
