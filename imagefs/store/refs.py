"""Which names point at which manifests: the OCI layout's `index.json`.

Each stored image is one descriptor in `index.json`, pointing at the *platform* manifest we
resolved (so `skopeo copy oci:ROOT:NAME` and `umoci` see an ordinary single image), with
annotations:

- `org.opencontainers.image.ref.name` and `io.containerd.image.name`: the full reference
  (`docker.io/library/alpine:latest`); absent for an image pulled by digest only;
- `dev.imagefs.repo-digest`: `name@sha256:…` as the registry resolved it (for a
  multi-platform image that is the index digest, as docker shows it);
- `dev.imagefs.source`: `registry/repository` the blobs can be fetched from later (lazy pull);
- `dev.imagefs.index`: the digest of the platform index, kept in the store too;
- `dev.imagefs.created`: when it was stored (RFC 3339, UTC).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from imagefs.errors import StoreError
from imagefs.oci.digest import Digest
from imagefs.oci.manifest import Descriptor
from imagefs.oci.reference import Reference
from imagefs.store import fsutil
from imagefs.store.layout import Layout

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
REPO_DIGEST = "dev.imagefs.repo-digest"
SOURCE = "dev.imagefs.source"
INDEX = "dev.imagefs.index"
CREATED = "dev.imagefs.created"
OCI_INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
INDEX_JSON_LIMIT = 256 << 20  # ~1 million images; more is damage, not a store


def now_rfc3339() -> str:
    """A record's `created` (and a mount record's `started`): now, RFC 3339 in UTC."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class ImageRecord:
    """One line of `index.json`: a name (or none) and the manifest it points at."""

    manifest: Descriptor
    name: Reference | None
    repo_digest: Reference | None
    source: Reference | None  # the repository (no tag) its blobs can be fetched from
    index_digest: Digest | None
    created: str
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def repository(self) -> str | None:
        ref = self.name or self.repo_digest
        return ref.name if ref else None

    def to_descriptor_json(self) -> dict[str, Any]:
        ann = dict(self.extra)
        if self.name is not None:
            ann[REF_NAME] = str(self.name)
            ann[CONTAINERD_NAME] = str(self.name)
        if self.repo_digest is not None:
            ann[REPO_DIGEST] = str(self.repo_digest)
        if self.source is not None:
            ann[SOURCE] = self.source.name
        if self.index_digest is not None:
            ann[INDEX] = str(self.index_digest)
        ann[CREATED] = self.created
        desc = replace(self.manifest, annotations=ann)
        return desc.to_json()

    @classmethod
    def from_descriptor_json(cls, obj: Any) -> ImageRecord:
        desc = Descriptor.from_json(obj)
        ann = dict(desc.annotations)
        name_s = ann.pop(REF_NAME, None)
        ann.pop(CONTAINERD_NAME, None)
        repo_digest_s = ann.pop(REPO_DIGEST, None)
        index_s = ann.pop(INDEX, None)
        source_s = ann.pop(SOURCE, None)
        return cls(
            manifest=replace(desc, annotations={}),
            name=Reference.parse(name_s) if name_s else None,
            repo_digest=Reference.parse(repo_digest_s) if repo_digest_s else None,
            source=Reference.parse(source_s, default_tag=None) if source_s else None,
            index_digest=Digest.parse(index_s) if index_s else None,
            created=ann.pop(CREATED, ""),
            extra=ann,
        )


class RefStore:
    """Reads and rewrites `index.json`. Writers hold the store lock (see `Store.locked`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = Layout(root).index_json

    def exists(self) -> bool:
        return fsutil.lstat(self.path, root=self.root) is not None

    def load(self) -> list[ImageRecord]:
        raw = fsutil.read_bytes(self.path, root=self.root, limit=INDEX_JSON_LIMIT)
        if raw is None:
            return []
        try:
            obj = json.loads(raw)
            return [ImageRecord.from_descriptor_json(m) for m in obj.get("manifests", [])]
        except Exception as exc:
            raise StoreError(f"{self.path} is corrupt ({exc}); run `imagefs check`") from None

    def save(self, records: list[ImageRecord]) -> None:
        obj = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX_MEDIA_TYPE,
            "manifests": [r.to_descriptor_json() for r in records],
        }
        fsutil.atomic_write(self.path, json.dumps(obj, indent=2).encode() + b"\n", root=self.root)
