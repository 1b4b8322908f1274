"""The systems under test. Each one turns the benchmark image into a directory tree.

A `System` opens *sessions*: one session is one mount (or, for the native tree, one look at
the extracted directory) that a single workload runs in, so no workload inherits the kernel
caches of the one before. A cold session starts from nothing local (a fresh imagefs store, no
ratarmount index) after the runner dropped the page cache; a warm session reuses what
`warm_up()` left behind (store or index on disk, page cache as it is).

To add a system (a lazy-format variant of imagefs, a network-emulated registry, another
FUSE tool), subclass `System` and register a factory in `SYSTEMS`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bench.images import VARIANTS, BuiltImage
from bench.util import (
    BenchError,
    force_unmount,
    log,
    preload,
    remove_tree,
    run,
    stop_process,
    wait_for_mount,
)
from imagefs.testing.images import PushedImage, registry_args, skopeo_copy, umoci_unpack
from imagefs.testing.registry import LocalRegistry

Phase = Literal["cold", "warm"]
MOUNT_TIMEOUT = 600.0


@dataclass
class Context:
    """What every system may use: the work dir, the built image and where it was pushed."""

    work: Path
    image: BuiltImage
    registry: LocalRegistry
    pushed: PushedImage
    imagefs_bin: Path
    ratarmount_bin: Path


@dataclass
class Tree:
    """One session's directory: where to work, which catalog view it shows, its daemon."""

    root: Path
    view: str
    ready_s: float | None = None
    """Command start to mount answering (None for a plain directory)."""
    pid_of: Callable[[], int | None] | None = None
    """Finds the process serving the tree (for its peak RSS, for py-spy). Asked only when
    needed, so a first-byte workload does not wait for `imagefs mounts` first."""
    started: float | None = None
    """`time.perf_counter()` when the mount command started (first byte counts from it)."""
    rss: bool = True
    """Whether the serving process's peak RSS means anything (not for the in-memory floor)."""
    _pid: int | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        if self._pid is None and self.pid_of is not None:
            self._pid = self.pid_of()
        return self._pid


