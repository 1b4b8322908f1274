"""Descriptors, manifests, indexes and image configs, parsed from the bytes a registry served.

Each parsed object keeps its raw bytes because digests are taken over those exact bytes;
re-serialising parsed JSON would change whitespace and key order, and so the digest.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any

from imagefs.errors import ImageFSError, InvalidReference, NotFound, UnsupportedMediaType
from imagefs.oci import mediatypes as mt
from imagefs.oci.digest import Digest
from imagefs.oci.platform import Platform

# The distribution registry refuses manifests above 4 MiB; so do containerd and docker.
MAX_MANIFEST_SIZE = 4 * 1024 * 1024

ATTESTATION_ANNOTATION = "vnd.docker.reference.type"
ATTESTATION_MANIFEST = "attestation-manifest"

_EMPTY: Mapping[str, str] = MappingProxyType({})


def _invalid(what: str, problem: str) -> ImageFSError:
    return ImageFSError(f"invalid {what}: {problem}")


def _frozen_annotations(value: Mapping[str, str]) -> Mapping[str, str]:
    return value if isinstance(value, MappingProxyType) else MappingProxyType(dict(value))


_MAX_SIZE = (1 << 63) - 1  # descriptor sizes are int64 (OCI image spec)


@dataclass(frozen=True)
class Descriptor:
    """A typed, sized, digested pointer to a blob or manifest."""

    media_type: str
    digest: Digest
    size: int
    urls: tuple[str, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=lambda: _EMPTY, hash=False)
    platform: Platform | None = None
    artifact_type: str | None = None

    def __post_init__(self) -> None:
        # Callers may hand in a dict; never let it be mutated behind our back.
        object.__setattr__(self, "annotations", _frozen_annotations(self.annotations))

    @classmethod
    def from_json(cls, obj: object, *, what: str = "manifest") -> Descriptor:
        """Build from a parsed JSON descriptor; errors say `invalid <what>: ...`."""
        d = _object(obj, what, "descriptor")
        media_type = _str(d, "mediaType", what, required=True)
        assert media_type is not None
        digest_text = _str(d, "digest", what, required=True)
        assert digest_text is not None
        try:
            digest = Digest.parse(digest_text)
        except InvalidReference as err:
            raise _invalid(what, str(err)) from None
        size = d.get("size")
        if type(size) is not int or not 0 <= size <= _MAX_SIZE:  # the spec's int64
            shown = repr(size)  # JSON's longest ints (4300 digits) cut to a line's worth
            shown = shown if len(shown) <= 24 else shown[:20] + "..."
            raise _invalid(
                what, f"descriptor {digest_text} has size {shown}, want an int from 0 to 2^63-1"
            )
        urls = d.get("urls", [])
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise _invalid(what, f"descriptor {digest_text}: urls must be a list of strings")
        platform = _platform(d["platform"], what) if "platform" in d else None
        return cls(
            media_type=media_type,
            digest=digest,
            size=size,
            urls=tuple(urls),
            annotations=_annotations(d, what),
            platform=platform,
            artifact_type=_str(d, "artifactType", what),
        )

    def to_json(self) -> dict[str, Any]:
        """The OCI JSON form, leaving out empty optional fields as the spec writers do."""
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": str(self.digest),
            "size": self.size,
        }
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform is not None:
            p: dict[str, Any] = {
                "architecture": self.platform.architecture,
                "os": self.platform.os,
            }
            if self.platform.os_version is not None:
                p["os.version"] = self.platform.os_version
            if self.platform.variant is not None:
                p["variant"] = self.platform.variant
            out["platform"] = p
        if self.artifact_type is not None:
            out["artifactType"] = self.artifact_type
        return out

    @property
    def is_attestation(self) -> bool:
        return self.annotations.get(ATTESTATION_ANNOTATION) == ATTESTATION_MANIFEST


@dataclass(frozen=True)
class Manifest:
    """An image manifest (OCI or Docker schema 2): one config and its layers."""

    raw: bytes
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=lambda: _EMPTY, hash=False)
    subject: Descriptor | None = None
    artifact_type: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "annotations", _frozen_annotations(self.annotations))

    @cached_property
    def digest(self) -> Digest:
        """The manifest's identity: sha256 over the raw bytes as served."""
        return Digest.of(self.raw)


