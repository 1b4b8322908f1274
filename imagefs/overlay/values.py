"""The values the overlay answers with and raises: plain data, no logic of the merge."""

from __future__ import annotations

from typing import NamedTuple

from imagefs.errors import ImageFSError

__all__ = ["Attrs", "InodeError", "NeedLayer"]


class NeedLayer(Exception):
    """Signal, not an error: the answer needs layer `index`'s TOC. Load it and call again."""

    def __init__(self, index: int) -> None:
        super().__init__(f"layer {index} TOC needed")
        self.index = index


class InodeError(ImageFSError):
    """An operation that does not apply to this inode (or an unknown inode); carries the
    errno the FUSE adapter should answer with."""

    def __init__(self, message: str, errno_: int) -> None:
        super().__init__(message)
        self.errno = errno_


class Attrs(NamedTuple):
    """What stat(2) shows for an inode. atime and ctime are the mtime (layers carry no more).

    A NamedTuple rather than a frozen dataclass: one is built per entry a listing or a lookup
    returns, and a tuple is built several times faster (`find -ls` of 49k entries builds 49k).
    """

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    blocks: int
    rdev: int
    mtime_ns: int

    @property
    def atime_ns(self) -> int:
        return self.mtime_ns

    @property
    def ctime_ns(self) -> int:
        return self.mtime_ns
