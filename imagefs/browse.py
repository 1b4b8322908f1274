"""Look inside an image without mounting it: `ls` and `cat` on the lazily fetched tree.

Why a second front end instead of "mount, look, unmount": browsing needs no FUSE, no root, no
mountpoint and no daemon (people who use crane, ratarmount or dive ask for exactly this), yet
it must cost what a mount costs and no more. So it is the same machinery the mount daemon
wires up, driven directly instead of by the kernel: the same store root, the same `LayerSet`
(TOCs by ranges, the piece cache, the index store, range fetching, verification) and the same
pure `Overlay`. `cat` of one file fetches that file's pieces and nothing else, and whatever a
browse fetched is there for the next mount of the root, and the other way round.

`Browser` is the small library API (paths to inodes, stat, listdir, read, readlink, walk);
`ls` and `cat` are the two commands built on it. `ls` output follows GNU ls in the C/UTF-8
locale with `-n` (numeric owners) and `-b` (escaped names), so it can be compared line for
line with GNU ls run on an extraction or a mount of the same image.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
import unicodedata
from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Any, BinaryIO, TypeVar

import trio

from imagefs.errors import ImageFSError, NotAFile, NotFound, UsageError, unwrap_groups
from imagefs.lazy.cache import DEFAULT_CACHE_SIZE
from imagefs.lazy.layers import READ_AHEAD, LayerSet
from imagefs.lazy.tree import LazyTree
from imagefs.lazy.wiring import lazy_layer_set
from imagefs.oci.platform import Platform
from imagefs.overlay import ROOT_INODE, Attrs, Overlay
from imagefs.pulling import find_or_pull
from imagefs.session import Session
from imagefs.store import ImageRecord
from imagefs.store.lookup import load_resolved

__all__ = [
    "MAX_SYMLINK_HOPS",
    "READ_SIZE",
    "Browser",
    "SymlinkLoop",
    "cat",
    "format_mode",
    "ls",
    "open_image",
    "quote_name",
]

log = logging.getLogger("imagefs.browse")

T = TypeVar("T")

#: Symlinks followed while resolving one path before giving up, as Linux does (ELOOP).
MAX_SYMLINK_HOPS = 40
#: `cat` reads this much at a time: big enough that a chunked layer's pieces are fetched in
#: few requests, small enough to stream a large file without holding it.
READ_SIZE = 1 << 20
#: GNU ls: a time is "recent" (shown with the hour) within half a mean Gregorian year.
_SIX_MONTHS_NS = 31556952 // 2 * 1_000_000_000
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class SymlinkLoop(ImageFSError):
    """More than MAX_SYMLINK_HOPS symlinks while resolving one path (the kernel's ELOOP)."""

    errno = errno.ELOOP


class _Missing(NotFound):
    """A path that does not resolve. Private so that `lookup_path` turns exactly this into
    None and never swallows a registry's NotFound (a blob the registry lost is an error)."""

    def __init__(self, message: str, *, dangling: bool = False) -> None:
        super().__init__(message)
        self.dangling = dangling


# -- wiring, shared with the mount daemon -----------------------------------------------------


async def open_image(
    session: Session,
    reference: str,
    platform: Platform | None = None,
    *,
    cache_size: int = DEFAULT_CACHE_SIZE,
    trust_published_index: bool = False,
) -> Browser:
    """A `Browser` on `reference`, pulling its metadata first when it is not in the store
    (as `imagefs mount` does). Close it with `aclose()` or use it with `async with`."""
    store = session.store
    record: ImageRecord = await find_or_pull(session, reference, platform)
    image = await session.disk(load_resolved, store, record.manifest.digest, record.index_digest)
    layers = image.layers
    stack = contextlib.ExitStack()
    # While we read, a concurrent `prune`/`rmi` must not delete what we are reading from.
    lease = stack.enter_context(store.lease())
    lease.add(record.manifest.digest, image.id, *(layer.digest for layer in layers))
    try:
        layer_set = lazy_layer_set(
            session,
            record,
            layers,
            cache_size=cache_size,
            trust_published_index=trust_published_index,
        )
    except BaseException:
        stack.close()
        raise
    stack.callback(layer_set.close)
    # Directory link counts would need every layer of a directory's listing before its
    # first stat; like the mount (and btrfs), report 1 and stay lazy.
    overlay = Overlay(len(layers), exact_dir_nlink=False)
    name = str(record.name or record.repo_digest or record.manifest.digest)
    return Browser(name, layer_set, overlay, stack)


# -- the library API --------------------------------------------------------------------------


class Browser:
    """The merged tree of one image, read on demand. Inode numbers are the overlay's: stable
    for the life of the Browser. Every method may fetch (a layer's TOC, file pieces)."""

    def __init__(
        self, name: str, layers: LayerSet, overlay: Overlay, resources: contextlib.ExitStack
    ) -> None:
        self.name = name
        self.layers = layers
        self.overlay = overlay
        self.tree = LazyTree(overlay, layers, log)
        self._resources = resources

    async def __aenter__(self) -> Browser:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Release the lease on the image's blobs and the layer files held open."""
        self._resources.close()

    async def _ask(self, fn: Callable[..., T], *args: Any) -> T:
        """Call a pure overlay method through the lazy tree, as the mount does; library
        callers get the ImageFSError itself instead of an errno."""
        return await self.tree.ask(fn, *args)

    # -- names ------------------------------------------------------------------------------

    async def lookup_path(self, path: str | bytes, *, follow: bool = False) -> int | None:
        """Inode of `path` in the image, or None if it does not exist.

        Resolved as the kernel would inside a chroot of the image: relative paths start at
        the root, `..` of the root is the root, `..` after a symlink goes to the parent of
        where the symlink led, symlinks in intermediate components are followed (absolute
        targets from the image's root), at most MAX_SYMLINK_HOPS of them (else `SymlinkLoop`).
        The final component is followed only with `follow` or a trailing slash (lstat vs stat).
        """
        try:
            return await self._resolve(_raw(path), follow=follow)
        except _Missing:
            return None

    async def _resolve(self, path: bytes, *, follow: bool) -> int:
        shown = quote_name(path)
        todo = _components(path)
        todo.reverse()  # a stack: the next component last
        dirs = [ROOT_INODE]  # the directories walked through; `..` pops
        hops = 0
        in_final_link = False  # resolving the target of a final symlink: missing = dangling
        while todo:
            comp = todo.pop()
            if comp == b".":
                continue
            if comp == b"..":
                if len(dirs) > 1:
                    dirs.pop()
                continue
            final = not todo
            ino = await self._ask(self.overlay.lookup, dirs[-1], comp)
            if ino is None:
                raise _Missing(
                    f"{shown}: no such file or directory in {self.name}",
                    dangling=in_final_link,
                )
            attrs = await self.stat(ino)
            if stat.S_ISLNK(attrs.mode) and (follow or not final):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise SymlinkLoop(f"{shown}: too many levels of symbolic links in {self.name}")
                target = await self.readlink(ino)
                if not target:
                    raise _Missing(
                        f"{shown}: empty symbolic link in {self.name}",
                        dangling=in_final_link or final,
                    )
                if target.startswith(b"/"):
                    dirs = [ROOT_INODE]
                in_final_link = in_final_link or final
                todo.extend(reversed(_components(target)))
                continue
            if final:
                return ino
            if not stat.S_ISDIR(attrs.mode):
                raise _Missing(f"{shown}: not a directory in {self.name}")
            dirs.append(ino)
        return dirs[-1]

    # -- inodes -----------------------------------------------------------------------------

    async def stat(self, ino: int) -> Attrs:
        """What lstat(2) on a mount would show (symlinks are not followed)."""
        return await self._ask(self.overlay.getattr, ino)

    async def listdir(self, ino: int) -> list[tuple[bytes, int]]:
        """(name, inode) of a directory's entries, sorted by name bytes, without . and .."""
        return await self._ask(self.overlay.readdir, ino)

    async def readlink(self, ino: int) -> bytes:
        return await self._ask(self.overlay.readlink, ino)

    async def read(self, ino: int, offset: int, length: int) -> bytes:
        """Up to `length` bytes of a regular file at `offset`; short only at the end."""
        layer, entry = await self._ask(self.overlay.locate, ino)
        toc = self.layers.index(layer).toc
        size = toc.size(entry)
        if offset >= size or length <= 0:
            return b""
        return await self.layers.read(layer, toc.offset(entry) + offset, min(length, size - offset))

    async def walk(self, path: str | bytes = b"/") -> AsyncIterator[tuple[bytes, Attrs]]:
        """(path, attrs) of `path` and everything below it, depth first, each directory's
        entries sorted by name bytes (as `find` would print them); symlinks are not
        followed, except in `path` itself where `lookup_path` would follow them."""
        raw = _raw(path)
        ino = await self._resolve(raw, follow=False)
        stack = [(raw, ino)]
        while stack:
            current, ino = stack.pop()
            attrs = await self.stat(ino)
            yield current, attrs
            if stat.S_ISDIR(attrs.mode):
                for name, child in reversed(await self.listdir(ino)):
                    stack.append((_join(current, name), child))

    # -- files for cat ----------------------------------------------------------------------

    async def open_file(self, path: str | bytes) -> int:
        """The inode of the regular file `path` names (symlinks followed), or a one-line
        error naming the path: NotFound (missing, dangling symlink), NotAFile (a directory
        or another kind of file), SymlinkLoop."""
        raw = _raw(path)
        shown = quote_name(raw)
        try:
            ino = await self._resolve(raw, follow=True)
        except _Missing as exc:
            if exc.dangling:
                raise NotFound(f"{shown}: dangling symbolic link in {self.name}") from None
            raise NotFound(str(exc)) from None
        mode = (await self.stat(ino)).mode
        if stat.S_ISDIR(mode):
            raise NotAFile(f"{shown}: Is a directory")  # GNU cat's words
        if not stat.S_ISREG(mode):
            raise NotAFile(f"{shown}: not a regular file")
        return ino

    async def copy_to(
        self,
        ino: int,
        out: BinaryIO,
        *,
        chunk: int = READ_SIZE,
        nursery: trio.Nursery | None = None,
    ) -> int:
        """Stream a regular file into `out` in `chunk`-sized reads; returns the bytes copied.

        With a `nursery`, the pieces of the next READ_AHEAD bytes of the file are fetched
        while the current ones are written, like the mount's read-ahead but never past the
        end of the file: the layer's own read-ahead runs on into the files stored after it,
        which a kernel reading a file may use and `cat` never does. Writes run in a worker
        thread so that a slow reader of a pipe does not stall those fetches."""
        size = (await self.stat(ino)).size
        layer, entry = await self._ask(self.overlay.locate, ino)
        start = self.layers.index(layer).toc.offset(entry)
        offset = ahead = 0
        while offset < size:
            data = await self.read(ino, offset, chunk)
            if not data:
                raise ImageFSError(
                    f"{quote_name(self.overlay.path(ino))}: ended at {offset} of {size} bytes"
                )
            offset += len(data)
            target = min(size, offset + READ_AHEAD)
            frm = max(ahead, offset)
            # in windows of at least half READ_AHEAD: few, large requests
            big_enough = target == size or target - frm >= READ_AHEAD // 2
            if nursery is not None and target > frm and big_enough:
                nursery.start_soon(self._prefetch, layer, start + frm, target - frm)
                ahead = target
            await trio.to_thread.run_sync(out.write, data)
        return offset

    async def _prefetch(self, layer: int, offset: int, length: int) -> None:
        with contextlib.suppress(ImageFSError):  # the read that needs the piece will report
            await self.layers.prefetch(layer, offset, length)


async def cat(
    session: Session,
    reference: str,
    paths: Sequence[str | bytes],
    out: BinaryIO,
    *,
    platform: Platform | None = None,
    cache_size: int = DEFAULT_CACHE_SIZE,
    trust_published_index: bool = False,
) -> None:
    """Write the files `paths` name, one after the other, to `out` (symlinks followed).

    Every path is checked before anything is written, so a typo gives one clear error and no
    half output. Each file streams with read-ahead within the file (see `Browser.copy_to`)."""
    if not paths:
        raise UsageError("cat: no path given")
    opened = await open_image(
        session,
        reference,
        platform,
        cache_size=cache_size,
        trust_published_index=trust_published_index,
    )
    async with opened as browser:
        inos = [await browser.open_file(p) for p in paths]
        with unwrap_groups():
            async with trio.open_nursery() as nursery:
                for ino in inos:
                    await browser.copy_to(ino, out, nursery=nursery)
        await trio.to_thread.run_sync(out.flush)


# -- ls ---------------------------------------------------------------------------------------


async def ls(
    session: Session,
    reference: str,
    path: str | bytes = "/",
    *,
    long: bool = False,
    recursive: bool = False,
    almost_all: bool = False,
    platform: Platform | None = None,
    cache_size: int = DEFAULT_CACHE_SIZE,
    now_ns: int | None = None,
    trust_published_index: bool = False,
) -> list[str]:
    """The lines GNU `ls -1b [-ln] [-R] [-A] PATH` would print for `path` in the image.

    Mirrors GNU ls (LC_CTYPE UTF-8, LC_COLLATE and LC_TIME C): names starting with "." are
    left out unless `almost_all`; a directory lists its entries, anything else itself under
    the name given; without `long` a symlink to a directory given as PATH is followed, with
    `long` only when PATH ends in "/"; `recursive` adds `DIR:` headers and blank lines
    between directories and does not follow symlinks below PATH. Owners are numeric (an
    image's /etc/passwd is not this machine's). `now_ns` fixes the time that decides which
    times are recent (default: the clock, read again for a file from the future, as GNU does).
    """
    opened = await open_image(
        session,
        reference,
        platform,
        cache_size=cache_size,
        trust_published_index=trust_published_index,
    )
    async with opened as browser:
        return await list_lines(
            browser,
            path,
            long=long,
            recursive=recursive,
            almost_all=almost_all,
            now_ns=now_ns,
        )


async def list_lines(
    browser: Browser,
    path: str | bytes,
    *,
    long: bool,
    recursive: bool,
    almost_all: bool,
    now_ns: int | None = None,
) -> list[str]:
    """`ls` on an open Browser (see `ls`)."""
    raw = _raw(path)
    ino = await _ls_target(browser, raw, long)
    attrs = await browser.stat(ino)
    if not stat.S_ISDIR(attrs.mode):
        return await _entries(browser, [(raw, ino, attrs)], long=long, now_ns=now_ns, total=False)
    out: list[str] = []
    pending = [(raw, ino)]
    while pending:
        dir_path, dir_ino = pending.pop()
        if recursive:
            if out:
                out.append("")
            out.append(quote_name(dir_path) + ":")
        rows = []
        for name, child in await browser.listdir(dir_ino):
            if almost_all or not name.startswith(b"."):
                rows.append((name, child, await browser.stat(child)))
        out += await _entries(browser, rows, long=long, now_ns=now_ns, total=True)
        if recursive:
            subdirs = [(_join(dir_path, n), i) for n, i, a in rows if stat.S_ISDIR(a.mode)]
            pending.extend(reversed(subdirs))
    return out


async def _ls_target(browser: Browser, raw: bytes, long: bool) -> int:
    """The inode `ls PATH` shows: GNU dereferences a command-line symlink only when it
    leads to a directory and neither -l nor -d/-F/-H/-L was given; a dangling one shows
    itself."""
    try:
        if long:
            return await browser._resolve(raw, follow=False)
        try:
            ino = await browser._resolve(raw, follow=True)
        except _Missing as exc:
            if not exc.dangling:
                raise
            return await browser._resolve(raw, follow=False)
        if stat.S_ISDIR((await browser.stat(ino)).mode):
            return ino
        return await browser._resolve(raw, follow=False)
    except _Missing as exc:
        raise NotFound(str(exc)) from None


async def _entries(
    browser: Browser,
    rows: Sequence[tuple[bytes, int, Attrs]],
    *,
    long: bool,
    now_ns: int | None,
    total: bool,
) -> list[str]:
    if not long:
        return [quote_name(name) for name, _, _ in rows]
    cells: list[tuple[str, str, str, str, str, str, str]] = []
    major_w = minor_w = 0
    for _, _, a in rows:
        if stat.S_ISCHR(a.mode) or stat.S_ISBLK(a.mode):
            major_w = max(major_w, len(str(os.major(a.rdev))))
            minor_w = max(minor_w, len(str(os.minor(a.rdev))))
    for name, ino, a in rows:
        shown = quote_name(name)
        if stat.S_ISLNK(a.mode):
            shown += " -> " + quote_name(await browser.readlink(ino))
        if stat.S_ISCHR(a.mode) or stat.S_ISBLK(a.mode):
            size = f"{os.major(a.rdev):>{major_w}}, {os.minor(a.rdev):>{minor_w}}"
        else:
            size = str(a.size)
        cells.append(
            (
                format_mode(a.mode),
                str(a.nlink),
                str(a.uid),
                str(a.gid),
                size,
                _format_time(a.mtime_ns, now_ns),
                shown,
            )
        )
    widths = [max((len(c[k]) for c in cells), default=0) for k in range(5)]
    lines = [f"total {-(-sum(a.blocks for _, _, a in rows) // 2)}"] if total else []
    for mode, nlink, uid, gid, size, when, shown in cells:
        lines.append(
            f"{mode} {nlink:>{widths[1]}} {uid:>{widths[2]}} {gid:>{widths[3]}} "
            f"{size:>{widths[4]}} {when} {shown}"
        )
    return lines


# -- formatting -------------------------------------------------------------------------------

_TYPE_CHAR = {
    stat.S_IFREG: "-",
    stat.S_IFDIR: "d",
    stat.S_IFLNK: "l",
    stat.S_IFCHR: "c",
    stat.S_IFBLK: "b",
    stat.S_IFIFO: "p",
    stat.S_IFSOCK: "s",
}


def format_mode(mode: int) -> str:
    """`drwxr-xr-x` as ls prints it: s/S, s/S and t/T for setuid, setgid and sticky."""

    def triad(r: int, w: int, x: int, special: int, on: str) -> str:
        xc = "x" if mode & x else "-"
        if mode & special:
            xc = on if mode & x else on.upper()
        return ("r" if mode & r else "-") + ("w" if mode & w else "-") + xc

    return (
        _TYPE_CHAR.get(stat.S_IFMT(mode), "?")
        + triad(stat.S_IRUSR, stat.S_IWUSR, stat.S_IXUSR, stat.S_ISUID, "s")
        + triad(stat.S_IRGRP, stat.S_IWGRP, stat.S_IXGRP, stat.S_ISGID, "s")
        + triad(stat.S_IROTH, stat.S_IWOTH, stat.S_IXOTH, stat.S_ISVTX, "t")
    )


def _format_time(mtime_ns: int, now_ns: int | None) -> str:
    """GNU ls's default in the C locale: `%b %e %H:%M` for the past six months, else
    `%b %e  %Y` (files from the future included), in local time.

    Without a fixed `now_ns` the clock is read per call, so that a file stamped a moment
    ago (tar rounds times to the nearest second) is not taken for one from the future; GNU
    gets the same effect by reading the clock again when it meets a future time."""
    if now_ns is None:
        now_ns = time.time_ns()
    seconds = mtime_ns // 1_000_000_000
    try:
        t = time.localtime(seconds)
    except (OverflowError, OSError, ValueError):
        return f"{seconds:>12}"  # GNU prints the raw number when localtime fails
    head = f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d}"
    if now_ns - _SIX_MONTHS_NS < mtime_ns < now_ns:
        return f"{head} {t.tm_hour:02d}:{t.tm_min:02d}"
    return f"{head}  {t.tm_year}"


