"""The packed encoding a layer TOC is made of, shared by the builder and the reader.

Each entry field lives in an `array`; the rare variable fields (link targets, xattrs, device
numbers) are small tagged records `tag varint(len) payload` in one extras blob; string sets
(whiteouts, opaque directories) are one blob plus an offset array (`Strings`).
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterable, Iterator

from imagefs.layers.tarscan import EntryType

DEFAULT_DIR_MODE = 0o755  # of a directory no entry describes (an implied parent)
IMPLICIT = 0x80  # flag bit in the type byte
TYPE_MASK = 0x7F
ENTRY_TYPES = {int(t): t for t in EntryType}  # a dict look-up is cheaper than EntryType(code)

# Tags of the records in the extras blob.
X_LINK = 1  # symlink target, or the lower-layer path a hard link refers to
X_XATTR = 2  # varint(len(name)) name value
X_DEV = 3  # varint(major) varint(minor)
X_LINKREF = 4  # varint(entry index) of the in-layer target of a hard link

for _code, _size in (("B", 1), ("H", 2), ("I", 4), ("Q", 8), ("q", 8)):
    if array(_code).itemsize != _size:  # pragma: no cover - exotic platforms only
        raise ImportError(f"array typecode {_code!r} is not {_size} bytes here")


# The largest device major or minor number a TOC holds: what `os.makedev` takes (a C int),
# more than Linux uses (12-bit majors and 20-bit minors, 32 bits each in the new encoding).
DEV_MAX = (1 << 31) - 1
# The largest file size a TOC holds: a file's size is an off_t (signed 64 bits).
SIZE_MAX = (1 << 63) - 1


def varint(value: int, out: bytearray) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def write_record(tag: int, payload: bytes, out: bytearray) -> None:
    out.append(tag)
    varint(len(payload), out)
    out += payload


def parent_of(path: bytes) -> bytes:
    cut = path.rfind(b"/")
    return path[:cut] if cut >= 0 else b""


_SET_MAX = 1 << 16  # members a `Strings` answers `in` for from a set (see __contains__)


class Strings:
    """An immutable sorted set of byte strings: one blob plus an offset array."""

    __slots__ = ("_members", "blob", "offs")

    def __init__(self, blob: bytes, offs: array[int]) -> None:
        self.blob = blob
        self.offs = offs
        self._members: frozenset[bytes] | None = None  # built on the first `in`

    @classmethod
    def build(cls, items: Iterable[bytes]) -> Strings:
        blob = bytearray()
        offs = array("I", [0])
        for item in sorted(set(items)):
            blob += item
            offs.append(len(blob))
        return cls(bytes(blob), offs)

    def __len__(self) -> int:
        return len(self.offs) - 1

    def _at(self, i: int) -> bytes:
        return self.blob[self.offs[i] : self.offs[i + 1]]

    def __contains__(self, item: bytes) -> bool:
        # A lookup asks every layer it passes whether the path is whited out: a set answers
        # in ~0.1 µs where a bisection with a Python key takes ~2.7. Real layers white out a
        # few paths; a set of more than `_SET_MAX` (a crafted TOC's millions, ~100 bytes each
        # as a set) is not built, those are bisected.
        members = self._members
        if members is None:
            n = len(self.offs) - 1
            if n > _SET_MAX:
                i = bisect.bisect_left(range(n), item, key=self._at)
                return i < n and self._at(i) == item
            members = self._members = frozenset(self)
        return item in members

    def __iter__(self) -> Iterator[bytes]:
        return (self._at(i) for i in range(len(self)))

    def names_in(self, dir_path: bytes) -> Iterator[bytes]:
        """Last components of the items directly below `dir_path` (a prefix range scan)."""
        n = len(self.offs) - 1
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
