"""Safe file primitives for everything under the store root, and durable writes.

Why: a store may be shared with a less trusted user (a group-writable `/var/lib/imagefs`, a
CI cache volume). A symbolic link planted anywhere under ROOT must never make imagefs read,
write or delete outside ROOT — `prune` and `check --repair` run as root would otherwise
delete whatever a planted `cache/chunks -> /etc` points at. So, under the root:

- directories are reached one component at a time *from the root*, each opened with
  `O_DIRECTORY | O_NOFOLLOW` relative to its parent's fd (openat), so a symlinked directory
  is an error (`LinkInStore`), never followed, and cannot be swapped in between a check and
  a use;
- files are opened relative to their directory's fd with `O_NOFOLLOW | O_NONBLOCK` and must
  be regular files (a planted FIFO must not hang a command);
- unlink, rename and mkdir are relative to a directory fd: unlinking a symlink removes the
  link, never what it points at;
- listings (`scan`) are lstat-based: a link is reported as a link;
- new files are temp files made with `O_CREAT | O_EXCL | O_NOFOLLOW`, then renamed over the
  name (rename replaces a link, it does not write through it).

Every function takes `root=`: the trust boundary. The root itself must not be a symlink; its
ancestors are the administrator's business and are followed as usual. Without `root` (paths
the user named on the command line, such as `-o FILE`) the directory is trusted as a whole.

How to use them (the blob and ref stores, the piece cache, the index store, the flat cache,
the build cache, `check` and every reader of a stored blob use these; the paths come from
`store.layout`, `paths = Layout(root)`):

    fsutil.ensure_dir(paths.pieces, root=root)                          # mkdir -p, no links
    fsutil.atomic_write(paths.pieces / hex, data, root=root, durable=False)
    data = fsutil.read_bytes(paths.layer_indexes / "sha256" / hex, root=root)  # None if missing
    for e in fsutil.scan(paths.pieces, root=root): ...                  # e.kind: file/dir/link
    fsutil.safe_unlink(paths.pieces / hex, root=root)                   # a link: the link goes
    fsutil.safe_rmtree(paths.flat, root=root)                           # bytes freed
    with fsutil.dir_fd(paths.pieces, root=root) as d:                   # one walk
        fd = fsutil.safe_open(d, name, os.O_RDONLY)

A crash leaves at worst a temp file (`TEMP_PREFIX`) that `prune`/`check` remove. OS failures
surface as `StoreError` naming the path (disk full, permission denied).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imagefs.errors import StoreError

TEMP_PREFIX = ".tmp-"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class LinkInStore(StoreError):
    """A symbolic link (or another non-regular thing) where imagefs expects its own file or
    directory. Never followed; `imagefs check --repair` removes it."""


def _link_error(path: Path, what: str = "a symbolic link") -> LinkInStore:
    return LinkInStore(
        f"{path} is {what}; imagefs never follows links in its store "
        "(`imagefs check --repair` removes it)"
    )


def os_error(exc: OSError, path: Path, action: str) -> StoreError:
    """One error message for the OS failures users can act on."""
    if exc.errno == errno.ENOSPC:
        return StoreError(f"no space left on device while {action} {path}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoreError(f"permission denied while {action} {path} (try --root or sudo)")
    return StoreError(f"{action} {path}: {exc.strerror or exc}")


# -- directories ------------------------------------------------------------------------------


def _open_child_dir(parent: int, name: str, path: Path, create: bool) -> int:
    """openat(parent, name, O_DIRECTORY|O_NOFOLLOW), mkdir first if asked."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755, dir_fd=parent)
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise _link_error(path) from None
            raise LinkInStore(f"{path} is not a directory") from None
        if exc.errno == errno.ENOENT:
            raise FileNotFoundError(errno.ENOENT, "no such directory", str(path)) from None
        raise


def open_dir(path: Path, *, root: Path | None = None, create: bool = False) -> int:
    """A read-only fd of directory `path` (the caller closes it).

    With `root`, `path` must be `root` or below it, and no component from `root` down may be
    a symlink. `create` makes missing directories (mkdir -p). FileNotFoundError when a
    component is missing and `create` is false.
    """
    if root is None:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        raise StoreError(f"{path} is outside the store {root}") from None
    if ".." in parts:
        raise StoreError(f"{path} climbs out of the store {root}")
    parent = root.parent
    if create and parent != root:
        parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if parent != root:  # the root itself: no link either
            fd = _swap(fd, _open_child_dir(fd, root.name, root, create))
        here = root
        for part in parts:
            here = here / part
            fd = _swap(fd, _open_child_dir(fd, part, here, create))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _swap(old: int, new: int) -> int:
    os.close(old)
    return new


