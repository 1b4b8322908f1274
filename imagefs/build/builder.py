"""`imagefs build`: run a Dockerfile's stages and store the result like a pulled image.

The shell around the pure parts: it mounts bases with imagefs (lazily: a RUN fetches only
what it reads), stacks steps with overlayfs, runs RUN under runc, turns upper directories
into layers and writes config, manifest and names into the store. Every mount and container
it makes is undone in a `finally` that cancellation cannot skip (Ctrl-C, SIGTERM), and the
image is named only after all of its blobs are stored.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from imagefs.build import cache as cachemod
from imagefs.build import config as cfgmod
from imagefs.build import context as ctx
from imagefs.build import copy as copymod
from imagefs.build import frontend, layerdiff, rootfs, runtime
from imagefs.build.bases import BaseImages
from imagefs.build.fetch import fetch_source
from imagefs.build.progress import Progress, Step
from imagefs.build.stage import StageState, rfc3339
from imagefs.build.stargzlayer import write_estargz_layer
from imagefs.build.words import Lexer
from imagefs.errors import BuildError
from imagefs.oci import mediatypes as mt
from imagefs.oci.digest import Digest
from imagefs.oci.image import Layer
from imagefs.oci.manifest import Descriptor
from imagefs.oci.platform import Platform
from imagefs.oci.reference import Reference
from imagefs.published import build_local
from imagefs.session import Session
from imagefs.store import ImageRecord, Layout, Lease, fsutil
from imagefs.store.lookup import load_resolved, put_record
from imagefs.store.refs import now_rfc3339

BUILT_ANNOTATION = "dev.imagefs.built"
"""On a built image's record: `push` then publishes the layer indexes the build made."""
BUILT = {BUILT_ANNOTATION: "true"}
LAYER_WRITERS = {"gzip": layerdiff.write_layer, "estargz": write_estargz_layer}


@dataclass
class BuildOptions:
    context: Path
    dockerfile: str
    """The Dockerfile's text."""
    tags: Sequence[str] = ()
    build_args: Mapping[str, str] = field(default_factory=dict)
    target: str | None = None
    no_cache: bool = False
    pull: bool = False
    network: str = "host"
    labels: Mapping[str, str] = field(default_factory=dict)
    compression: str = "gzip"
    platform: str | None = None
    global_argv: Sequence[str] | None = None
    """Global options for the base images' mount daemons (the CLI passes its own command
    line's); None: derived from the session."""
    trust_published_index: bool = False
    """The base images' mounts use an index published next to the image (`mount`'s flag)."""


@dataclass(frozen=True)
class BuildResult:
    image_id: Digest
    manifest_digest: Digest
    names: list[Reference]
    layers_built: int
    steps_cached: int


