"""Compact table of contents of one layer: packed arrays in memory, one checksummed blob on disk.

A big layer has tens of thousands of entries and a mount keeps every layer's TOC in memory,
so nothing here holds one Python object per entry. Each field lives in an `array` (one machine
word or less per entry), names live in one `bytes` blob addressed by an offset array, and the
rarely used variable fields (link targets, xattrs, device numbers) share a second blob of small
tagged records. Lookups binary-search an array of entry indices sorted by path: every name
below a directory is then one contiguous run, so `children` and implicit parents come cheap.

Layer semantics decided here (the overlay above only combines layers):

- The same path twice: the last entry wins. Earlier versions stay in the arrays because a
  hard link written in between may still refer to them (as it does on an extracted disk).
- An entry below a path that a later entry of the same layer turns into a non-directory is
  gone (extraction would have removed it); one below a path that was a non-directory at the
  time is refused with a warning (umoci fails there).
- Parents that only appear as prefixes become implicit directories, flagged as such: umoci
  creates them with MkdirAll(0777) under the usual 022 umask, i.e. 0755 owned by the unpacking
  user (root), and leaves an existing lower directory's metadata alone. So the TOC reports them
  as 0755 root:root mtime 0 and the overlay prefers a lower explicit directory's attributes.
- `.wh.NAME` and `.wh..wh..opq` are not entries; they are kept as sorted path sets and only ever
  affect lower layers (umoci keeps paths this layer wrote). A `.wh.NAME` that comes after this
  layer wrote NAME or something below it is recorded as opacity of NAME: that is what umoci's
  extraction makes of it (the lower children go, the directory itself stays). Other
  `.wh..wh.*` names (aufs bookkeeping) are ignored, a bare `.wh.` is a warning. eStargz's own
  files at the root are hidden.
- Hard links are resolved inside the layer at build time to the newest earlier version of the
  target path; a link whose target is not in the layer refers to the layers below and is left
  for the overlay to resolve.
"""

from __future__ import annotations

import bisect
import struct
import sys
from array import array
from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple

import xxhash

from imagefs.errors import LayerFormatError
from imagefs.layers.tarscan import EntryType, TarEntry, TarScanner, clean_path, show

__all__ = [
    "DEFAULT_DIR_MODE",
    "HIDDEN_AT_ROOT",
    "EntryAttrs",
    "EntryType",
    "Toc",
    "TocBuilder",
    "toc_from_tar",
]

DEFAULT_DIR_MODE = 0o755

#: eStargz bookkeeping files, present in the tar but never part of the image.
HIDDEN_AT_ROOT = frozenset((b"stargz.index.json", b".prefetch.landmark", b".no.prefetch.landmark"))

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"

#: Ids that do not fit a 32-bit uid_t are shown as the kernel's overflow id.
OVERFLOW_ID = 65534

_IMPLICIT = 0x80  # flag bit in the type byte
_TYPE_MASK = 0x7F
_ENTRY_TYPES = {int(t): t for t in EntryType}  # a dict look-up is cheaper than EntryType(code)

# Tags of the records in the extras blob.
_X_LINK = 1  # symlink target, or the lower-layer path a hard link refers to
_X_XATTR = 2  # varint(len(name)) name value
_X_DEV = 3  # varint(major) varint(minor)
_X_LINKREF = 4  # varint(entry index) of the in-layer target of a hard link

_MAGIC = b"IMGFSTOC"
_VERSION = 1
_HEADER = struct.Struct("<8sIIQQ")  # magic, version, entry count, body length, xxh3_64(body)
_SECTION_LEN = struct.Struct("<Q")

for _code, _size in (("B", 1), ("H", 2), ("I", 4), ("Q", 8), ("q", 8)):
    if array(_code).itemsize != _size:  # pragma: no cover - exotic platforms only
        raise ImportError(f"array typecode {_code!r} is not {_size} bytes here")


