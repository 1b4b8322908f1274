"""What the kernel says is mounted where: `/proc/self/mountinfo` (proc(5)).

`umount` and `mount` decide from this, not from our own records, whether a directory holds
an imagefs mount: a record can outlive its daemon (`kill -9`), and only the kernel knows that
`/mnt/x` is a tmpfs that `imagefs umount` must leave alone. imagefs mounts carry
`fsname=imagefs,subtype=imagefs`, which the kernel shows as type `fuse.imagefs`, source
`imagefs`. Parsing is pure; `read_mounts` is the one function that reads a file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

FSTYPE = "fuse.imagefs"
SOURCE = "imagefs"

_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class MountInfo:
    mount_id: int
    mountpoint: str
    fstype: str
    source: str

    @property
    def is_imagefs(self) -> bool:
        return self.fstype == FSTYPE


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (`\\040`)."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[MountInfo]:
    """Lines `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPER`."""
    out: list[MountInfo] = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            out.append(
                MountInfo(
                    mount_id=int(fields[0]),
                    mountpoint=_unescape(fields[4]),
                    fstype=fields[sep + 1],
                    source=_unescape(fields[sep + 2]),
                )
            )
        except (ValueError, IndexError):
            continue  # a line we do not understand describes nothing we could act on
    return out


def mount_at(mounts: list[MountInfo], path: str) -> MountInfo | None:
    """The mount visible at `path` (the last one mounted there: it hides the others)."""
    found = None
    for m in mounts:
        if m.mountpoint == path:
            found = m
    return found


def read_mounts(proc: Path = Path("/proc/self/mountinfo")) -> list[MountInfo]:
    return parse_mountinfo(proc.read_text(errors="surrogateescape"))
