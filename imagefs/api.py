"""The verbs of imagefs as plain async functions: the CLI and the tests both call these.

Each verb takes a `Session` (store root, transport options, one registry client per host) and
returns values; printing is the CLI's business. Disk work runs in worker threads through one
limiter so the trio thread stays free for the network.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import trio

from imagefs.api_profiles import load_profile as load_profile  # prefetch profiles as verbs
from imagefs.api_profiles import pull_profile as pull_profile
from imagefs.api_profiles import push_profile as push_profile
from imagefs.api_profiles import record_profile as record_profile
from imagefs.errors import (
    ImageFSError,
    ImageInUse,
    IntegrityError,
    InvalidReference,
    NotFound,
    Unauthorized,
    UsageError,
    unwrap_groups,
)
from imagefs.oci.digest import Digest
from imagefs.oci.image import Layer, ResolvedImage
from imagefs.oci.manifest import Descriptor
from imagefs.oci.platform import Platform
from imagefs.oci.reference import Reference
from imagefs.pulling import PullResult, find_or_pull, pull
from imagefs.registry import credentials
from imagefs.registry.client import RegistryClient
from imagefs.session import Session, fetch_blob, keep_whole_blob
from imagefs.store import ImageRecord, Store, fsutil
from imagefs.store.lookup import (
    find_record,
    find_records,
    is_dangling,
    load_resolved,
    put_record,
)
from imagefs.store.refs import now_rfc3339

if TYPE_CHECKING:  # imported lazily: `imagefs mount` and friends start faster without it
    from imagefs.indexes import PushedIndexes

log = logging.getLogger("imagefs")


# -- images / inspect -------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSummary:
    record: ImageRecord
    image: ResolvedImage
    size: int  # compressed bytes of config + layers: what a full pull downloads
    cached: int  # bytes of layer data present locally

    @property
    def repository(self) -> str:
        ref = self.record.name or self.record.repo_digest
        return ref.familiar_name if ref else "<none>"

    @property
    def tag(self) -> str:
        return self.record.name.tag or "<none>" if self.record.name else "<none>"


def layer_cached_bytes(store: Store, layer: Layer) -> int:
    """How much of a layer is local, in compressed bytes: the whole blob, or the compressed
    ranges whose verified pieces are in the piece cache (known once the layer's index is:
    pieces are named by content, not by layer)."""
    if store.blobs.has(layer.digest):
        return layer.size
    from imagefs.lazy.cached import cached_bytes

    return min(layer.size, cached_bytes(store.root, layer))


def sweep_derived(store: Store) -> int:
    """Drop layer indexes, manifest-bound indexes, referrer records and flattened layers of
    layers (manifests) no image uses, and the caches of earlier versions (`cache/chunks`,
    `indexes/sha256`). Pieces are content-addressed and shared: the cache cap's LRU
    eviction bounds them. Hold `store.locked()`. Returns the bytes freed.

    Nothing is followed: a symlinked area is refused (LinkInStore), a link inside one is
    removed itself, never what it points at (see `fsutil.safe_rmtree`).
    """
    keep = {Digest.parse(d).hex for d in store.reachable(store.records()) if ":" in d}
    freed = 0
    for old in store.paths.old_areas():
        freed += fsutil.safe_rmtree(old, root=store.root)
    for area in store.paths.derived_areas():
        for entry in fsutil.scan(area, root=store.root):
            name = entry.name.split("-", 1)[0]  # refused/<layer hex>-<kind>-<verifier hex>
            if name in keep or name.startswith("."):
                continue
            freed += fsutil.safe_rmtree(area / entry.name, root=store.root)
    return freed


def _summarise(store: Store, record: ImageRecord) -> ImageSummary:
    image = load_resolved(store, record.manifest.digest, record.index_digest)
    layers = image.layers
    size = image.manifest.config.size + sum(layer.size for layer in layers)
    cached = sum(layer_cached_bytes(store, layer) for layer in layers)
    return ImageSummary(record, image, size, cached)


IMAGE_FILTERS = ("dangling", "reference", "label", "before", "since")


async def images(
    session: Session,
    filter_ref: str | None = None,
    *,
    all_images: bool = False,
    filters: Mapping[str, Sequence[str]] | None = None,
) -> list[ImageSummary]:
    """Stored images, newest first, as `docker images` lists them: tagged ones, those pulled by
    digest (TAG `<none>`) and dangling ones (`<none>` `<none>`). `filters` are docker's
    (`dangling`, `reference`, `label`, `before`, `since`; see `formats.parse_filters`).
    `all_images` is docker's `-a`; imagefs has no intermediate images to add."""
    del all_images

    def work() -> list[ImageSummary]:
        store = session.store
        records = store.records()
        keep = _image_filter(store, filters or {})
        out = []
        for rec in records:
            if filter_ref and not _filter_matches(rec, filter_ref):
                continue
            summary = _summarise(store, rec)
            if keep(summary):
                out.append(summary)
        out.sort(key=lambda s: s.record.created, reverse=True)
        return out

    result: list[ImageSummary] = await session.disk(work)
    return result


