"""The benchmark image: a recipe of layers, built once with umoci and cached, plus a catalog.

A recipe is a list of layers; each layer copies a Debian minbase root (made by `debootstrap`)
or trees of this machine's `/usr` into the root filesystem, or deletes paths (umoci writes
whiteouts for those). umoci packs each layer as gzip, the way most registries serve images.

The built layout is cached under the bench work dir keyed by the recipe, so reruns skip the
build. Beside it sits `catalog.json`: the regular files (path, size) of the merged tree and
of each layer alone, which the workloads draw their files from (the largest file, the random
small files) without walking a mount first and warming its caches.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.convert import converted_tag, estargz_layout
from bench.util import BenchError, log, remove_tree, run
from imagefs.testing.images import (
    Compression,
    LayoutImage,
    PushedImage,
    build_umoci_image,
    push,
    scratch_dir,
)
from imagefs.testing.registry import LocalRegistry

DEBOOTSTRAP = "debootstrap:bookworm-minbase"
DEBOOTSTRAP_PYTHON = "debootstrap:bookworm-minbase+python3"
"""A minbase root with python3 installed: copied over DEBOOTSTRAP, its diff is one layer."""
DEBIAN_MIRROR = "http://deb.debian.org/debian"


@dataclass(frozen=True)
class LayerSpec:
    """One layer: copy `sources` (absolute host paths, or DEBOOTSTRAP), then `delete`."""

    name: str
    sources: tuple[str, ...] = ()
    delete: tuple[str, ...] = ()


@dataclass(frozen=True)
class Recipe:
    name: str
    layers: tuple[LayerSpec, ...]

    def key(self) -> str:
        """Changes when the recipe (or which of its host paths exist) changes."""
        present = [
            (s, os.path.exists(s)) for layer in self.layers for s in layer.sources if s[0] == "/"
        ]
        text = json.dumps([repr(self.layers), present])
        return hashlib.sha256(text.encode()).hexdigest()[:12]


FULL = Recipe(
    "debian-usr",
    (
        LayerSpec("debian bookworm minbase (debootstrap)", (DEBOOTSTRAP,)),
        LayerSpec(
            "/usr/share subset",
            tuple(
                f"/usr/share/{d}"
                for d in (
                    "man",
                    "icons",
                    "vim",
                    "perl",
                    "cmake-3.25",
                    "i18n",
                    "mime",
                    "zoneinfo",
                    "X11",
                    "tcltk",
                )
            ),
        ),
        LayerSpec(
            "/usr/lib subset",
            (
                "/usr/lib/python3.11",
                "/usr/lib/python3",
                "/usr/lib/node_modules",
                "/usr/lib/git-core",
                "/usr/lib/gcc/x86_64-linux-gnu/12/cc1plus",
            ),
        ),
        LayerSpec(
            "clean-up (whiteouts)",
            delete=("usr/share/doc", "usr/share/man/man3", "usr/lib/python3.11/test"),
        ),
    ),
)

LAZY = Recipe(
    "debian-py",
    (
        LayerSpec("debian bookworm minbase (debootstrap)", (DEBOOTSTRAP,)),
        LayerSpec(
            "python3 (apt, as debootstrap --include=python3 installs it)", (DEBOOTSTRAP_PYTHON,)
        ),
        LayerSpec(
            "/usr/share subset",
            tuple(f"/usr/share/{d}" for d in ("vim", "perl", "i18n", "mime", "zoneinfo")),
        ),
        LayerSpec(
            "/usr/lib subset",
            (
                "/usr/lib/git-core",
                "/usr/lib/node_modules",
                "/usr/lib/gcc/x86_64-linux-gnu/12/cc1plus",
            ),
        ),
        LayerSpec("clean-up (whiteouts)", delete=("usr/share/doc", "usr/share/vim/vim90/doc")),
    ),
)
"""The lazy-loading experiments' image: ~300 MB in 5 layers, a Debian that runs python3."""

QUICK = Recipe(
    "quick",
    (
        LayerSpec("/usr/share bits", ("/usr/share/zoneinfo", "/usr/share/perl")),
        LayerSpec("python stdlib", ("/usr/lib/python3.11",)),
        LayerSpec("clean-up (whiteouts)", delete=("usr/lib/python3.11/test",)),
    ),
)


