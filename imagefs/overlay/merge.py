"""The merged, read-only view of a stack of layer TOCs, resolved lazily from the top down.

Pure and synchronous. The shell (the FUSE adapter) owns fetching: when an answer depends on a
layer whose TOC is not loaded yet, any call raises `NeedLayer(index)`; the shell fetches that
TOC, calls `set_layer`, and repeats the call. Calls keep no partial state when they raise, so
the retry simply goes further. A layer whose TOC never influences an answer is never asked
for: a lookup stops at the first layer that decides it (an entry, a whiteout, an opaque
directory, a non-directory hiding what is below).

Semantics follow an extraction of the layers, in order, onto one disk by umoci (the reference
extractor the integration tests compare against), expressed per path:

- Walking down from the top, the first layer holding a non-directory at a path decides it. A
  directory merges with lower directories at the same path until something "cuts" it: an
  opaque marker or a whiteout of that path, or a non-directory at that path, in some layer;
  the cutting layer's own children still count, those of the layers below do not. Cuts of an
  ancestor cut all its descendants the same way.
- A directory takes its attributes from the topmost layer with an explicit entry for it. An
  implicit directory (only a prefix of other names in its layer) keeps a lower directory's
  attributes (umoci's MkdirAll leaves an existing directory alone) unless that lower version
  was whited out or replaced, in which case it is a fresh 0755 root:root directory, mtime 0.
- A hard link shares the inode of its target. The target is the newest earlier version of the
  named path in the same layer (fixed when the TOC was built); failing that, whatever the path
  names in the merged view of the layers below (an extracted disk already holds those). A link
  whose target is missing or a directory is skipped, as if the entry were not in its layer,
  with a warning in `Overlay.warnings`.
- `st_nlink` of a non-directory is the number of visible paths of the merged tree that reach
  the same file, computed the first time it is asked for: the candidates are the file's own
  path and every visible hard link of layers at or above the file's layer that resolves to
  it; each candidate counts if a lookup of its path from the root lands on the same file.
  Directories have 2 + the number of child directories, as on an extracted tree; computing
  that needs every layer the directory's listing needs (pass `exact_dir_nlink=False` to report
  1 instead, which `find` and friends understand as "unknown", and stay fully lazy).
- Sizes and blocks mimic an extraction onto ext4 with 4 KiB blocks: regular files use
  ceil(size / 4096) * 8 blocks of 512 bytes (no holes, no inline data); directories are 4096
  bytes and 8 blocks; symlinks are len(target) bytes and 0 blocks when the target is shorter
  than 60 bytes (ext4 stores those in the inode), 8 otherwise; devices and fifos are 0/0.
  Symlinks show mode 0777 as Linux does whatever the tar said.

Not modelled: umoci and containerd follow symlinks of lower layers in the parent path of an
entry (a layer writing `lib/x` over a lower `lib -> usr/lib` puts the file in `usr/lib`); here
the implicit `lib/` directory replaces the symlink. Layer producers never emit that.

Inode numbers: ROOT_INODE is 1 (pyfuse3.ROOT_INODE). Others are handed out on first sight (a
lookup or a listing) and stay stable for the life of the Overlay: directories are keyed by
merged path, everything else by the (layer, entry) of the file it is, so hard links share one.
State is only kept for inodes that were visited; `forget` drops cached listings but never the
number, so a later lookup returns the same one.
"""

from __future__ import annotations

import errno
import os
import stat
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

from imagefs.errors import LayerFormatError
from imagefs.layers.tarscan import EntryType, show
from imagefs.layers.toc import DEFAULT_DIR_MODE, Toc
from imagefs.layers.toc.packed import DEV_MAX, IMPLICIT, SIZE_MAX, TYPE_MASK
from imagefs.overlay.values import Attrs, InodeError, NeedLayer

__all__ = ["ROOT_INODE", "Attrs", "InodeError", "NeedLayer", "Overlay"]

ROOT_INODE = 1