class Builder:
    def __init__(self, session: Session, opts: BuildOptions, progress: Progress) -> None:
        self.session = session
        self.store = session.store
        self.opts = opts
        self.progress = progress
        self.cache = cachemod.BuildCache(session.root)
        self.work = (
            Layout(session.root.absolute()).build_work / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        self.stages: dict[int, StageState] = {}
        self.bases = BaseImages(
            session,
            self.work,
            pull=opts.pull,
            global_argv=opts.global_argv,
            trust_published_index=opts.trust_published_index,
        )
        self.throwaway: list[Path] = []
        self.layers_built = 0
        self.steps_cached = 0
        self.lease: Lease | None = None
        epoch = os.environ.get("SOURCE_DATE_EPOCH") or opts.build_args.get("SOURCE_DATE_EPOCH")
        self.epoch = int(epoch) if epoch and epoch.isdigit() else None
        self.created = rfc3339(self.epoch if self.epoch is not None else time.time())
        self._n = 0

    # -- entry ----------------------------------------------------------------------------

    async def run(self) -> BuildResult:
        df = frontend.parse(self.opts.dockerfile)
        meta = frontend.meta_arg_values(df, self.opts.build_args)
        target = frontend.select_target(df, self.opts.target)
        stages = frontend.needed_stages(df, target, meta)
        await self.session.disk(self.cache.sweep)
        self.work.mkdir(parents=True, exist_ok=True)
        ignore = await self.session.disk(ctx.IgnoreRules.load, self.opts.context)
        with self.store.lease() as lease:
            self.lease = self.bases.lease = lease
            try:
                for stage in stages:
                    self.stages[stage.index] = await self._stage(df, stage, meta, ignore)
                return await self._export(self.stages[target.index])
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._cleanup)

    def _cleanup(self) -> None:
        for mnt in self.work.glob("merged-*"):
            runtime.unmount(mnt)
        self.bases.unmount_all()
        for path in self.throwaway:
            shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(self.work, ignore_errors=True)

    # -- stages ---------------------------------------------------------------------------

    def _step(self, stage: frontend.Stage, i: int, text: str, total: int | None = None) -> Step:
        n = total or len(stage.instructions) + 1
        return self.progress.step(f"[{stage.label} {i}/{n}] {text}")

    async def _stage(
        self,
        df: frontend.Dockerfile,
        stage: frontend.Stage,
        meta: Mapping[str, str],
        ignore: ctx.IgnoreRules,
    ) -> StageState:
        base = frontend.resolve_base(stage, meta, df.escape)
        step = self._step(stage, 1, f"FROM {base}")
        st = await self._from(df, stage, base)
        step.done()
        triggers: tuple[frontend.Instruction, ...] = ()
        if st.meta.get("onbuild"):
            try:
                parsed = frontend.parse("FROM scratch\n" + "\n".join(st.meta.pop("onbuild")))
            except BuildError as exc:
                raise BuildError(f"ONBUILD trigger of {base}: {exc}") from None
            triggers = parsed.stages[0].instructions
        steps = (*triggers, *stage.instructions)
        for i, ins in enumerate(steps, start=2):
            env = {**st.args, **cfgmod.env_map(st.config)}
            lexer = Lexer(env, df.escape)
            step = self._step(stage, i, ins.original.split("\n", 1)[0], len(steps) + 1)
            try:
                await self._instruction(df, st, ins, lexer, meta, ignore, step)
            except BuildError as exc:
                step.error(str(exc))
                raise
            step.done()
        if st.pending_workdir:
            step = self.progress.step(f"[{stage.label}] WORKDIR {st.config.get('WorkingDir')}")
            await self._fs_step(st, cachemod.key(st.key, "WORKDIR"), "", step, None)
            step.done()
        return st

    async def _from(self, df: frontend.Dockerfile, stage: frontend.Stage, base: str) -> StageState:
        parent = frontend.find_stage(df, base, stage.index)
        if parent is not None:
            p = self.stages[parent.index]
            image = json.loads(json.dumps(p.image))
            st = StageState(stage.label, image, p.base_root, p.source, p.key, self.created)
            st.base_ref = p.base_ref
            st.layers, st.uppers = list(p.layers), list(p.uppers)
            return st
        if base == "scratch":
            empty = self.work / "scratch"
            empty.mkdir(exist_ok=True)
            plat = Platform.host()
            image = {
                "architecture": plat.architecture,
                "os": plat.os,
                "config": {"Env": [f"PATH={runtime.DEFAULT_PATH}"]},
                "rootfs": {"type": "layers", "diff_ids": []},
                "history": [],
            }
            return StageState(
                stage.label, image, empty, None, self._root_key("scratch"), self.created
            )
        record = await self.bases.resolve(base, stage.platform)
        resolved = await self.session.disk(
            load_resolved, self.store, record.manifest.digest, record.index_digest
        )
        image = json.loads(resolved.config.raw)
        image.setdefault("rootfs", {"type": "layers", "diff_ids": []})
        # Mounted only when a step needs the files: a rebuild whose steps are all cached
        # starts no mount at all.
        st = StageState(
            stage.label, image, Path("/nonexistent"), record.source,
            self._root_key(str(record.manifest.digest)), self.created,
        )  # fmt: skip
        st.base_ref = base
        st.layers = [layer.descriptor for layer in resolved.layers]
        # docker runs the base's ONBUILD triggers right after FROM; the child keeps none.
        st.meta["onbuild"] = list(image.get("config", {}).pop("OnBuild", None) or [])
        return st

    def _root_key(self, base: str) -> str:
        # The compression is part of every key: a step's layer differs per compression.
        if self.opts.compression == "gzip":
            return cachemod.key(base)  # the keys of gzip builds stay as they were
        return cachemod.key(base, self.opts.compression)

    async def _ensure_base(self, st: StageState) -> None:
        if st.base_ref is not None:
            st.base_root, _ = await self.bases.mount(st.base_ref, None)
            st.base_ref = None

    # -- instructions -----------------------------------------------------------------------

    async def _instruction(
        self,
        df: frontend.Dockerfile,
        st: StageState,
        ins: frontend.Instruction,
        lexer: Lexer,
        meta: Mapping[str, str],
        ignore: ctx.IgnoreRules,
        step: Step,
    ) -> None:
        if ins.cmd == "ARG":
            for name, default in frontend.arg_pairs(ins, lexer):
                if name in self.opts.build_args:
                    st.args[name] = self.opts.build_args[name]
                elif default is not None:
                    st.args[name] = default
                elif name in meta:
                    st.args[name] = meta[name]
            st.key = cachemod.key(st.key, "ARG", sorted(st.args.items()))
            st.add_history("ARG " + " ".join(ins.args), empty=True)
        elif ins.cmd == "WORKDIR":
            path = lexer.word(" ".join(ins.args))
            if not path:
                raise BuildError(f"Dockerfile:{ins.line}: WORKDIR needs a path")
            st.config["WorkingDir"] = rootfs.join(st.config.get("WorkingDir") or "/", path)
            st.pending_workdir = True
            st.meta["workdir_user"] = st.config.get("User") or "0"
            st.key = cachemod.key(st.key, "WORKDIR", st.config["WorkingDir"])
            st.add_history(f"WORKDIR {st.config['WorkingDir']}", empty=True)
        elif ins.cmd == "RUN":
            await self._run(st, ins, step)
        elif ins.cmd in ("COPY", "ADD"):
            await self._copy(df, st, ins, lexer, ignore, step)
        else:
            st.meta.setdefault("shell", st.shell)
            st.meta.setdefault("cmd_set", False)
            created_by = cfgmod.apply(st.config, ins, lexer, st.meta)
            st.key = cachemod.key(st.key, created_by)
            st.add_history(created_by, empty=True)

    async def _fs_step(
        self, st: StageState, key: str, created_by: str, step: Step, action: Any
    ) -> None:
        """A step that changes files: cached, or run on an overlay and turned into a layer."""
        st.key = key
        entry = None if self.opts.no_cache else await self.session.disk(
            self.cache.get, key, self.store.blobs.has
        )  # fmt: skip
        if entry is not None:
            step.cached()
            self.steps_cached += 1
            st.pending_workdir = False
            if entry.layer is not None:
                assert self.lease is not None
                self.lease.add(entry.layer.digest)
            st.add_layer(entry.upper, entry.layer, created_by)
            return
        await self._ensure_base(st)
        tmp = await self.session.disk(self.cache.new_dir)
        try:
            upper = tmp / "upper"
            self._n += 1
            merged = self.work / f"merged-{self._n}"
            async with runtime.overlay(st.lowers(), upper, tmp / "work", merged):
                if st.pending_workdir:
                    wd = st.config.get("WorkingDir") or "/"
                    user = st.meta.get("workdir_user") or "0"
                    uid, gid, _ = await self.session.disk(rootfs.lookup_user, merged, user)
                    await self.session.disk(copymod.make_dirs, merged, wd, (uid, gid))
                    st.pending_workdir = False
                if action is not None:
                    await action(merged)
            layer = None
            if not await self.session.disk(layerdiff.is_empty, upper):
                layer = await self.session.disk(self._store_layer, upper)
                self.layers_built += 1
            keep = not self.opts.no_cache
            entry = await self.session.disk(lambda: self.cache.commit(tmp, key, layer, keep=keep))
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(shutil.rmtree, tmp, True)
            raise
        if self.opts.no_cache:
            self.throwaway.append(tmp)
        st.add_layer(entry.upper, layer, created_by)

    def _store_layer(self, upper: Path) -> layerdiff.LayerBlob:
        """Write the layer blob into the store: temp file, fsync, rename (containerd's way).

        Through `fsutil` from the store root (no link followed); the temp file is an
        `fsutil.TEMP_PREFIX` name, so one a crash leaves is found by `check` and removed by
        `check --repair`."""
        blobs, root = self.store.blobs, self.store.root
        tmp = blobs.ingest_dir  # the directory until the temp file has a name
        try:
            with fsutil.dir_fd(blobs.ingest_dir, root=root, create=True) as d:
                fd, name = fsutil.create_temp(d)
            tmp = blobs.ingest_dir / name
            with os.fdopen(fd, "wb") as out:
                blob = LAYER_WRITERS[self.opts.compression](upper, out, self.epoch)
                out.flush()
                os.fsync(out.fileno())
            assert self.lease is not None
            self.lease.add(blob.digest)
            target = blobs.path(blob.digest)
            fsutil.replace(tmp, target, root=root)  # fsyncs the directory
            # Index the new layer now, so `push` can publish it and a mount of the pushed
            # image reads byte ranges at once (the blob is hot in the page cache here).
            # An eStargz layer needs none: its TOC is its index.
            if not blob.annotations:
                layer = Layer(Descriptor(mt.OCI_LAYER_GZIP, blob.digest, blob.size), blob.diff_id)
                build_local(self.store.root, target, layer)
        finally:
            if tmp != blobs.ingest_dir:
                fsutil.safe_unlink(tmp, root=root)
        return blob

    async def _run(self, st: StageState, ins: frontend.Instruction, step: Step) -> None:
        ins.check_flags(["network"])
        shell = st.shell
        if ins.heredocs and not ins.json and ins.args[0].startswith("<<") and len(ins.args) == 1:
            args = [*shell, ins.heredocs[0].content]
        elif ins.heredocs and not ins.json:
            args = [*shell, ins.original.split(None, 1)[1]]
        else:
            args = cfgmod.command_form(ins, shell)
        env_map = {**st.args, **cfgmod.env_map(st.config)}
        env_map.setdefault("PATH", runtime.DEFAULT_PATH)
        env = [f"{k}={v}" for k, v in env_map.items()]
        network = ins.flag("network") or self.opts.network
        user = st.config.get("User") or "0"
        workdir = st.config.get("WorkingDir") or "/"
        arg_text = " ".join(f"{k}={v}" for k, v in sorted(st.args.items()))
        shown = " ".join(args)
        created_by = f"RUN |{len(st.args)} {arg_text} {shown}" if st.args else f"RUN {shown}"
        key = cachemod.key(st.key, "RUN", args, env, user, workdir, network)

        async def action(merged: Path) -> None:
            uid, gid, groups = await self.session.disk(rootfs.lookup_user, merged, user)
            proc = runtime.Process(args, env, uid, gid, tuple(groups), workdir)
            spec = runtime.runtime_spec(merged, proc, network=network)
            dests = runtime.mount_destinations(spec)
            missing = await self.session.disk(runtime.missing_mountpoints, merged, dests)
            result = await runtime.run(self.work / f"bundle-{self._n}", spec, step.line)
            await self.session.disk(runtime.remove_mountpoints, merged, missing)
            if result.exit_code != 0:
                tail = " | ".join(result.tail[-5:])
                raise BuildError(
                    f"RUN {shown!r} (Dockerfile:{ins.line}) exited with code {result.exit_code}"
                    + (f"; last output: {tail}" if tail else "")
                )

        await self._fs_step(st, key, f"{created_by} # buildkit", step, action)

    async def _copy(
        self,
        df: frontend.Dockerfile,
        st: StageState,
        ins: frontend.Instruction,
        lexer: Lexer,
        ignore: ctx.IgnoreRules,
        step: Step,
    ) -> None:
        ins.check_flags(["from", "chown", "chmod", "link", "parents"])
        words = [lexer.word(a) for a in ins.args]
        if len(words) < 2:
            raise BuildError(f"Dockerfile:{ins.line}: {ins.cmd} needs a source and a destination")
        *srcs, dest_word = words
        dest = rootfs.join(st.config.get("WorkingDir") or "/", dest_word)
        if dest_word.endswith("/") and not dest.endswith("/"):
            dest += "/"
        chmod = ins.flag("chmod")
        mode = None
        if chmod is not None:
            try:
                mode = int(lexer.word(chmod), 8)
            except ValueError:
                raise BuildError(
                    f"Dockerfile:{ins.line}: --chmod wants octal, not {chmod!r}"
                ) from None
        chown = ins.flag("chown")
        chown = lexer.word(chown) if chown else None
        from_flag = ins.flag("from")
        heredoc_names = {h.name for h in ins.heredocs}
        async with self._source_root(df, st, lexer.word(from_flag) if from_flag else None) as (
            src_root,
            src_key,
        ):
            groups: list[list[ctx.Source]] = []
            remote: set[int] = set()
            for pattern in srcs:
                if pattern.startswith("<<") and pattern[2:].lstrip("-") in heredoc_names:
                    name = pattern[2:].lstrip("-")
                    doc = next(h for h in ins.heredocs if h.name == name)
                    groups.append(ctx.heredoc_source(self.work, name, doc.content))
                    continue
                scheme = pattern.split("://")[0] if "://" in pattern else ""
                if ins.cmd == "ADD" and scheme in ("http", "https"):
                    groups.append(
                        await fetch_source(self.work, ins.line, pattern, dest, self.session.options)
                    )
                    remote.add(len(groups) - 1)  # a downloaded archive is not extracted
                    continue
                if ins.cmd == "ADD" and scheme:
                    raise BuildError(
                        f"Dockerfile:{ins.line}: ADD of {scheme} URLs is not supported"
                    )
                matches = await self.session.disk(
                    ctx.select, src_root, pattern, ignore if src_key is None else None
                )
                if not matches:
                    raise BuildError(
                        f"Dockerfile:{ins.line}: {ins.cmd} failed: source {pattern!r} not found"
                        + (" in the build context" if src_key is None else f" in {from_flag}")
                    )
                for path, rel in matches:
                    walked = await self.session.disk(
                        lambda p=path, r=rel: list(
                            ctx.walk(p, r, ignore if src_key is None else None)
                        )
                    )
                    groups.append(walked)
            content = await self.session.disk(ctx.digest_sources, [s for g in groups for s in g])
            created_by = f"{ins.cmd} {' '.join(words)} # buildkit"
            key = cachemod.key(st.key, ins.cmd, words, chown, mode, dest, src_key, content)

            async def action(merged: Path) -> None:
                def work() -> None:
                    uid = gid = None
                    if chown:
                        user, _, group = chown.partition(":")
                        spec_user = (
                            f"{user}:{group or user}" if group or not user.isdigit() else user
                        )
                        uid, gid, _ = rootfs.lookup_user(merged, spec_user)
                        if not group and user.isdigit():
                            gid = uid
                    own = copymod.Ownership(uid, gid, mode)
                    archives = [
                        g for i, g in enumerate(groups)
                        if ins.cmd == "ADD" and i not in remote and len(g) == 1
                        and copymod.is_archive(g[0].path)
                    ]  # fmt: skip
                    plain = [g for g in groups if not any(g is a for a in archives)]
                    if plain:
                        copymod.copy_sources(
                            merged, plain, dest, own, keep_owner=src_key is not None
                        )
                    for g in archives:
                        copymod.extract_archive(merged, g[0].path, dest, own)

                await self.session.disk(work)

            await self._fs_step(st, key, created_by, step, action)

    @contextlib.asynccontextmanager
    async def _source_root(
        self, df: frontend.Dockerfile, st: StageState, src: str | None
    ) -> AsyncIterator[tuple[Path, str | None]]:
        """Where COPY reads: the context, another stage's root (read-only overlay), an image."""
        if src is None:
            yield self.opts.context.absolute(), None
            return
        stage = frontend.find_stage(df, src)
        if stage is not None and stage.index in self.stages:
            other = self.stages[stage.index]
            await self._ensure_base(other)
            self._n += 1
            merged = self.work / f"merged-{self._n}"
            empty = self.work / "empty-lower"
            empty.mkdir(exist_ok=True)
            # No upper dir: a read-only overlay (it wants two lowers at least).
            lowers = ":".join(str(p) for p in [*other.lowers(), empty])
            merged.mkdir()
            await trio.to_thread.run_sync(runtime.mount_ro, lowers, merged)
            try:
                yield merged, other.key
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(runtime.unmount, merged)
            return
        mnt, record = await self.bases.mount(src, None)
        yield mnt, str(record.manifest.digest)

    # -- export ---------------------------------------------------------------------------

    async def _export(self, st: StageState) -> BuildResult:
        step = self.progress.step("exporting to image")
        if self.opts.labels:
            st.config["Labels"] = {**(st.config.get("Labels") or {}), **self.opts.labels}
        config_bytes = st.final_config()
        config_digest = Digest.of(config_bytes)
        config_desc = Descriptor(mt.OCI_CONFIG, config_digest, len(config_bytes))
        manifest_bytes = st.manifest(config_desc)
        manifest_digest = Digest.of(manifest_bytes)
        assert self.lease is not None
        self.lease.add(config_digest, manifest_digest)
        await self.session.disk(self.store.blobs.put, config_bytes, config_digest)
        await self.session.disk(self.store.blobs.put, manifest_bytes, manifest_digest)
        step.note(f"writing image {config_digest} done")
        names = [Reference.parse(t) for t in self.opts.tags]
        manifest_desc = Descriptor(mt.OCI_MANIFEST, manifest_digest, len(manifest_bytes))
        now = now_rfc3339()
        for name in names:
            record = ImageRecord(manifest_desc, name, None, st.source, None, now, BUILT)
            await self.session.disk(put_record, self.store, record)
            step.note(f"naming to {name} done")
        if not names:
            record = ImageRecord(manifest_desc, None, None, st.source, None, now, BUILT)
            await self.session.disk(put_record, self.store, record)
        step.done()
        return BuildResult(
            config_digest, manifest_digest, names, self.layers_built, self.steps_cached
        )


async def build(
    session: Session, opts: BuildOptions, progress: Progress | None = None
) -> BuildResult:
    """Build `opts.dockerfile` in `opts.context` into the store (root only)."""
    if os.geteuid() != 0:
        raise BuildError(
            "imagefs build must run as root (it mounts overlayfs and runs RUN in namespaces)"
        )
    if opts.compression not in LAYER_WRITERS:
        raise BuildError(f"--compression {opts.compression} is not supported yet (gzip, estargz)")
    if opts.network not in ("host", "none"):
        raise BuildError(f"--network must be host or none, not {opts.network!r}")
    if not opts.context.is_dir():
        raise BuildError(f"build context {opts.context} is not a directory")
    runtime.require_tools()
    builder = Builder(session, opts, progress or Progress("quiet", sys.stderr))
    return await builder.run()