_C_ESCAPES = {
    0x07: "\\a",
    0x08: "\\b",
    0x09: "\\t",
    0x0A: "\\n",
    0x0B: "\\v",
    0x0C: "\\f",
    0x0D: "\\r",
    0x20: "\\ ",
    0x5C: "\\\\",
}
# Unicode categories GNU's iswprint (glibc, UTF-8) treats as unprintable, approximately:
# controls, surrogates (here: the bytes that were not UTF-8), unassigned, line/para separators.
_UNPRINTABLE = frozenset({"Cc", "Cs", "Cn", "Zl", "Zp"})


def quote_name(name: bytes) -> str:
    """A raw name as `ls -b` (--quoting-style=escape) prints it in a UTF-8 locale: printable
    characters as they are; backslash, space and the C control characters as `\\\\`, `\\ `,
    `\\n` ...; every other unprintable character and every byte that is not UTF-8 as `\\ooo`.
    One line whatever the name holds, and the bytes can be recovered from it."""
    out: list[str] = []
    for ch in name.decode("utf-8", "surrogateescape"):
        cp = ord(ch)
        if 0xDC80 <= cp <= 0xDCFF:  # an undecodable byte, kept by surrogateescape
            out.append(f"\\{cp - 0xDC00:03o}")
        elif cp in _C_ESCAPES:
            out.append(_C_ESCAPES[cp])
        elif cp < 0x80:
            out.append(ch if 0x20 < cp < 0x7F else f"\\{cp:03o}")
        elif unicodedata.category(ch) in _UNPRINTABLE:
            out.extend(f"\\{b:03o}" for b in ch.encode("utf-8"))
        else:
            out.append(ch)
    return "".join(out)


# -- paths ------------------------------------------------------------------------------------


def _raw(path: str | bytes) -> bytes:
    return os.fsencode(path)


def _components(path: bytes) -> list[bytes]:
    """Components of a path; a trailing slash becomes a final "." so that the component
    before it must be a directory and is followed if it is a symlink, as in the kernel."""
    comps = [c for c in path.split(b"/") if c]
    if path.endswith(b"/") and comps:
        comps.append(b".")
    return comps


def _join(parent: bytes, name: bytes) -> bytes:
    return parent + name if parent.endswith(b"/") else parent + b"/" + name
