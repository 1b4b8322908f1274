"""Trust domains (issue 9 cases 1, 2 and 7): no image's metadata can change what another
image serves; only what is verified against a layer's own digest is shared. A published
index is not reached from the manifest the user named: it is used only with
`--trust-published-index`, and refused once the blob shows it lied.

Images are written byte by byte (`RegistryWriter`) to the real docker-registry; the "lying
registry" of case 2 is a real registry whose blob file was replaced on its disk.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from pathlib import Path

import pytest

from imagefs import api
from imagefs.fs.lifecycle import log_path_for
from imagefs.layers import estargz
from imagefs.layers.layerindex import build_from_blob
from imagefs.oci.digest import Digest
from imagefs.oci.reference import Reference
from imagefs.published import push_indexes
from imagefs.store.lookup import load_resolved
from imagefs.testing.hostile import (
    END,
    Layer,
    RegistryWriter,
    default_config,
    estargz_retoc,
    file_entry,
)
from imagefs.testing.mounts import imagefs, mounted
from imagefs.testing.registry import LocalRegistry

pytestmark = pytest.mark.fuse

TRUE_A = b"the true a.txt\n" * 200
TRUE_B = b"BBBBBBBBBBBBBB\n" * 200  # same size: a forged offset reads a whole file
EVIL = b"attacker text!\n" * 200
TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
TRUST = ("--trust-published-index",)


def _layer() -> Layer:
    noise = random.Random(9).randbytes(64 << 10)  # incompressible: L outweighs a forgery
    tar = file_entry(b"a.txt", TRUE_A) + file_entry(b"b.txt", TRUE_B)
    tar += file_entry(b"noise.bin", noise) + END
    return Layer(gzip.compress(tar, mtime=0), "sha256:" + hashlib.sha256(tar).hexdigest())


def _evil_config(layer: Layer) -> dict[str, object]:
    return {**default_config([layer]), "config": {"Env": ["EVIL=1"]}}  # another manifest


def _cat(root: Path, ref: str, path: str, *flags: str) -> bytes:
    return imagefs(root, "cat", *flags, ref, path).stdout.encode()


async def _publish_forged_index(work: Path, ref: str, layer: Layer) -> None:
    """`imagefs index --push` as an attacker does it: the real index code, then the TOC
    edited so that a.txt has b.txt's offset (every span digest stays genuine)."""
    blob = work / "layer.blob"
    blob.write_bytes(layer.blob)
    idx = build_from_blob(blob, Digest.of(layer.blob), "gzip")
    toc = idx.toc
    ia, ib = toc.find(b"a.txt"), toc.find(b"b.txt")
    assert ia is not None and ib is not None
    toc._offsets[ia] = toc.offset(ib)
    async with api.Session(root=work / "attacker") as session:
        await api.pull(session, ref)
        record = await session.disk(api.find_record, session.store, ref)
        image = load_resolved(session.store, record.manifest.digest, record.index_digest)
        r = Reference.parse(ref)
        await push_indexes(session.client(r), r.repository, image, [idx])


async def test_forged_published_index_of_another_image_is_never_used(
    tmp_path: Path, registry: LocalRegistry, repo_name: str
) -> None:
    writer = RegistryWriter(registry)
    layer = _layer()
    good = writer.image(f"{repo_name}/good", "v", [layer])
    evil = writer.image(f"{repo_name}/evil", "x", [layer], config=_evil_config(layer))
    await _publish_forged_index(tmp_path, evil, layer)

    root = tmp_path / "victim"  # trusts published indexes: each only for its own image
    with mounted(root, evil, tmp_path / "m-evil", mount_args=TRUST) as mnt:  # attacker's view
        assert (mnt / "a.txt").read_bytes() == TRUE_B
    assert _cat(root, good, "a.txt", *TRUST) == TRUE_A
    with mounted(root, good, tmp_path / "m-good", mount_args=TRUST) as mnt:
        assert (mnt / "a.txt").read_bytes() == TRUE_A
    imagefs(root, "check")  # all bindings hold: the forgery is evil's, bound to evil
    imagefs(root, "pull", "--full", good)
    imagefs(root, "check", "--repair")
    assert _cat(root, good, "a.txt") == TRUE_A

    # The owner of good/v publishes from this store: what goes out is built from the blob.
    imagefs(root, "index", "--push", good)
    fresh = tmp_path / "fresh"
    with mounted(fresh, good, tmp_path / "m-fresh", mount_args=TRUST) as mnt:
        assert (mnt / "a.txt").read_bytes() == TRUE_A
    log = next((fresh / "logs").glob("mount-*.log")).read_text()
    assert "registry index" in log  # it really was the published index that was used
    # once the blob is local, its own index comes first for every image, evil/x included
    assert _cat(root, evil, "a.txt") == TRUE_A


