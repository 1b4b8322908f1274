"""OCI image layouts on disk, written by hand or with GNU tar (no imagefs code involved).

Quirk that shapes `layout_add_tar_layer`: skopeo's zstd:chunked writer re-emits the tar
stream, dropping the padding after the two zero end blocks, yet keeps the old diff_id in the
config. GNU tar pads to 10 KiB by default, hence `--blocking-factor=1`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import zstandard

from imagefs.testing.infra import InfraError, require_binary

Compression = Literal["gzip", "zstd", "zstd:chunked"]
ManifestFormat = Literal["v2s2", "oci"]
Mutation = Callable[[Path], None]
"""Changes a root filesystem in place (create, modify, delete); becomes one layer."""

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
REF_NAME = "org.opencontainers.image.ref.name"
TOOL_TIMEOUT = 300


def run_tool(args: Sequence[str], *, cwd: Path | None = None) -> str:
    """Run a producer (umoci, tar), return its stdout; InfraError with its stderr if it fails."""
    require_binary(args[0])
    proc = subprocess.run(
        list(args), cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False
    )
    if proc.returncode != 0:
        raise InfraError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


# --------------------------------------------------------------------------------------------
# OCI image layouts


@dataclass(frozen=True)
class LayoutImage:
    """A tagged image (or index) in an OCI image layout directory."""

    layout: Path
    tag: str

    @property
    def skopeo_ref(self) -> str:
        """`oci:LAYOUT:TAG`, the containers-transports name skopeo takes."""
        return f"oci:{self.layout}:{self.tag}"

    @property
    def umoci_ref(self) -> str:
        """`LAYOUT:TAG`, what umoci's `--image` takes."""
        return f"{self.layout}:{self.tag}"

    def descriptor(self) -> dict[str, Any]:
        """The index.json descriptor this tag points at."""
        for desc in read_json(self.layout / "index.json")["manifests"]:
            if desc.get("annotations", {}).get(REF_NAME) == self.tag:
                return dict(desc)
        raise InfraError(f"tag {self.tag!r} not in {self.layout}/index.json")

    @property
    def digest(self) -> str:
        return str(self.descriptor()["digest"])

    def manifest(self) -> dict[str, Any]:
        return dict(json.loads(self.blob(self.digest)))

    def config(self) -> dict[str, Any]:
        return dict(json.loads(self.blob(self.manifest()["config"]["digest"])))

    def layers(self) -> list[dict[str, Any]]:
        return list(self.manifest()["layers"])

    def blob(self, digest: str) -> bytes:
        return blob_path(self.layout, digest).read_bytes()


def read_json(path: Path) -> Any:
    return json.loads(path.read_bytes())