@dataclass(frozen=True)
class Index:
    """An OCI image index or Docker manifest list: one manifest per platform."""

    raw: bytes
    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=lambda: _EMPTY, hash=False)
    subject: Descriptor | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "annotations", _frozen_annotations(self.annotations))

    @cached_property
    def digest(self) -> Digest:
        return Digest.of(self.raw)

    def select(self, platform: Platform) -> Descriptor:
        """The entry to run on `platform`: an exact variant if present, else the closest older.

        Attestation entries (buildkit's provenance/SBOM, platform `unknown/unknown`) and
        entries without a platform are never images to run, so they are skipped.
        """
        candidates = [d for d in self.manifests if d.platform is not None and not d.is_attestation]
        best: tuple[int, Descriptor] | None = None
        for descriptor in candidates:
            assert descriptor.platform is not None
            rank = platform.match_rank(descriptor.platform)
            if rank is not None and (best is None or rank < best[0]):
                best = (rank, descriptor)
        if best is not None:
            return best[1]
        available = ", ".join(str(d.platform) for d in candidates) or "none"
        raise NotFound(
            f"no image for platform {platform} in index {self.digest}; available: {available}"
        )


@dataclass(frozen=True)
class ImageConfig:
    """The image configuration blob: platform, run defaults, and the layers' diff IDs.

    `config` and `history` are deep-frozen copies of the JSON: objects become read-only
    mappings and arrays become tuples.
    """

    raw: bytes
    architecture: str
    os: str
    variant: str | None
    created: str | None
    author: str | None
    config: Mapping[str, Any]
    diff_ids: tuple[Digest, ...]
    history: tuple[Mapping[str, Any], ...]

    @classmethod
    def parse(cls, raw: bytes) -> ImageConfig:
        what = "image config"
        obj = _object(_loads(raw, what), what, "config")
        architecture = _str(obj, "architecture", what, required=True)
        os = _str(obj, "os", what, required=True)
        assert architecture is not None and os is not None
        rootfs = _object(obj.get("rootfs"), what, "rootfs")
        if rootfs.get("type") != "layers":
            raise _invalid(what, f"rootfs.type is {rootfs.get('type')!r}, want 'layers'")
        diff_ids_json = rootfs.get("diff_ids")
        if not isinstance(diff_ids_json, list):
            raise _invalid(what, "rootfs.diff_ids must be a list")
        diff_ids: list[Digest] = []
        for item in diff_ids_json:
            if not isinstance(item, str):
                raise _invalid(what, f"rootfs.diff_ids has a non-string entry {item!r}")
            try:
                diff_ids.append(Digest.parse(item))
            except InvalidReference as err:
                raise _invalid(what, str(err)) from None
        run_config = obj.get("config")
        if run_config is None:
            run_config = {}
        if not isinstance(run_config, dict):
            raise _invalid(what, "config must be an object")
        history = obj.get("history")
        if history is None:
            history = []
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise _invalid(what, "history must be a list of objects")
        return cls(
            raw=raw,
            architecture=architecture,
            os=os,
            variant=_str(obj, "variant", what),
            created=_str(obj, "created", what),
            author=_str(obj, "author", what),
            config=_deep_freeze(run_config),
            diff_ids=tuple(diff_ids),
            history=tuple(_deep_freeze(h) for h in history),
        )

    @cached_property
    def digest(self) -> Digest:
        """The config digest, which docker shows as the image ID."""
        return Digest.of(self.raw)

    @property
    def platform(self) -> Platform:
        return Platform(self.os, self.architecture, self.variant)


def parse_manifest(raw: bytes, content_type: str | None) -> Manifest | Index:
    """Parse a manifest or index as served, deciding its type as containerd does.

    The JSON `mediaType` field is authoritative when present. OCI allows leaving it out, so
    then a known Content-Type decides, and failing that the document's shape. Registries
    backed by plain object stores often answer `application/json`, which says nothing.
    """
    what = "manifest"
    if len(raw) > MAX_MANIFEST_SIZE:
        raise _invalid(what, f"{len(raw)} bytes is larger than the 4 MiB limit")
    header_type = _bare_media_type(content_type)
    if header_type in mt.SCHEMA1_TYPES:
        raise _schema1()
    obj = _object(_loads(raw, what), what, "manifest")
    field_type = _str(obj, "mediaType", what)
    if field_type in mt.SCHEMA1_TYPES or obj.get("schemaVersion") == 1:
        raise _schema1()
    if obj.get("schemaVersion") != 2:
        raise _invalid(what, f"schemaVersion is {obj.get('schemaVersion')!r}, want 2")
    if field_type is not None and header_type in mt.MANIFEST_TYPES and field_type != header_type:
        raise _invalid(
            what, f'Content-Type is "{header_type}" but the mediaType field says "{field_type}"'
        )
    media_type = field_type
    if media_type is None and header_type in mt.MANIFEST_TYPES:
        media_type = header_type
    if media_type is None:
        media_type = _infer_type(obj)
    if media_type in mt.INDEX_TYPES:
        return _parse_index(raw, media_type, obj)
    if media_type in mt.IMAGE_MANIFEST_TYPES:
        return _parse_image_manifest(raw, media_type, obj)
    raise UnsupportedMediaType(f'unsupported manifest media type "{media_type}"')


