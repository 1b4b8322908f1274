"""COPY and ADD into a step's root filesystem (an overlay whose upper dir becomes the layer).

Docker's rules: a source directory's *contents* are copied, not the directory itself; the
destination is a directory when it ends in `/`, when there are several sources, or when it
already is one; missing parents are created (root-owned, 0755); files keep their mode and
mtime; owners become 0:0 (or `--chown`) for context files and are kept for `--from` files
unless `--chown` is given; `--chmod` sets the mode of what is copied. ADD of a local tar
archive (plain, gzip, bzip2, xz) extracts it into the destination.

Every destination path is resolved inside the rootfs (`rootfs.resolve`), and nothing is
written through a symlink: existing entries in the way are replaced, as docker does.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from imagefs.build.context import Source
from imagefs.build.rootfs import resolve
from imagefs.errors import BuildError


@dataclass(frozen=True)
class Ownership:
    uid: int | None = None
    gid: int | None = None
    mode: int | None = None


def _make_parents(root: Path, container_dir: str, owner: tuple[int, int] | None = None) -> Path:
    """`mkdir -p` inside the rootfs (root-owned, 0755), symlinks resolved inside it."""
    target = resolve(root, container_dir)
    missing = []
    probe = target
    while not probe.exists() and probe != root:
        missing.append(probe)
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise BuildError(f"cannot copy to {container_dir}: a path component is not a directory")
    for d in reversed(missing):
        d.mkdir()
        os.chmod(d, 0o755)
        if owner is not None:  # as buildah: directories COPY --chown creates get that owner
            os.chown(d, *owner)
    return target


def make_dirs(root: Path, container_dir: str, owner: tuple[int, int] | None = None) -> None:
    """WORKDIR: create the directory (0755, owned by USER as buildah does) when missing."""
    _make_parents(root, container_dir, owner)


def _remove(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()


def _copy_one(src: Path, dst: Path, own: Ownership, keep_owner: bool) -> None:
    st = src.lstat()
    mode = st.st_mode
    uid = own.uid if own.uid is not None else (st.st_uid if keep_owner else 0)
    gid = own.gid if own.gid is not None else (st.st_gid if keep_owner else 0)
    if stat.S_ISDIR(mode):
        if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
            _remove(dst)
        if not dst.exists():
            dst.mkdir()
    elif stat.S_ISLNK(mode):
        _remove(dst)
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISREG(mode):
        if dst.is_symlink() or dst.is_dir():
            _remove(dst)
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
            shutil.copyfileobj(f, out, 1 << 20)
    else:
        _remove(dst)
        if stat.S_ISFIFO(mode):
            os.mkfifo(dst)
        else:
            os.mknod(dst, mode, st.st_rdev)
    os.chown(dst, uid, gid, follow_symlinks=False)
    if not stat.S_ISLNK(mode):
        perm = own.mode if own.mode is not None else stat.S_IMODE(mode)
        os.chmod(dst, perm)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def copy_sources(
    root: Path,
    groups: Sequence[list[Source]],
    dest: str,
    own: Ownership,
    *,
    keep_owner: bool = False,
) -> None:
    """Copy each group (one COPY source: the path and what is below it) to `dest`."""
    dest_is_dir = dest.endswith("/") or len(groups) > 1
    if not dest_is_dir:
        probe = resolve(root, dest)
        dest_is_dir = probe.is_dir() and not probe.is_symlink()
    if not dest_is_dir and groups and groups[0] and groups[0][0].path.is_dir():
        dest_is_dir = True  # a directory's contents go into the destination directory
    owner = (own.uid, own.gid if own.gid is not None else 0) if own.uid is not None else None
    base = _make_parents(root, dest.rstrip("/") or "/", owner) if dest_is_dir else None
    dirs: list[tuple[Path, Path]] = []
    for group in groups:
        if not group:
            continue
        top = group[0]
        top_is_dir = top.path.is_dir() and not top.path.is_symlink()
        for src in group:
            if top_is_dir and src is top:
                continue  # the directory itself is not copied, only its contents
            if base is not None:
                name = src.rel if top_is_dir else f"{top.path.name}/{src.rel}".rstrip("/")
                dst = base / name
            else:
                parent = _make_parents(root, os.path.dirname(dest.rstrip("/")) or "/", owner)
                dst = parent / os.path.basename(dest.rstrip("/"))
            _copy_one(src.path, dst, own, keep_owner)
            if src.path.is_dir() and not src.path.is_symlink():
                dirs.append((src.path, dst))
    # Copying children touched the directories: put their mtimes back, deepest first.
    for src_dir, dst_dir in reversed(dirs):
        st = src_dir.lstat()
        os.utime(dst_dir, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def is_archive(path: Path) -> bool:
    if not path.is_file() or path.is_symlink():
        return False
    try:
        with tarfile.open(path, "r:*"):
            return True
    except (tarfile.TarError, OSError, EOFError):
        return False


def extract_archive(root: Path, archive: Path, dest: str, own: Ownership) -> None:
    """ADD of a local tar archive: unpack into `dest` (owners kept unless --chown)."""
    base = _make_parents(root, dest.rstrip("/") or "/")
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = os.path.normpath("/" + member.name).lstrip("/")
                if not name or name == ".":
                    continue
                target = resolve(base, name, follow_last=False)
                _make_parents(base, os.path.dirname(name) or "/")
                if member.isdir():
                    if not target.is_dir() or target.is_symlink():
                        _remove(target)
                        target.mkdir()
                elif member.issym():
                    _remove(target)
                    os.symlink(member.linkname, target)
                elif member.islnk():
                    _remove(target)
                    link_src = resolve(base, member.linkname, follow_last=False)
                    os.link(link_src, target)
                    continue
                elif member.isfile():
                    _remove(target)
                    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW)
                    f = tar.extractfile(member)
                    assert f is not None
                    with os.fdopen(fd, "wb") as out:
                        shutil.copyfileobj(f, out, 1 << 20)
                else:
                    continue  # devices and fifos in an ADDed archive: skipped
                uid = own.uid if own.uid is not None else member.uid
                gid = own.gid if own.gid is not None else member.gid
                os.chown(target, uid, gid, follow_symlinks=False)
                if not member.issym():
                    os.chmod(target, member.mode & 0o7777)
                os.utime(target, (member.mtime, member.mtime), follow_symlinks=False)
    except (tarfile.TarError, EOFError) as exc:
        raise BuildError(f"ADD {archive.name}: broken archive ({exc})") from None
