"""Real images made by tools that are not imagefs: umoci, GNU tar and skopeo.

Why independent producers: an image imagefs wrote itself can only confirm that imagefs agrees
with imagefs. umoci writes PAX layers with per-file whiteouts, GNU tar writes GNU-format
entries (and whatever odd names we hand it, such as `.wh..wh..opq`), skopeo re-compresses to
zstd / zstd:chunked and converts to Docker v2s2 -- the variety real registries serve.

Everything here is synchronous (subprocesses and files); async tests call it from fixtures
or through `trio.to_thread.run_sync`. This module builds with umoci and holds the sample
image; OCI layouts and GNU tar layers are `imagefs.testing.layout`, skopeo pushes and pulls
`imagefs.testing.skopeo` (all re-exported here).

umoci quirks (they shape the code below):

* `umoci unpack` needs a bundle path that does not exist yet; `repack --refresh-bundle`
  lets one bundle serve several layers in a row. umoci writes a `./` root entry in each
  layer and whiteouts as mode-0 files dated 1970.
* umoci's `config --config.cmd/--config.entrypoint` take one argument per flag, repeated.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagefs.testing.infra import InfraError
from imagefs.testing.layout import (
    OCI_INDEX,
    Compression,
    LayoutImage,
    ManifestFormat,
    Mutation,
    canonical_json,
    init_layout,
    layout_add_tar_layer,
    layout_append_blob,
    layout_append_layer,
    run_tool,
    set_tag,
    write_blob,
)
from imagefs.testing.registry import LocalRegistry
from imagefs.testing.skopeo import (
    PushedImage,
    SkopeoError,
    pull_to_layout,
    push,
    registry_args,
    run_skopeo,
    skopeo_copy,
    skopeo_inspect,
)

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
    "layout_append_blob",
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
    run_tool(args)
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
    run_tool(["umoci", "new", "--image", f"{layout}:{tag}"])
    image = LayoutImage(layout, tag)
    with tempfile.TemporaryDirectory(prefix="umoci-bundle-", dir=layout.parent) as tmp:
        bundle = Path(tmp) / "bundle"  # umoci wants to create the bundle directory itself
        run_tool(["umoci", "unpack", "--image", image.umoci_ref, str(bundle)])
        for i, mutate in enumerate(layers):
            mutate(bundle / "rootfs")
            run_tool(
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
    run_tool(["umoci", "unpack", "--image", image.umoci_ref, str(bundle)])
    return bundle / "rootfs"


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
    digest, size = write_blob(layout, canonical_json(index))
    set_tag(layout, "index", {"mediaType": OCI_INDEX, "digest": digest, "size": size})
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
