"""An overlayfs upper directory -> an eStargz layer, streamed to a file (`--compression estargz`).

The same tar as the gzip layer (`layerdiff.layer_entries`), cut into gzip members the way
ctr-remote cuts them: each regular file's data starts a member, and so does every further
`CHUNK_SIZE` bytes of it; a `.no.prefetch.landmark` leads, the TOC (`stargz.index.json`) is
the last tar entry in a member of its own, and the 51-byte footer points at it. Any gzip/tar
reader still reads the blob as a plain tar.gz. Memory: one chunk plus the TOC entries.

The manifest descriptor carries the TOC digest (`containerd.io/snapshot/stargz/toc.digest`)
and the tar size (`io.containers.estargz.uncompressed-size`), as ctr-remote writes them: a
reader verifies the TOC against the first and so mounts the layer lazily without any index.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import zlib
from pathlib import Path
from typing import IO, Any

from imagefs.build.layerdiff import LayerBlob, layer_entries
from imagefs.errors import BuildError
from imagefs.layers.estargz import (
    _LANDMARK_CONTENT,
    NO_PREFETCH_LANDMARK,
    TOC_DIGEST_ANNOTATION,
    TOC_TAR_NAME,
    make_footer,
    tar_header,
    toc_entry,
)
from imagefs.oci.digest import Digest

CHUNK_SIZE = 4 * 1024 * 1024
"""ctr-remote's default chunk size."""
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"


class _Members:
    """Writes the tar stream to `out` as gzip members; hashes both sides as it goes."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.blob = hashlib.sha256()
        self.tar = hashlib.sha256()
        self.offset = 0
        self.tar_size = 0
        self._comp: Any = None

    def _emit(self, data: bytes) -> None:
        if data:
            self.out.write(data)
            self.blob.update(data)
            self.offset += len(data)

    def cut(self) -> int:
        """End the current member (if any); return where the next one starts."""
        if self._comp is not None:
            self._emit(self._comp.flush())
            self._comp = None
        return self.offset

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._comp is None:
            # wbits 31: a gzip member with mtime 0 and no name -- the same tree, the same blob
            self._comp = zlib.compressobj(6, zlib.DEFLATED, 31)
        self.tar.update(data)
        self.tar_size += len(data)
        self._emit(self._comp.compress(data))


def _write_file(w: _Members, info: tarfile.TarInfo, path: Path, entries: list[Any]) -> None:
    entry = toc_entry(info)
    entry["size"] = info.size
    whole = hashlib.sha256()
    first = entry
    with open(path, "rb") as f:
        for chunk_offset in range(0, info.size, CHUNK_SIZE):
            chunk = f.read(min(CHUNK_SIZE, info.size - chunk_offset))
            if len(chunk) != min(CHUNK_SIZE, info.size - chunk_offset):
                raise BuildError(f"{info.name} changed size while the layer was written")
            last = chunk_offset + CHUNK_SIZE >= info.size
            e = entry if chunk_offset == 0 else {
                "name": entry["name"], "type": "chunk", "chunkOffset": chunk_offset,
            }  # fmt: skip
            e["offset"] = w.cut()
            e["chunkSize"] = 0 if last else len(chunk)  # the spec: the last chunk has 0
            e["chunkDigest"] = "sha256:" + hashlib.sha256(chunk).hexdigest()
            whole.update(chunk)
            w.write(chunk)
            entries.append(e)
    first["digest"] = "sha256:" + whole.hexdigest()
    w.write(b"\x00" * (-info.size % 512))


def write_estargz_layer(upper: Path, out: IO[bytes], epoch: int | None = None) -> LayerBlob:
    """Stream `upper`'s layer as eStargz into `out`; the blob's digests and annotations."""
    w = _Members(out)
    entries: list[dict[str, Any]] = []
    landmark = tarfile.TarInfo(NO_PREFETCH_LANDMARK)
    landmark.size, landmark.mode = len(_LANDMARK_CONTENT), 0o644
    w.write(tar_header(landmark))
    digest = "sha256:" + hashlib.sha256(_LANDMARK_CONTENT).hexdigest()
    entries.append({
        **toc_entry(landmark), "size": 1, "digest": digest, "offset": w.cut(),
        "chunkSize": 0, "chunkDigest": digest,
    })  # fmt: skip
    w.write(_LANDMARK_CONTENT + b"\x00" * 511)
    count = 0
    for info, path in layer_entries(upper, epoch):
        count += 1
        w.write(tar_header(info))
        if path is None or info.size == 0:
            entries.append(toc_entry(info))
        else:
            _write_file(w, info, path, entries)
    toc = json.dumps({"version": 1, "entries": entries}, separators=(",", ":")).encode()
    toc_offset = w.cut()
    toc_info = tarfile.TarInfo(TOC_TAR_NAME)
    toc_info.size, toc_info.mode = len(toc), 0o644
    w.write(tar_header(toc_info))
    w.write(toc + b"\x00" * (-len(toc) % 512))
    w.write(b"\x00" * 1024)  # tar end-of-archive
    w.cut()
    w._emit(make_footer(toc_offset))
    return LayerBlob(
        digest=Digest.parse("sha256:" + w.blob.hexdigest()),
        diff_id=Digest.parse("sha256:" + w.tar.hexdigest()),
        size=w.offset,
        entries=count,
        annotations={
            TOC_DIGEST_ANNOTATION: "sha256:" + hashlib.sha256(toc).hexdigest(),
            UNCOMPRESSED_SIZE_ANNOTATION: str(w.tar_size),
        },
    )