@dataclass
class FileList:
    """Regular files of one view of the image (the merged tree, or one layer on its own)."""

    files: list[tuple[str, int]]
    entries: int
    """Every entry, directories and links included (what `find` prints, less the root)."""

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.files)

    def largest(self) -> tuple[str, int]:
        return max(self.files, key=lambda f: (f[1], f[0]))

    def to_json(self) -> dict[str, Any]:
        return {"files": self.files, "entries": self.entries}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> FileList:
        return cls([(str(p), int(s)) for p, s in obj["files"]], int(obj["entries"]))


@dataclass
class LayerInfo:
    digest: str
    size: int
    """Compressed bytes."""
    media_type: str
    name: str
    catalog: FileList

    def blob(self, layout: Path) -> Path:
        return layout / "blobs" / "sha256" / self.digest.split(":", 1)[1]


@dataclass
class BuiltImage:
    recipe: Recipe
    image: LayoutImage
    merged: FileList
    layers: list[LayerInfo] = field(default_factory=list)

    @property
    def compressed_bytes(self) -> int:
        return sum(layer.size for layer in self.layers)

    def biggest_layer(self) -> int:
        return max(range(len(self.layers)), key=lambda i: self.layers[i].size)

    def view(self, name: str) -> FileList:
        """`merged` or `layer:N`."""
        if name == "merged":
            return self.merged
        if name.startswith("layer:"):
            return self.layers[int(name.split(":", 1)[1])].catalog
        raise ValueError(f"unknown view {name!r}")


# --------------------------------------------------------------------------------------------
# building


def debootstrap_root(cache: Path, include: tuple[str, ...] = ()) -> Path:
    """A Debian bookworm minbase root (plus `include` packages), made once (apt caches and
    lists removed, as images do)."""
    name = "bookworm-minbase" + "".join(f"-{p}" for p in include)
    root = cache / name
    if (root / "etc" / "debian_version").exists():
        return root
    tmp = cache / f"{name}.tmp"
    remove_tree(tmp)
    extra = [f"--include={','.join(include)}"] if include else []
    log(f"debootstrap --variant=minbase {' '.join(extra)} bookworm {tmp} (minutes, once)")
    run(
        ["debootstrap", "--variant=minbase", *extra, "bookworm", str(tmp), DEBIAN_MIRROR],
        timeout=3600,
    )
    for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (tmp / sub).glob("*"):
            if entry.is_file():
                entry.unlink()
    tmp.rename(root)
    return root


def _copy(source: Path, rootfs: Path, dest_rel: str) -> None:
    """`cp -a`: keeps symlinks, modes, owners and device nodes (shutil would read /dev/zero)."""
    dest = rootfs / dest_rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir() and not source.is_symlink():
        dest.mkdir(exist_ok=True)
        run(["cp", "-a", f"{source}/.", f"{dest}/"])
    else:
        run(["cp", "-a", str(source), str(dest)])


def _mutation(spec: LayerSpec, cache: Path) -> Callable[[Path], None]:
    def apply(rootfs: Path) -> None:
        for src in spec.sources:
            if src == DEBOOTSTRAP:
                _copy(debootstrap_root(cache), rootfs, ".")
            elif src == DEBOOTSTRAP_PYTHON:
                _copy(debootstrap_root(cache, ("python3",)), rootfs, ".")
            elif os.path.lexists(src):
                _copy(Path(src), rootfs, src.lstrip("/"))
            else:
                log(f"  {src} is not on this machine; skipped")
        for rel in spec.delete:
            target = rootfs / rel
            if target.is_dir() and not target.is_symlink():
                remove_tree(target)
            elif os.path.lexists(target):
                target.unlink()

    return apply


def walk_catalog(rootfs: Path) -> FileList:
    files: list[tuple[str, int]] = []
    entries = 0
    for dirpath, dirnames, filenames in os.walk(rootfs):
        entries += len(dirnames) + len(filenames)
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if os.path.isfile(path) and not os.path.islink(path):
                files.append((os.path.relpath(path, rootfs), st.st_size))
    files.sort()
    return FileList(files, entries)


def tar_catalog(blob: Path) -> FileList:
    """The regular files of one gzip layer blob, as the tar has them (whiteouts left out)."""
    files: list[tuple[str, int]] = []
    entries = 0
    with tarfile.open(blob, "r:gz") as tar:
        for member in tar:
            name = os.path.normpath(member.name.lstrip("/")).removeprefix("./")
            if name in (".", ""):
                continue
            entries += 1
            if member.isreg() and not os.path.basename(name).startswith(".wh."):
                files.append((name, member.size))
    files.sort()
    return FileList(files, entries)


