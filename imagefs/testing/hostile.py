"""Hand-made hostile images, written straight into a loopback registry (no skopeo, no layout).

Tests need blobs and manifests no image tool would write: a config that declares a gigabyte,
a manifest with 10,000 layers, a layer that is not a tar, a gzip bomb, a tar with a million
entries. `RegistryWriter` PUTs them with urllib (the test registry is plain HTTP on
127.0.0.1); the generators build the bytes quickly and without holding what they describe in
memory (a 10 GiB bomb is ~10 MiB of repeated deflate blocks).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
import tarfile
import urllib.request
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

from imagefs.layers import estargz
from imagefs.testing.registry import LocalRegistry

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
TAR_LAYER = "application/vnd.oci.image.layer.v1.tar"
BLOCK = 512


@dataclass(frozen=True)
class Layer:
    blob: bytes
    diff_id: str
    media_type: str = GZIP_LAYER


def gzip_layer(tar: bytes) -> Layer:
    return Layer(gzip.compress(tar, compresslevel=1, mtime=0), _sha(tar), GZIP_LAYER)


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class RegistryWriter:
    """Blobs and manifests PUT as they are: the registry checks digests, nothing else."""

    def __init__(self, registry: LocalRegistry) -> None:
        if registry.tls or registry.auth != "none":
            raise ValueError("RegistryWriter speaks plain HTTP without auth")
        self.registry = registry

    def _send(self, method: str, url: str, data: bytes | None = None, **headers: str) -> Any:
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        return urllib.request.urlopen(req, timeout=120)

    def put_blob(self, repo: str, data: bytes) -> dict[str, Any]:
        """Monolithic upload; returns a descriptor (without media type)."""
        digest = _sha(data)
        base = self.registry.url
        with self._send("POST", f"{base}/v2/{repo}/blobs/uploads/", b"") as resp:
            location = urljoin(base, resp.headers["Location"])
        sep = "&" if "?" in location else "?"
        with self._send(
            "PUT",
            f"{location}{sep}digest={digest}",
            data,
            **{"Content-Type": "application/octet-stream"},
        ):
            pass
        return {"digest": digest, "size": len(data)}

    def put_manifest(self, repo: str, tag: str, raw: bytes, media_type: str = OCI_MANIFEST) -> str:
        url = f"{self.registry.url}/v2/{repo}/manifests/{tag}"
        with self._send("PUT", url, raw, **{"Content-Type": media_type}) as resp:
            return str(resp.headers["Docker-Content-Digest"])

    def image(
        self,
        repo: str,
        tag: str,
        layers: Sequence[Layer],
        *,
        config: Mapping[str, Any] | None = None,
        config_size: int | None = None,
        layer_descriptors: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """Push config, layers and manifest; returns `HOST/REPO:TAG`.

        `config_size` overrides the config's declared size (a lie the registry does not
        check); `layer_descriptors` replaces the manifest's layer list entirely.
        """
        cfg = dict(config) if config is not None else default_config(layers)
        config_raw = json.dumps(cfg, sort_keys=True).encode()
        config_desc = {"mediaType": OCI_CONFIG, **self.put_blob(repo, config_raw)}
        if config_size is not None:
            config_desc["size"] = config_size
        descs: list[Mapping[str, Any]]
        if layer_descriptors is None:
            descs = [{"mediaType": la.media_type, **self.put_blob(repo, la.blob)} for la in layers]
        else:
            for la in layers:
                self.put_blob(repo, la.blob)
            descs = list(layer_descriptors)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config_desc,
            "layers": descs,
        }
        self.put_manifest(repo, tag, json.dumps(manifest).encode())
        return f"{self.registry.host}/{repo}:{tag}"


def default_config(layers: Sequence[Layer]) -> dict[str, Any]:
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [la.diff_id for la in layers]},
    }


# -- raw tar headers --------------------------------------------------------------------------


def header(
    name: bytes,
    *,
    size: int = 0,
    typeflag: bytes = b"0",
    linkname: bytes = b"",
    mode: int = 0o644,
) -> bytes:
    """One ustar header block with a correct checksum (name and linkname up to 100 bytes)."""
    if len(name) > 100 or len(linkname) > 100:
        raise ValueError("use PAX records for long names")
    block = bytearray(BLOCK)
    block[0 : len(name)] = name
    block[100:108] = b"%07o\x00" % mode
    block[108:116] = b"%07o\x00" % 0
    block[116:124] = b"%07o\x00" % 0
    if size < 8**11:
        block[124:136] = b"%011o\x00" % size
    else:  # GNU base-256 for sizes octal cannot hold
        block[124:136] = b"\x80" + size.to_bytes(11, "big")
    block[136:148] = b"%011o\x00" % 0
    block[156:157] = typeflag
    block[157 : 157 + len(linkname)] = linkname
    block[257:265] = b"ustar\x0000"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % sum(block)
    return bytes(block)


def pax(records: Mapping[bytes, bytes], name: bytes = b"PaxHeader") -> bytes:
    """A PAX extended header ('x') with `records`, padded."""
    body = b""
    for key, value in records.items():
        core = b" " + key + b"=" + value + b"\n"
        n = len(core) + 1
        while len(str(n).encode()) + len(core) != n:
            n += 1
        body += str(n).encode() + core
    return header(name[:100], size=len(body), typeflag=b"x") + _padded(body)


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def file_entry(name: bytes, data: bytes, **kw: Any) -> bytes:
    return header(name, size=len(data), **kw) + _padded(data)


END = bytes(2 * BLOCK)


# -- big generated layers ---------------------------------------------------------------------


def many_entries_tar(count: int, per_dir: int = 1000) -> Iterator[bytes]:
    """A tar of `count` empty files in directories of `per_dir`, yielded in 512 KiB pieces.

    Headers are made from one template: only the name and the checksum change per entry.
    """
    template = bytearray(header(b"", mode=0o644))
    template[148:156] = b" " * 8
    base_sum = sum(template)
    out = bytearray()
    for k in range(count):
        name = b"d%05d/f%07d" % (k // per_dir, k)
        block = bytearray(template)
        block[0 : len(name)] = name
        block[148:156] = b"%06o\x00 " % (base_sum + sum(name))
        out += block
        if len(out) >= 512 << 10:
            yield bytes(out)
            out.clear()
    out += END
    yield bytes(out)


def gzip_stream(pieces: Iterator[bytes], level: int = 1) -> bytes:
    comp = zlib.compressobj(level, zlib.DEFLATED, 31)
    return b"".join(comp.compress(p) for p in pieces) + comp.flush()


def gzip_bomb(zeros: int, name: bytes = b"zeros.bin") -> tuple[bytes, str]:
    """A gzip'd tar holding one file of `zeros` zero bytes: (blob, diff_id).

    Built without inflating anything: after a full flush a deflater starts afresh, so every
    1 MiB of zeros compresses to the very same ~1 KiB, which is repeated. The CRC and the
    diff_id (sha256 of the whole tar) are computed by streaming zeros, ~10 s for 10 GiB.
    """
    chunk = 1 << 20
    if zeros % chunk:
        raise ValueError("zeros must be a whole number of MiB")
    head = header(name, size=zeros)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = comp.compress(head) + comp.flush(zlib.Z_FULL_FLUSH)
    unit = comp.compress(bytes(chunk)) + comp.flush(zlib.Z_FULL_FLUSH)
    again = comp.compress(bytes(chunk)) + comp.flush(zlib.Z_FULL_FLUSH)
    assert unit == again, "a deflater after a full flush must repeat itself"
    tail = comp.compress(END) + comp.flush()
    crc = zlib.crc32(head)
    sha = hashlib.sha256(head)
    big = bytes(64 << 20)
    left = zeros
    while left:
        n = min(left, len(big))
        view = memoryview(big)[:n]
        crc = zlib.crc32(view, crc)
        sha.update(view)
        left -= n
    crc = zlib.crc32(END, crc)
    sha.update(END)
    total = len(head) + zeros + len(END)
    blob = b"".join(
        [
            b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff",
            first,
            unit * (zeros // chunk),
            tail,
            struct.pack("<II", crc & 0xFFFFFFFF, total & 0xFFFFFFFF),
        ]
    )
    return blob, "sha256:" + sha.hexdigest()


def estargz_retoc(
    blob: estargz.EStargzBlob, edit: Mapping[str, Mapping[str, object]]
) -> tuple[Layer, bytes]:
    """The eStargz blob with its TOC entries edited (by name: fields to set), the TOC member
    and footer written again; a valid blob and diff_id, and the new TOC JSON (whose sha256 is
    what a `toc.digest` annotation naming it must say)."""
    footer = estargz.footer_size(blob.blob)
    toc_json = estargz.toc_json_from_member(blob.blob[blob.toc_offset : len(blob.blob) - footer])
    doc = json.loads(toc_json)
    for entry in doc["entries"]:
        entry.update(edit.get(entry["name"], {}))
    new_json = json.dumps(doc, separators=(",", ":")).encode()
    info = tarfile.TarInfo(estargz.TOC_TAR_NAME)
    info.size = len(new_json)
    tar = info.tobuf(tarfile.USTAR_FORMAT) + new_json + bytes(-len(new_json) % BLOCK) + END
    member = gzip.compress(tar, mtime=0)
    data = blob.blob[: blob.toc_offset] + member + estargz.make_footer(blob.toc_offset)
    diff_id = "sha256:" + hashlib.sha256(gzip.decompress(data)).hexdigest()
    return Layer(data, diff_id), new_json
