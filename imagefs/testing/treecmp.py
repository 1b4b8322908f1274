"""Compare two directory trees entry by entry, the way a conformance test needs.

For every path (raw bytes, relative to the tree root) it records: file type, permission bits
(with setuid/setgid/sticky), uid, gid, size of regular files, mtime in nanoseconds, the link
target of symlinks, the sha256 of regular file contents, device numbers, every extended
attribute (binary values as hex), and hard-link groups (the other paths sharing the inode).
Two trees are the same when these listings are identical.

Used by the conformance tests (a mount against `umoci unpack`) and by `tools/treecmp`, so users
can diff a mount against any directory.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

TYPES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}

ALL_FIELDS = (
    "type",
    "mode",
    "uid",
    "gid",
    "size",
    "mtime",
    "link",
    "sha256",
    "rdev",
    "xattrs",
    "hardlinks",
)


@dataclass(frozen=True)
class Entry:
    path: bytes
    fields: tuple[tuple[str, str], ...]

    def show(self) -> str:
        name = self.path.decode("utf-8", "backslashreplace")
        return f"{name!r} " + " ".join(f"{k}={v}" for k, v in self.fields)


def _sha256(path: bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _xattrs(path: bytes) -> str:
    try:
        names = sorted(os.listxattr(path, follow_symlinks=False))
    except OSError:
        return ""
    parts = []
    for name in names:
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
        parts.append(f"{name}={value.hex()}")
    return ",".join(parts)


def _walk(root: bytes) -> Iterator[bytes]:
    """Every path under root, relative, depth first, in byte order; the root itself is b"."."""
    yield b"."
    stack = [b""]
    while stack:
        rel = stack.pop()
        full = os.path.join(root, rel) if rel else root
        names = sorted(os.listdir(full))
        for name in reversed(names):
            child = os.path.join(rel, name) if rel else name
            st = os.lstat(os.path.join(root, child))
            if stat.S_ISDIR(st.st_mode):
                stack.append(child)
        for name in names:
            yield os.path.join(rel, name) if rel else name


def listing(
    root: str | bytes | os.PathLike[str], fields: Sequence[str] = ALL_FIELDS
) -> list[Entry]:
    """The comparable listing of a tree (see module docstring)."""
    root_b = os.fsencode(root)
    paths = list(_walk(root_b))
    stats = {p: os.lstat(os.path.join(root_b, p)) for p in paths}
    groups: dict[tuple[int, int], list[bytes]] = defaultdict(list)
    for p, st in stats.items():
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            groups[(st.st_dev, st.st_ino)].append(p)
    out = []
    for p in paths:
        st = stats[p]
        full = os.path.join(root_b, p)
        kind = TYPES.get(stat.S_IFMT(st.st_mode), "?")
        values: dict[str, str] = {
            "type": kind,
            "mode": f"{stat.S_IMODE(st.st_mode):04o}" if kind != "symlink" else "-",
            "uid": str(st.st_uid),
            "gid": str(st.st_gid),
            "size": str(st.st_size) if kind in ("file", "symlink") else "-",
            "mtime": str(st.st_mtime_ns) if p != b"." else "-",
            "link": os.readlink(full).hex() if kind == "symlink" else "-",
            "sha256": _sha256(full) if kind == "file" else "-",
            "rdev": f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            if kind in ("char", "block")
            else "-",
            "xattrs": _xattrs(full),
            "hardlinks": ",".join(
                q.decode("utf-8", "backslashreplace")
                for q in sorted(groups.get((st.st_dev, st.st_ino), []))
                if q != p
            ),
        }
        out.append(Entry(p, tuple((f, values[f]) for f in fields)))
    return out


def diff(a: Sequence[Entry], b: Sequence[Entry], limit: int = 50) -> list[str]:
    """Human-readable differences between two listings (empty when identical)."""
    left = {e.path: e for e in a}
    right = {e.path: e for e in b}
    out: list[str] = []
    for path in sorted(left.keys() | right.keys()):
        ea, eb = left.get(path), right.get(path)
        name = path.decode("utf-8", "backslashreplace")
        if ea is None:
            out.append(f"only in second: {name!r}")
        elif eb is None:
            out.append(f"only in first:  {name!r}")
        elif ea.fields != eb.fields:
            da, db = dict(ea.fields), dict(eb.fields)
            changed = [f"{k}: {da[k]} != {db[k]}" for k in da if da[k] != db.get(k)]
            out.append(f"differs: {name!r}: " + "; ".join(changed))
        if len(out) >= limit:
            out.append("...")
            break
    return out


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="treecmp",
        description="Compare two trees entry by entry (type, mode, owner, size, mtime, link, "
        "content sha256, device, xattrs, hard links). Exit 0 when identical, 1 otherwise.",
    )
    p.add_argument("first")
    p.add_argument("second")
    p.add_argument(
        "--ignore",
        action="append",
        default=[],
        choices=ALL_FIELDS,
        help="leave a field out of the comparison (repeatable)",
    )
    p.add_argument("--limit", type=int, default=50, help="differences shown at most")
    a = p.parse_args(argv)
    fields = [f for f in ALL_FIELDS if f not in a.ignore]
    first, second = listing(a.first, fields), listing(a.second, fields)
    problems = diff(first, second, a.limit)
    for line in problems:
        print(line)
    if not problems:
        print(f"identical: {len(first)} entries")
    return 1 if problems else 0
