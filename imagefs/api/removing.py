"""Names and removal: `tag`, `rmi` (untag; delete what only that image used), `prune`, and
the sweep of derived data (indexes, flattened layers) of layers no image uses."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

from imagefs.errors import ImageFSError, ImageInUse, InvalidReference, NotFound
from imagefs.oci.digest import Digest
from imagefs.oci.reference import Reference
from imagefs.session import Session
from imagefs.store import ImageRecord, Store, fsutil
from imagefs.store.lookup import find_record, find_records, is_dangling, load_resolved, put_record
from imagefs.store.refs import now_rfc3339


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