def build_image(recipe: Recipe, cache: Path) -> BuiltImage:
    """The recipe's image in an OCI layout under `cache`, built with umoci unless cached."""
    home = cache / "images" / f"{recipe.name}-{recipe.key()}"
    catalog_path = home / "catalog.json"
    layout = home / "layout"
    if catalog_path.exists():
        return _load(recipe, home)
    remove_tree(home)
    home.mkdir(parents=True)
    merged: list[FileList] = []
    mutations = [_mutation(spec, cache) for spec in recipe.layers]
    last = mutations[-1]

    def last_and_catalog(rootfs: Path) -> None:
        last(rootfs)
        merged.append(walk_catalog(rootfs))

    mutations[-1] = last_and_catalog
    log(f"building image {recipe.name} ({len(recipe.layers)} layers) in {layout}")
    image = build_umoci_image(layout, mutations, tag=recipe.name)
    layers = []
    for desc, spec in zip(image.layers(), recipe.layers, strict=True):
        blob = layout / "blobs" / "sha256" / str(desc["digest"]).split(":", 1)[1]
        info = LayerInfo(
            str(desc["digest"]),
            int(desc["size"]),
            str(desc["mediaType"]),
            spec.name,
            tar_catalog(blob),
        )
        layers.append(info)
    catalog = {
        "tag": recipe.name,
        "merged": merged[0].to_json(),
        "layers": [
            {
                "digest": layer.digest,
                "size": layer.size,
                "media_type": layer.media_type,
                "name": layer.name,
                "catalog": layer.catalog.to_json(),
            }
            for layer in layers
        ],
    }
    tmp = catalog_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(catalog))
    tmp.rename(catalog_path)
    return _load(recipe, home)


def _load(recipe: Recipe, home: Path) -> BuiltImage:
    obj = json.loads((home / "catalog.json").read_text())
    layers = [
        LayerInfo(
            str(layer["digest"]),
            int(layer["size"]),
            str(layer["media_type"]),
            str(layer["name"]),
            FileList.from_json(layer["catalog"]),
        )
        for layer in obj["layers"]
    ]
    image = LayoutImage(home / "layout", str(obj["tag"]))
    built = BuiltImage(recipe, image, FileList.from_json(obj["merged"]), layers)
    if [str(d["digest"]) for d in image.layers()] != [layer.digest for layer in layers]:
        raise BenchError(f"{home}: catalog.json does not match the layout; delete {home}")
    return built


# --------------------------------------------------------------------------------------------
# variants in the registry


@dataclass(frozen=True)
class Variant:
    """How the image is stored in the registry.

    * `gzip`: the gzip layers as umoci built them (imagefs fetches a layer whole on first
      need, then indexes it);
    * `gzip+index`: the same, plus an imagefs layer index published next to it
      (`imagefs --root R index --push REF` once, on a throwaway root), so reads are ranges;
    * `estargz`: every layer's tar rewritten as eStargz by imagefs's writer
      (`bench.convert`), with the `containerd.io/snapshot/stargz/toc.digest` annotation;
    * `zstd:chunked`: skopeo's zstd:chunked conversion of the gzip image.
    """

    name: str
    compression: Compression | None = None
    estargz: bool = False
    publish_index: bool = False

    def push(
        self, built: BuiltImage, registry: LocalRegistry, imagefs_bin: Path | None = None
    ) -> PushedImage:
        repo_tag = f"bench/{built.recipe.name}:{self.name.replace('+', '-').replace(':', '-')}"
        if self.estargz:
            return push(
                estargz_layout(built.image, converted_tag(built.recipe.name)),
                registry,
                repo_tag,
            )
        pushed = push(built.image, registry, repo_tag, compression=self.compression)
        if self.publish_index:
            if imagefs_bin is None:
                raise BenchError(f"variant {self.name}: needs the imagefs binary to index")
            with scratch_dir("bench-indexer-") as root:
                run(
                    [str(imagefs_bin), "--root", str(root), "index", "--push", pushed.ref], cwd=root
                )
        return pushed


VARIANTS = {
    v.name: v
    for v in (
        Variant("gzip"),
        Variant("gzip+index", publish_index=True),
        Variant("estargz", estargz=True),
        Variant("zstd:chunked", compression="zstd:chunked"),
    )
}
