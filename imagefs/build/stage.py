"""The state of one stage while it is built: config, layers, history, the stack of uppers."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from imagefs.build.config import DEFAULT_SHELL
from imagefs.build.layerdiff import LayerBlob
from imagefs.oci import mediatypes as mt
from imagefs.oci.manifest import Descriptor
from imagefs.oci.reference import Reference

BUILDKIT_COMMENT = "buildkit.dockerfile.v0"
# The same bytes under the OCI name: an OCI manifest may not list docker media types.
_TO_OCI = {
    mt.DOCKER_LAYER_GZIP: mt.OCI_LAYER_GZIP,
    mt.DOCKER_LAYER: mt.OCI_LAYER,
    mt.DOCKER_LAYER_ZSTD: mt.OCI_LAYER_ZSTD,
    mt.DOCKER_FOREIGN_LAYER_GZIP: mt.OCI_LAYER_NONDISTRIBUTABLE_GZIP,
    mt.DOCKER_FOREIGN_LAYER: mt.OCI_LAYER_NONDISTRIBUTABLE,
}


def rfc3339(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class StageState:
    label: str
    image: dict[str, Any]
    """The full image config JSON (architecture, os, config, rootfs, history...)."""
    base_root: Path
    """The base's root: an imagefs FUSE mount, or an empty directory for scratch."""
    source: Reference | None  # where the base image's blobs come from (ImageRecord.source)
    """registry/repository the base layers can be fetched from (None: scratch)."""
    key: str
    created: str
    base_ref: str | None = None
    """The base image while it is not mounted yet (then `base_root` is a placeholder)."""
    layers: list[Descriptor] = field(default_factory=list)
    uppers: list[Path] = field(default_factory=list)
    """Upper dirs of this stage's (and its parent stages') steps, bottom first."""
    args: dict[str, str] = field(default_factory=dict)
    """Build args declared in the stage (visible to RUN and expansion, not in the config)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """`cmd_set`, `shell`, `author` (see config.apply)."""
    pending_workdir: bool = False

    @property
    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = self.image.setdefault("config", {})
        return cfg

    @property
    def shell(self) -> list[str]:
        shell: list[str] = self.meta.get("shell") or list(self.config.get("Shell") or DEFAULT_SHELL)
        return shell

    def lowers(self) -> list[Path]:
        """overlayfs lowerdir order: topmost first, the base last."""
        return [*reversed(self.uppers), self.base_root]

    def add_history(self, created_by: str, *, empty: bool) -> None:
        entry: dict[str, Any] = {
            "created": self.created,
            "created_by": created_by,
            "comment": BUILDKIT_COMMENT,
        }
        if empty:
            entry["empty_layer"] = True
        self.image.setdefault("history", []).append(entry)

    def add_layer(self, upper: Path, layer: LayerBlob | None, created_by: str) -> None:
        self.uppers.append(upper)
        self.add_history(created_by, empty=layer is None)
        if layer is not None:
            desc = Descriptor(mt.OCI_LAYER_GZIP, layer.digest, layer.size)
            self.layers.append(replace(desc, annotations=layer.annotations))
            self.image["rootfs"]["diff_ids"].append(str(layer.diff_id))

    def final_config(self) -> bytes:
        image = dict(self.image)
        image["created"] = self.created
        if self.meta.get("author"):
            image["author"] = self.meta["author"]
        cfg = {k: v for k, v in self.config.items() if v not in (None, {}, [])}
        image["config"] = cfg
        for legacy in ("container", "container_config", "docker_version", "id", "parent"):
            image.pop(legacy, None)
        return json.dumps(image, separators=(",", ":")).encode()

    def manifest(self, config: Descriptor) -> bytes:
        obj = {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "config": {
                "mediaType": mt.OCI_CONFIG,
                "digest": str(config.digest),
                "size": config.size,
            },
            # Annotations kept: an eStargz/zstd:chunked base layer needs its TOC digest.
            "layers": [
                {**d.to_json(), "mediaType": _TO_OCI.get(d.media_type, d.media_type)}
                for d in self.layers
            ],
        }
        return json.dumps(obj, separators=(",", ":")).encode()