class EntryAttrs(NamedTuple):
    """One entry's metadata, built on demand from the packed arrays (never stored).

    A NamedTuple, not a frozen dataclass: it is built for every entry the kernel asks about,
    and a tuple is built in one step where a frozen dataclass sets each field in turn.
    """

    type: EntryType
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    mtime_ns: int
    devmajor: int
    devminor: int
    offset: int
    linkname: bytes
    implicit: bool


def _varint(value: int, out: bytearray) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _record(tag: int, payload: bytes, out: bytearray) -> None:
    out.append(tag)
    _varint(len(payload), out)
    out += payload


def _parent(path: bytes) -> bytes:
    cut = path.rfind(b"/")
    return path[:cut] if cut >= 0 else b""


class _Strings:
    """An immutable sorted set of byte strings: one blob plus an offset array."""

    __slots__ = ("_blob", "_offs")

    def __init__(self, blob: bytes, offs: array[int]) -> None:
        self._blob = blob
        self._offs = offs

    @classmethod
    def build(cls, items: Iterable[bytes]) -> _Strings:
        blob = bytearray()
        offs = array("I", [0])
        for item in sorted(set(items)):
            blob += item
            offs.append(len(blob))
        return cls(bytes(blob), offs)

    def __len__(self) -> int:
        return len(self._offs) - 1

    def _at(self, i: int) -> bytes:
        return self._blob[self._offs[i] : self._offs[i + 1]]

    def __contains__(self, item: bytes) -> bool:
        n = len(self._offs) - 1
        if not n:
            return False
        i = bisect.bisect_left(range(n), item, key=self._at)
        return i < n and self._at(i) == item

    def __iter__(self) -> Iterator[bytes]:
        return (self._at(i) for i in range(len(self)))

    def names_in(self, dir_path: bytes) -> Iterator[bytes]:
        """Last components of the items directly below `dir_path` (a prefix range scan)."""
        n = len(self._offs) - 1
        prefix = dir_path + b"/" if dir_path else b""
        i = bisect.bisect_left(range(n), prefix, key=self._at)
        while i < n:
            item = self._at(i)
            if not item.startswith(prefix):
                return
            rest = item[len(prefix) :]
            if b"/" not in rest:
                yield rest
            i += 1


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
        type = EntryType(type)
        path = clean_path(path)
        name = path[path.rfind(b"/") + 1 :]
        if name.startswith(WHITEOUT_PREFIX):
            self._add_whiteout(path, name)
            return None
        if path in self._hide:
            return None
        if not path and type is not EntryType.DIR:
            self._warn(path, "the root can only be a directory")
            return None
        if not 0 <= size < 1 << 64 or not 0 <= offset < 1 << 64:
            self._warn(path, f"impossible size {size} or offset {offset}")
            return None
        if not 0 <= mtime_ns < 1_000_000_000:
            self._warn(path, f"impossible nanoseconds {mtime_ns}")
            return None
        if not -(1 << 63) <= mtime < 1 << 63:
            self._warn(path, f"mtime {mtime} out of range; using 0")
            mtime = 0
        if not 0 <= uid < 1 << 32 or not 0 <= gid < 1 << 32:
            self._warn(path, f"owner {uid}:{gid} does not fit 32 bits; using {OVERFLOW_ID}")
            uid = uid if 0 <= uid < 1 << 32 else OVERFLOW_ID
            gid = gid if 0 <= gid < 1 << 32 else OVERFLOW_ID

        index = len(self._types)
        extras = bytearray()
        if type is EntryType.HARDLINK:
            target = self._link_target(path, clean_path(linkname), index, extras)
            if target is None:
                return None
            linkname = target
            size = 0
        if type in (EntryType.SYMLINK, EntryType.HARDLINK):
            _record(_X_LINK, linkname, extras)
        if type in (EntryType.CHAR, EntryType.BLOCK) and (devmajor or devminor):
            dev = bytearray()
            _varint(max(devmajor, 0), dev)
            _varint(max(devminor, 0), dev)
            _record(_X_DEV, bytes(dev), extras)
        items = xattrs.items() if isinstance(xattrs, Mapping) else xattrs
        for xname, xvalue in items:
            rec = bytearray()
            _varint(len(xname), rec)
            rec += xname
            rec += xvalue
            _record(_X_XATTR, bytes(rec), extras)
        if type is not EntryType.REG:
            size = 0

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
        if type is not EntryType.DIR:
            self._last_nondir[path] = index
        parent = _parent(path) if path else b""
        while parent and parent not in self._prefixes:
            self._prefixes.add(parent)
            parent = _parent(parent)
        return index

    def _warn(self, path: bytes, message: str) -> None:
        self.warnings.append(f"{show(path)}: {message}; skipped")

    def _add_whiteout(self, path: bytes, name: bytes) -> None:
        parent = _parent(path)
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
        jtype = self._types[j] & _TYPE_MASK
        if jtype == EntryType.DIR:
            self._warn(path, f"hard link to directory {show(target)}")
            return None
        if jtype != EntryType.HARDLINK:
            ref = bytearray()
            _varint(j, ref)
            _record(_X_LINKREF, bytes(ref), extras)
            return target
        # A link to a link: share its final target (in-layer index or lower path).
        jx = self._extras[self._extra_offs[j] : self._extra_offs[j + 1]]
        lower = target
        pos = 0
        while pos < len(jx):
            tag = jx[pos]
            length, pos = _read_varint(bytes(jx), pos + 1)
            payload = bytes(jx[pos : pos + length])
            pos += length
            if tag == _X_LINKREF:
                _record(_X_LINKREF, payload, extras)
            elif tag == _X_LINK:
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
        for path, vers in versions.items():
            i = vers[-1]
            if last_nondir and self._under_nondir(path, i):
                continue
            visible.append(i)
            visible_paths.add(path)

        implicit_paths: list[bytes] = []
        for path in list(visible_paths):
            parent = _parent(path) if path else None
            while parent and parent not in visible_paths:
                visible_paths.add(parent)
                implicit_paths.append(parent)
                parent = _parent(parent)
        for path in implicit_paths:
            visible.append(len(self._types))
            self._types.append(int(EntryType.DIR) | _IMPLICIT)
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
            whiteouts=_Strings.build(self._whiteouts),
            opaque=_Strings.build(self._opaque),
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
            ancestor = _parent(ancestor)
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