@contextlib.contextmanager
def dir_fd(path: Path, *, root: Path | None = None, create: bool = False) -> Iterator[int]:
    """`open_dir` as a context manager: for several operations in one directory."""
    fd = open_dir(path, root=root, create=create)
    try:
        yield fd
    finally:
        os.close(fd)


def ensure_dir(path: Path, *, root: Path | None = None) -> None:
    """mkdir -p `path`, refusing (LinkInStore) a symlink anywhere from `root` down."""
    try:
        os.close(open_dir(path, root=root, create=True))
    except OSError as exc:
        raise os_error(exc, path, "creating") from exc


def fsync_dir(path: Path | int) -> None:
    if isinstance(path, int):
        os.fsync(path)
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- files ------------------------------------------------------------------------------------


def safe_open(
    directory: Path | int,
    name: str,
    flags: int,
    mode: int = 0o644,
    *,
    root: Path | None = None,
) -> int:
    """open(`name`) inside `directory` (a path, reached as `open_dir` does, or an fd) with
    `O_NOFOLLOW`; the result must be a regular file. Raises LinkInStore for a link, a FIFO,
    a device or a directory; FileNotFoundError as usual. `O_NONBLOCK` is added so a planted
    FIFO cannot block the open, and cleared again on the returned fd. `O_CREAT` on a path
    also creates the missing directories."""
    if "/" in name or name in ("", ".", ".."):
        raise StoreError(f"bad file name {name!r} in the store")
    if isinstance(directory, int):
        return _open_in(directory, name, flags, mode, Path(name))
    with dir_fd(directory, root=root, create=bool(flags & os.O_CREAT)) as d:
        return _open_in(d, name, flags, mode, directory / name)