def _schema1() -> UnsupportedMediaType:
    return UnsupportedMediaType(
        "Docker schema 1 manifests are not supported (deprecated since 2019); "
        "re-push the image with a current tool"
    )


def _infer_type(obj: dict[str, Any]) -> str:
    has_manifests = "manifests" in obj
    has_image_parts = "config" in obj and "layers" in obj
    if has_manifests and not has_image_parts:
        return mt.OCI_INDEX
    if has_image_parts and not has_manifests:
        return mt.OCI_MANIFEST
    raise _invalid("manifest", "no mediaType, and the document is neither an index nor a manifest")


def _parse_image_manifest(raw: bytes, media_type: str, obj: dict[str, Any]) -> Manifest:
    if "config" not in obj:
        raise _invalid("manifest", f"{media_type} has no config")
    layers = obj.get("layers")
    if not isinstance(layers, list):
        raise _invalid("manifest", "layers must be a list")
    return Manifest(
        raw=raw,
        media_type=media_type,
        config=Descriptor.from_json(obj["config"]),
        layers=tuple(Descriptor.from_json(layer) for layer in layers),
        annotations=_annotations(obj, "manifest"),
        subject=Descriptor.from_json(obj["subject"]) if "subject" in obj else None,
        artifact_type=_str(obj, "artifactType", "manifest"),
    )


def _parse_index(raw: bytes, media_type: str, obj: dict[str, Any]) -> Index:
    manifests = obj.get("manifests")
    if not isinstance(manifests, list):
        raise _invalid("manifest", f"{media_type} needs a manifests list")
    return Index(
        raw=raw,
        media_type=media_type,
        manifests=tuple(Descriptor.from_json(m) for m in manifests),
        annotations=_annotations(obj, "manifest"),
        subject=Descriptor.from_json(obj["subject"]) if "subject" in obj else None,
    )


def _bare_media_type(content_type: str | None) -> str | None:
    """`application/json; charset=utf-8` -> `application/json`; media types ignore case."""
    if content_type is None:
        return None
    bare = content_type.split(";", 1)[0].strip().lower()
    return bare or None


def _loads(raw: bytes, what: str) -> object:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # Two parsers could pick different values for a repeated key while agreeing on the
        # digest; refusing duplicates closes that gap.
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise _invalid(what, f'duplicate key "{key}"')
            out[key] = value
        return out

    # NaN, Infinity and numbers no float holds (1e400) are not JSON (RFC 8259), though
    # `json.loads` takes them; no registry client written in Go would read them either.
    def no_constant(name: str) -> float:
        raise _invalid(what, f"{name} is not a JSON number")

    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise _invalid(what, f"number {text[:24]} is out of range")
        return value

    try:
        return json.loads(
            raw, object_pairs_hook=no_duplicates, parse_constant=no_constant, parse_float=finite
        )
    except (ValueError, RecursionError) as err:
        raise _invalid(what, f"not valid JSON ({err})") from None


def _object(obj: object, what: str, name: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise _invalid(what, f"{name} must be a JSON object, got {type(obj).__name__}")
    return obj


def _str(obj: dict[str, Any], key: str, what: str, *, required: bool = False) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise _invalid(what, f"missing {key}")
        return None
    if not isinstance(value, str):
        raise _invalid(what, f"{key} must be a string, got {type(value).__name__}")
    return value


def _annotations(obj: dict[str, Any], what: str) -> Mapping[str, str]:
    value = obj.get("annotations")
    if value is None:
        return _EMPTY
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _invalid(what, "annotations must map strings to strings")
    return MappingProxyType(dict(value))


def _platform(obj: object, what: str) -> Platform:
    p = _object(obj, what, "platform")
    os = _str(p, "os", what, required=True)
    architecture = _str(p, "architecture", what, required=True)
    assert os is not None and architecture is not None
    return Platform(
        os=os,
        architecture=architecture,
        variant=_str(p, "variant", what),
        os_version=_str(p, "os.version", what),
    )


def _deep_freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _deep_freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_deep_freeze(v) for v in value)
    return value