class Toc:
    """One layer's immutable table of contents. Entry indices are ints in [0, len(toc))."""

    __slots__ = (
        "_extra_offs",
        "_extras",
        "_finds",
        "_gids",
        "_links",
        "_modes",
        "_mtimes",
        "_nsecs",
        "_offsets",
        "_opaque",
        "_order",
        "_path_offs",
        "_path_table",
        "_paths",
        "_sizes",
        "_types",
        "_uids",
        "_whiteouts",
    )

    def __init__(
        self,
        *,
        types: array[int],
        modes: array[int],
        uids: array[int],
        gids: array[int],
        sizes: array[int],
        offsets: array[int],
        mtimes: array[int],
        nsecs: array[int],
        path_offs: array[int],
        paths: bytes,
        extra_offs: array[int],
        extras: bytes,
        order: array[int],
        links: array[int],
        whiteouts: _Strings,
        opaque: _Strings,
    ) -> None:
        self._types = types
        self._modes = modes
        self._uids = uids
        self._gids = gids
        self._sizes = sizes
        self._offsets = offsets
        self._mtimes = mtimes
        self._nsecs = nsecs
        self._path_offs = path_offs
        self._paths = paths
        self._extra_offs = extra_offs
        self._extras = extras
        self._order = order
        self._path_table: array[int] | None = None  # built once `find` is used enough
        self._finds = 0
        self._links = links
        self._whiteouts = whiteouts
        self._opaque = opaque

    # ----------------------------------------------------------------- lookups

    def __len__(self) -> int:
        """Number of stored entries, superseded versions and implicit directories included."""
        return len(self._types)

    @property
    def visible_count(self) -> int:
        return len(self._order)

    def path(self, i: int) -> bytes:
        return self._paths[self._path_offs[i] : self._path_offs[i + 1]]

    def find(self, path: bytes) -> int | None:
        """Index of the visible entry at a cleaned `path` (b"" is the root entry, if any).

        Once a TOC has answered enough lookups, from a hash table of entry indices (open
        addressing, 4 bytes a slot, at most half full): one or two path comparisons, where
        a bisection of the sorted order takes ~16 path slices (a warm random read's lookups
        spent most of their time there).
        """
        table = self._path_table
        if table is None:
            # The table costs ~0.4 µs an entry to build (~17 ms for 40k entries), a bisection
            # ~7 µs more than a table lookup: bisect until the lookups made would have paid
            # for it (ski rental: never more than twice the better choice), so a mount's
            # first request, a handful of lookups, does not build it.
            self._finds += 1
            if self._finds < max(64, len(self._order) // 16):
                order = self._order
                lo = bisect.bisect_left(order, path, key=self.path)
                return order[lo] if lo < len(order) and self.path(order[lo]) == path else None
            table = self._path_table = self._build_path_table()
        mask = len(table) - 1
        slot = hash(path) & mask
        paths, offs = self._paths, self._path_offs
        while True:
            i = table[slot]
            if i < 0:
                return None
            if paths[offs[i] : offs[i + 1]] == path:
                return i
            slot = (slot + 1) & mask

    def _build_path_table(self) -> array[int]:
        size = 8
        while size < 2 * len(self._order):
            size <<= 1
        table = array("i", [-1]) * size
        mask = size - 1
        paths, offs = self._paths, self._path_offs
        for i in self._order:
            slot = hash(paths[offs[i] : offs[i + 1]]) & mask
            while table[slot] >= 0:
                slot = (slot + 1) & mask
            table[slot] = i
        return table

    def children(self, dir_path: bytes) -> Iterator[tuple[bytes, int]]:
        """(name, entry index) of the visible entries directly in `dir_path`, sorted by name.

        All descendants of a directory form one run of the sorted order; a grandchild run is
        jumped over by searching for the first path after `prefix + name + "/"` (`"0"` is the
        byte after `"/"`).
        """
        order = self._order
        n = len(order)
        prefix = dir_path + b"/" if dir_path else b""
        plen = len(prefix)
        pos = bisect.bisect_left(order, prefix, key=self.path)
        path = self.path
        while pos < n:
            i = order[pos]
            p = path(i)
            if not p.startswith(prefix):
                return
            rest = p[plen:]
            slash = rest.find(b"/")
            if slash < 0:
                if rest:  # the root entry itself has an empty rest
                    yield rest, i
                pos += 1
            else:  # a grandchild: the child itself came first, so jump over its subtree
                pos = bisect.bisect_left(order, prefix + rest[:slash] + b"0", pos, key=path)

    def is_opaque(self, dir_path: bytes) -> bool:
        """Whether this layer hides every lower child of `dir_path` (`.wh..wh..opq`)."""
        return dir_path in self._opaque

    def is_whited_out(self, path: bytes) -> bool:
        """Whether this layer hides `path` of the layers below it (`.wh.NAME`)."""
        return path in self._whiteouts

    def whiteouts(self) -> Iterator[bytes]:
        return iter(self._whiteouts)

    def whiteout_names(self, dir_path: bytes) -> Iterator[bytes]:
        """Names this layer whites out directly in `dir_path`."""
        return self._whiteouts.names_in(dir_path)

    def opaque_dirs(self) -> Iterator[bytes]:
        return iter(self._opaque)

    def visible(self) -> Iterator[int]:
        """Visible entry indices in path order."""
        return iter(self._order)

    # ----------------------------------------------------------------- entries

    def entry_type(self, i: int) -> EntryType:
        return EntryType(self._types[i] & _TYPE_MASK)

    def is_dir(self, i: int) -> bool:
        return (self._types[i] & _TYPE_MASK) == EntryType.DIR

    def is_hardlink(self, i: int) -> bool:
        return self._types[i] == EntryType.HARDLINK

    def is_implicit(self, i: int) -> bool:
        return bool(self._types[i] & _IMPLICIT)

    def size(self, i: int) -> int:
        return self._sizes[i]

    def offset(self, i: int) -> int:
        return self._offsets[i]

    def _records(self, i: int) -> Iterator[tuple[int, bytes]]:
        start, end = self._extra_offs[i], self._extra_offs[i + 1]
        extras = self._extras
        pos = start
        while pos < end:
            tag = extras[pos]
            length, pos = _read_varint(extras, pos + 1)
            yield tag, extras[pos : pos + length]
            pos += length

    def linkname(self, i: int) -> bytes:
        """Symlink target, or the path a hard link names (b"" for other entries)."""
        for tag, payload in self._records(i):
            if tag == _X_LINK:
                return payload
        return b""

    def hardlink_target(self, i: int) -> int | bytes:
        """What hard link `i` refers to: an entry index in this layer, or a path to resolve
        in the merged view of the layers below."""
        lower = b""
        for tag, payload in self._records(i):
            if tag == _X_LINKREF:
                return _read_varint(payload, 0)[0]
            if tag == _X_LINK:
                lower = payload
        return lower

    def hardlinks(self) -> array[int]:
        """Indices of the visible hard-link entries (usually empty)."""
        return self._links

    def device(self, i: int) -> tuple[int, int]:
        for tag, payload in self._records(i):
            if tag == _X_DEV:
                major, pos = _read_varint(payload, 0)
                minor, _ = _read_varint(payload, pos)
                return major, minor
        return 0, 0

    def xattrs(self, i: int) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        for tag, payload in self._records(i):
            if tag == _X_XATTR:
                nlen, pos = _read_varint(payload, 0)
                out[payload[pos : pos + nlen]] = payload[pos + nlen :]
        return out

    def attrs(self, i: int) -> EntryAttrs:
        code = self._types[i]
        try:
            etype = _ENTRY_TYPES[code & _TYPE_MASK]
        except KeyError:
            etype = EntryType(code & _TYPE_MASK)  # raises the enum's own ValueError
        linkname = b""
        major = minor = 0
        # Most entries (regular files, directories) have no extra records: skip the scan.
        # Otherwise one scan, the first record of each kind winning, as in linkname/device.
        if self._extra_offs[i] != self._extra_offs[i + 1]:
            link_seen = dev_seen = False
            for tag, payload in self._records(i):
                if tag == _X_LINK and not link_seen:
                    linkname, link_seen = payload, True
                elif tag == _X_DEV and not dev_seen:
                    major, pos = _read_varint(payload, 0)
                    minor, _ = _read_varint(payload, pos)
                    dev_seen = True
        return EntryAttrs(
            etype,
            self._modes[i],
            self._uids[i],
            self._gids[i],
            self._sizes[i],
            self._mtimes[i],
            self._nsecs[i],
            major,
            minor,
            self._offsets[i],
            linkname,
            bool(code & _IMPLICIT),
        )

    # ----------------------------------------------------------------- persistence

    def _sections(self) -> list[bytes | array[int]]:
        return [
            self._types,
            self._modes,
            self._uids,
            self._gids,
            self._sizes,
            self._offsets,
            self._mtimes,
            self._nsecs,
            self._path_offs,
            self._paths,
            self._extra_offs,
            self._extras,
            self._order,
            self._links,
            self._whiteouts._offs,
            self._whiteouts._blob,
            self._opaque._offs,
            self._opaque._blob,
        ]

    def to_bytes(self) -> bytes:
        """Serialize: a header (magic, version, count, body length, xxh3_64) and the body.

        Arrays are stored little-endian whatever the host, so cache files can move between
        machines.
        """
        body = bytearray()
        for section in self._sections():
            if isinstance(section, array):
                if sys.byteorder == "big":  # pragma: no cover - no big-endian CI
                    section = array(section.typecode, section)
                    section.byteswap()
                raw: bytes = section.tobytes()
            else:
                raw = section
            body += _SECTION_LEN.pack(len(raw))
            body += raw
        header = _HEADER.pack(
            _MAGIC, _VERSION, len(self._types), len(body), xxhash.xxh3_64_intdigest(body)
        )
        return header + bytes(body)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Toc:
        """Load what `to_bytes` wrote; raise `LayerFormatError` if it is torn or foreign."""
        view = memoryview(data).cast("B")
        if len(view) < _HEADER.size:
            raise LayerFormatError("layer TOC: file too short for its header")
        magic, version, count, body_len, digest = _HEADER.unpack_from(view)
        if magic != _MAGIC:
            raise LayerFormatError("layer TOC: not an imagefs TOC (bad magic)")
        if version != _VERSION:
            raise LayerFormatError(f"layer TOC: unsupported version {version}")
        body = view[_HEADER.size :]
        if len(body) != body_len:
            raise LayerFormatError(
                f"layer TOC: body is {len(body)} bytes, header says {body_len} (torn write?)"
            )
        if xxhash.xxh3_64_intdigest(body) != digest:
            raise LayerFormatError("layer TOC: checksum mismatch (torn or corrupted file)")

        pos = 0

        def section() -> memoryview:
            nonlocal pos
            if pos + _SECTION_LEN.size > len(body):
                raise LayerFormatError("layer TOC: truncated section table")
            (length,) = _SECTION_LEN.unpack_from(body, pos)
            pos += _SECTION_LEN.size
            if pos + length > len(body):
                raise LayerFormatError("layer TOC: section runs past the end")
            raw = body[pos : pos + length]
            pos += length
            return raw

        def arr(code: str) -> array[int]:
            raw = section()
            out = array(code)
            if len(raw) % out.itemsize:
                raise LayerFormatError("layer TOC: section size is not a whole number of items")
            out.frombytes(raw)
            if sys.byteorder == "big":  # pragma: no cover
                out.byteswap()
            return out

        types, modes, uids, gids = arr("B"), arr("H"), arr("I"), arr("I")
        sizes, offsets, mtimes, nsecs = arr("Q"), arr("Q"), arr("q"), arr("I")
        path_offs, paths = arr("I"), bytes(section())
        extra_offs, extras = arr("I"), bytes(section())
        order, links = arr("I"), arr("I")
        wh_offs, wh_blob = arr("I"), bytes(section())
        op_offs, op_blob = arr("I"), bytes(section())
        if pos != len(body):
            raise LayerFormatError("layer TOC: trailing bytes after the last section")

        def check(ok: bool, what: str) -> None:
            if not ok:
                raise LayerFormatError(f"layer TOC: inconsistent {what}")

        for a in (types, modes, uids, gids, sizes, offsets, mtimes, nsecs):
            check(len(a) == count, "entry arrays")
        for offs, blob, what in (
            (path_offs, paths, "paths"),
            (extra_offs, extras, "extras"),
            (wh_offs, wh_blob, "whiteouts"),
            (op_offs, op_blob, "opaque dirs"),
        ):
            check(len(offs) >= 1 and offs[0] == 0 and offs[-1] == len(blob), what)
        check(len(path_offs) == count + 1 and len(extra_offs) == count + 1, "offset arrays")
        check(not order or max(order) < count, "sorted index")
        check(not links or max(links) < count, "hard-link index")
        return cls(
            types=types,
            modes=modes,
            uids=uids,
            gids=gids,
            sizes=sizes,
            offsets=offsets,
            mtimes=mtimes,
            nsecs=nsecs,
            path_offs=path_offs,
            paths=paths,
            extra_offs=extra_offs,
            extras=extras,
            order=order,
            links=links,
            whiteouts=_Strings(wh_blob, wh_offs),
            opaque=_Strings(op_blob, op_offs),
        )


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