def _open_in(directory: int, name: str, flags: int, mode: int, shown: Path) -> int:
    flags |= os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, mode, dir_fd=directory)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _link_error(shown) from None
        if exc.errno in (errno.ENXIO, errno.EISDIR):
            raise _link_error(shown, "not a regular file") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _link_error(shown, "not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bytes(path: Path, *, root: Path | None = None, limit: int | None = None) -> bytes | None:
    """The whole file at `path`, or None if it (or its directory) does not exist. A file
    larger than `limit` is a StoreError (nothing in the store is read unbounded)."""
    try:
        fd = safe_open(path.parent, path.name, os.O_RDONLY, root=root)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        if limit is None:
            return f.read()
        if os.fstat(f.fileno()).st_size > limit:  # refused before a byte is buffered
            raise StoreError(f"{path} is larger than the {limit} bytes expected")
        data = f.read(limit + 1)  # bounded even if the file grows while we read
        if len(data) > limit:
            raise StoreError(f"{path} is larger than the {limit} bytes expected")
        return data


def lstat(path: Path, *, root: Path | None = None) -> os.stat_result | None:
    """lstat of `path` (its directory reached safely); None if missing."""
    try:
        with dir_fd(path.parent, root=root) as d:
            return os.stat(path.name, dir_fd=d, follow_symlinks=False)
    except FileNotFoundError:
        return None


def is_real_dir(path: Path, *, root: Path | None = None) -> bool:
    """`path` is a directory, and neither it nor anything above it (to `root`) a link."""
    try:
        st = lstat(path, root=root)
    except (LinkInStore, FileNotFoundError):
        return False
    return st is not None and stat.S_ISDIR(st.st_mode)


def safe_unlink(path: Path, *, root: Path | None = None) -> bool:
    """Remove the file or link `path` (a link itself, never its target); False if missing.
    A directory is left alone (use `safe_rmtree`)."""
    try:
        with dir_fd(path.parent, root=root) as d:
            os.unlink(path.name, dir_fd=d)
    except (FileNotFoundError, IsADirectoryError):
        return False
    except OSError as exc:
        raise os_error(exc, path, "removing") from exc
    return True


def tree_size(directory: int, name: str) -> int:
    """Bytes of the regular files under `name` in the open `directory`; links not followed."""
    st = os.stat(name, dir_fd=directory, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size if stat.S_ISREG(st.st_mode) else 0
    total = 0
    fd = os.open(name, _DIR_FLAGS, dir_fd=directory)
    try:
        for _, _, files, d in os.fwalk(".", dir_fd=fd, follow_symlinks=False):
            for f in files:
                with contextlib.suppress(FileNotFoundError):
                    fst = os.stat(f, dir_fd=d, follow_symlinks=False)
                    if stat.S_ISREG(fst.st_mode):
                        total += fst.st_size
    finally:
        os.close(fd)
    return total


def safe_rmtree(path: Path, *, root: Path | None = None) -> int:
    """Remove `path` and everything below it without following any link (a link anywhere,
    `path` included, is removed itself). Returns the bytes of regular files freed."""
    try:
        with dir_fd(path.parent, root=root) as d:
            st = os.stat(path.name, dir_fd=d, follow_symlinks=False)
            freed = tree_size(d, path.name)
            if stat.S_ISDIR(st.st_mode):
                # Python's fd-based rmtree: never follows links (rmtree.avoids_symlink_attacks)
                shutil.rmtree(path.name, dir_fd=d)
            else:
                os.unlink(path.name, dir_fd=d)
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise os_error(exc, path, "removing") from exc
    return freed


@dataclass(frozen=True)
class Entry:
    """One name in a directory, as lstat sees it."""

    name: str
    kind: str  # "file", "dir", "link" or "other" (FIFO, socket, device)
    size: int
    mtime: float


def scan(path: Path, *, root: Path | None = None) -> list[Entry]:
    """The entries of directory `path`, sorted by name, links reported as links. A missing
    directory is an empty list; a symlinked one is LinkInStore."""
    try:
        with dir_fd(path, root=root) as d:
            return scan_fd(d)
    except FileNotFoundError:
        return []


def scan_fd(directory: int) -> list[Entry]:
    out: list[Entry] = []
    with os.scandir(directory) as it:
        for e in it:
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while we looked
            mode = st.st_mode
            kind = (
                "link"
                if stat.S_ISLNK(mode)
                else "dir"
                if stat.S_ISDIR(mode)
                else "file"
                if stat.S_ISREG(mode)
                else "other"
            )
            out.append(Entry(e.name, kind, st.st_size, st.st_mtime))
    out.sort(key=lambda e: e.name)
    return out


def replace(src: Path, dst: Path, *, root: Path | None = None) -> None:
    """rename(2) `src` over `dst` (a link at `dst` is replaced, not written through)."""
    with dir_fd(src.parent, root=root) as s, dir_fd(dst.parent, root=root, create=True) as t:
        os.replace(src.name, dst.name, src_dir_fd=s, dst_dir_fd=t)
        fsync_dir(t)


def create_temp(directory: int, mode: int = 0o644) -> tuple[int, str]:
    """A new, empty temp file in the open `directory` (O_EXCL: never an existing name or a
    link); returns (fd, name)."""
    while True:
        name = f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        try:
            fd = os.open(
                name,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                mode,
                dir_fd=directory,
            )
        except FileExistsError:
            continue
        return fd, name


def atomic_write(
    path: Path,
    data: bytes,
    *,
    mode: int = 0o644,
    durable: bool = True,
    root: Path | None = None,
) -> None:
    """Replace `path` with `data` so that no reader ever sees a partial file.

    With `root`, the directory is reached without following links (and created if missing);
    a link already at `path` is replaced, never written through. `durable=False` skips the
    fsyncs: for cache pieces, whose own checksum catches a file that a crash left torn, and
    which are cheaper to refetch than to sync one by one.
    """
    try:
        d = open_dir(path.parent, root=root, create=True)
    except OSError as exc:
        raise os_error(exc, path, "writing") from exc
    tmp = ""
    try:
        fd, tmp = create_temp(d, mode)
        try:
            os.fchmod(fd, mode)  # the umask must not decide who may read the store
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path.name, src_dir_fd=d, dst_dir_fd=d)
        tmp = ""
        if durable:
            os.fsync(d)
    except OSError as exc:
        raise os_error(exc, path, "writing") from exc
    finally:
        if tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=d)
        os.close(d)
