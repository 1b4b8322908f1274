"""The pyfuse3 adapter: kernel requests in, answers from the overlay and the layer set out.

Thin on purpose. The merge logic is the pure `Overlay`; when it needs a layer it raises
`NeedLayer`, and `_ask` fetches that layer (through `LayerSet.ensure`) and asks again. Errors
are translated here, once: an `ImageFSError` becomes its errno (EIO for registry and format
trouble) with a log line; anything unexpected is logged with its traceback and answered with
EIO, so one bad entry or one failed fetch never takes the mount down.

The image never changes, so entries and attributes are cached by the kernel for a long time,
files are opened with `keep_cache`, negative lookups are cached too, and every operation that
would write answers EROFS.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pyfuse3

from imagefs.errors import ImageFSError
from imagefs.lazy import telemetry
from imagefs.lazy.layers import LayerSet
from imagefs.lazy.tree import LazyTree
from imagefs.overlay import ROOT_INODE, Attrs, Overlay

log = logging.getLogger("imagefs.fs")

T = TypeVar("T")
C = TypeVar("C", bound=type[pyfuse3.Operations])

# The image is immutable: let the kernel cache names and attributes for a day.
CACHE_TIMEOUT = 86400.0


@dataclass(frozen=True, slots=True)
class _Open:
    """An open file: its inode, and where its bytes are (layer, start in the layer's
    uncompressed stream, size)."""

    ino: int
    layer: int
    start: int
    size: int


def _edge(name: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(fn)
    async def handler(self: ImageOperations, *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            if isinstance(exc, ImageFSError):
                log.error("%s: %s", name, exc)
            else:
                log.exception("%s%r: unexpected failure", name, args[:3])
            if name == "forget":  # the kernel expects no answer to forget
                return None
            raise (_fuse_error(exc) if isinstance(exc, ImageFSError) else _eio()) from None

    return handler


def _eio() -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(errno.EIO)


def errno_edge(cls: C) -> C:
    """Wrap every request handler of `cls`: pyfuse3 ends `main()` — the whole mount — when a
    handler raises anything but FUSEError, so whatever slipped past a handler's own
    translation becomes its errno (EIO when unexpected) and a log line here instead."""
    for name, fn in list(vars(cls).items()):
        if hasattr(pyfuse3.Operations, name) and inspect.iscoroutinefunction(fn):
            setattr(cls, name, _edge(name, fn))
    return cls


class _MountTree(LazyTree):
    """A layer that fails to load costs the request EIO, logged with the layer's digest; the
    next request that needs it tries again."""

    async def load(self, index: int) -> None:
        name = self.layers.layers[index].digest
        try:
            await super().load(index)
        except ImageFSError as exc:  # registry or format trouble
            log.error("layer %d (%s): %s", index, name, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("layer %d (%s): unexpected failure", index, name)
            raise pyfuse3.FUSEError(errno.EIO) from None


@errno_edge
class ImageOperations(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, overlay: Overlay, layers: LayerSet, *, total_size: int = 0) -> None:
        super().__init__()
        self.overlay = overlay
        self.layers = layers
        self.total_size = total_size
        self._dirs: dict[int, list[tuple[bytes, int]]] = {}
        # Directory inode -> its parent's, learnt as the kernel walks down (it reaches every
        # directory through a lookup or a readdirplus of its parent): what `..` lists.
        self._parents: dict[int, int] = {ROOT_INODE: ROOT_INODE}
        self._files: dict[int, _Open] = {}
        self._next_fh = 1
        self.telemetry: telemetry.Telemetry | None = None
        self.tree = _MountTree(overlay, layers, log)

    # -- plumbing ---------------------------------------------------------------------------

    async def _ask(self, fn: Callable[..., T], *args: Any) -> T:
        """Call a pure overlay method through the lazy tree (which loads the layers it asks
        for), translating errors. Warm, this is one call of `fn`: nothing yields."""
        try:
            return await self.tree.ask(fn, *args)
        except ImageFSError as exc:
            raise _fuse_error(exc) from None
        except pyfuse3.FUSEError:
            raise
        except Exception:  # a bug must cost one request, not the mount
            log.exception("%s%r failed", getattr(fn, "__name__", fn), args)
            raise pyfuse3.FUSEError(errno.EIO) from None

    def _entry(self, a: Attrs) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = a.ino
        e.generation = 0
        e.entry_timeout = CACHE_TIMEOUT
        e.attr_timeout = CACHE_TIMEOUT
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_rdev = a.rdev
        e.st_size = a.size
        e.st_blksize = 4096
        e.st_blocks = a.blocks
        e.st_atime_ns = a.atime_ns
        e.st_mtime_ns = a.mtime_ns
        e.st_ctime_ns = a.ctime_ns
        return e

    # -- names ------------------------------------------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        ino = await self._ask(self.overlay.lookup, parent_inode, bytes(name))
        self._event("lookup", parent_inode, bytes(name))
        if ino is None:
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0  # a cached "no such entry"
            negative.entry_timeout = CACHE_TIMEOUT
            return negative
        attrs = await self._ask(self.overlay.getattr, ino)
        if stat.S_ISDIR(attrs.mode):
            self._parents[ino] = parent_inode
        return self._entry(attrs)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, nlookup in inode_list:
            self.overlay.forget(ino, nlookup)

    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        return self._entry(await self._ask(self.overlay.getattr, inode))

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        target = await self._ask(self.overlay.readlink, inode)
        self._event("readlink", inode)
        return target

    # -- directories ------------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        listing = await self._ask(self.overlay.readdir, inode)
        self._event("readdir", inode)
        fh = self._next_fh
        self._next_fh += 1
        # `.` and `..` first, as every filesystem lists them (`ls -a`); FUSE leaves that to us.
        # The root's `..` is the root itself.
        dots = [(b".", inode), (b"..", self._parents.get(inode, ROOT_INODE))]
        self._dirs[fh] = dots + listing  # a snapshot: offsets stay valid for this handle
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self._dirs.get(fh)
        if listing is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        overlay = self.overlay
        getattr_, remember, entry = overlay.getattr, overlay.remember, self._entry
        reply, parents, this = pyfuse3.readdir_reply, self._parents, listing[0][1]
        for pos in range(start_id, len(listing)):
            name, ino = listing[pos]
            try:
                # Warm (the layers of a listed directory's entries are loaded): a plain
                # call, not a coroutine per entry; `_ask` loads a layer or translates.
                a = getattr_(ino)
            except Exception:
                a = await self._ask(getattr_, ino)
            if not reply(token, name, entry(a), pos + 1):
                break
            if name in (b".", b".."):
                continue  # the kernel takes no lookup reference for these (fuse_direntplus_link)
            remember(ino)  # readdirplus counts as a lookup
            if stat.S_ISDIR(a.mode):
                parents[ino] = this
        if overlay.warnings:
            self.tree.log_warnings()

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # -- files ------------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        # `locate` answers EISDIR for a directory and EINVAL for another non-regular file.
        layer, entry = await self._ask(self.overlay.locate, inode)
        toc = self.layers.index(layer).toc
        self._event("open", inode)
        fh = self._next_fh
        self._next_fh += 1
        # Everything a read needs, found once per open instead of once per read.
        self._files[fh] = _Open(inode, layer, toc.offset(entry), toc.size(entry))
        # keep_cache: the kernel keeps this file's pages across opens (the image never
        # changes); direct_io stays off, so reads go through the page cache.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        f = self._files.get(fh)
        if f is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if off >= f.size:
            return b""
        n = min(size, f.size - off)
        tele = self.telemetry
        info = telemetry.ReadInfo()
        token = telemetry.current.set(info)
        try:
            data = await self.layers.read(
                f.layer, f.start + off, n, read_ahead_until=f.start + f.size
            )
            if tele is not None:
                # The path is only written to a trace; without one, do not look it up.
                path = self.overlay.path(f.ino) if tele.tracing else b""
                tele.read(f.ino, path, f.layer, off, len(data), info, stream_offset=f.start + off)
            return data
        except ImageFSError as exc:
            log.error("read %r at %d: %s", self.overlay.path(f.ino), off, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("read %r at %d", self.overlay.path(f.ino), off)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            telemetry.current.reset(token)

    def _event(self, op: str, ino: int, name: bytes | None = None) -> None:
        tele = self.telemetry
        if tele is None:
            return
        if not tele.tracing:  # counted only: the path is for the trace
            tele.count(op)
            return
        try:
            path = self.overlay.path(ino)
        except ImageFSError:
            path = b"?"
        if name is not None:
            path = path + b"/" + name if path else name
        tele.event(op, path)

    async def release(self, fh: int) -> None:
        self._files.pop(fh, None)

    # -- xattrs -----------------------------------------------------------------------------

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return await self._ask(self.overlay.listxattr, inode)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        value = await self._ask(self.overlay.getxattr, inode, bytes(name))
        self._event("getxattr", inode)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    # -- the filesystem ---------------------------------------------------------------------

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = 4096
        s.f_frsize = 4096
        s.f_blocks = (self.total_size + 4095) // 4096
        s.f_bfree = 0
        s.f_bavail = 0
        s.f_files = sum(
            len(self.layers.index(i).toc)
            for i in range(len(self.layers.layers))
            if self.layers.loaded(i)
        )
        s.f_ffree = 0
        s.f_favail = 0
        s.f_namemax = 255
        return s

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        await self._ask(self.overlay.getattr, inode)
        return True

    # -- everything that writes: read-only filesystem ----------------------------------------

    async def setattr(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mknod(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mkdir(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def unlink(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rmdir(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def symlink(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rename(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def link(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def create(self, *args: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def write(self, *args: Any) -> int:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def setxattr(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def removexattr(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)


def _fuse_error(exc: ImageFSError) -> pyfuse3.FUSEError:
    code = getattr(exc, "errno", errno.EIO)
    return pyfuse3.FUSEError(code if isinstance(code, int) and code > 0 else errno.EIO)