class System(ABC):
    name: str
    description: str
    view = "merged"
    phases: tuple[Phase, ...] = ("cold", "warm")
    """The phases this system runs in (the in-memory floor has no cold state)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.home = ctx.work / "systems" / self.name
        self._warm = False

    def setup(self) -> None:
        """Once, before the first run."""
        remove_tree(self.home)
        self.home.mkdir(parents=True)

    def prepare_run(self) -> dict[str, float]:
        """Once per run, before its cold sessions; may return metrics of its own."""
        return {}

    def warm_up(self) -> None:
        """Before each run's warm sessions: the first time, leave the local state a warm
        session uses; every time, read that state into the page cache (the cold sessions
        dropped it), so "warm" means the same in every run."""
        if not self._warm:
            self._warm_up()
            self._warm = True
        preload(*self.warm_files())

    def _warm_up(self) -> None:
        return None  # nothing to leave behind by default

    def warm_files(self) -> list[Path]:
        """The local files a warm session reads (the store, the index, the tree)."""
        return []

    @abstractmethod
    def session(self, phase: Phase) -> contextlib.AbstractContextManager[Tree]: ...

    def teardown(self) -> None:
        """Always called (even after Ctrl-C); must not raise."""
        with contextlib.suppress(Exception):
            remove_tree(self.home)


# --------------------------------------------------------------------------------------------
# imagefs


class Imagefs(System):
    """`imagefs mount` of the pushed image: cold on a fresh store, warm on a reused one."""

    def __init__(self, ctx: Context, name: str = "imagefs", variant: str = "gzip") -> None:
        self.name = name
        self.variant = variant
        self.description = f"imagefs mount ({variant} layers from the local registry)"
        super().__init__(ctx)
        self._cold_count = 0
        self.ref = ctx.pushed.ref

    def setup(self) -> None:
        super().setup()
        if self.variant != "gzip":  # the run pushed plain gzip; push this variant beside it
            pushed = VARIANTS[self.variant].push(
                self.ctx.image, self.ctx.registry, self.ctx.imagefs_bin
            )
            self.ref = pushed.ref

    def _imagefs(self, root: Path, *args: str) -> str:
        # cwd: the daemon runs as `python -m imagefs`, which puts the cwd first on sys.path;
        # from the repo that would be the live work tree instead of the snapshot.
        return run(
            [str(self.ctx.imagefs_bin), "--root", str(root), *args],
            timeout=MOUNT_TIMEOUT,
            cwd=self.home,
        )

    def _daemon_pid(self, root: Path, mnt: Path) -> int | None:
        for line in self._imagefs(root, "mounts", "--format", "json").splitlines():
            m = json.loads(line)  # docker's `--format json`: an object per line
            if Path(m["Mountpoint"]) == mnt:
                return int(m["PID"])
        return None

    @contextlib.contextmanager
    def _mounted(self, root: Path) -> Iterator[Tree]:
        mnt = self.home / "mnt"
        mnt.mkdir(exist_ok=True)
        try:
            start = time.perf_counter()
            # indexes the bench published itself (`Variant.publish_index`): opted into
            self._imagefs(root, "mount", "--trust-published-index", self.ref, str(mnt))
            os.stat(mnt)
            ready = time.perf_counter() - start
            yield Tree(
                mnt, self.view, ready, pid_of=lambda: self._daemon_pid(root, mnt), started=start
            )
        finally:
            try:
                self._imagefs(root, "umount", str(mnt))
            except BenchError as e:
                log(f"{self.name}: {e}; forcing the unmount")
                force_unmount(mnt)

    @contextlib.contextmanager
    def session(self, phase: Phase) -> Iterator[Tree]:
        if phase == "warm":
            with self._mounted(self.home / "warm-store") as tree:
                yield tree
            return
        self._cold_count += 1
        root = self.home / f"cold-store-{self._cold_count}"
        try:
            with self._mounted(root) as tree:
                yield tree
        finally:
            remove_tree(root)

    def warm_files(self) -> list[Path]:
        return [self.home / "warm-store"]

    def _warm_up(self) -> None:
        # Every layer fetched and indexed once: a warm mount has nothing left to fetch.
        with self._mounted(self.home / "warm-store") as tree:
            run(["bash", "-c", "tar cf - . | wc -c"], cwd=tree.root)


# --------------------------------------------------------------------------------------------
# the native tree


class Native(System):
    """`skopeo copy docker://… oci:…` + `umoci unpack`: the whole image pulled and extracted.

    Each run pulls and extracts it again (timed); its sessions just look at the directory.
    """

    name = "native"
    description = "skopeo copy + umoci unpack, then the plain directory"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.rootfs: Path | None = None

    def prepare_run(self) -> dict[str, float]:
        layout = self.home / "layout"
        bundle = self.home / "bundle"
        remove_tree(layout)
        remove_tree(bundle)
        start = time.perf_counter()
        skopeo_copy(
            f"docker://{self.ctx.pushed.ref}",
            f"oci:{layout}:bench",
            registry_args(self.ctx.registry, "src"),
        )
        pulled = time.perf_counter()
        run(["umoci", "unpack", "--image", f"{layout}:bench", str(bundle)])
        done = time.perf_counter()
        self.rootfs = bundle / "rootfs"
        return {
            "pull_s": pulled - start,
            "extract_s": done - pulled,
            "pull_extract_s": done - start,
        }

    def warm_files(self) -> list[Path]:
        return [self.rootfs] if self.rootfs is not None else []

    def _warm_up(self) -> None:
        if self.rootfs is None:
            self.prepare_run()

    @contextlib.contextmanager
    def session(self, phase: Phase) -> Iterator[Tree]:
        if self.rootfs is None:
            self.prepare_run()
        assert self.rootfs is not None
        yield Tree(self.rootfs, self.view)


# --------------------------------------------------------------------------------------------
# ratarmount


class Ratarmount(System):
    """ratarmount (from PyPI, its own venv) on the image's gzip layer blobs, read locally.

    `layers="all"` union-mounts every layer (later archives win; OCI whiteouts are not
    applied, so the tree is a little bigger than the image's); `layers="biggest"` mounts the
    biggest layer blob alone. Cold: no index (ratarmount builds it before the mount
    answers); warm: the index from the warm-up.
    """

    def __init__(self, ctx: Context, layers: Literal["all", "biggest"]) -> None:
        self.layers = layers
        self.name = "ratarmount" if layers == "all" else "ratarmount-layer"
        super().__init__(ctx)
        image = ctx.image
        if layers == "all":
            self.indices = list(range(len(image.layers)))
            self.description = f"ratarmount union of all {len(image.layers)} gzip layer blobs"
        else:
            big = image.biggest_layer()
            self.indices = [big]
            self.view = f"layer:{big}"
            self.description = f"ratarmount of the biggest gzip layer blob (layer {big})"
        self._cold_count = 0

    def setup(self) -> None:
        super().setup()
        archives = self.home / "archives"
        archives.mkdir()
        layout = self.ctx.image.image.layout
        for i in self.indices:
            (archives / f"layer{i}.tar.gz").symlink_to(self.ctx.image.layers[i].blob(layout))

    @contextlib.contextmanager
    def _mounted(self, index_dir: Path) -> Iterator[Tree]:
        mnt = self.home / "mnt"
        mnt.mkdir(exist_ok=True)
        index_dir.mkdir(parents=True, exist_ok=True)
        archives = [str(self.home / "archives" / f"layer{i}.tar.gz") for i in self.indices]
        args = [
            str(self.ctx.ratarmount_bin),
            "-f",
            "--index-folders",
            str(index_dir),
            *archives,
            str(mnt),
        ]
        logfile = self.home / "ratarmount.log"
        with open(logfile, "ab") as out:
            start = time.perf_counter()
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        try:
            wait_for_mount(mnt, MOUNT_TIMEOUT, proc)
            ready = time.perf_counter() - start
            yield Tree(mnt, self.view, ready, pid_of=lambda: proc.pid)
        finally:
            if os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, check=False)
            stop_process(proc)
            force_unmount(mnt)

    @contextlib.contextmanager
    def session(self, phase: Phase) -> Iterator[Tree]:
        if phase == "warm":
            with self._mounted(self.home / "warm-index") as tree:
                yield tree
            return
        self._cold_count += 1
        index_dir = self.home / f"cold-index-{self._cold_count}"
        try:
            with self._mounted(index_dir) as tree:
                yield tree
        finally:
            remove_tree(index_dir)

    def warm_files(self) -> list[Path]:
        layout = self.ctx.image.image.layout
        blobs = [self.ctx.image.layers[i].blob(layout) for i in self.indices]
        return [*blobs, self.home / "warm-index"]

    def _warm_up(self) -> None:
        with self._mounted(self.home / "warm-index"):
            pass


# --------------------------------------------------------------------------------------------
# the floor


class Floor(System):
    """`floorfs.py`: the same tree (a `umoci unpack` of the image) served from memory by a
    minimal pyfuse3 filesystem with imagefs's kernel-cache settings: what FUSE itself costs.

    Only warm sessions: it has no cold state (it reads the whole tree into memory before it
    mounts), so its mount time and its RSS (the whole tree) mean nothing and are not shown.
    """

    name = "floor"
    description = (
        "minimal in-memory pyfuse3 filesystem serving the same tree (umoci unpack) with "
        "imagefs's kernel-cache settings (`tools/lib/bench/floorfs.py`)"
    )
    phases = ("warm",)

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.rootfs = self.home / "bundle" / "rootfs"

    def setup(self) -> None:
        super().setup()
        self.rootfs = umoci_unpack(self.ctx.image.image, self.home / "bundle")

    def warm_files(self) -> list[Path]:
        return [self.rootfs]

    @contextlib.contextmanager
    def session(self, phase: Phase) -> Iterator[Tree]:
        mnt = self.home / "mnt"
        mnt.mkdir(exist_ok=True)
        with open(self.home / "floorfs.log", "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, str(FLOORFS), str(self.rootfs), str(mnt)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                cwd=self.home,  # not the repo: the snapshot of imagefs must come first
            )
        try:
            wait_for_mount(mnt, MOUNT_TIMEOUT, proc)
            yield Tree(mnt, self.view, pid_of=lambda: proc.pid, rss=False)
        finally:
            if os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, check=False)
            stop_process(proc)
            force_unmount(mnt)


FLOORFS = Path(__file__).resolve().parent / "floorfs.py"

SYSTEMS: dict[str, Callable[[Context], System]] = {
    "imagefs": lambda ctx: Imagefs(ctx),
    "imagefs-index": lambda ctx: Imagefs(ctx, "imagefs-index", "gzip+index"),
    "floor": Floor,
    "native": Native,
    "ratarmount": lambda ctx: Ratarmount(ctx, "all"),
    "ratarmount-layer": lambda ctx: Ratarmount(ctx, "biggest"),
}