def _image_filter(
    store: Store, filters: Mapping[str, Sequence[str]]
) -> Callable[[ImageSummary], bool]:
    """docker's rules: values of one key are alternatives, different keys must all hold."""
    from imagefs.formats import parse_time

    dangling = filters.get("dangling", [])
    if len(set(dangling)) > 1 or any(v not in ("true", "false") for v in dangling):
        raise UsageError(f"invalid filter 'dangling={','.join(dangling)}': want true or false")

    def created(summary: ImageSummary) -> float:
        when = parse_time(summary.image.config.created)
        return when.timestamp() if when else 0.0

    bounds: dict[str, float] = {}
    for key in ("before", "since"):
        for query in filters.get(key, []):
            bounds[key] = created(_summarise(store, find_record(store, query)))

    def keep(s: ImageSummary) -> bool:
        if dangling and is_dangling(s.record) != (dangling[0] == "true"):
            return False
        if "reference" in filters and not any(
            _reference_matches(s.record, p) for p in filters["reference"]
        ):
            return False
        labels = thaw(s.image.config.config).get("Labels") or {}
        for want in filters.get("label", []):
            key, sep, value = want.partition("=")
            if key not in labels or (sep and labels[key] != value):
                return False
        if "before" in bounds and not created(s) < bounds["before"]:
            return False
        return not ("since" in bounds and not created(s) > bounds["since"])

    return keep


def _filter_matches(record: ImageRecord, pattern: str) -> bool:
    """docker images REPOSITORY[:TAG]: by familiar or full name, tag optional."""
    import fnmatch

    ref = record.name or record.repo_digest
    if ref is None:
        return False
    # The tag is after a `:` in the last path component (an earlier one is a host's port).
    has_tag = ":" in pattern.rpartition("/")[2]
    repo_pat, _, tag_pat = pattern.rpartition(":") if has_tag else (pattern, "", "")
    names = {ref.familiar_name, ref.name}
    if not any(fnmatch.fnmatchcase(n, repo_pat) for n in names):
        return False
    return not tag_pat or (
        record.name is not None and fnmatch.fnmatchcase(record.name.tag or "", tag_pat)
    )


def _reference_matches(record: ImageRecord, pattern: str) -> bool:
    """docker's reference filter: Go's path.Match against `repo:tag`, then against `repo`."""
    names = []
    for ref in (record.name, record.repo_digest):
        if ref is not None:
            names += [ref.familiar, ref.familiar_name]
    return any(_path_match(pattern, n) for n in names)


def _path_match(pattern: str, name: str) -> bool:
    """Go's path.Match: `*` and `?` never cross a `/`."""
    import re

    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and "]" in pattern[i + 1 :]:
            j = pattern.index("]", i + 1)
            body = pattern[i + 1 : j].replace("\\", "\\\\")
            out.append("[" + ("^" + body[1:] if body.startswith("^") else body) + "]")
            i = j
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return re.fullmatch("".join(out), name) is not None


