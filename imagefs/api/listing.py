"""`imagefs images`: stored images as docker lists them, with docker's filters, and how much
of each is local."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from imagefs.errors import UsageError
from imagefs.oci.image import Layer, ResolvedImage
from imagefs.session import Session
from imagefs.store import ImageRecord, Store
from imagefs.store.lookup import find_record, is_dangling, load_resolved


@dataclass(frozen=True)
class ImageSummary:
    record: ImageRecord
    image: ResolvedImage
    size: int  # compressed bytes of config + layers: what a full pull downloads
    cached: int  # bytes of layer data present locally

    @property
    def repository(self) -> str:
        ref = self.record.name or self.record.repo_digest
        return ref.familiar_name if ref else "<none>"

    @property
    def tag(self) -> str:
        return self.record.name.tag or "<none>" if self.record.name else "<none>"


def layer_cached_bytes(store: Store, layer: Layer) -> int:
    """How much of a layer is local, in compressed bytes: the whole blob, or the compressed
    ranges whose verified pieces are in the piece cache (known once the layer's index is:
    pieces are named by content, not by layer)."""
    if store.blobs.has(layer.digest):
        return layer.size
    from imagefs.lazy.cached import cached_bytes

    return min(layer.size, cached_bytes(store.root, layer))


def image_summary(store: Store, record: ImageRecord) -> ImageSummary:
    image = load_resolved(store, record.manifest.digest, record.index_digest)
    layers = image.layers
    size = image.manifest.config.size + sum(layer.size for layer in layers)
    cached = sum(layer_cached_bytes(store, layer) for layer in layers)
    return ImageSummary(record, image, size, cached)


IMAGE_FILTERS = ("dangling", "reference", "label", "before", "since")


async def images(
    session: Session,
    filter_ref: str | None = None,
    *,
    all_images: bool = False,
    filters: Mapping[str, Sequence[str]] | None = None,
) -> list[ImageSummary]:
    """Stored images, newest first, as `docker images` lists them: tagged ones, those pulled by
    digest (TAG `<none>`) and dangling ones (`<none>` `<none>`). `filters` are docker's
    (`dangling`, `reference`, `label`, `before`, `since`; see `formats.parse_filters`).
    `all_images` is docker's `-a`; imagefs has no intermediate images to add."""
    del all_images

    def work() -> list[ImageSummary]:
        store = session.store
        records = store.records()
        keep = _image_filter(store, filters or {})
        out = []
        for rec in records:
            if filter_ref and not _filter_matches(rec, filter_ref):
                continue
            summary = image_summary(store, rec)
            if keep(summary):
                out.append(summary)
        out.sort(key=lambda s: s.record.created, reverse=True)
        return out

    result: list[ImageSummary] = await session.disk(work)
    return result


def _image_filter(
    store: Store, filters: Mapping[str, Sequence[str]]
) -> Callable[[ImageSummary], bool]:
    """docker's rules: values of one key are alternatives, different keys must all hold."""
    from imagefs.formats import parse_time

    dangling = filters.get("dangling", [])
    if len(set(dangling)) > 1 or any(v not in ("true", "false") for v in dangling):
        raise UsageError(f"invalid filter 'dangling={','.join(dangling)}': want true or false")

    def created(summary: ImageSummary) -> float:
        when = parse_time(summary.image.config.created)
        return when.timestamp() if when else 0.0

    bounds: dict[str, float] = {}
    for key in ("before", "since"):
        for query in filters.get(key, []):
            bounds[key] = created(image_summary(store, find_record(store, query)))

    def keep(s: ImageSummary) -> bool:
        if dangling and is_dangling(s.record) != (dangling[0] == "true"):
            return False
        if "reference" in filters and not any(
            _reference_matches(s.record, p) for p in filters["reference"]
        ):
            return False
        labels = thaw(s.image.config.config).get("Labels") or {}
        for want in filters.get("label", []):
            key, sep, value = want.partition("=")
            if key not in labels or (sep and labels[key] != value):
                return False
        if "before" in bounds and not created(s) < bounds["before"]:
            return False
        return not ("since" in bounds and not created(s) > bounds["since"])

    return keep


def _filter_matches(record: ImageRecord, pattern: str) -> bool:
    """docker images REPOSITORY[:TAG]: by familiar or full name, tag optional."""
    import fnmatch

    ref = record.name or record.repo_digest
    if ref is None:
        return False
    # The tag is after a `:` in the last path component (an earlier one is a host's port).
    has_tag = ":" in pattern.rpartition("/")[2]
    repo_pat, _, tag_pat = pattern.rpartition(":") if has_tag else (pattern, "", "")
    names = {ref.familiar_name, ref.name}
    if not any(fnmatch.fnmatchcase(n, repo_pat) for n in names):
        return False
    return not tag_pat or (
        record.name is not None and fnmatch.fnmatchcase(record.name.tag or "", tag_pat)
    )


def _reference_matches(record: ImageRecord, pattern: str) -> bool:
    """docker's reference filter: Go's path.Match against `repo:tag`, then against `repo`."""
    names = []
    for ref in (record.name, record.repo_digest):
        if ref is not None:
            names += [ref.familiar, ref.familiar_name]
    return any(_path_match(pattern, n) for n in names)


def _path_match(pattern: str, name: str) -> bool:
    """Go's path.Match: `*` and `?` never cross a `/`."""
    import re

    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and "]" in pattern[i + 1 :]:
            j = pattern.index("]", i + 1)
            body = pattern[i + 1 : j].replace("\\", "\\\\")
            out.append("[" + ("^" + body[1:] if body.startswith("^") else body) + "]")
            i = j
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return re.fullmatch("".join(out), name) is not None


def thaw(value: Any) -> Any:
    """Plain JSON types from the frozen forms the config parser hands out."""
    if isinstance(value, Mapping):
        return {str(k): thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    return value
