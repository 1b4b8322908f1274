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
from typing import Any, NamedTuple, TypeVar, cast

import pyfuse3
import trio

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


class _Open(NamedTuple):
    """An open file: its inode, and where its bytes are (layer, start in the layer's
    uncompressed stream, size). A NamedTuple: one is built per open, in one step (a frozen
    dataclass sets each field in turn)."""

    ino: int
    layer: int
    start: int
    size: int


# What a read served from pieces already in the cache tells telemetry (never changed).
_CACHED = telemetry.ReadInfo(source="cache")

# An open directory: `.` and `..` (name, inode), then the overlay's listing (name, inode).
_Handle = tuple[tuple[tuple[bytes, int], tuple[bytes, int]], list[tuple[bytes, int]]]


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
        self._dirs: dict[int, _Handle] = {}
        # Built once and kept: the image never changes, so an inode's attributes are
        # answered again as they were first built (the kernel asks again whenever its own
        # caches let go). A list by inode number (numbers are dense and never reused): ~220
        # bytes an inode ever visited (pyfuse3's EntryAttributes and a slot), ~11 MB for the
        # 48k-entry bench image. `_listed`: directories whose entries all have theirs.
        self._attrs: list[pyfuse3.EntryAttributes | None] = []
        self._listed: set[int] = set()
        self._negative = pyfuse3.EntryAttributes()
        self._negative.st_ino = 0  # a cached "no such entry"
        self._negative.entry_timeout = CACHE_TIMEOUT
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

    def _attributes(self, ino: int) -> pyfuse3.EntryAttributes:
        """The inode's attributes as the kernel gets them, built on first need and kept.
        Pure (raises NeedLayer like the overlay): call it through `_ask`."""
        attrs = self._attrs
        if ino < len(attrs):
            e = attrs[ino]
            if e is not None:
                return e
        e = _entry(self.overlay.getattr(ino))
        if ino >= len(attrs):
            attrs.extend([None] * (ino + 1 - len(attrs)))
        attrs[ino] = e
        return e

    def _listing(self, ino: int) -> _Handle:
        """What readdirplus answers for a directory: `.`, `..`, then the overlay's listing
        (built once by the overlay, shared, not copied), every entry's attributes built
        the first time. Pure (raises NeedLayer): call it through `_ask`."""
        attributes = self._attributes
        parent = self._parents.get(ino, ROOT_INODE)  # the root's `..` is the root itself
        attributes(ino)
        attributes(parent)
        children = self.overlay.listing(ino)
        if ino not in self._listed:
            dirs = [child for _, child in children if stat.S_ISDIR(attributes(child).st_mode)]
            for child in dirs:  # only now: a NeedLayer above leaves nothing half done
                self._parents[child] = ino
            self._listed.add(ino)
        # `.` and `..` first, as every filesystem lists them (`ls -a`); FUSE leaves that to us.
        return ((b".", ino), (b"..", parent)), children

    # -- names ------------------------------------------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        ino = await self._ask(self.overlay.lookup, parent_inode, bytes(name))
        self._event("lookup", parent_inode, bytes(name))
        if ino is None:
            return self._negative
        e = await self._ask(self._attributes, ino)
        if stat.S_ISDIR(e.st_mode):
            self._parents[ino] = parent_inode
        return e

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, nlookup in inode_list:
            self.overlay.forget(ino, nlookup)

    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        return await self._ask(self._attributes, inode)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        target = await self._ask(self.overlay.readlink, inode)
        self._event("readlink", inode)
        return target

    # -- directories ------------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        handle = await self._ask(self._listing, inode)
        self._event("readdir", inode)
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = handle  # never changed: offsets stay valid for this handle
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._dirs.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        dots, children = handle
        # Every entry has its attributes (`_listing` built them); were one missing, the
        # reply would raise and the request, not the mount, would fail.
        reply, attrs = pyfuse3.readdir_reply, cast(list[pyfuse3.EntryAttributes], self._attrs)
        # Offsets: 1 and 2 after `.` and `..`, 3 + k after the k-th entry of the listing.
        for pos in range(start_id, 2):
            name, ino = dots[pos]
            if not reply(token, name, attrs[ino], pos + 1):
                return
        remember = self.overlay.remember
        for k in range(max(start_id - 2, 0), len(children)):
            name, ino = children[k]
            if not reply(token, name, attrs[ino], k + 3):
                return
            # Readdirplus counts as a lookup (fuse_direntplus_link); the kernel takes no
            # reference for `.` and `..`.
            remember(ino)

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
        try:
            # Warm (the bytes in the cache's pieces or a local file): preads, nothing else.
            data = self.layers.read_warm(
                f.layer, f.start + off, n, read_ahead_until=f.start + f.size
            )
        except Exception as exc:
            raise self._read_failed(f, off, exc) from None
        if data is None:
            return await self._read_making(f, off, n)
        tele = self.telemetry
        if tele is not None:
            path = self.overlay.path(f.ino) if tele.tracing else b""
            tele.read(f.ino, path, f.layer, off, len(data), _CACHED, stream_offset=f.start + off)
        return data

    async def _read_making(self, f: _Open, off: int, n: int) -> bytes:
        """A read that needs more than preads: an index to load, pieces to make."""
        tele = self.telemetry
        info = telemetry.ReadInfo()
        token = telemetry.current.set(info)
        began = trio.current_time()
        try:
            data = await self.layers.read(
                f.layer, f.start + off, n, read_ahead_until=f.start + f.size
            )
            # all this read waited for: its own fetches, a read-ahead fetch already in flight
            # for its bytes, an index (a read answered at once never comes here)
            info.wait = trio.current_time() - began
            if tele is not None:
                # The path is only written to a trace; without one, do not look it up.
                path = self.overlay.path(f.ino) if tele.tracing else b""
                tele.read(f.ino, path, f.layer, off, len(data), info, stream_offset=f.start + off)
            return data
        except Exception as exc:
            raise self._read_failed(f, off, exc) from None
        finally:
            telemetry.current.reset(token)

    def _read_failed(self, f: _Open, off: int, exc: Exception) -> pyfuse3.FUSEError:
        """A failed read costs EIO and a log line (a traceback when unexpected)."""
        if isinstance(exc, ImageFSError):
            log.error("read %r at %d: %s", self.overlay.path(f.ino), off, exc)
        else:
            log.error("read %r at %d", self.overlay.path(f.ino), off, exc_info=exc)
        return pyfuse3.FUSEError(errno.EIO)

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
        await self._ask(self._attributes, inode)
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


def _entry(a: Attrs) -> pyfuse3.EntryAttributes:
    ino, mode, nlink, uid, gid, size, blocks, rdev, mtime_ns = a  # one unpack, not 9 reads
    e = pyfuse3.EntryAttributes()
    e.st_ino = ino
    e.generation = 0
    e.entry_timeout = CACHE_TIMEOUT
    e.attr_timeout = CACHE_TIMEOUT
    e.st_mode = mode
    e.st_nlink = nlink
    e.st_uid = uid
    e.st_gid = gid
    e.st_rdev = rdev
    e.st_size = size
    e.st_blksize = 4096
    e.st_blocks = blocks
    # atime and ctime are the mtime (`Attrs.atime_ns` says so, through a property call)
    e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = mtime_ns
    return e


def _fuse_error(exc: ImageFSError) -> pyfuse3.FUSEError:
    code = getattr(exc, "errno", errno.EIO)
    return pyfuse3.FUSEError(code if isinstance(code, int) and code > 0 else errno.EIO)
