"""Real images made by tools that are not imagefs: umoci, GNU tar and skopeo.

Why independent producers: an image imagefs wrote itself can only confirm that imagefs agrees
with imagefs. umoci writes PAX layers with per-file whiteouts, GNU tar writes GNU-format
entries (and whatever odd names we hand it, such as `.wh..wh..opq`), skopeo re-compresses to
zstd / zstd:chunked and converts to Docker v2s2 -- the variety real registries serve.

Everything here is synchronous (subprocesses and files); async tests call it from fixtures
or through `trio.to_thread.run_sync`.

Quirks learned the hard way (they shape the code below):

* skopeo (containers/image 5.23) keeps a blob-info cache under /var/lib/containers/cache
  for root. When pushing with `--dest-compress-format`, a gzip blob of the same layer that
  the cache knows is already in the registry (any repository) is cross-mounted instead of
  recompressing, so the "zstd" push silently stays gzip. `push()` therefore converts into
  a fresh `dir:` copy first and pushes that with `--preserve-digests`, which forbids any
  substitution. (`dir:`, not `oci:`: an OCI layout destination accepts a v2s2 manifest but
  then cannot find it by tag.)
* `umoci unpack` needs a bundle path that does not exist yet; `repack --refresh-bundle`
  lets one bundle serve several layers in a row. umoci writes a `./` root entry in each
  layer and whiteouts as mode-0 files dated 1970.
* umoci's `config --config.cmd/--config.entrypoint` take one argument per flag, repeated.
* skopeo's zstd:chunked writer re-emits the tar stream: trailing padding after the two zero
  end blocks is dropped, yet the config keeps the old diff_id. GNU tar pads to 10 KiB by
  default, hence `--blocking-factor=1` in `layout_add_tar_layer`.
* The `dir:` transport keeps layer compression unless `--dest-compress` is given, and an
  `oci:` destination stores a v2s2 manifest it then cannot resolve by tag.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import hashlib
import json
import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import zstandard

from imagefs.testing.registry import InfraError, LocalRegistry, require_binary

__all__ = [
    "Compression",
    "LayoutImage",
    "ManifestFormat",
    "PlatformImage",
    "PushedImage",
    "PushedIndex",
    "SampleImage",
    "SkopeoError",
    "build_umoci_image",
    "init_layout",
    "layout_add_tar_layer",
    "layout_append_layer",
    "pull_to_layout",
    "push",
    "push_multiplatform",
    "registry_args",
    "run_skopeo",
    "skopeo_copy",
    "skopeo_inspect",
    "small_sample_image",
    "umoci_config",
    "umoci_unpack",
]

Compression = Literal["gzip", "zstd", "zstd:chunked"]
ManifestFormat = Literal["v2s2", "oci"]
Mutation = Callable[[Path], None]
"""Changes a root filesystem in place (create, modify, delete); becomes one layer."""

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
_REF_NAME = "org.opencontainers.image.ref.name"
_TIMEOUT = 300


class SkopeoError(InfraError):
    """skopeo failed; `stderr` holds its reason (tests match "401", "unauthorized" ...)."""

    def __init__(self, args: Sequence[str], returncode: int, stderr: str) -> None:
        super().__init__(f"skopeo {' '.join(args[1:3])} ... exited {returncode}: {stderr.strip()}")
        self.returncode = returncode
        self.stderr = stderr


def _run(args: Sequence[str], *, cwd: Path | None = None) -> str:
    require_binary(args[0])
    proc = subprocess.run(
        list(args), cwd=cwd, capture_output=True, text=True, timeout=_TIMEOUT, check=False
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
        for desc in _read_json(self.layout / "index.json")["manifests"]:
            if desc.get("annotations", {}).get(_REF_NAME) == self.tag:
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
        return _blob_path(self.layout, digest).read_bytes()


def _read_json(path: Path) -> Any:
    return json.loads(path.read_bytes())


def _blob_path(layout: Path, digest: str) -> Path:
    algo, _, hex_ = digest.partition(":")
    return layout / "blobs" / algo / hex_


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _write_blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = _blob_path(layout, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.rename(path)
    return digest, len(data)


def _set_tag(layout: Path, tag: str, descriptor: Mapping[str, Any]) -> None:
    index_path = layout / "index.json"
    index = _read_json(index_path)
    kept = [d for d in index["manifests"] if d.get("annotations", {}).get(_REF_NAME) != tag]
    desc = dict(descriptor)
    desc["annotations"] = {**desc.get("annotations", {}), _REF_NAME: tag}
    index["manifests"] = [*kept, desc]
    tmp = index_path.with_name("index.json.tmp")
    tmp.write_bytes(_canonical(index))
    tmp.rename(index_path)


def init_layout(layout: Path) -> Path:
    """An empty OCI layout at `layout` (made by umoci), unless one is already there."""
    if not (layout / "oci-layout").exists():
        layout.parent.mkdir(parents=True, exist_ok=True)
        _run(["umoci", "init", "--layout", str(layout)])
    return layout


# --------------------------------------------------------------------------------------------
# umoci


def umoci_config(
    image: LayoutImage,
    *,
    env: Sequence[str] = (),
    cmd: Sequence[str] | None = None,
    entrypoint: Sequence[str] | None = None,
    working_dir: str | None = None,
    user: str | None = None,
    labels: Mapping[str, str] | None = None,
    author: str | None = None,
    architecture: str | None = None,
    os_name: str | None = None,
    created: str | None = None,
) -> LayoutImage:
    """Edit the image config in place with `umoci config` (adds an empty_layer history)."""
    args = ["umoci", "config", "--image", image.umoci_ref]
    args += [f"--config.env={e}" for e in env]
    if cmd is not None:
        args += ["--clear=config.cmd", *(f"--config.cmd={c}" for c in cmd)]
    if entrypoint is not None:
        args += ["--clear=config.entrypoint", *(f"--config.entrypoint={c}" for c in entrypoint)]
    if working_dir is not None:
        args.append(f"--config.workingdir={working_dir}")
    if user is not None:
        args.append(f"--config.user={user}")
    args += [f"--config.label={k}={v}" for k, v in (labels or {}).items()]
    if author is not None:
        args.append(f"--author={author}")
    if architecture is not None:
        args.append(f"--architecture={architecture}")
    if os_name is not None:
        args.append(f"--os={os_name}")
    if created is not None:
        args.append(f"--created={created}")
    _run(args)
    return image


def build_umoci_image(
    layout: Path,
    layers: Sequence[Mutation],
    *,
    tag: str = "latest",
    env: Sequence[str] = (),
    cmd: Sequence[str] | None = None,
    entrypoint: Sequence[str] | None = None,
    working_dir: str | None = None,
    labels: Mapping[str, str] | None = None,
    author: str | None = None,
    architecture: str | None = None,
    os_name: str | None = None,
) -> LayoutImage:
    """Build `layout:tag` with umoci: one layer per mutation of the rootfs, in order.

    Each mutation sees the rootfs as the layers below left it; deleting a file there makes
    umoci write a `.wh.NAME` whiteout in that layer. Config options are applied at the end
    (`umoci config`), which adds no layer.
    """
    init_layout(layout)
    _run(["umoci", "new", "--image", f"{layout}:{tag}"])
    image = LayoutImage(layout, tag)
    with tempfile.TemporaryDirectory(prefix="umoci-bundle-", dir=layout.parent) as tmp:
        bundle = Path(tmp) / "bundle"  # umoci wants to create the bundle directory itself
        _run(["umoci", "unpack", "--image", image.umoci_ref, str(bundle)])
        for i, mutate in enumerate(layers):
            mutate(bundle / "rootfs")
            _run(
                [
                    "umoci",
                    "repack",
                    "--refresh-bundle",
                    f"--history.created_by=imagefs.testing layer {i}",
                    "--image",
                    image.umoci_ref,
                    str(bundle),
                ]
            )
    if env or cmd is not None or entrypoint is not None or working_dir is not None or labels:
        umoci_config(
            image,
            env=env,
            cmd=cmd,
            entrypoint=entrypoint,
            working_dir=working_dir,
            labels=labels,
            author=author,
            architecture=architecture,
            os_name=os_name,
        )
    elif author is not None or architecture is not None or os_name is not None:
        umoci_config(image, author=author, architecture=architecture, os_name=os_name)
    return image


def umoci_unpack(image: LayoutImage, bundle: Path) -> Path:
    """The reference extraction of `image` (umoci applies whiteouts); returns the rootfs.

    `bundle` must not exist yet. umoci 0.4.7 reads gzip and uncompressed layers only, so
    unpack zstd images from the gzip layout they were made from.
    """
    _run(["umoci", "unpack", "--image", image.umoci_ref, str(bundle)])
    return bundle / "rootfs"


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
    base = _DOCKER_LAYER if docker else _OCI_LAYER
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
    layer_digest, layer_size = _write_blob(image.layout, blob)
    config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    config["rootfs"]["diff_ids"].append(diff_id)
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    config.setdefault("history", []).append({"created": now, "created_by": created_by})
    config_digest, config_size = _write_blob(image.layout, _canonical(config))

    manifest["config"] = {**manifest["config"], "digest": config_digest, "size": config_size}
    layer_desc: dict[str, Any] = {
        "mediaType": media_type,
        "digest": layer_digest,
        "size": layer_size,
    }
    if annotations:
        layer_desc["annotations"] = dict(annotations)
    manifest["layers"] = [*manifest["layers"], layer_desc]
    manifest_digest, manifest_size = _write_blob(image.layout, _canonical(manifest))
    media_type = manifest.get("mediaType", OCI_MANIFEST)
    new = LayoutImage(image.layout, tag or image.tag)
    _set_tag(
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
            timeout=_TIMEOUT,
            check=False,
        )
        if proc.returncode != 0:
            raise InfraError(f"GNU tar failed: {proc.stderr.decode(errors='replace')}")
    return layout_append_layer(
        image, proc.stdout, compression=compression, tag=tag, created_by="GNU tar"
    )


# --------------------------------------------------------------------------------------------
# skopeo


def run_skopeo(args: Sequence[str]) -> str:
    """Run `skopeo ARGS` (with `--insecure-policy`) and return stdout; SkopeoError on failure.

    `--insecure-policy` spares us /etc/containers/policy.json, which a minimal machine may
    lack; we never verify signatures in tests anyway.
    """
    full = [require_binary("skopeo"), "--insecure-policy", *args]
    proc = subprocess.run(full, capture_output=True, text=True, timeout=_TIMEOUT, check=False)
    if proc.returncode != 0:
        raise SkopeoError(full, proc.returncode, proc.stderr)
    return proc.stdout


def registry_args(
    registry: LocalRegistry,
    side: Literal["src", "dest", ""],
    *,
    creds: tuple[str, str] | None = None,
    anonymous: bool = False,
) -> list[str]:
    """skopeo flags to reach `registry`: TLS trust and credentials for one side of a copy.

    `side=""` gives the flags of `skopeo inspect`. Without `creds` the registry's first
    user is used when it has users, unless `anonymous`. We always say something about
    credentials so a ~/.docker/config.json left by another test never leaks in.
    """
    p = f"--{side}-" if side else "--"
    out = [f"{p}cert-dir={registry.cert_dir}"] if registry.tls else [f"{p}tls-verify=false"]
    if creds is None and registry.users and not anonymous:
        creds = registry.credentials()
    if creds is not None and not anonymous:
        out.append(f"{p}creds={creds[0]}:{creds[1]}")
    else:
        out.append(f"{p}no-creds")
    return out


def skopeo_copy(src: str, dst: str, extra_args: Sequence[str] = ()) -> None:
    """`skopeo copy` between any two transports; add `registry_args(...)` for registries."""
    run_skopeo(["copy", "--quiet", "--retry-times=0", *extra_args, src, dst])


def skopeo_inspect(
    registry: LocalRegistry,
    repo_ref: str,
    *,
    raw: bool = False,
    config: bool = False,
    creds: tuple[str, str] | None = None,
    anonymous: bool = False,
) -> Any:
    """Parsed `skopeo inspect [--raw] [--config] docker://HOST/REPO_REF`.

    `raw` gives the manifest (or index) exactly as stored; without `--raw` skopeo picks
    the linux/amd64 image of an index and summarises it.
    """
    args = ["inspect", "--retry-times=0"]
    if raw:
        args.append("--raw")
    if config:
        args.append("--config")
    args += registry_args(registry, "", creds=creds, anonymous=anonymous)
    return json.loads(run_skopeo([*args, f"docker://{registry.host}/{repo_ref}"]))


@dataclass(frozen=True)
class PushedImage:
    """Where an image landed in a registry."""

    host: str
    repository: str
    tag: str
    digest: str
    """Manifest digest as the registry stores it (skopeo's --digestfile)."""

    @property
    def ref(self) -> str:
        """`127.0.0.1:PORT/repo:tag`."""
        return f"{self.host}/{self.repository}:{self.tag}"

    @property
    def digest_ref(self) -> str:
        """`127.0.0.1:PORT/repo@sha256:...`."""
        return f"{self.host}/{self.repository}@{self.digest}"

    @property
    def repo_tag(self) -> str:
        return f"{self.repository}:{self.tag}"


def _split_repo_tag(repo_tag: str) -> tuple[str, str]:
    repo, sep, tag = repo_tag.rpartition(":")
    if not sep or "/" in tag:
        return repo_tag, "latest"
    return repo, tag


def push(
    image: LayoutImage | str,
    registry: LocalRegistry,
    repo_tag: str,
    *,
    format: ManifestFormat | None = None,
    compression: Compression | None = None,
    creds: tuple[str, str] | None = None,
    anonymous: bool = False,
    all_images: bool = False,
    extra_args: Sequence[str] = (),
) -> PushedImage:
    """Push `image` (a LayoutImage or any skopeo source string) to `registry/repo_tag`.

    With `format` or `compression` the image is first converted into a fresh temporary `dir:`
    copy, then pushed byte for byte with `--preserve-digests` (see the module docstring:
    otherwise skopeo may cross-mount an old gzip blob instead of the zstd one you asked for).
    `zstd` / `zstd:chunked` need `format` None or "oci".
    """
    if format == "v2s2" and compression in ("zstd", "zstd:chunked"):
        raise ValueError("Docker v2s2 manifests cannot carry zstd layers")
    src = image.skopeo_ref if isinstance(image, LayoutImage) else image
    repository, tag = _split_repo_tag(repo_tag)
    all_flag = ["--all"] if all_images else []
    with tempfile.TemporaryDirectory(prefix="skopeo-push-") as tmp:
        if format is not None or compression is not None:
            conv = ["--format", format] if format is not None else []
            if compression is not None:
                # The dir: transport keeps layers as they are unless told --dest-compress.
                conv += ["--dest-compress", "--dest-compress-format", compression]
            converted = f"dir:{tmp}/converted"
            skopeo_copy(src, converted, [*all_flag, *conv])
            src = converted
        digest_file = Path(tmp) / "digest"
        skopeo_copy(
            src,
            f"docker://{registry.host}/{repository}:{tag}",
            [
                *all_flag,
                "--preserve-digests",
                f"--digestfile={digest_file}",
                *registry_args(registry, "dest", creds=creds, anonymous=anonymous),
                *extra_args,
            ],
        )
        digest = digest_file.read_text().strip()
    return PushedImage(registry.host, repository, tag, digest)


def pull_to_layout(
    registry: LocalRegistry,
    repo_ref: str,
    layout: Path,
    *,
    tag: str = "latest",
    creds: tuple[str, str] | None = None,
) -> LayoutImage:
    """Copy `registry/repo_ref` into an OCI layout (e.g. to `umoci_unpack` it as reference)."""
    skopeo_copy(
        f"docker://{registry.host}/{repo_ref}",
        f"oci:{layout}:{tag}",
        registry_args(registry, "src", creds=creds),
    )
    return LayoutImage(layout, tag)


# --------------------------------------------------------------------------------------------
# Multi-platform index


@dataclass(frozen=True)
class PlatformImage:
    """One platform's image inside a pushed index."""

    os: str
    architecture: str
    digest: str
    files: Mapping[str, bytes]
    """Files (path relative to /, no leading slash) that differ per platform."""


@dataclass(frozen=True)
class PushedIndex:
    """A multi-platform OCI image index in the registry."""

    image: PushedImage
    """Tag and digest of the index itself."""
    platforms: tuple[PlatformImage, ...]


def push_multiplatform(
    workdir: Path,
    registry: LocalRegistry,
    repo_tag: str,
    *,
    platforms: Sequence[tuple[str, str]] = (("linux", "amd64"), ("linux", "arm64")),
    creds: tuple[str, str] | None = None,
) -> PushedIndex:
    """Build one umoci image per (os, architecture), tie them in an OCI index, push it all.

    Each platform's image holds `etc/platform` = "OS/ARCH\\n" plus a shared `etc/common`.
    The index is written into the same OCI layout (skopeo resolves a layout tag that points
    at an index) and pushed with `skopeo copy --all`, children first, so the registry
    receives exactly our index bytes.
    """
    layout = init_layout(workdir / "multiplatform-layout")
    entries: list[dict[str, Any]] = []
    built: list[PlatformImage] = []
    for os_name, arch in platforms:
        files = {"etc/platform": f"{os_name}/{arch}\n".encode(), "etc/common": b"shared\n"}

        def populate(rootfs: Path, files: Mapping[str, bytes] = files) -> None:
            _write_files(rootfs, files)

        image = build_umoci_image(
            layout,
            [populate],
            tag=f"{os_name}-{arch}",
            architecture=arch,
            os_name=os_name,
            cmd=["/bin/true"],
        )
        desc = image.descriptor()
        desc.pop("annotations", None)
        desc["platform"] = {"architecture": arch, "os": os_name}
        entries.append(desc)
        built.append(PlatformImage(os_name, arch, str(desc["digest"]), files))
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    digest, size = _write_blob(layout, _canonical(index))
    _set_tag(layout, "index", {"mediaType": OCI_INDEX, "digest": digest, "size": size})
    pushed = push(LayoutImage(layout, "index"), registry, repo_tag, creds=creds, all_images=True)
    if pushed.digest != digest:
        raise InfraError(f"registry stored index {pushed.digest}, we wrote {digest}")
    return PushedIndex(pushed, tuple(built))


# --------------------------------------------------------------------------------------------
# The small sample image


@dataclass(frozen=True)
class SampleImage:
    """A pushed 3-layer sample image and what a correct extraction of it contains."""

    pushed: PushedImage
    layout: LayoutImage
    """The gzip OCI layout it was pushed from (umoci_unpack it for a reference tree)."""
    files: Mapping[str, bytes]
    """Regular files of the final tree: path relative to / (no leading slash) -> content."""
    executables: frozenset[str]
    """Paths in `files` with mode 0755 (the rest are 0644)."""
    symlinks: Mapping[str, str]
    """Symlink path -> target, as stored."""
    dirs: frozenset[str]
    """Directories that must exist (including empty ones)."""
    absent: frozenset[str]
    """Paths deleted by a whiteout (`.wh.`) or hidden by an opaque dir (`.wh..wh..opq`)."""
    env: tuple[str, ...]
    cmd: tuple[str, ...]
    working_dir: str
    labels: Mapping[str, str]
    layer_count: int = field(default=3)

    @property
    def ref(self) -> str:
        return self.pushed.ref

    @property
    def digest(self) -> str:
        return self.pushed.digest


def _write_files(rootfs: Path, files: Mapping[str, bytes], mode: int = 0o644) -> None:
    for rel, content in files.items():
        path = rootfs / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(mode)


def sample_big_file(size: int = 300_000, seed: int = 1) -> bytes:
    """Deterministic incompressible bytes (so Range reads of a layer have something to do)."""
    return random.Random(seed).randbytes(size)


def small_sample_image(
    workdir: Path,
    registry: LocalRegistry,
    repo_tag: str = "sample/small:v1",
    *,
    format: ManifestFormat | None = None,
    compression: Compression | None = None,
    creds: tuple[str, str] | None = None,
) -> SampleImage:
    """Build and push a small 3-layer image covering the overlay basics.

    layer 0 (umoci): etc/hello.txt, etc/removed.txt, opt/app/old.txt, a 300 kB random file,
                     an empty dir var/empty;
    layer 1 (umoci): rewrites etc/hello.txt, deletes etc/removed.txt (-> `.wh.removed.txt`),
                     adds symlink usr/bin/hello -> ../../etc/hello.txt and an executable;
    layer 2 (GNU tar): opt/app/.wh..wh..opq + opt/app/new.txt (hides opt/app/old.txt).
    Config: Env, Cmd, WorkingDir, a label.
    """
    layout = workdir / "sample-layout"
    big = sample_big_file()

    def layer0(rootfs: Path) -> None:
        _write_files(
            rootfs,
            {
                "etc/hello.txt": b"hello from layer 0\n",
                "etc/removed.txt": b"deleted in layer 1\n",
                "opt/app/old.txt": b"hidden by an opaque whiteout in layer 2\n",
                "usr/share/sample/big.bin": big,
            },
        )
        (rootfs / "var/empty").mkdir(parents=True)

    def layer1(rootfs: Path) -> None:
        (rootfs / "etc/hello.txt").write_bytes(b"hello from layer 1\n")
        (rootfs / "etc/removed.txt").unlink()
        (rootfs / "usr/bin").mkdir(parents=True)
        (rootfs / "usr/bin/hello").symlink_to("../../etc/hello.txt")
        _write_files(rootfs, {"usr/bin/tool": b"#!/bin/sh\necho tool\n"}, mode=0o755)

    def layer2(root: Path) -> None:
        _write_files(root, {"opt/app/.wh..wh..opq": b"", "opt/app/new.txt": b"new app\n"})
        for d in (root / "opt", root / "opt/app"):
            d.chmod(0o755)

    env = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "GREETING=hi")
    cmd = ("/usr/bin/tool",)
    labels = {"org.opencontainers.image.title": "imagefs sample"}
    image = build_umoci_image(
        layout,
        [layer0, layer1],
        tag="sample",
        env=env,
        cmd=cmd,
        working_dir="/opt/app",
        labels=labels,
        author="imagefs.testing",
    )
    image = layout_add_tar_layer(image, layer2)
    pushed = push(image, registry, repo_tag, format=format, compression=compression, creds=creds)
    return SampleImage(
        pushed=pushed,
        layout=image,
        files={
            "etc/hello.txt": b"hello from layer 1\n",
            "usr/share/sample/big.bin": big,
            "usr/bin/tool": b"#!/bin/sh\necho tool\n",
            "opt/app/new.txt": b"new app\n",
        },
        executables=frozenset({"usr/bin/tool"}),
        symlinks={"usr/bin/hello": "../../etc/hello.txt"},
        dirs=frozenset({"etc", "opt", "opt/app", "usr", "usr/bin", "usr/share", "var/empty"}),
        absent=frozenset({"etc/removed.txt", "opt/app/old.txt"}),
        env=env,
        cmd=cmd,
        working_dir="/opt/app",
        labels=labels,
    )


@contextlib.contextmanager
def scratch_dir(prefix: str = "imagefs-") -> Iterator[Path]:
    """A temporary directory removed afterwards (for tools/ scripts without pytest)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