def thaw(value: Any) -> Any:
    """Plain JSON types from the frozen forms the config parser hands out."""
    if isinstance(value, Mapping):
        return {str(k): thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    return value


def inspect_json(store: Store, record: ImageRecord) -> dict[str, Any]:
    """docker inspect's keys, plus an `ImageFS` object with what docker cannot know."""
    s = _summarise(store, record)
    image = s.image
    cfg = image.config
    repo_tags = sorted(
        r.name.familiar
        for r in store.records()
        if r.name is not None and r.manifest.digest == record.manifest.digest
    )
    repo_digests = sorted(
        {
            r.repo_digest.familiar
            for r in store.records()
            if r.repo_digest is not None and r.manifest.digest == record.manifest.digest
        }
    )
    c = thaw(cfg.config)
    return {
        "Id": str(image.id),
        "RepoTags": repo_tags,
        "RepoDigests": repo_digests,
        "Created": cfg.created or "",
        "Author": cfg.author or "",
        "Architecture": cfg.architecture,
        "Os": cfg.os,
        **({"Variant": cfg.variant} if cfg.variant else {}),
        "Config": {
            "Env": c.get("Env"),
            "Cmd": c.get("Cmd"),
            "Entrypoint": c.get("Entrypoint"),
            "WorkingDir": c.get("WorkingDir", ""),
            "User": c.get("User", ""),
            "Labels": c.get("Labels"),
            "ExposedPorts": c.get("ExposedPorts"),
            "Volumes": c.get("Volumes"),
        },
        "RootFS": {"Type": "layers", "Layers": [str(d) for d in cfg.diff_ids]},
        "Size": s.size,
        "ImageFS": {
            "ManifestDigest": str(image.manifest_digest),
            "ManifestMediaType": image.manifest.media_type,
            "IndexDigest": str(image.index_digest) if image.index_digest else None,
            "Source": record.source.name if record.source else None,
            "Cached": s.cached,
            "Layers": [
                {
                    "Digest": str(layer.digest),
                    "MediaType": layer.descriptor.media_type,
                    "Size": layer.size,
                    "DiffID": str(layer.diff_id),
                    "Cached": layer_cached_bytes(store, layer),
                    **(
                        {"Annotations": dict(layer.descriptor.annotations)}
                        if layer.descriptor.annotations
                        else {}
                    ),
                }
                for layer in image.layers
            ],
        },
    }


async def inspect(session: Session, queries: Sequence[str]) -> list[dict[str, Any]]:
    """docker inspect's objects for every query; raises for the first that names nothing
    (the CLI calls `inspect_one` per argument, to print the others anyway)."""
    return [await inspect_one(session, q) for q in queries]


async def inspect_one(session: Session, query: str) -> dict[str, Any]:
    def work() -> dict[str, Any]:
        store = session.store
        return inspect_json(store, find_record(store, query))

    result: dict[str, Any] = await session.disk(work)
    return result


# -- tag / rmi / prune ------------------------------------------------------------------------


async def tag(session: Session, source: str, target: str) -> ImageRecord:
    target_ref = Reference.parse(target)
    if target_ref.digest is not None:
        raise InvalidReference(f"invalid target {target!r}: a tag cannot contain a digest")

    def work() -> ImageRecord:
        store = session.store
        src = find_record(store, source)
        record = ImageRecord(
            manifest=src.manifest,
            name=target_ref,
            repo_digest=src.repo_digest if src.repository == target_ref.name else None,
            source=src.source,
            index_digest=src.index_digest,
            created=now_rfc3339(),
            extra=src.extra,  # e.g. `dev.imagefs.built`: a new name is the same image
        )
        put_record(store, record)
        return record

    result: ImageRecord = await session.disk(work)
    return result


@dataclass(frozen=True)
class RmiResult:
    untagged: list[str]  # docker's `Untagged:` lines: `repo:tag`, then `repo@sha256:…`
    deleted: list[tuple[Digest, int]]  # blobs deleted, the image ID (config) first


async def rmi(session: Session, queries: Sequence[str], *, force: bool = False) -> RmiResult:
    """`rmi_one` for each query on its own, as docker does: what can go goes; then the first
    failure (if any) is raised."""
    untagged: list[str] = []
    deleted: list[tuple[Digest, int]] = []
    failure: ImageFSError | None = None
    for q in queries:
        try:
            one = await rmi_one(session, q, force=force)
        except ImageFSError as exc:
            failure = failure or exc
            continue
        untagged += one.untagged
        deleted += one.deleted
    if failure is not None:
        raise failure
    return RmiResult(untagged, deleted)


async def rmi_one(session: Session, query: str, *, force: bool = False) -> RmiResult:
    """Untag what `query` names (a tag: that tag; an ID or digest: every name of the image);
    when an image loses its last name, delete the blobs only it used.

    A mounted image keeps its blobs: without `force` it is refused; with `force` it is untagged
    and stays listed as a dangling `<none>` image until it is unmounted and removed, as docker
    keeps an image a container uses."""

    def work() -> RmiResult:
        store = session.store
        with store.locked():
            records = store.records()
            found = find_records(store, query)
            if not found:
                raise NotFound(f"no such image: {query}")
            by_name = [r for r in found if _names(r, query)]
            manifests = {r.manifest.digest for r in found}
            if by_name:
                chosen = by_name
            elif _is_digest_ref(query):
                chosen = found  # repo@sha256:…: that repository's records of the image
            else:  # an image ID: every name of the image
                chosen = [r for r in records if r.manifest.digest in manifests]
                repos = {r.repository for r in chosen if r.repository is not None}
                if len(repos) > 1 and not force:
                    raise ImageInUse(
                        f"conflict: unable to delete {query} (must be forced) - image is "
                        "referenced in multiple repositories"
                    )
            kept = [r for r in records if r not in chosen]
            orphaned = {
                r.manifest.digest
                for r in chosen
                if not any(k.manifest.digest == r.manifest.digest for k in kept)
            }
            mounted = {
                Digest.parse(m.manifest_digest): m
                for m in store.active_mounts()
                if m.manifest_digest in {str(d) for d in orphaned}
            }
            for digest, m in mounted.items():
                if not force or all(is_dangling(r) for r in chosen):
                    raise ImageInUse(
                        f"image {query} is mounted at {m.mountpoint} (pid {m.pid}); "
                        "unmount it first" + ("" if force else " or use -f")
                    )
                # Untagged but in use: stays as a dangling image, the mount keeps its source.
                rec = next(r for r in chosen if r.manifest.digest == digest)
                kept.append(replace(rec, name=None, repo_digest=None, created=now_rfc3339()))
            store.refs.save(kept)
            untagged = [r.name.familiar for r in chosen if r.name is not None]
            for r in chosen:
                gone = r.manifest.digest in orphaned
                if gone and r.repo_digest is not None and r.repo_digest.familiar not in untagged:
                    untagged.append(r.repo_digest.familiar)
            candidates: list[Digest] = []
            for rec in chosen:
                if rec.manifest.digest not in orphaned or rec.manifest.digest in mounted:
                    continue
                with contextlib.suppress(ImageFSError):
                    image = load_resolved(store, rec.manifest.digest, rec.index_digest)
                    candidates += [image.id, *(layer.digest for layer in image.layers)]
                candidates.append(rec.manifest.digest)
                if rec.index_digest:
                    candidates.append(rec.index_digest)
            deleted = store.collect_garbage(list(dict.fromkeys(candidates)))
            sweep_derived(store)
        return RmiResult(untagged, deleted)

    result: RmiResult = await session.disk(work)
    return result


def _is_digest_ref(query: str) -> bool:
    try:
        return Reference.parse(query).digest is not None and "@" in query
    except InvalidReference:
        return False


def _names(record: ImageRecord, query: str) -> bool:
    try:
        ref = Reference.parse(query)
    except InvalidReference:
        return False
    return ref.digest is None and record.name is not None and str(record.name) == str(ref)


@dataclass(frozen=True)
class PruneResult:
    blobs: list[tuple[Digest, int]]
    derived_bytes: int  # cache pieces, indexes and flattened layers of unused layers

    @property
    def total(self) -> int:
        return sum(n for _, n in self.blobs) + self.derived_bytes


async def prune(session: Session, *, build_cache: bool = False) -> PruneResult:
    """docker image prune: dangling images that no mount uses, then what no image (and no
    build cache entry) needs; `build_cache`: empty the build cache first."""

    def work() -> PruneResult:
        store = session.store
        with store.locked():
            in_use = {m.manifest_digest for m in store.active_mounts()}
            records = store.records()
            kept = [r for r in records if not is_dangling(r) or str(r.manifest.digest) in in_use]
            if len(kept) != len(records):
                store.refs.save(kept)
            cache_bytes = 0
            if build_cache:
                from imagefs.build.cache import remove_all

                cache_bytes = remove_all(store.root)
            blobs = [(d, n) for d, n in store.collect_garbage() if n]
            return PruneResult(blobs, sweep_derived(store) + cache_bytes)

    result: PruneResult = await session.disk(work)
    return result


# -- push -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushResult:
    reference: Reference
    digest: Digest
    size: int
    uploaded: list[Digest]
    mounted: list[Digest]
    existed: list[Digest]


async def push(
    session: Session, reference: str, *, progress: Callable[[Digest, str], None] | None = None
) -> PushResult:
    """Push a local image to the registry its name points at.

    Blobs not in the local store (lazy pulls) are streamed from the registry the image came
    from and verified on the way; a blob already in the target registry is skipped, and one in
    another repository of the same registry is mounted instead of uploaded.
    """
    ref = Reference.parse(reference)
    store = session.store
    record = await session.disk(find_record, store, reference)
    image: ResolvedImage = await session.disk(
        load_resolved, store, record.manifest.digest, record.index_digest
    )
    client = session.client(ref)
    source_ref = record.source
    uploaded: list[Digest] = []
    mounted: list[Digest] = []
    existed: list[Digest] = []
    blobs = [image.manifest.config, *(layer.descriptor for layer in image.layers)]

    async def one(desc: Descriptor) -> None:
        if await client.blob_size(ref.repository, desc.digest) is not None:
            existed.append(desc.digest)
            if progress:
                progress(desc.digest, "Layer already exists")
            return
        if (
            source_ref is not None
            and source_ref.registry == ref.registry
            and source_ref.repository != ref.repository
            and await client.mount_blob(ref.repository, desc.digest, source_ref.repository)
        ):
            mounted.append(desc.digest)
            if progress:
                progress(desc.digest, f"Mounted from {source_ref.familiar_name}")
            return
        await client.upload_blob(
            ref.repository, desc.digest, desc.size, lambda: _blob_source(session, record, desc)
        )
        uploaded.append(desc.digest)
        if progress:
            progress(desc.digest, "Pushed")

    limit = trio.CapacityLimiter(3)

    async def limited(desc: Descriptor) -> None:
        async with limit:
            await one(desc)

    tag_or_digest = ref.tag or str(image.manifest_digest)
    try:
        with unwrap_groups():
            async with trio.open_nursery() as nursery:
                for desc in blobs:
                    nursery.start_soon(limited, desc)
        digest = await client.put_manifest(
            ref.repository, tag_or_digest, image.manifest.raw, image.manifest.media_type
        )
    except Unauthorized as exc:
        # A push starts with reads (does the registry have this blob?), so the registry's
        # refusal may name a pull scope; the user asked to push, and must hear that.
        hint = str(exc).rpartition("; ")[2] if "; " in str(exc) else ""
        code = f" ({exc.code})" if exc.code else ""
        raise Unauthorized(
            f"{ref.registry}: unauthorized to push to {ref.repository}{code}"
            + (f"; {hint}" if hint else ""),
            host=exc.host,
            status=exc.status,
            code=exc.code,
        ) from None
    if ref.tag is not None:
        new = ImageRecord(
            manifest=record.manifest,
            name=ref.without_digest(),
            repo_digest=Reference.parse(f"{ref.name}@{digest}"),
            source=record.source,
            index_digest=record.index_digest,
            created=record.created,
            extra=record.extra,
        )
        await session.disk(put_record, store, new)
    return PushResult(ref, digest, len(image.manifest.raw), uploaded, mounted, existed)


async def _blob_source(
    session: Session, record: ImageRecord, desc: Descriptor
) -> AsyncIterator[bytes]:
    """The blob's bytes: from the store if present, else from the source registry, verified."""
    if await session.disk(session.store.blobs.has, desc.digest):
        raw = await session.disk(session.store.blobs.open, desc.digest)  # never through a link
        async with trio.wrap_file(raw) as f:
            while chunk := await f.read(1 << 20):
                yield chunk
        return
    src = record.source
    if src is None:
        raise NotFound(f"blob {desc.digest} is not local and the image has no known source")
    hasher = desc.digest.new_hasher()
    total = 0
    async for chunk in session.client(src).stream_blob(src.repository, desc.digest, desc.size):
        hasher.update(chunk)
        total += len(chunk)
        if total == desc.size and f"{desc.digest.algorithm}:{hasher.hexdigest()}" != str(
            desc.digest
        ):
            # Withhold the last bytes so the upload can never complete with wrong content.
            raise IntegrityError(f"blob {desc.digest} from {src.registry} failed verification")
        yield chunk


# -- index ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerIndexed:
    layer: Layer
    entries: int
    spans: int
    uncompressed: int
    seconds: float
    built: bool  # False when it was already in the index store


@dataclass(frozen=True)
class IndexResult:
    reference: Reference
    layers: list[LayerIndexed]
    skipped: list[Layer]  # eStargz / zstd:chunked: they carry their own TOC
    pushed: PushedIndexes | None


async def index(
    session: Session, reference: str, *, push: bool = False, platform: Platform | None = None
) -> IndexResult:
    """Build the imagefs layer index of each layer that needs one; `push` publishes them."""
    import time

    from imagefs.indexes import build_local, needs_index, push_indexes
    from imagefs.store.indexstore import IndexStore

    store = session.store
    record = await find_or_pull(session, reference, platform)
    image: ResolvedImage = await session.disk(
        load_resolved, store, record.manifest.digest, record.index_digest
    )
    source = record.source
    done: list[LayerIndexed] = []
    skipped: list[Layer] = []
    indexes = IndexStore(store.root)
    built = []
    for layer in image.layers:
        if not needs_index(layer):
            skipped.append(layer)
            continue
        # Only the layer-bound index (built here from the verified blob) is ever published:
        # never a TOC or a published index this store was handed for some image.
        existing = await session.disk(indexes.load_layer, layer.digest)
        began = time.monotonic()
        if existing is None or existing.seek is None:
            if not store.blobs.has(layer.digest):
                if source is None:
                    raise NotFound(f"layer {layer.digest.short} is not local and has no source")
                await fetch_blob(
                    session, session.client(source), source.repository, layer.descriptor
                )
            began = time.monotonic()
            existing = await trio.to_thread.run_sync(
                build_local, store.root, store.blobs.path(layer.digest), layer
            )
            was_built = True
        else:
            was_built = False
        assert existing.seek is not None
        built.append(existing)
        done.append(
            LayerIndexed(
                layer,
                len(existing.toc),
                len(existing.seek.points),
                existing.seek.uncompressed_size,
                time.monotonic() - began,
                was_built,
            )
        )
    pushed = None
    ref = record.name or record.source
    if push:
        if ref is None:
            raise NotFound(f"{reference}: no repository to push the index to")
        pushed = await push_indexes(session.client(ref), ref.repository, image, built)
    return IndexResult(ref or Reference.parse(reference), done, skipped, pushed)


# -- login / logout ---------------------------------------------------------------------------


async def login(session: Session, registry: str, username: str, password: str) -> None:
    """Check the credentials against the registry, then store them (docker's config.json)."""
    host = normalize_registry_host(registry)
    creds = credentials.Credentials(username=username, password=password)
    probe = RegistryClient(
        host,
        endpoint_host=Reference.parse(f"{host}/x").endpoint_host,
        options=session.options,
        credential_lookup=lambda _h: creds,
    )
    async with probe:
        try:
            await probe.check_login()
        except Unauthorized as exc:
            raise Unauthorized(
                f"{host}: login failed: username or password refused (unauthorized, "
                f"HTTP {exc.status or 401})",
                host=host,
                status=exc.status,
            ) from None
    await trio.to_thread.run_sync(credentials.store, host, creds)


async def logout(session: Session, registry: str) -> bool:
    host = normalize_registry_host(registry)
    erased: bool = await trio.to_thread.run_sync(credentials.erase, host)
    return erased


def normalize_registry_host(value: str) -> str:
    host = value.removeprefix("https://").removeprefix("http://").split("/", 1)[0]
    if host in ("index.docker.io", "registry-1.docker.io", "docker.io", ""):
        return "docker.io"
    return host


def read_password_interactively(prompt: str = "Password: ") -> str:
    return getpass.getpass(prompt)


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=4, ensure_ascii=False)


__all__ = [
    "ImageSummary",
    "PullResult",
    "PushResult",
    "RmiResult",
    "Session",
    "Unauthorized",
    "fetch_blob",
    "find_or_pull",
    "find_record",
    "images",
    "inspect",
    "keep_whole_blob",
    "login",
    "logout",
    "now_rfc3339",
    "prune",
    "pull",
    "push",
    "rmi",
    "tag",
]
