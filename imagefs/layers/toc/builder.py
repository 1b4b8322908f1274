"""The writing side of a layer TOC: `TocBuilder` takes entries in tar order and decides the
layer's semantics (see the package docstring); `toc_from_tar` feeds it from a tar scan."""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterable, Mapping

from imagefs.layers.tarscan import EntryType, TarEntry, TarScanner, clean_path, show
from imagefs.layers.toc.packed import (
    DEFAULT_DIR_MODE,
    DEV_MAX,
    IMPLICIT,
    SIZE_MAX,
    TYPE_MASK,
    X_DEV,
    X_LINK,
    X_LINKREF,
    X_XATTR,
    Strings,
    parent_of,
    read_varint,
    varint,
    write_record,
)
from imagefs.layers.toc.table import Toc

#: eStargz bookkeeping files, present in the tar but never part of the image.
HIDDEN_AT_ROOT = frozenset((b"stargz.index.json", b".prefetch.landmark", b".no.prefetch.landmark"))

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"

#: Ids that do not fit a 32-bit uid_t are shown as the kernel's overflow id.
OVERFLOW_ID = 65534
# Members read once: `add` runs once per entry of a layer (40k for a big one), and reading
# an enum member off its class costs more than a global.
_REG, _DIR, _SYMLINK, _HARDLINK = (
    EntryType.REG,
    EntryType.DIR,
    EntryType.SYMLINK,
    EntryType.HARDLINK,
)
_CHAR, _BLOCK = EntryType.CHAR, EntryType.BLOCK


