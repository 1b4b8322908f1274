"""The floor: the least a pyfuse3 filesystem can cost, serving the same tree as the image.

    python floorfs.py ROOTFS MOUNTPOINT

Loads a directory (a `umoci unpack` of the bench image) into memory — names, modes, owners,
sizes, mtimes, symlinks, device numbers, xattrs, hard links and every file's bytes — and
serves it read-only through pyfuse3 with the kernel-cache settings imagefs uses (the same mount
options and entry/attr timeouts, imported from `imagefs.fs`, `keep_cache` on open, readdirplus
replies, no writeback cache). Every answer is a dict look-up of an object built at load time,
so what a workload costs here is FUSE and pyfuse3 themselves: `tools/bench --systems floor`
reports imagefs as a ratio of it (issue 10).

Runs in the foreground until unmounted (`fusermount3 -u`) or sent SIGTERM/SIGINT. Mounts only
once the tree is loaded, so "the mountpoint answers" means "ready". Nothing here is imagefs
code under test: it is the yardstick, kept as small as pyfuse3 allows.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyfuse3
import trio

from imagefs.fs.daemon import settle_garbage_collector
from imagefs.fs.lifecycle import MountOptions
from imagefs.fs.operations import CACHE_TIMEOUT


@dataclass
class Node:
    attrs: pyfuse3.EntryAttributes
    children: dict[bytes, int] | None = None  # directories: name -> inode
    listing: list[tuple[bytes, int]] = field(default_factory=list)  # sorted, for readdir
    data: bytes = b""  # regular files
    target: bytes = b""  # symlinks
    xattrs: dict[bytes, bytes] = field(default_factory=dict)


def _attrs(st: os.stat_result, ino: int) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = ino
    e.generation = 0
    e.entry_timeout = CACHE_TIMEOUT
    e.attr_timeout = CACHE_TIMEOUT
    e.st_mode = st.st_mode
    e.st_nlink = st.st_nlink
    e.st_uid = st.st_uid
    e.st_gid = st.st_gid
    e.st_rdev = st.st_rdev
    e.st_size = st.st_size
    e.st_blksize = 4096
    e.st_blocks = st.st_blocks
    e.st_atime_ns = st.st_mtime_ns
    e.st_mtime_ns = st.st_mtime_ns
    e.st_ctime_ns = st.st_mtime_ns
    return e


def _xattrs(path: bytes) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out
    for name in names:
        try:
            out[os.fsencode(name)] = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
    return out


def load(root: bytes) -> dict[int, Node]:
    """Every entry under `root` as a Node, by inode number (the root is pyfuse3.ROOT_INODE).
    Hard links (same st_dev/st_ino in the tree) share one inode, as in imagefs."""
    nodes: dict[int, Node] = {}
    seen: dict[tuple[int, int], int] = {}
    next_ino = pyfuse3.ROOT_INODE

    def add(path: bytes, st: os.stat_result) -> tuple[int, bool]:
        nonlocal next_ino
        key = (st.st_dev, st.st_ino)
        if not stat.S_ISDIR(st.st_mode) and key in seen:
            return seen[key], False
        ino = next_ino
        next_ino += 1
        seen[key] = ino
        node = Node(_attrs(st, ino), xattrs=_xattrs(path))
        if stat.S_ISDIR(st.st_mode):
            node.children = {}
        elif stat.S_ISREG(st.st_mode):
            with open(path, "rb", buffering=0) as f:
                node.data = f.read()
        elif stat.S_ISLNK(st.st_mode):
            node.target = os.readlink(path)
        nodes[ino] = node
        return ino, True

    stack = [add(root, os.lstat(root))[0]]
    paths = {stack[0]: root}
    parents = {stack[0]: stack[0]}
    while stack:
        dir_ino = stack.pop()
        directory = nodes[dir_ino]
        assert directory.children is not None
        for name in sorted(os.listdir(paths[dir_ino])):
            path = os.path.join(paths[dir_ino], name)
            st = os.lstat(path)
            ino, new = add(path, st)
            directory.children[name] = ino
            if new and stat.S_ISDIR(st.st_mode):
                paths[ino] = path
                parents[ino] = dir_ino
                stack.append(ino)
        # `.` and `..` first, as imagefs lists them (the root's `..` is the root).
        dots = [(b".", dir_ino), (b"..", parents[dir_ino])]
        directory.listing = dots + sorted(directory.children.items())
    return nodes


class FloorOperations(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, nodes: dict[int, Node]) -> None:
        super().__init__()
        self.nodes = nodes
        self.files = sum(1 for n in nodes.values() if n.children is None)
        self.blocks = sum(len(n.data) for n in nodes.values()) // 4096 + 1

    def _node(self, inode: int) -> Node:
        node = self.nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        children = self._node(parent_inode).children
        if children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        ino = children.get(name)
        if ino is None:
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0  # cached "no such entry", as imagefs answers
            negative.entry_timeout = CACHE_TIMEOUT
            return negative
        return self.nodes[ino].attrs

    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        return self._node(inode).attrs

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self._node(inode).target

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if self._node(inode).children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self.nodes[fh].listing
        nodes = self.nodes
        for pos in range(start_id, len(listing)):
            name, ino = listing[pos]
            if not pyfuse3.readdir_reply(token, name, nodes[ino].attrs, pos + 1):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        data = self.nodes[fh].data
        if off == 0 and size >= len(data):
            return data  # the whole file: no copy
        return data[off : off + size]

    async def release(self, fh: int) -> None:
        return None

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return sorted(self._node(inode).xattrs)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        value = self._node(inode).xattrs.get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = self.blocks
        s.f_files = self.files
        s.f_namemax = 255
        return s


async def _serve(signalled: list[int]) -> None:
    async with trio.open_nursery() as nursery:

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    signalled.append(signum)
                    pyfuse3.terminate()
                    return

        nursery.start_soon(stop_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv: Sequence[str]) -> int:
    if len(argv) != 2:
        print("usage: floorfs.py ROOTFS MOUNTPOINT", file=sys.stderr)
        return 2
    root, mountpoint = os.fsencode(argv[0]), argv[1]
    try:
        nodes = load(root)
    except OSError as exc:
        print(f"floorfs: cannot load {argv[0]}: {exc}", file=sys.stderr)
        return 1
    pyfuse3.init(FloorOperations(nodes), mountpoint, MountOptions().fuse_options())
    # The collector as imagefs's daemon has it (frozen start-up, larger young generation):
    # a process setting of imagefs's, so the yardstick gets it too.
    settle_garbage_collector()
    # main() returns when the kernel ended the session (fusermount3 -u: nothing left to
    # unmount) or after a signal made us terminate() (then we unmount, as imagefs does).
    signalled: list[int] = []
    try:
        trio.run(_serve, signalled)
    except BaseException:
        pyfuse3.close(unmount=True)
        raise
    pyfuse3.close(unmount=bool(signalled))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