def _pad_estargz(blob: estargz.EStargzBlob, size: int) -> bytes:
    """The same eStargz blob grown to `size` bytes with zeros before the TOC member."""
    footer = estargz.footer_size(blob.blob)
    pad = size - len(blob.blob)
    assert pad >= 0
    return (
        blob.blob[: blob.toc_offset]
        + bytes(pad)
        + blob.blob[blob.toc_offset : len(blob.blob) - footer]
        + estargz.make_footer(blob.toc_offset + pad)
    )


def _registry_blob_file(registry: LocalRegistry, digest: str) -> Path:
    hexd = digest.split(":")[1]
    path = registry.storage_dir / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"
    assert path.is_file(), path
    return path


async def test_lying_registry_cannot_poison_another_image(
    tmp_path: Path,
    registry: LocalRegistry,
    fresh_registry: LocalRegistry,
    repo_name: str,
) -> None:
    layer = _layer()
    good = RegistryWriter(registry).image(f"{repo_name}/good", "v", [layer])
    # Registry H: the honest L is uploaded, then its file on disk is replaced by a forged
    # eStargz blob of the same size; evil/x names L with the forged TOC's digest.
    forged = estargz.write_estargz(
        [estargz.FileSpec("a.txt", data=EVIL), estargz.FileSpec("b.txt", data=EVIL)],
        prefetch=2,
    )
    data = _pad_estargz(forged, len(layer.blob))
    digest = "sha256:" + hashlib.sha256(layer.blob).hexdigest()
    desc = {
        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
        "digest": digest,
        "size": len(layer.blob),
        "annotations": {TOC_DIGEST: forged.toc_digest},
    }
    evil = RegistryWriter(fresh_registry).image(
        f"{repo_name}/evil", "x", [layer], config=_evil_config(layer), layer_descriptors=[desc]
    )
    _registry_blob_file(fresh_registry, digest).write_bytes(data)

    root = tmp_path / "victim"
    with mounted(root, evil, tmp_path / "m-evil") as mnt:
        assert (mnt / "a.txt").read_bytes() == EVIL  # what H chose to show, under H's TOC
    with mounted(root, good, tmp_path / "m-good") as mnt:
        assert (mnt / "a.txt").read_bytes() == TRUE_A
        assert (mnt / "b.txt").read_bytes() == TRUE_B
    assert _cat(root, good, "a.txt") == TRUE_A


async def test_estargz_toc_that_lies_about_its_tar_stream_is_refused(
    tmp_path: Path, registry: LocalRegistry, repo_name: str
) -> None:
    honest = estargz.write_estargz(
        [estargz.FileSpec("a.txt", data=TRUE_A), estargz.FileSpec("b.txt", data=TRUE_B)]
    )
    entries = json.loads(
        estargz.toc_json_from_member(
            honest.blob[honest.toc_offset : len(honest.blob) - estargz.footer_size(honest.blob)]
        )
    )["entries"]
    b = next(e for e in entries if e["name"] == "b.txt")
    lie = {k: b[k] for k in ("offset", "digest", "chunkDigest")}
    layer, toc_json = estargz_retoc(honest, {"a.txt": lie})
    toc_digest = "sha256:" + hashlib.sha256(toc_json).hexdigest()
    writer = RegistryWriter(registry)
    desc = {
        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
        **writer.put_blob(repo_name, layer.blob),
        "annotations": {TOC_DIGEST: toc_digest},
    }
    ref = writer.image(repo_name, "v", [layer], layer_descriptors=[desc])

    root = tmp_path / "root"
    with mounted(root, ref, tmp_path / "m1") as mnt:
        lazy = (mnt / "a.txt").read_bytes()
    assert lazy == TRUE_B  # lazily, the TOC is all there is (its chunks verify)
    imagefs(root, "pull", "--full", ref)
    with mounted(root, ref, tmp_path / "m2") as mnt:
        assert (mnt / "a.txt").read_bytes() == TRUE_A  # the tar stream
        assert (mnt / "b.txt").read_bytes() == TRUE_B
    logs = "".join(p.read_text() for p in (root / "logs").glob("mount-*.log"))
    assert "disagrees with the tar stream" in logs
    refused = list((root / "indexes" / "refused").iterdir())
    assert len(refused) == 1 and toc_digest.split(":")[1] in refused[0].name
    # A later lazy mount in this store (blob and its index gone) does not use the TOC.
    layer_hex = Digest.of(layer.blob).hex
    (root / "blobs" / "sha256" / layer_hex).unlink()
    (root / "indexes" / "layer" / "sha256" / layer_hex).unlink()
    with mounted(root, ref, tmp_path / "m3") as mnt:
        assert (mnt / "a.txt").read_bytes() == TRUE_A
    # A fresh store agrees once it has the whole blob.
    fresh = tmp_path / "fresh"
    imagefs(fresh, "pull", "--full", ref)
    assert _cat(fresh, ref, "a.txt") == TRUE_A


