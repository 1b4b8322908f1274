"""Prefetch profiles: what a workload read, in order, so the next mount can fetch it early.

`imagefs profile record REF -o PROFILE -- COMMAND…` mounts the image with a trace, runs the
command with the mountpoint in `$IMAGEFS_MOUNT`, and turns the trace's read events into a
profile (JSON):

    {"version": 1, "image": "sha256:<manifest digest>",
     "layers": ["sha256:<layer digest>", …],
     "files": [{"path": "usr/bin/python3", "layer": 2,
                "ranges": [[stream offset, length], …]}, …]}

Files appear in the order they were first read; a file's ranges are in the uncompressed
(virtual) stream of its layer, merged where they touch. `imagefs mount --prefetch PROFILE`
fetches them in that order in the background, one piece at a time, so on-demand reads always
go first; the profile is ignored (with a warning) for another image. Profiles can be kept next
to the image as an OCI artifact (`imagefs profile push`/`pull`), like layer indexes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from imagefs.errors import UsageError

VERSION = 1
ARTIFACT_TYPE = "application/vnd.imagefs.prefetch-profile.v1"
MEDIA_TYPE = "application/vnd.imagefs.prefetch-profile.v1+json"


@dataclass(frozen=True)
class FileReads:
    path: str
    layer: int
    ranges: tuple[tuple[int, int], ...]

    @property
    def total_bytes(self) -> int:
        return sum(n for _, n in self.ranges)


@dataclass(frozen=True)
class Profile:
    image: str
    layers: tuple[str, ...]
    files: tuple[FileReads, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.total_bytes for f in self.files)

    def to_json(self) -> bytes:
        obj = {
            "version": VERSION,
            "image": self.image,
            "layers": list(self.layers),
            "files": [
                {"path": f.path, "layer": f.layer, "ranges": [list(r) for r in f.ranges]}
                for f in self.files
            ],
        }
        return json.dumps(obj, indent=1).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, where: str = "profile") -> Profile:
        try:
            obj: Any = json.loads(data)
            if obj.get("version") != VERSION:
                raise ValueError(f"version {obj.get('version')!r} (want {VERSION})")
            files = tuple(
                FileReads(
                    str(f["path"]),
                    int(f["layer"]),
                    tuple((int(a), int(b)) for a, b in f["ranges"]),
                )
                for f in obj["files"]
            )
            return cls(str(obj["image"]), tuple(str(x) for x in obj["layers"]), files)
        # OverflowError: int() of a JSON Infinity (json.loads takes NaN and Infinity);
        # RecursionError: JSON nested past the scanner's depth
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
            raise UsageError(f"{where} is not an imagefs prefetch profile: {exc}") from None
        except RecursionError:
            raise UsageError(
                f"{where} is not an imagefs prefetch profile: nested too deeply"
            ) from None


def _merge(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for start, n in sorted(ranges):
        if out and start <= out[-1][0] + out[-1][1]:
            prev_start, prev_n = out[-1]
            out[-1] = (prev_start, max(prev_start + prev_n, start + n) - prev_start)
        else:
            out.append((start, n))
    return tuple(out)


def from_trace(lines: Iterable[bytes | str], image: str, layers: Sequence[str]) -> Profile:
    """A profile from trace JSON lines (pure). Files in first-read order."""
    order: list[tuple[str, int]] = []
    ranges: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for line in lines:
        if not line.strip():
            continue
        event = json.loads(line)
        if event.get("op") != "read" or "stream_offset" not in event:
            continue
        key = (str(event["path"]), int(event["layer"]))
        if key not in ranges:
            order.append(key)
            ranges[key] = []
        ranges[key].append((int(event["stream_offset"]), int(event["length"])))
    files = tuple(FileReads(path, layer, _merge(ranges[(path, layer)])) for path, layer in order)
    return Profile(image, tuple(layers), files)
