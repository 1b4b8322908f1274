"""`imagefs inspect`: docker inspect's keys, plus an `ImageFS` object with what docker cannot
know (manifest, source, per-layer cached bytes)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from imagefs.api.listing import image_summary, layer_cached_bytes, thaw
from imagefs.session import Session
from imagefs.store import ImageRecord, Store
from imagefs.store.lookup import find_record


def inspect_json(store: Store, record: ImageRecord) -> dict[str, Any]:
    """docker inspect's keys, plus an `ImageFS` object with what docker cannot know."""
    s = image_summary(store, record)
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


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=4, ensure_ascii=False)
