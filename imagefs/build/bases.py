"""The images a build starts from (`FROM IMAGE`, `COPY --from=IMAGE`).

Each is resolved once per build — the stored image, or pulled (metadata only) when it is
not local or `--pull` is given — kept under the build's lease, and mounted lazily by
imagefs's own daemon only when a step needs its files, so a RUN fetches only what it reads.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

import trio

from imagefs.build import runtime
from imagefs.errors import BuildError, NotFound
from imagefs.fs import lifecycle
from imagefs.oci.platform import Platform
from imagefs.oci.reference import Reference
from imagefs.pulling import pull
from imagefs.session import Session
from imagefs.store import ImageRecord, Lease
from imagefs.store.lookup import find_record


class BaseImages:
    def __init__(
        self,
        session: Session,
        work: Path,
        *,
        pull: bool,
        global_argv: Sequence[str] | None = None,
        trust_published_index: bool = False,
    ) -> None:
        self.session = session
        self.trust_published_index = trust_published_index
        self.work = work
        self.pull = pull
        self.global_argv = global_argv
        self.lease: Lease | None = None  # the build's, set when it starts
        self.records: dict[str, ImageRecord] = {}
        self.mounts: dict[str, tuple[Path, ImageRecord]] = {}

    async def resolve(self, ref: str, platform: str | None) -> ImageRecord:
        """The stored record of `ref`, pulled (metadata only) when it is not local."""
        if ref in self.records:
            return self.records[ref]
        try:
            Reference.parse(ref)
        except Exception as exc:
            raise BuildError(f"invalid base image reference {ref!r}: {exc}") from None
        record = None
        if not self.pull:
            with contextlib.suppress(NotFound):
                record = await self.session.disk(find_record, self.session.store, ref)
        if record is None:
            try:
                plat = Platform.parse(platform) if platform else None
                record = (await pull(self.session, ref, platform=plat)).record
            except NotFound as exc:
                raise BuildError(f"base image {ref} not found: {exc}") from None
        assert self.lease is not None
        self.lease.add(record.manifest.digest)
        self.records[ref] = record
        return record

    async def mount(self, ref: str, platform: str | None) -> tuple[Path, ImageRecord]:
        """Mount an image lazily (imagefs's own daemon), once per build."""
        if ref in self.mounts:
            return self.mounts[ref]
        record = await self.resolve(ref, platform)
        mnt = self.work / f"image-{len(self.mounts)}"
        mnt.mkdir()
        argv = self.mount_argv(ref, mnt)
        log = lifecycle.log_path_for(self.session.root, mnt)
        self.mounts[ref] = (mnt, record)
        await trio.to_thread.run_sync(lifecycle.spawn_daemon, argv, log, mnt)
        return mnt, record

    def unmount_all(self) -> None:
        for mnt, _ in self.mounts.values():
            with contextlib.suppress(Exception):
                lifecycle.unmount(mnt, self.session.store)
            if os.path.ismount(mnt):
                runtime.unmount(mnt)

    def mount_argv(self, ref: str, mnt: Path) -> list[str]:
        """The command line of a base image's mount daemon."""
        argv = [*self._global_argv(), "mount", "-f", "-o", "allow_other,suid,dev"]
        if self.trust_published_index:
            argv.append("--trust-published-index")
        return [*argv, ref, str(mnt)]

    def _global_argv(self) -> list[str]:
        """The mount daemons' global options: the command line's own when the CLI gave
        them (every global option, as `imagefs` was run), else derived from the session."""
        if self.global_argv is not None:
            return list(self.global_argv)
        o = self.session.options
        argv = ["--root", str(self.session.root.absolute())]
        if o.config_dir is not None:
            argv += ["--config", str(o.config_dir)]
        for host in sorted(o.insecure_registries):
            argv += ["--insecure-registry", host]
        if o.link is not None:  # the base mount fetches over the same emulated network
            if o.link.latency:
                argv += ["--net-latency", f"{o.link.latency * 1000:g}"]
            if o.link.bandwidth:
                argv += ["--net-bandwidth", f"{o.link.bandwidth:.0f}B/s"]
        return argv
