"""Paths inside an image's root filesystem, resolved as the container would see them.

A build works on a root file system that is a directory on the host. A symlink in it
(`/etc -> /host-secrets`, `../../..`) means something inside the container and something
else on the host; every path the builder opens in a rootfs goes through `resolve`, which
follows symlinks itself, relative to the rootfs root, and never leaves it (what
`securejoin` does for runc and buildah).
"""

from __future__ import annotations

import os
import posixpath
import stat
from pathlib import Path

from imagefs.errors import BuildError

_MAX_LINKS = 40


def resolve(root: Path, path: str, *, follow_last: bool = True) -> Path:
    """The host path of container path `path` in `root`; symlinks followed inside `root`."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        try:
            st = candidate.lstat()
        except (FileNotFoundError, NotADirectoryError):
            resolved.append(part)
            continue
        if stat.S_ISLNK(st.st_mode) and (parts or follow_last):
            links += 1
            if links > _MAX_LINKS:
                raise BuildError(f"too many levels of symbolic links in {path}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    return root.joinpath(*resolved)


def join(base: str, path: str) -> str:
    """A container path: `path` relative to directory `base` (WORKDIR), cleaned."""
    return posixpath.normpath(posixpath.join(base or "/", path)) if path else base


def _table(root: Path, name: str) -> list[list[str]]:
    try:
        text = resolve(root, f"/etc/{name}").read_text(errors="replace")
    except OSError:
        return []
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def lookup_user(root: Path, user: str) -> tuple[int, int, list[int]]:
    """USER `name|uid[:group|gid]` -> (uid, gid, supplementary gids), from the image's files."""
    name, _, group = user.partition(":")
    passwd = _table(root, "passwd")
    groups = _table(root, "group")
    uid: int | None = None
    gid: int | None = None
    login = None
    for row in passwd:
        if len(row) >= 4 and (row[0] == name or (name.isdigit() and row[2] == name)):
            uid, login = int(row[2]), row[0]
            gid = int(row[3]) if row[3].isdigit() else 0
            break
    if uid is None:
        if not name.isdigit():
            raise BuildError(f"unable to find user {name}: no matching entries in passwd file")
        uid, gid = int(name), 0
    if group:
        gid = None
        for row in groups:
            if len(row) >= 3 and (row[0] == group or (group.isdigit() and row[2] == group)):
                gid = int(row[2])
                break
        if gid is None:
            if not group.isdigit():
                raise BuildError(f"unable to find group {group}: no matching entries in group file")
            gid = int(group)
    extra: list[int] = []
    if login is not None and not group:
        for row in groups:
            if len(row) >= 4 and login in row[3].split(",") and row[2].isdigit():
                extra.append(int(row[2]))
    return uid, gid or 0, sorted(set(extra))