BLOCK_SIZE = 4096
_REG, _DIR, _HARDLINK = int(EntryType.REG), int(EntryType.DIR), int(EntryType.HARDLINK)
DIR_SIZE = 4096
#: ext4 keeps symlink targets shorter than this inside the inode (no data block).
FAST_SYMLINK_MAX = 60

_S_IFMT: dict[int, int] = {  # by type code (`EntryType` values)
    EntryType.REG: stat.S_IFREG,
    EntryType.SYMLINK: stat.S_IFLNK,
    EntryType.CHAR: stat.S_IFCHR,
    EntryType.BLOCK: stat.S_IFBLK,
    EntryType.DIR: stat.S_IFDIR,
    EntryType.FIFO: stat.S_IFIFO,
}


@dataclass(frozen=True, slots=True)
class _DirHit:
    """Resolution result for a directory.

    `attr` is the (layer, entry) its attributes come from, None for a synthesized directory.
    When the deciding layer only had an implicit directory, the attributes may still come from
    below: `search_from` is then the layer to continue from, looked at on the first getattr
    so that the lookup itself needs no more layers.
    """

    attr: tuple[int, int] | None
    search_from: int | None = None


# A resolution: absent (None), a directory, or a non-directory as (layer, entry) of its file.
_Found = _DirHit | tuple[int, int] | None


class _Dir:
    __slots__ = (
        "attr",
        "attr_from",
        "children",
        "clear_to",
        "floor",
        "ino",
        "parent",
        "path",
        "reached",
        "top",
    )

    def __init__(
        self,
        path: bytes,
        top: int,
        parent: _Dir | None,
        attr: tuple[int, int] | None,
        attr_from: int | None,
        *,
        ino: int = 0,
    ) -> None:
        self.path = path
        self.top = top  # highest layer of the view this directory belongs to
        self.parent = parent
        self.attr = attr
        self.attr_from = attr_from  # None once `attr` is final; see _DirHit.search_from
        self.ino = ino
        # Children come from layers [floor, top]. `floor` is found lazily: layers
        # [clear_to, top] are known not to cut this path.
        self.floor: int | None = None
        self.clear_to = top + 1
        self.reached = top + 1  # lowest layer already known to contribute
        self.children: list[tuple[bytes, int]] | None = None


class _File:
    # The first path it was seen under (for messages and traces) is kept as its directory
    # and its name, both already held by the listing: no path copy per file (issue 10.4).
    __slots__ = ("ident", "ino", "name", "nlink", "parent")

    def __init__(self, ident: tuple[int, int], parent: _Dir, name: bytes, ino: int) -> None:
        self.ident = ident
        self.parent = parent
        self.name = name
        self.ino = ino
        self.nlink: int | None = None

    @property
    def path(self) -> bytes:
        return _join(self.parent.path, self.name)


def _join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