def test_two_images_sharing_a_layer_share_its_toc_and_pieces(
    tmp_path: Path, registry: LocalRegistry, repo_name: str
) -> None:
    data = random.Random(5).randbytes(600_000)
    blob = estargz.write_estargz(
        [estargz.FileSpec("a.txt", data=TRUE_A), estargz.FileSpec("big.bin", data=data)],
        chunk_size=200_000,
    )
    layer = Layer(blob.blob, blob.diff_id)
    writer = RegistryWriter(registry)
    desc = {
        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
        **writer.put_blob(repo_name, blob.blob),
        "annotations": {TOC_DIGEST: blob.toc_digest},
    }
    one = writer.image(repo_name, "one", [layer], layer_descriptors=[desc])
    two = writer.image(
        repo_name, "two", [layer], config=_evil_config(layer), layer_descriptors=[desc]
    )
    root = tmp_path / "root"
    registry.mark()
    with mounted(root, one, tmp_path / "m1") as mnt:
        assert (mnt / "big.bin").read_bytes() == data
    assert any(r.path.endswith(desc["digest"]) for r in registry.blob_gets())
    registry.mark()
    with mounted(root, two, tmp_path / "m2") as mnt:
        assert (mnt / "big.bin").read_bytes() == data
    # the same TOC verifier and the same chunk digests: nothing of the layer fetched again
    assert not [r for r in registry.blob_gets() if r.path.endswith(desc["digest"])]


def test_offline_remount_finds_its_own_published_index(
    tmp_path: Path, registry: LocalRegistry, repo_name: str
) -> None:
    from imagefs.testing.proxy import FaultProxy

    layer = _layer()
    RegistryWriter(registry).image(repo_name, "v", [layer])
    with FaultProxy(registry.url) as proxy:
        ref = f"{proxy.host}/{repo_name}:v"
        imagefs(tmp_path / "publisher", "index", "--push", ref)
        root = tmp_path / "root"
        with mounted(root, ref, tmp_path / "m1", mount_args=TRUST) as mnt:
            assert (mnt / "a.txt").read_bytes() == TRUE_A
        proxy.stop()
        # the referrer record of this manifest leads to the kept index: no registry needed
        with mounted(root, ref, tmp_path / "m2", mount_args=TRUST) as mnt:
            assert (mnt / "a.txt").read_bytes() == TRUE_A
    log = log_path_for(root, (tmp_path / "m2").absolute()).read_text()  # the offline one's
    assert "registry index" in log and "fetching the whole blob" not in log


async def test_an_index_attached_to_the_image_itself_is_used_only_when_trusted(
    tmp_path: Path, registry: LocalRegistry, repo_name: str
) -> None:
    """Anyone who can push to the repository can attach an index with subject = the image
    the user names. By default it is never read: the layer is indexed from its verified
    blob. Trusted, it is served lazily — and refused for good once the blob shows it lied."""
    layer = _layer()
    ref = RegistryWriter(registry).image(repo_name, "v", [layer])
    await _publish_forged_index(tmp_path, ref, layer)

    root = tmp_path / "default"
    with mounted(root, ref, tmp_path / "m0") as mnt:
        assert (mnt / "a.txt").read_bytes() == TRUE_A
    assert _cat(tmp_path / "default-cat", ref, "a.txt") == TRUE_A
    log = log_path_for(root, (tmp_path / "m0").absolute()).read_text()
    assert "registry index" not in log and "built from the blob" in log

    trusting = tmp_path / "trusting"
    with mounted(trusting, ref, tmp_path / "m1", mount_args=TRUST) as mnt:
        assert (mnt / "a.txt").read_bytes() == TRUE_B  # what opting in risks, documented
    imagefs(trusting, "pull", "--full", ref)
    with mounted(trusting, ref, tmp_path / "m2", mount_args=TRUST) as mnt:
        assert (mnt / "a.txt").read_bytes() == TRUE_A  # the blob's own index, checked against
    log = log_path_for(trusting, (tmp_path / "m2").absolute()).read_text()
    assert "published TOC" in log and "disagrees with the tar stream" in log, log
    refused = list((trusting / "indexes" / "refused").iterdir())
    assert len(refused) == 1 and "-published-" in refused[0].name
    # The blob and its index gone, a trusting mount still never uses the refused index.
    layer_hex = Digest.of(layer.blob).hex
    (trusting / "blobs" / "sha256" / layer_hex).unlink()
    (trusting / "indexes" / "layer" / "sha256" / layer_hex).unlink()
    assert _cat(trusting, ref, "a.txt", *TRUST) == TRUE_A