def blob_path(layout: Path, digest: str) -> Path:
    algo, _, hex_ = digest.partition(":")
    return layout / "blobs" / algo / hex_


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def write_blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = blob_path(layout, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.rename(path)
    return digest, len(data)


def set_tag(layout: Path, tag: str, descriptor: Mapping[str, Any]) -> None:
    index_path = layout / "index.json"
    index = read_json(index_path)
    kept = [d for d in index["manifests"] if d.get("annotations", {}).get(REF_NAME) != tag]
    desc = dict(descriptor)
    desc["annotations"] = {**desc.get("annotations", {}), REF_NAME: tag}
    index["manifests"] = [*kept, desc]
    tmp = index_path.with_name("index.json.tmp")
    tmp.write_bytes(canonical_json(index))
    tmp.rename(index_path)


def init_layout(layout: Path) -> Path:
    """An empty OCI layout at `layout` (made by umoci), unless one is already there."""
    if not (layout / "oci-layout").exists():
        layout.parent.mkdir(parents=True, exist_ok=True)
        run_tool(["umoci", "init", "--layout", str(layout)])
    return layout


# --------------------------------------------------------------------------------------------
# Layers made with GNU tar


def layout_append_layer(
    image: LayoutImage,
    tar_bytes: bytes,
    *,
    compression: Literal["gzip", "zstd"] | None = "gzip",
    tag: str | None = None,
    created_by: str = "imagefs.testing layout_append_layer",
) -> LayoutImage:
    """Append an uncompressed tar stream as a new top layer of `image`.

    Rewrites config (diff_ids, history) and manifest, writes blobs by digest, and points
    `tag` (default: the same tag) at the new manifest. Old blobs stay (harmless).
    """
    manifest = image.manifest()
    docker = manifest.get("mediaType") == DOCKER_MANIFEST
    if docker and compression == "zstd":
        raise ValueError("Docker v2s2 manifests cannot carry zstd layers")
    if compression == "gzip":
        blob = gzip.compress(tar_bytes, compresslevel=6, mtime=0)
    elif compression == "zstd":
        blob = zstandard.ZstdCompressor(level=3).compress(tar_bytes)
    else:
        blob = tar_bytes
    base = DOCKER_LAYER if docker else OCI_LAYER
    suffix = {"gzip": ".gzip" if docker else "+gzip", "zstd": "+zstd", None: ""}[compression]
    return layout_append_blob(
        image,
        blob,
        diff_id="sha256:" + hashlib.sha256(tar_bytes).hexdigest(),
        media_type=base + suffix,
        tag=tag,
        created_by=created_by,
    )


def layout_append_blob(
    image: LayoutImage,
    blob: bytes,
    *,
    diff_id: str,
    media_type: str,
    annotations: Mapping[str, str] | None = None,
    tag: str | None = None,
    created_by: str = "imagefs.testing layout_append_blob",
) -> LayoutImage:
    """Append an already compressed layer blob (e.g. eStargz) with its diff_id."""
    manifest = image.manifest()
    config = image.config()
    layer_digest, layer_size = write_blob(image.layout, blob)
    config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    config["rootfs"]["diff_ids"].append(diff_id)
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    config.setdefault("history", []).append({"created": now, "created_by": created_by})
    config_digest, config_size = write_blob(image.layout, canonical_json(config))

    manifest["config"] = {**manifest["config"], "digest": config_digest, "size": config_size}
    layer_desc: dict[str, Any] = {
        "mediaType": media_type,
        "digest": layer_digest,
        "size": layer_size,
    }
    if annotations:
        layer_desc["annotations"] = dict(annotations)
    manifest["layers"] = [*manifest["layers"], layer_desc]
    manifest_digest, manifest_size = write_blob(image.layout, canonical_json(manifest))
    media_type = manifest.get("mediaType", OCI_MANIFEST)
    new = LayoutImage(image.layout, tag or image.tag)
    set_tag(
        image.layout,
        new.tag,
        {"mediaType": media_type, "digest": manifest_digest, "size": manifest_size},
    )
    return new


def layout_add_tar_layer(
    image: LayoutImage,
    populate: Mutation | Path,
    *,
    compression: Literal["gzip", "zstd"] | None = "gzip",
    tar_args: Sequence[str] = ("--format=gnu", "--blocking-factor=1"),
    tag: str | None = None,
) -> LayoutImage:
    """Append a layer that GNU tar makes from a directory tree (not a diff: literally it).

    `populate` either fills an empty directory or is a directory to archive. Whiteouts are
    ordinary files here: create `.wh.NAME` or `.wh..wh..opq` yourself to test them. Entries
    are sorted, owned by 0:0, dated at the epoch, so the layer is reproducible.

    `--blocking-factor=1` (default) stops GNU tar padding the stream to 10 KiB: skopeo's
    zstd:chunked writer drops that padding but keeps the old diff_id, which makes an image
    whose layer no longer matches its config.
    """
    with contextlib.ExitStack() as stack:
        if isinstance(populate, Path):
            src = populate
        else:
            src = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tar-layer-")))
            populate(src)
        names = sorted(os.listdir(src))
        if not names:
            raise ValueError("an empty layer tree; give the layer at least one entry")
        require_binary("tar")
        proc = subprocess.run(
            [
                "tar",
                "--create",
                "--file=-",
                f"--directory={src}",
                "--sort=name",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "--mtime=@0",
                *tar_args,
                "--",
                *names,
            ],
            capture_output=True,
            timeout=TOOL_TIMEOUT,
            check=False,
        )
        if proc.returncode != 0:
            raise InfraError(f"GNU tar failed: {proc.stderr.decode(errors='replace')}")
    return layout_append_layer(
        image, proc.stdout, compression=compression, tag=tag, created_by="GNU tar"
    )
