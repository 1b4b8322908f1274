"""pull / images / tag / inspect / push / rmi / prune against a real docker-registry.

Images are made by umoci and pushed by skopeo (imagefs.testing); skopeo checks what imagefs
pushed. Each test has its own store root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from imagefs import api
from imagefs.errors import ImageInUse, IntegrityError, NotFound, RegistryUnreachable
from imagefs.oci.digest import Digest
from imagefs.oci.platform import Platform
from imagefs.registry.transport import TransportOptions
from imagefs.store import MountRecord, Store
from imagefs.testing.images import (
    SampleImage,
    push,
    push_multiplatform,
    skopeo_inspect,
    small_sample_image,
)
from imagefs.testing.registry import LocalRegistry


@pytest.fixture(autouse=True)
def _isolated_docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))


def session(tmp_path: Path, **options: object) -> api.Session:
    return api.Session(root=tmp_path / "root", options=TransportOptions(**options))  # type: ignore[arg-type]


def imagefs_cli(
    *args: str, root: Path, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imagefs", "--root", str(root), *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=120,
    )


async def test_lazy_pull_stores_metadata_only(
    tmp_path: Path, sample_image: SampleImage, registry: LocalRegistry
) -> None:
    registry.mark()
    async with session(tmp_path) as s:
        result = await api.pull(s, sample_image.ref)
        assert str(result.image.repo_digest) == sample_image.digest
        [summary] = await api.images(s)
    layer_digests = {str(layer.digest) for layer in result.image.layers}
    fetched = {r.path.rsplit("/", 1)[1] for r in registry.blob_gets()}
    assert fetched == {str(result.image.id)}  # the config, and no layer
    assert not layer_digests & fetched
    assert summary.cached == 0 and summary.size > 300_000
    store = Store(tmp_path / "root")
    assert store.blobs.has(result.image.manifest_digest) and store.blobs.has(result.image.id)
    assert not any(store.blobs.has(d) for d in (layer.digest for layer in result.image.layers))


async def test_full_pull_downloads_and_verifies_every_layer(
    tmp_path: Path, sample_image: SampleImage
) -> None:
    async with session(tmp_path) as s:
        result = await api.pull(s, sample_image.ref, full=True)
        [summary] = await api.images(s)
    store = Store(tmp_path / "root")
    for layer in result.image.layers:
        data = store.blobs.path(layer.digest).read_bytes()
        assert Digest.of(data) == layer.digest and len(data) == layer.size
    assert summary.cached == sum(layer.size for layer in result.image.layers)
    # The store is an OCI layout that skopeo can copy from by the full reference.
    out = tmp_path / "copied"
    subprocess.run(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "-q",
            f"oci:{tmp_path / 'root'}:{sample_image.ref}",
            f"dir:{out}",
        ],
        check=True,
        capture_output=True,
    )
    assert (out / "manifest.json").read_bytes() == store.blobs.read(result.image.manifest_digest)


async def test_second_pull_is_up_to_date(tmp_path: Path, sample_image: SampleImage) -> None:
    async with session(tmp_path) as s:
        first = await api.pull(s, sample_image.ref)
        second = await api.pull(s, sample_image.ref)
    assert not first.up_to_date and second.up_to_date


async def test_tag_images_inspect(tmp_path: Path, sample_image: SampleImage) -> None:
    async with session(tmp_path) as s:
        pulled = await api.pull(s, sample_image.ref)
        image_id = str(pulled.image.id)
        await api.tag(s, image_id[7:19], "example.com/team/app:1.0")
        await api.tag(s, sample_image.ref, "other:latest")
        listed = await api.images(s)
        assert {(i.repository, i.tag) for i in listed} == {
            (f"{sample_image.pushed.host}/sample/small", "v1"),
            ("example.com/team/app", "1.0"),
            ("other", "latest"),
        }
        assert {str(i.image.id) for i in listed} == {image_id}
        filtered = await api.images(s, "example.com/team/*")
        assert [i.tag for i in filtered] == ["1.0"]
        [info] = await api.inspect(s, ["other"])
    assert info["Id"] == image_id
    assert sorted(info["RepoTags"]) == sorted(
        [sample_image.ref, "example.com/team/app:1.0", "other:latest"]
    )
    assert info["RepoDigests"] == [f"{sample_image.pushed.host}/sample/small@{sample_image.digest}"]
    assert info["Config"]["Env"] == list(sample_image.env)
    assert info["Config"]["Cmd"] == list(sample_image.cmd)
    assert info["Config"]["WorkingDir"] == sample_image.working_dir
    assert info["Config"]["Labels"] == dict(sample_image.labels)
    assert info["Architecture"] and info["Os"] == "linux"
    layers = info["ImageFS"]["Layers"]
    assert len(layers) == sample_image.layer_count == len(info["RootFS"]["Layers"])
    assert [entry["DiffID"] for entry in layers] == info["RootFS"]["Layers"]
    assert all(entry["Cached"] == 0 for entry in layers)
    assert info["ImageFS"]["ManifestDigest"] == sample_image.digest
    json.dumps(info)  # plain JSON all the way down


async def test_push_to_another_repository_mounts_blobs(
    tmp_path: Path, sample_image: SampleImage, registry: LocalRegistry, repo_name: str
) -> None:
    target = f"{registry.host}/{repo_name}:copy"
    async with session(tmp_path) as s:
        await api.pull(s, sample_image.ref)  # lazy: no layer is local
        await api.tag(s, sample_image.ref, target)
        result = await api.push(s, target)
    assert not result.uploaded and len(result.mounted) == sample_image.layer_count + 1
    theirs = skopeo_inspect(registry, f"{repo_name}:copy")
    original = skopeo_inspect(registry, sample_image.pushed.repo_tag)
    assert theirs["Digest"] == original["Digest"] == str(result.digest)
    assert theirs["Layers"] == original["Layers"]


async def test_push_of_a_lazy_image_to_another_registry_streams_from_the_source(
    tmp_path: Path, sample_image: SampleImage, fresh_registry: LocalRegistry
) -> None:
    target = f"{fresh_registry.host}/elsewhere/app:v1"
    async with session(tmp_path) as s:
        await api.pull(s, sample_image.ref)
        await api.tag(s, sample_image.ref, target)
        result = await api.push(s, target)
        store = s.store
        assert len(result.uploaded) == sample_image.layer_count + 1
        # nothing was kept locally on the way: the image is still lazy
        [summary] = [
            i for i in await api.images(s) if i.tag == "v1" and "elsewhere" in i.repository
        ]
        assert summary.cached == 0
        again = await api.push(s, target)
        assert not again.uploaded and len(again.existed) == sample_image.layer_count + 1
    theirs = skopeo_inspect(fresh_registry, "elsewhere/app:v1")
    assert theirs["Digest"] == sample_image.digest
    assert store.records()


async def test_rmi_deletes_only_unshared_blobs(
    tmp_path: Path, registry: LocalRegistry, repo_name: str
) -> None:
    work = tmp_path / "build"
    work.mkdir()
    a = small_sample_image(work / "a", registry, f"{repo_name}-a:v1")
    async with session(tmp_path) as s:
        pa = await api.pull(s, a.ref, full=True)
        await api.tag(s, a.ref, "copy:v1")
        first = await api.rmi(s, [a.ref])
        assert first.untagged == [a.ref] and first.deleted == []  # still named "copy:v1"
        store = s.store
        assert all(store.blobs.has(layer.digest) for layer in pa.image.layers)
        second = await api.rmi(s, ["copy:v1"])
        deleted = {d for d, _ in second.deleted}
        layers = {layer.digest for layer in pa.image.layers}
        expected = {pa.image.manifest_digest, pa.image.id, *layers}
        assert deleted == expected
        assert not any(store.blobs.has(d) for d in expected)
        assert await api.images(s, all_images=True) == []


async def test_rmi_keeps_blobs_another_image_shares(
    tmp_path: Path, registry: LocalRegistry, repo_name: str
) -> None:
    work = tmp_path / "build"
    work.mkdir()
    a = small_sample_image(work / "a", registry, f"{repo_name}:a")
    # same layers, other config: push the same layout with another label via skopeo's dir copy
    b_pushed = push(a.layout, registry, f"{repo_name}:b", format="v2s2")
    async with session(tmp_path) as s:
        pa = await api.pull(s, a.ref, full=True)
        pb = await api.pull(s, b_pushed.ref, full=True)
        a_layers = {layer.digest for layer in pa.image.layers}
        shared = a_layers & {layer.digest for layer in pb.image.layers}
        assert shared, "v2s2 copy of the same layout shares the gzip layers"
        await api.rmi(s, [a.ref])
        assert all(s.store.blobs.has(d) for d in shared)
        assert s.store.blobs.has(pb.image.manifest_digest)


async def test_rmi_takes_each_query_on_its_own(tmp_path: Path, sample_image: SampleImage) -> None:
    # docker's way: an unknown name is an error of its own; the others are still removed.
    async with session(tmp_path) as s:
        await api.pull(s, sample_image.ref)
        with pytest.raises(NotFound, match="no such image: nothere:v9"):
            await api.rmi(s, ["nothere:v9", sample_image.ref])
        assert await api.images(s) == []


async def test_rmi_refuses_a_mounted_image_unless_forced(
    tmp_path: Path, sample_image: SampleImage
) -> None:
    from imagefs.fs.lifecycle import MountRegistration

    async with session(tmp_path) as s:
        pulled = await api.pull(s, sample_image.ref)
        reg = MountRegistration(
            s.store,
            MountRecord(
                "/mnt/somewhere",
                os.getpid(),
                sample_image.ref,
                str(pulled.image.manifest_digest),
                api.now_rfc3339(),
            ),
        )
        try:
            with pytest.raises(ImageInUse, match="mounted at /mnt/somewhere"):
                await api.rmi(s, [sample_image.ref])
            assert await api.images(s)
            forced = await api.rmi(s, [sample_image.ref], force=True)
            assert forced.untagged[0] == sample_image.ref and forced.deleted == []
            [left] = await api.images(s)  # in use: listed as a dangling <none> image
            assert (left.repository, left.tag) == ("<none>", "<none>")
            assert (await api.prune(s)).blobs == []  # still mounted: kept
        finally:
            reg.close()
        assert len(await api.images(s)) == 1
        assert (await api.prune(s)).blobs and await api.images(s) == []


async def test_prune_removes_unreferenced_blobs(tmp_path: Path, sample_image: SampleImage) -> None:
    async with session(tmp_path) as s:
        pulled = await api.pull(s, sample_image.ref, full=True)
        stray = s.store.blobs.put(b"nobody references me")
        freed = await api.prune(s)
        assert [d for d, _ in freed.blobs] == [stray]
        assert all(s.store.blobs.has(layer.digest) for layer in pulled.image.layers)


async def test_multiplatform_index_picks_the_platform(
    tmp_path: Path, registry: LocalRegistry, repo_name: str
) -> None:
    pushed = push_multiplatform(tmp_path / "mp", registry, f"{repo_name}:multi")
    by_arch = {p.architecture: p for p in pushed.platforms}
    async with session(tmp_path) as s:
        arm = await api.pull(s, pushed.image.ref, platform=Platform.parse("linux/arm64/v8"))
        assert str(arm.image.manifest_digest) == by_arch["arm64"].digest
        assert str(arm.image.repo_digest) == pushed.image.digest  # docker shows the index digest
        amd = await api.pull(s, pushed.image.ref, platform=Platform.parse("linux/amd64"))
        assert str(amd.image.manifest_digest) == by_arch["amd64"].digest
        with pytest.raises(NotFound, match="s390x"):
            await api.pull(s, pushed.image.ref, platform=Platform.parse("linux/s390x"))


@pytest.mark.parametrize("fmt,compression", [("v2s2", None), ("oci", "zstd")])
async def test_pull_docker_v2s2_and_zstd(
    tmp_path: Path,
    sample_image: SampleImage,
    registry: LocalRegistry,
    repo_name: str,
    fmt: str,
    compression: str | None,
) -> None:
    pushed = push(
        sample_image.layout,
        registry,
        f"{repo_name}:x",
        format=fmt,  # type: ignore[arg-type]
        compression=compression,  # type: ignore[arg-type]
    )
    async with session(tmp_path) as s:
        result = await api.pull(s, pushed.ref, full=True)
    want = (
        "application/vnd.docker.distribution.manifest.v2+json"
        if fmt == "v2s2"
        else "application/vnd.oci.image.manifest.v1+json"
    )
    assert result.image.manifest.media_type == want
    if compression == "zstd":
        assert all(layer.descriptor.media_type.endswith("+zstd") for layer in result.image.layers)


async def test_pull_by_digest_and_name_tag_digest(
    tmp_path: Path, sample_image: SampleImage
) -> None:
    async with session(tmp_path) as s:
        by_digest = await api.pull(s, sample_image.pushed.digest_ref)
        assert by_digest.record.name is None
        [only] = await api.images(s)  # listed, as docker lists it: TAG <none>
        assert only.tag == "<none>" and only.repository == sample_image.ref.rpartition(":")[0]
        both = await api.pull(s, f"{sample_image.ref}@{sample_image.digest}")
        assert str(both.image.manifest_digest) == sample_image.digest


async def test_concurrent_pulls_of_one_image_both_succeed(
    tmp_path: Path, sample_image: SampleImage
) -> None:
    root = tmp_path / "root"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "imagefs",
                "--root",
                str(root),
                "pull",
                "--full",
                sample_image.ref,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for p in procs:
        _out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    records = Store(root).records()
    assert len(records) == 1
    assert not list((root / "ingest").glob("*.partial"))


async def test_interrupted_download_resumes_with_range(
    tmp_path: Path, sample_image: SampleImage, registry: LocalRegistry
) -> None:
    async with session(tmp_path) as s:
        meta = await api.pull(s, sample_image.ref)
        big = max(meta.image.layers, key=lambda layer: layer.size)
        blob = subprocess.run(
            [
                "skopeo",
                "--insecure-policy",
                "copy",
                "-q",
                sample_image.layout.skopeo_ref,
                f"dir:{tmp_path / 'dir'}",
            ],
            check=True,
            capture_output=True,
        )
        del blob
        data = (tmp_path / "dir" / big.digest.hex).read_bytes()
        partial = tmp_path / "root" / "ingest" / f"{big.digest.hex}.partial"
        partial.parent.mkdir(exist_ok=True)
        partial.write_bytes(data[: len(data) // 2])  # as a killed pull leaves it
        registry.mark()
        await api.pull(s, sample_image.ref, full=True)
    assert s.store.blobs.path(big.digest).read_bytes() == data
    big_gets = [r for r in registry.blob_gets() if big.digest.hex in r.path]
    assert [r.status for r in big_gets] == [206]
    assert big_gets[0].bytes_written == len(data) - len(data) // 2


async def test_corrupted_blob_in_registry_stores_nothing(
    tmp_path: Path, fresh_registry: LocalRegistry
) -> None:
    sample = small_sample_image(tmp_path / "b", fresh_registry, "bad/blob:v1")
    async with session(tmp_path) as s:
        meta = await api.pull(s, sample.ref)
        victim = max(meta.image.layers, key=lambda layer: layer.size)
        data_file = next(
            fresh_registry.storage_dir.rglob(f"blobs/sha256/*/{victim.digest.hex}/data")
        )
        raw = bytearray(data_file.read_bytes())
        raw[len(raw) // 2] ^= 0x55
        data_file.write_bytes(bytes(raw))
        with pytest.raises(IntegrityError, match=victim.digest.hex):
            await api.pull(s, sample.ref, full=True)
        assert not s.store.blobs.has(victim.digest)
        partial = tmp_path / "root" / "ingest" / f"{victim.digest.hex}.partial"
        assert not partial.exists() or partial.stat().st_size == 0


async def test_corrupted_config_in_registry_is_refused(
    tmp_path: Path, fresh_registry: LocalRegistry
) -> None:
    sample = small_sample_image(tmp_path / "b", fresh_registry, "bad/config:v1")
    config_digest = sample.layout.manifest()["config"]["digest"].split(":")[1]
    data_file = next(fresh_registry.storage_dir.rglob(f"blobs/sha256/*/{config_digest}/data"))
    data_file.write_bytes(data_file.read_bytes().replace(b'"linux"', b'"LINUX"'))
    async with session(tmp_path) as s:
        with pytest.raises(IntegrityError):
            await api.pull(s, sample.ref)
        assert await api.images(s, all_images=True) == []
    assert not list((tmp_path / "root" / "blobs" / "sha256").glob("*"))


async def test_mirror_is_tried_first_and_upstream_answers_when_it_fails(
    tmp_path: Path,
    sample_image: SampleImage,
    registry: LocalRegistry,
    fresh_registry: LocalRegistry,
) -> None:
    # the mirror holds a copy of the image under the same repository name
    push(sample_image.layout, fresh_registry, sample_image.pushed.repo_tag)
    fresh_registry.mark()
    registry.mark()
    mirrors = {registry.host: [fresh_registry.url]}
    async with session(tmp_path, mirrors=mirrors) as s:
        await api.pull(s, sample_image.ref, full=True)
    assert fresh_registry.blob_gets() and not registry.blob_gets()
    # a mirror that is down: the upstream answers
    async with session(tmp_path / "2", mirrors={registry.host: ["http://127.0.0.1:9"]}) as s:
        result = await api.pull(s, sample_image.ref)
    assert str(result.image.repo_digest) == sample_image.digest


async def test_unreachable_registry_is_one_clear_error(tmp_path: Path) -> None:
    from imagefs.registry.transport import RetryPolicy

    async with session(tmp_path, retry=RetryPolicy(attempts=2, base_delay=0.01)) as s:
        with pytest.raises(RegistryUnreachable, match=r"127\.0\.0\.1:9: cannot connect"):
            await api.pull(s, "127.0.0.1:9/nothing/here:v1")


def test_cli_errors_are_one_line_with_exit_codes(tmp_path: Path, registry: LocalRegistry) -> None:
    root = tmp_path / "root"
    bad = imagefs_cli("pull", "Upper/Case", root=root)
    assert bad.returncode == 2
    assert (
        bad.stderr.strip()
        == 'imagefs: invalid reference "Upper/Case": repository name must be lowercase'
    )
    bad_tag = imagefs_cli("pull", "alpine:-bad", root=root)
    assert (
        bad_tag.returncode == 2
        and "tag" in bad_tag.stderr
        and len(bad_tag.stderr.splitlines()) == 1
    )
    bad_digest = imagefs_cli("pull", "alpine@sha256:abc", root=root)
    assert bad_digest.returncode == 2 and "digest" in bad_digest.stderr
    unknown = imagefs_cli("pull", f"{registry.host}/no/such:tag", root=root)
    assert unknown.returncode == 1
    assert unknown.stderr.startswith(
        f"imagefs: {registry.host}: manifest for no/such:tag not found"
    )
    assert "MANIFEST_UNKNOWN" in unknown.stderr or "NAME_UNKNOWN" in unknown.stderr
    assert len(unknown.stderr.splitlines()) == 1
    rmi = imagefs_cli("rmi", "ghost:1", root=root)
    assert (rmi.returncode, rmi.stderr) == (1, "imagefs: no such image: ghost:1\n")
    for out in (bad, unknown, rmi):
        assert "Traceback" not in out.stderr


def test_cli_end_to_end(tmp_path: Path, sample_image: SampleImage, registry: LocalRegistry) -> None:
    root = tmp_path / "root"
    pull = imagefs_cli("pull", sample_image.ref, root=root)
    assert pull.returncode == 0, pull.stderr
    assert f"Digest: {sample_image.digest}" in pull.stdout
    assert "Status: Downloaded newer image for" in pull.stdout
    table = imagefs_cli("images", root=root)
    header, row = table.stdout.splitlines()
    assert header.split()[:4] == ["REPOSITORY", "TAG", "IMAGE", "ID"] and "CACHED" in header
    assert row.split()[:2] == [f"{registry.host}/sample/small", "v1"]
    assert row.endswith("0B (0%)")
    full = imagefs_cli("pull", "--full", sample_image.ref, root=root)
    assert full.returncode == 0, full.stderr
    assert imagefs_cli("images", root=root).stdout.splitlines()[1].endswith("(100%)")
    ids = imagefs_cli("images", "-q", root=root).stdout.split()
    assert len(ids) == 1 and len(ids[0]) == 12
    as_json = [
        json.loads(line)
        for line in imagefs_cli("images", "--format", "json", root=root).stdout.splitlines()
    ]
    assert as_json[0]["Cached"].endswith("(100%)") and as_json[0]["Size"].endswith("kB")
    info = json.loads(imagefs_cli("inspect", sample_image.ref, root=root).stdout)
    assert info[0]["ImageFS"]["ManifestDigest"] == sample_image.digest
    rmi = imagefs_cli("rmi", sample_image.ref, root=root)
    assert rmi.returncode == 0 and f"Untagged: {sample_image.ref}" in rmi.stdout
    assert "Deleted: sha256:" in rmi.stdout
    assert not list((root / "blobs" / "sha256").iterdir())


async def test_disk_full_leaves_nothing_half_written(
    tmp_path: Path, sample_image: SampleImage
) -> None:
    from imagefs.errors import StoreError

    root = tmp_path / "small"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(root)], check=True)
    try:
        async with api.Session(root=root / "store") as s:
            with pytest.raises(StoreError, match="no space left on device"):
                await api.pull(s, sample_image.ref, full=True)
            for blob in (root / "store" / "blobs" / "sha256").iterdir():
                assert Digest.of(blob.read_bytes()).hex == blob.name  # only whole, verified blobs
    finally:
        subprocess.run(["umount", str(root)], check=True)


async def test_trio_is_not_blocked_by_a_pull(
    tmp_path: Path, sample_image: SampleImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Disk work (writing and committing ingested blobs) runs in worker threads, never in the
    trio thread: recorded per call, so a single blocking call on the event loop fails it."""
    from imagefs.store import blobs

    in_trio: list[bool] = []

    def on_trio_thread() -> bool:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            return False
        return True

    real_write, real_commit = blobs.Ingest.write, blobs.Ingest.commit

    def write(self: blobs.Ingest, data: bytes) -> None:
        in_trio.append(on_trio_thread())
        real_write(self, data)

    def commit(self: blobs.Ingest) -> Path:
        in_trio.append(on_trio_thread())
        return real_commit(self)

    monkeypatch.setattr(blobs.Ingest, "write", write)
    monkeypatch.setattr(blobs.Ingest, "commit", commit)
    async with session(tmp_path) as s:
        await api.pull(s, sample_image.ref, full=True)
    assert in_trio, "the pull wrote no blob: the test proves nothing"
    assert not any(in_trio), f"{sum(in_trio)} of {len(in_trio)} disk calls ran on the trio thread"
