"""Pushing and pulling test images with skopeo (containers/image), an independent client.

Quirks learned the hard way (they shape the code below):

* skopeo (containers/image 5.23) keeps a blob-info cache under /var/lib/containers/cache
  for root. When pushing with `--dest-compress-format`, a gzip blob of the same layer that
  the cache knows is already in the registry (any repository) is cross-mounted instead of
  recompressing, so the "zstd" push silently stays gzip. `push()` therefore converts into
  a fresh `dir:` copy first and pushes that with `--preserve-digests`, which forbids any
  substitution. (`dir:`, not `oci:`: an OCI layout destination accepts a v2s2 manifest but
  then cannot find it by tag.)
* The `dir:` transport keeps layer compression unless `--dest-compress` is given, and an
  `oci:` destination stores a v2s2 manifest it then cannot resolve by tag.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from imagefs.testing.infra import InfraError, require_binary
from imagefs.testing.layout import (
    TOOL_TIMEOUT,
    Compression,
    LayoutImage,
    ManifestFormat,
)
from imagefs.testing.registry import LocalRegistry


class SkopeoError(InfraError):
    """skopeo failed; `stderr` holds its reason (tests match "401", "unauthorized" ...)."""

    def __init__(self, args: Sequence[str], returncode: int, stderr: str) -> None:
        super().__init__(f"skopeo {' '.join(args[1:3])} ... exited {returncode}: {stderr.strip()}")
        self.returncode = returncode
        self.stderr = stderr


# --------------------------------------------------------------------------------------------
# skopeo


def run_skopeo(args: Sequence[str]) -> str:
    """Run `skopeo ARGS` (with `--insecure-policy`) and return stdout; SkopeoError on failure.

    `--insecure-policy` spares us /etc/containers/policy.json, which a minimal machine may
    lack; we never verify signatures in tests anyway.
    """
    full = [require_binary("skopeo"), "--insecure-policy", *args]
    proc = subprocess.run(full, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False)
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