class TocBuilder:
    """Collects a layer's entries in tar order, then `build()`s an immutable `Toc`.

    `add` takes plain values so that TOC sources other than a tar scan (an eStargz or
    zstd:chunked JSON TOC) can feed it too; `add_tar_entry` is the shortcut for the scanner.
    Problems that spoil one entry are appended to `warnings` and the entry is left out.
    """

    def __init__(self, *, estargz: bool = False) -> None:
        """`estargz`: the layer is eStargz, whose bookkeeping files at the root
        (`HIDDEN_AT_ROOT`) are not part of the image; in any other layer they are files."""
        self.warnings: list[str] = []
        self._hide = HIDDEN_AT_ROOT if estargz else frozenset()
        self._types = array("B")
        self._modes = array("H")
        self._uids = array("I")
        self._gids = array("I")
        self._sizes = array("Q")
        self._offsets = array("Q")
        self._mtimes = array("q")
        self._nsecs = array("I")
        self._path_offs = array("I", [0])
        self._paths = bytearray()
        self._extra_offs = array("I", [0])
        self._extras = bytearray()
        # Build-time only (dropped by build()): every version of every path, in tar order.
        self._versions: dict[bytes, list[int]] = {}
        self._last_nondir: dict[bytes, int] = {}
        self._prefixes: set[bytes] = set()  # parents of the paths added so far
        self._whiteouts: set[bytes] = set()
        self._opaque: set[bytes] = set()
        self._built = False

    def __len__(self) -> int:
        return len(self._types)

    def add_tar_entry(self, entry: TarEntry) -> int | None:
        return self.add(
            entry.path,
            entry.type,
            mode=entry.mode,
            uid=entry.uid,
            gid=entry.gid,
            size=entry.size,
            mtime=entry.mtime,
            mtime_ns=entry.mtime_ns,
            devmajor=entry.devmajor,
            devminor=entry.devminor,
            offset=entry.offset,
            linkname=entry.linkname,
            xattrs=entry.xattrs,
        )

    def add(
        self,
        path: bytes,
        type: EntryType,
        *,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        size: int = 0,
        mtime: int = 0,
        mtime_ns: int = 0,
        devmajor: int = 0,
        devminor: int = 0,
        offset: int = 0,
        linkname: bytes = b"",
        xattrs: Mapping[bytes, bytes] | Iterable[tuple[bytes, bytes]] = (),
    ) -> int | None:
        """Append one entry; return its index, or None if it is not an entry of its own.

        `path` is cleaned again here (cleaning is idempotent) so that every source gets the
        same containment guarantee.
        """
        if self._built:
            raise RuntimeError("TocBuilder.add() after build()")
        if type.__class__ is not EntryType:
            type = EntryType(type)
        path = clean_path(path)
        name = path[path.rfind(b"/") + 1 :]
        if name.startswith(WHITEOUT_PREFIX):
            self._add_whiteout(path, name)
            return None
        if path in self._hide:
            return None
        if not path and type is not _DIR:
            self._warn(path, "the root can only be a directory")
            return None
        if not 0 <= size <= SIZE_MAX or not 0 <= offset < 1 << 64:
            self._warn(path, f"impossible size {size} or offset {offset}")
            return None
        if not 0 <= mtime_ns < 1_000_000_000:
            self._warn(path, f"impossible nanoseconds {mtime_ns}")
            return None
        if not -(1 << 63) <= mtime < 1 << 63:
            self._warn(path, f"mtime {mtime} out of range; using 0")
            mtime = 0
        if (type is _CHAR or type is _BLOCK) and max(devmajor, devminor) > DEV_MAX:
            self._warn(path, f"impossible device numbers {devmajor}:{devminor}")
            return None
        if not 0 <= uid < 1 << 32 or not 0 <= gid < 1 << 32:
            self._warn(path, f"owner {uid}:{gid} does not fit 32 bits; using {OVERFLOW_ID}")
            uid = uid if 0 <= uid < 1 << 32 else OVERFLOW_ID
            gid = gid if 0 <= gid < 1 << 32 else OVERFLOW_ID

        index = len(self._types)
        extras = bytearray()
        if type is not _REG:  # most entries: no link, no device, size kept
            if type is _HARDLINK:
                target = self._link_target(path, clean_path(linkname), index, extras)
                if target is None:
                    return None
                linkname = target
            if type is _SYMLINK or type is _HARDLINK:
                write_record(X_LINK, linkname, extras)
            if (type is _CHAR or type is _BLOCK) and (devmajor or devminor):
                dev = bytearray()
                varint(max(devmajor, 0), dev)
                varint(max(devminor, 0), dev)
                write_record(X_DEV, bytes(dev), extras)
            size = 0
        if xattrs:
            items = xattrs.items() if isinstance(xattrs, Mapping) else xattrs
            for xname, xvalue in items:
                rec = bytearray()
                varint(len(xname), rec)
                rec += xname
                rec += xvalue
                write_record(X_XATTR, bytes(rec), extras)

        self._types.append(int(type))
        self._modes.append(mode & 0o7777)
        self._uids.append(uid)
        self._gids.append(gid)
        self._sizes.append(size)
        self._offsets.append(offset)
        self._mtimes.append(mtime)
        self._nsecs.append(mtime_ns)
        self._paths += path
        self._path_offs.append(len(self._paths))
        self._extras += extras
        self._extra_offs.append(len(self._extras))
        self._versions.setdefault(path, []).append(index)
        if type is not _DIR:
            self._last_nondir[path] = index
        parent = parent_of(path) if path else b""
        while parent and parent not in self._prefixes:
            self._prefixes.add(parent)
            parent = parent_of(parent)
        return index

    def _warn(self, path: bytes, message: str) -> None:
        self.warnings.append(f"{show(path)}: {message}; skipped")

    def _add_whiteout(self, path: bytes, name: bytes) -> None:
        parent = parent_of(path)
        if name == OPAQUE_MARKER:
            self._opaque.add(parent)
        elif name.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            pass  # aufs bookkeeping (.wh..wh.plnk and friends): meaningless to an image
        elif name in (WHITEOUT_PREFIX, WHITEOUT_PREFIX + b".", WHITEOUT_PREFIX + b".."):
            self._warn(path, "whiteout without a name")
        else:
            hidden = name[len(WHITEOUT_PREFIX) :]
            target = parent + b"/" + hidden if parent else hidden
            if target in self._versions or target in self._prefixes:
                # This layer already wrote the path (or below it): umoci keeps what the layer
                # wrote and only removes the lower children, which is what opacity means. The
                # directory is then not recreated, so an implicit one keeps lower attributes.
                self._opaque.add(target)
            else:
                self._whiteouts.add(target)

    def _link_target(
        self, path: bytes, target: bytes, index: int, extras: bytearray
    ) -> bytes | None:
        """Point a hard link at the newest earlier version of its target in this layer.

        Returns the path to record as link target (the lower-layer path to resolve when the
        target is not in this layer), or None when the link is refused.
        """
        if not target or target == path:
            self._warn(path, "hard link to itself or to the root")
            return None
        versions = self._versions.get(target)
        if not versions:
            return target  # refers to the layers below; the overlay resolves it
        j = versions[-1]
        jtype = self._types[j] & TYPE_MASK
        if jtype == EntryType.DIR:
            self._warn(path, f"hard link to directory {show(target)}")
            return None
        if jtype != EntryType.HARDLINK:
            ref = bytearray()
            varint(j, ref)
            write_record(X_LINKREF, bytes(ref), extras)
            return target
        # A link to a link: share its final target (in-layer index or lower path).
        jx = self._extras[self._extra_offs[j] : self._extra_offs[j + 1]]
        lower = target
        pos = 0
        while pos < len(jx):
            tag = jx[pos]
            length, pos = read_varint(bytes(jx), pos + 1)
            payload = bytes(jx[pos : pos + length])
            pos += length
            if tag == X_LINKREF:
                write_record(X_LINKREF, payload, extras)
            elif tag == X_LINK:
                lower = payload
        return lower

    def _path(self, i: int) -> bytes:
        return bytes(self._paths[self._path_offs[i] : self._path_offs[i + 1]])

    def build(self) -> Toc:
        """Decide visibility, synthesize implicit directories, sort, and freeze."""
        if self._built:
            raise RuntimeError("TocBuilder.build() called twice")
        self._built = True
        versions = self._versions
        last_nondir = self._last_nondir
        visible: list[int] = []
        visible_paths: set[bytes] = set()
        # Non-directories that some entry's path goes through (every ancestor of an entry
        # is in `_prefixes`): almost always none, and then no entry's ancestors need a look
        # (a 40k-entry TOC: 40k walks up the tree, ~0.15 s).
        blocking = bool(last_nondir.keys() & self._prefixes)
        for path, vers in versions.items():
            i = vers[-1]
            if blocking and self._under_nondir(path, i):
                continue
            visible.append(i)
            visible_paths.add(path)

        implicit_paths: list[bytes] = []
        for path in list(visible_paths):
            parent = parent_of(path) if path else None
            while parent and parent not in visible_paths:
                visible_paths.add(parent)
                implicit_paths.append(parent)
                parent = parent_of(parent)
        for path in implicit_paths:
            visible.append(len(self._types))
            self._types.append(int(EntryType.DIR) | IMPLICIT)
            self._modes.append(DEFAULT_DIR_MODE)
            self._uids.append(0)
            self._gids.append(0)
            self._sizes.append(0)
            self._offsets.append(0)
            self._mtimes.append(0)
            self._nsecs.append(0)
            self._paths += path
            self._path_offs.append(len(self._paths))
            self._extra_offs.append(len(self._extras))

        paths = bytes(self._paths)
        offs = self._path_offs
        visible.sort(key=lambda i: paths[offs[i] : offs[i + 1]])
        order = array("I", visible)
        links = array("I", sorted(i for i in visible if self._types[i] == EntryType.HARDLINK))
        toc = Toc(
            types=self._types,
            modes=self._modes,
            uids=self._uids,
            gids=self._gids,
            sizes=self._sizes,
            offsets=self._offsets,
            mtimes=self._mtimes,
            nsecs=self._nsecs,
            path_offs=self._path_offs,
            paths=paths,
            extra_offs=self._extra_offs,
            extras=bytes(self._extras),
            order=order,
            links=links,
            whiteouts=Strings.build(self._whiteouts),
            opaque=Strings.build(self._opaque),
        )
        self._versions = {}
        self._last_nondir = {}
        self._prefixes = set()
        self._paths = bytearray()
        self._extras = bytearray()
        return toc

    def _under_nondir(self, path: bytes, i: int) -> bool:
        """Whether entry `i` at `path` was removed or refused because of a non-dir ancestor."""
        ancestor = path
        while ancestor:
            ancestor = parent_of(ancestor)
            m = self._last_nondir.get(ancestor)
            if m is None:
                continue
            if m > i:
                return True  # replaced later by a non-directory, which removes the subtree
            vers = self._versions[ancestor]
            before = vers[bisect.bisect_left(vers, i) - 1]
            if before == m:
                self._warn(path, f"parent {show(ancestor)} is not a directory")
                return True
        return False


def toc_from_tar(chunks: bytes | Iterable[bytes]) -> tuple[Toc, list[str]]:
    """Scan an uncompressed layer tar (whole or in chunks) into a TOC, with its warnings."""
    scanner = TarScanner()
    builder = TocBuilder()
    if isinstance(chunks, bytes | bytearray | memoryview):
        chunks = [bytes(chunks)]
    for chunk in chunks:
        for entry in scanner.feed(chunk):
            builder.add_tar_entry(entry)
    for entry in scanner.close():
        builder.add_tar_entry(entry)
    toc = builder.build()
    return toc, scanner.warnings + builder.warnings