class Overlay:
    """Merged view over `layer_count` layers, index 0 at the bottom."""

    def __init__(self, layer_count: int, *, exact_dir_nlink: bool = True) -> None:
        if layer_count < 0:
            raise ValueError("layer_count must be >= 0")
        self.warnings: list[str] = []
        self._tocs: list[Toc | None] = [None] * layer_count
        self._top = layer_count - 1
        self._exact_dir_nlink = exact_dir_nlink
        root = _Dir(b"", self._top, None, None, self._top, ino=ROOT_INODE)
        self._nodes: list[_Dir | _File | None] = [None, root]
        self._dir_ino: dict[bytes, int] = {b"": ROOT_INODE}
        self._file_ino: dict[tuple[int, int], int] = {}
        # Kernel lookup counts by inode number, beside `_nodes` (4 bytes an inode, where a
        # dict took ~50).
        self._lookups = array("L", [0, 0])
        # Views restricted to the layers below some layer, for hard links to lower layers.
        self._views: dict[tuple[int, bytes], _Dir] = {}
        self._link_ident: dict[tuple[int, int], tuple[int, int] | None] = {}
        self._link_groups: dict[tuple[int, int], set[bytes]] = {}
        self._links_indexed: set[int] = set()
        self._links_from = layer_count  # the lowest k with layers [k, top] all indexed

    # ------------------------------------------------------------------ layers

    @property
    def layer_count(self) -> int:
        return len(self._tocs)

    def set_layer(self, index: int, toc: Toc) -> None:
        if not 0 <= index < len(self._tocs):
            raise ValueError(f"no layer {index} in a stack of {len(self._tocs)}")
        current = self._tocs[index]
        if current is not None and current is not toc:
            # Cached answers were derived from the first one; swapping would make them lie.
            raise ValueError(f"layer {index} already has a TOC")
        self._tocs[index] = toc

    def has_layer(self, index: int) -> bool:
        return self._tocs[index] is not None

    def missing_layers(self) -> list[int]:
        return [i for i, toc in enumerate(self._tocs) if toc is None]

    def _toc(self, index: int) -> Toc:
        toc = self._tocs[index]
        if toc is None:
            raise NeedLayer(index)
        return toc

    # ------------------------------------------------------------------ resolution

    def _cuts(self, path: bytes, k: int) -> bool:
        """Whether layer k hides the lower layers' children of `path`."""
        toc = self._toc(k)
        if toc.is_whited_out(path) or toc.is_opaque(path):
            return True
        idx = toc.find(path)
        if idx is None or toc.is_dir(idx):
            return False
        return not toc.is_hardlink(idx) or self._link_identity(k, idx) is not None

    def _reaches(self, d: _Dir, k: int) -> bool:
        """Whether layer k may contribute children to directory `d`."""
        if k >= d.reached:
            return True  # the answer is monotonic in k: no need to climb to the root again
        if d.floor is not None:
            return k >= d.floor
        if d.parent is not None and not self._reaches(d.parent, k):
            return False
        while d.clear_to > k + 1:
            j = d.clear_to - 1
            if self._cuts(d.path, j):
                d.floor = j
                return False
            d.clear_to = j
        d.reached = k
        return True

    def _entry(self, toc: Toc, k: int, path: bytes) -> tuple[int | None, tuple[int, int]]:
        """Layer k's visible entry at `path` and the (layer, entry) of the file it is.

        A hard link whose target cannot be found is skipped as if absent from its layer.
        """
        idx = toc.find(path)
        if idx is not None and toc.is_hardlink(idx):
            ident = self._link_identity(k, idx)
            if ident is None:
                return None, (k, -1)
            return idx, ident
        return idx, (k, -1 if idx is None else idx)

    def _resolve(self, parent: _Dir, path: bytes) -> _Found:
        """Decide what `path` (a child of `parent`) is in parent's view, top layer first."""
        k = parent.top
        while k >= 0 and self._reaches(parent, k):
            toc = self._toc(k)
            idx, ident = self._entry(toc, k, path)
            if idx is not None:
                if not toc.is_dir(idx):
                    return ident
                if not toc.is_implicit(idx):
                    return _DirHit((k, idx))
                if toc.is_whited_out(path):
                    return _DirHit(None)  # the lower version was removed before this was made
                return _DirHit(None, k - 1)
            if toc.is_whited_out(path):
                return None
            k -= 1
        return None

    def _link_identity(self, k: int, idx: int) -> tuple[int, int] | None:
        """The (layer, entry) of the file hard link `idx` of layer k shares, or None."""
        key = (k, idx)
        if key in self._link_ident:
            return self._link_ident[key]
        toc = self._toc(k)
        target = toc.hardlink_target(idx)
        ident: tuple[int, int] | None
        if isinstance(target, int):
            ident = (k, target)
        else:
            found = self._resolve_path(k - 1, target)
            ident = found if isinstance(found, tuple) else None
            if ident is None:
                what = "a directory" if isinstance(found, _DirHit) else "missing"
                self.warnings.append(
                    f"layer {k}: hard link {show(toc.path(idx))} -> {show(target)}: "
                    f"target {what} in the layers below; skipped"
                )
        self._link_ident[key] = ident
        return ident

    def _view_root(self, top: int) -> _Dir:
        if top == self._top:
            root = self._nodes[ROOT_INODE]
            assert isinstance(root, _Dir)
            return root
        key = (top, b"")
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = _Dir(b"", top, None, None, top)
        return view

    def _resolve_path(self, top: int, path: bytes) -> _Found:
        """Resolve a cleaned path from the root of the view made of layers [0, top]."""
        if top < 0:
            return None
        d = self._view_root(top)
        if not path:
            return _DirHit(None)
        comps = path.split(b"/")
        cur = b""
        for comp in comps[:-1]:
            cur = _join(cur, comp)
            found = self._resolve(d, cur)
            if not isinstance(found, _DirHit):
                return None
            d = self._dir_node(d, cur, found)
        return self._resolve(d, path)

    def _dir_node(self, parent: _Dir, path: bytes, hit: _DirHit) -> _Dir:
        if parent.top == self._top:
            node = self._nodes[self._ino_for(parent, path.rpartition(b"/")[2], hit)]
            assert isinstance(node, _Dir)
            return node
        key = (parent.top, path)
        d = self._views.get(key)
        if d is None:
            d = self._views[key] = _Dir(path, parent.top, parent, hit.attr, hit.search_from)
        return d

    def _ino_for(self, parent: _Dir, name: bytes, found: _DirHit | tuple[int, int]) -> int:
        """The inode of `name` in `parent`, resolved as `found`; numbered on first sight."""
        if isinstance(found, _DirHit):
            path = _join(parent.path, name)
            ino = self._dir_ino.get(path)
            if ino is None:
                ino = len(self._nodes)
                self._nodes.append(
                    _Dir(path, self._top, parent, found.attr, found.search_from, ino=ino)
                )
                self._lookups.append(0)
                self._dir_ino[path] = ino
            return ino
        ino = self._file_ino.get(found)
        if ino is None:
            ino = len(self._nodes)
            self._nodes.append(_File(found, parent, name, ino))
            self._lookups.append(0)
            self._file_ino[found] = ino
        return ino

    # ------------------------------------------------------------------ inodes

    def _node(self, ino: int) -> _Dir | _File:
        node = self._nodes[ino] if 0 < ino < len(self._nodes) else None
        if node is None:
            raise InodeError(f"no inode {ino}", errno.ENOENT)
        return node

    def _dir(self, ino: int) -> _Dir:
        node = self._node(ino)
        if not isinstance(node, _Dir):
            raise InodeError(f"{show(node.path)} is not a directory", errno.ENOTDIR)
        return node

    def _file(self, ino: int) -> _File:
        node = self._node(ino)
        if isinstance(node, _Dir):
            raise InodeError(f"{show(node.path)} is a directory", errno.EISDIR)
        return node

    def path(self, ino: int) -> bytes:
        """The merged path of a directory, or the first path a file was seen under."""
        return self._node(ino).path

    def lookup(self, parent_ino: int, name: bytes) -> int | None:
        """Inode of `name` in directory `parent_ino`, or None. Counts one kernel lookup."""
        d = self._dir(parent_ino)
        if not name or b"/" in name or name in (b".", b".."):
            return None
        found = self._resolve(d, _join(d.path, name))
        if found is None:
            return None
        ino = self._ino_for(d, name, found)
        self._lookups[ino] += 1
        return ino

    def remember(self, ino: int) -> None:
        """Count a lookup the kernel gained another way (a readdirplus reply)."""
        self._node(ino)
        self._lookups[ino] += 1

    def forget(self, ino: int, nlookup: int) -> None:
        """The kernel dropped `nlookup` references. The number stays valid; caches go."""
        node = self._nodes[ino] if 0 < ino < len(self._nodes) else None
        if node is None:
            return
        left = self._lookups[ino] - nlookup
        if left > 0:
            self._lookups[ino] = left
            return
        self._lookups[ino] = 0
        if isinstance(node, _Dir) and ino != ROOT_INODE:
            node.children = None

    def _children(self, d: _Dir) -> list[tuple[bytes, int]]:
        """List a directory: the same decisions as `_resolve` for every name, but made in one
        sweep over each layer's listing instead of one search per name and layer."""
        if d.children is not None:
            return d.children
        decided: dict[bytes, _DirHit | tuple[int, int]] = {}
        hidden: set[bytes] = set()  # whited out by a layer above the one being swept
        layers = 0
        k = d.top
        while k >= 0 and self._reaches(d, k):
            toc = self._toc(k)
            codes = toc.codes  # one type byte per entry, read here instead of three calls
            for name, idx in toc.children(d.path):
                if name in decided or name in hidden:
                    continue
                code = codes[idx]
                if code == _HARDLINK:
                    ident = self._link_identity(k, idx)
                    if ident is not None:
                        decided[name] = ident
                elif code & TYPE_MASK != _DIR:
                    decided[name] = (k, idx)
                elif not code & IMPLICIT:
                    decided[name] = _DirHit((k, idx))
                elif toc.is_whited_out(_join(d.path, name)):
                    decided[name] = _DirHit(None)
                else:
                    decided[name] = _DirHit(None, k - 1)
            hidden.update(toc.whiteout_names(d.path))
            layers += 1
            k -= 1
        # One layer's listing comes sorted; names merged from several need sorting.
        names = sorted(decided) if layers > 1 else decided
        out = [(name, self._ino_for(d, name, decided[name])) for name in names]
        d.children = out
        return out

    def readdir(self, ino: int) -> list[tuple[bytes, int]]:
        """(name, inode) of every entry of a directory, sorted by name bytes; no . or .."""
        return list(self._children(self._dir(ino)))

    def listing(self, ino: int) -> list[tuple[bytes, int]]:
        """What `readdir` answers, without the copy: the list kept for the directory, which
        the caller must not change (the FUSE adapter lists it as it is)."""
        return self._children(self._dir(ino))

    def _dir_attr(self, d: _Dir) -> tuple[int, int] | None:
        """Where a directory's attributes come from, continuing an implicit directory's search
        downwards: an explicit directory below supplies them, anything that removed the lower
        directory (a whiteout, a non-directory) means a fresh synthesized one."""
        k = d.attr_from
        if k is None:
            return d.attr
        attr = None
        while k >= 0 and (d.parent is None or self._reaches(d.parent, k)):
            toc = self._toc(k)
            idx, _ = self._entry(toc, k, d.path)
            if idx is not None:
                if not toc.is_dir(idx):
                    break
                if not toc.is_implicit(idx):
                    attr = (k, idx)
                    break
                if toc.is_whited_out(d.path):
                    break
            elif toc.is_whited_out(d.path):
                break
            k -= 1
        d.attr, d.attr_from = attr, None
        return attr

    def getattr(self, ino: int) -> Attrs:
        # Attrs are built with positional fields (ino, mode, nlink, uid, gid, size, blocks,
        # rdev, mtime_ns): keywords cost a NamedTuple four times as much, once per entry a
        # listing answers.
        node = self._node(ino)
        if isinstance(node, _Dir):
            attr = self._dir_attr(node)
            nlink = 1
            if self._exact_dir_nlink:
                nlink = 2 + sum(
                    1 for _, child in self._children(node) if isinstance(self._nodes[child], _Dir)
                )
            if attr is None:
                mode = stat.S_IFDIR | DEFAULT_DIR_MODE
                return Attrs(ino, mode, nlink, 0, 0, DIR_SIZE, DIR_SIZE // 512, 0, 0)
            k, i = attr
            e = self._toc(k).attrs(i)
            mtime_ns = e.mtime * 1_000_000_000 + e.mtime_ns
            mode = stat.S_IFDIR | e.mode
            return Attrs(ino, mode, nlink, e.uid, e.gid, DIR_SIZE, DIR_SIZE // 512, 0, mtime_ns)
        k, i = node.ident
        toc = self._toc(k)
        code, mode, uid, gid, size, mtime, nsec = toc.stat(i)
        blocks = rdev = 0
        if code == _REG:  # most entries: the arrays say all, no extra record is read
            if size > SIZE_MAX:  # only a foreign (published) index: TocBuilder skips those
                raise LayerFormatError(f"{show(node.path)}: size {size} is out of range")
            blocks = -(-size // BLOCK_SIZE) * (BLOCK_SIZE // 512)
        else:  # a link target's length, device numbers: from the extra records
            e = toc.attrs(i)
            size = 0
            if e.type == EntryType.SYMLINK:
                mode = 0o777
                size = len(e.linkname)
                blocks = 0 if size < FAST_SYMLINK_MAX else BLOCK_SIZE // 512
            elif e.type == EntryType.CHAR or e.type == EntryType.BLOCK:
                if max(e.devmajor, e.devminor) > DEV_MAX:  # as for sizes above
                    raise LayerFormatError(
                        f"{show(node.path)}: device numbers {e.devmajor}:{e.devminor} are out "
                        "of range"
                    )
                rdev = os.makedev(e.devmajor, e.devminor)
        nlink = node.nlink if node.nlink is not None else self._file_nlink(node)
        mode |= _S_IFMT[code]
        return Attrs(ino, mode, nlink, uid, gid, size, blocks, rdev, mtime * 1_000_000_000 + nsec)

    def _index_links(self, k: int) -> None:
        if k in self._links_indexed:
            return
        toc = self._toc(k)
        found: list[tuple[tuple[int, int], bytes]] = []
        for li in toc.hardlinks():
            ident = self._link_identity(k, li)
            if ident is not None:
                found.append((ident, toc.path(li)))
        for ident, path in found:  # only now: a NeedLayer above must leave no half index
            self._link_groups.setdefault(ident, set()).add(path)
        self._links_indexed.add(k)

    def _file_nlink(self, f: _File) -> int:
        if f.nlink is not None:
            return f.nlink
        j, t = f.ident
        if j < self._links_from:
            for k in range(j, self._top + 1):
                self._index_links(k)
            self._links_from = j  # layers [j, top] are all indexed now
        links = self._link_groups.get(f.ident)
        if not links:
            f.nlink = 1
            return 1
        candidates = {self._toc(j).path(t), *links}
        count = sum(1 for p in candidates if self._resolve_path(self._top, p) == f.ident)
        f.nlink = max(count, 1)
        return f.nlink

    def _attr_source(self, ino: int) -> tuple[int, int] | None:
        node = self._node(ino)
        return self._dir_attr(node) if isinstance(node, _Dir) else node.ident

    def readlink(self, ino: int) -> bytes:
        node = self._node(ino)
        if isinstance(node, _File):
            k, i = node.ident
            toc = self._toc(k)
            if toc.entry_type(i) is EntryType.SYMLINK:
                return toc.linkname(i)
        raise InodeError(f"{show(node.path)} is not a symlink", errno.EINVAL)

    def listxattr(self, ino: int) -> list[bytes]:
        src = self._attr_source(ino)
        if src is None:
            return []
        return sorted(self._toc(src[0]).xattrs(src[1]))

    def getxattr(self, ino: int, name: bytes) -> bytes | None:
        """The xattr's value, or None (the adapter answers ENODATA)."""
        src = self._attr_source(ino)
        if src is None:
            return None
        return self._toc(src[0]).xattrs(src[1]).get(name)

    def locate(self, ino: int) -> tuple[int, int]:
        """(layer index, entry index) holding a regular file's data."""
        node = self._file(ino)
        k, i = node.ident
        if self._toc(k).entry_type(i) is not EntryType.REG:
            raise InodeError(f"{show(node.path)} is not a regular file", errno.EINVAL)
        return node.ident

    def walk(self) -> Iterator[tuple[bytes, int, Attrs]]:
        """(path, inode, attrs) of the whole merged tree, depth first, sorted; root is b""."""
        stack: list[tuple[bytes, int]] = [(b"", ROOT_INODE)]
        while stack:
            path, ino = stack.pop()
            yield path, ino, self.getattr(ino)
            node = self._nodes[ino]
            if isinstance(node, _Dir):
                for name, child in reversed(self._children(node)):
                    stack.append((_join(path, name), child))
