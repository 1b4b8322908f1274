"""The image verbs behave as docker's do (issue 11): what a docker user types, imagefs answers
the way docker would. Everything runs the real `imagefs` command against a real registry."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from imagefs.testing.images import SampleImage, build_umoci_image, push, push_multiplatform
from imagefs.testing.mounts import mounted
from imagefs.testing.registry import LocalRegistry

pytestmark = pytest.mark.registry


@pytest.fixture(autouse=True)
def _isolated_docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))


def cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imagefs", "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def ok(root: Path, *args: str) -> str:
    out = cli(root, *args)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    return out.stdout


# -- item 2: --platform -----------------------------------------------------------------------

HOST_WARNING = (
    "WARNING: The requested image's platform (linux/arm64) does not match the detected host "
    "platform (linux/amd64) and no specific platform was requested"
)


@pytest.mark.fuse
def test_platform_is_resolved_again_when_the_local_tag_is_another(
    tmp_path: Path, registry: LocalRegistry, repo_name: str
) -> None:
    if os.uname().machine != "x86_64":
        pytest.fail("this test's expectations are written for an amd64 host")
    pushed = push_multiplatform(tmp_path / "mp", registry, f"{repo_name}:latest")
    ref, root = pushed.image.ref, tmp_path / "root"
    with mounted(root, ref, tmp_path / "a", mount_args=["--platform", "linux/amd64"]) as a:
        assert (a / "etc" / "platform").read_text() == "linux/amd64\n"
    # docker keeps one image per tag: asking for another platform resolves it again.
    with mounted(root, ref, tmp_path / "b", mount_args=["--platform", "linux/arm64"]) as b:
        assert (b / "etc" / "platform").read_text() == "linux/arm64\n"
    assert len(ok(root, "images", "-q").split()) == 1
    assert ok(root, "cat", "--platform", "linux/amd64", ref, "etc/platform") == "linux/amd64\n"
    pull = cli(root, "pull", "--platform", "linux/arm64", ref)
    assert pull.returncode == 0 and "Downloaded newer image" in pull.stdout
    assert ok(root, "cat", ref, "etc/platform") == "linux/arm64\n"
    image_id = ok(root, "images", "-q").strip()
    by_id = cli(root, "cat", "--platform", "linux/amd64", image_id, "etc/platform")
    assert by_id.returncode == 2  # an ID names the local image; it cannot be resolved again
    assert by_id.stderr == (
        f"imagefs: {image_id} is a local image for linux/arm64; name it by reference to get "
        "it for linux/amd64\n"
    )
    # Without --platform, an image of another platform than the host's gets docker's warning,
    # from cat, ls, mount and pull alike; the local image is used as it is.
    for args in (["cat", ref, "etc/platform"], ["ls", ref, "etc"]):
        out = cli(root, *args)
        assert (out.returncode, out.stderr) == (0, HOST_WARNING + "\n"), args
    mnt = tmp_path / "c"
    mnt.mkdir()
    warned = cli(root, "mount", ref, str(mnt))
    try:
        assert warned.returncode == 0 and warned.stderr.startswith(HOST_WARNING + "\n")
        assert (mnt / "etc" / "platform").read_text() == "linux/arm64\n"
    finally:
        cli(root, "umount", str(mnt))

    # A single-platform image of another platform is pulled, with the warning (an index
    # without this machine's platform is an error, as docker's "no matching manifest").
    def populate(rootfs: Path) -> None:
        (rootfs / "etc").mkdir()
        (rootfs / "etc" / "platform").write_text("linux/arm64\n")

    layout = build_umoci_image(tmp_path / "arm", [populate], tag="arm", architecture="arm64")
    arm_only = push(layout, registry, f"{repo_name}-arm:v1")
    fresh = cli(tmp_path / "root2", "pull", arm_only.ref)
    assert fresh.returncode == 0 and fresh.stderr == HOST_WARNING + "\n"


# -- items 3 and 4: rmi and images as docker's ------------------------------------------------


def test_rmi_takes_each_argument_on_its_own(
    tmp_path: Path, sample_image: SampleImage, registry: LocalRegistry, repo_name: str
) -> None:
    root = tmp_path / "root"
    other = push_multiplatform(tmp_path / "mp", registry, f"{repo_name}:v1")
    ok(root, "pull", sample_image.ref)
    ok(root, "pull", other.image.ref)
    ok(root, "tag", sample_image.ref, "elsewhere/copy:v2")  # one ID in two repositories
    ids = ok(root, "images", "-q").split()
    assert len(ids) == 2
    other_id = json.loads(ok(root, "inspect", other.image.ref))[0]["Id"]
    out = cli(root, "rmi", *ids, "ghost:1")
    assert out.returncode == 1
    sample_id = next(i for i in ids if not other_id.endswith(i) and other_id[7:19] != i)
    assert out.stderr.splitlines() == [
        f"imagefs: conflict: unable to delete {sample_id} (must be forced) - image is "
        "referenced in multiple repositories",
        "imagefs: no such image: ghost:1",
    ]
    familiar = other.image.ref
    lines = out.stdout.splitlines()
    assert lines[:3] == [
        f"Untagged: {familiar}",
        f"Untagged: {familiar.rpartition(':')[0]}@{other.image.digest}",
        f"Deleted: {other_id}",  # the image ID first, as docker prints it
    ]
    assert all(line.startswith("Deleted: sha256:") for line in lines[3:]) and len(lines) > 4
    left = ok(root, "images", "--format", "{{.Repository}}:{{.Tag}}").split()
    assert sorted(left) == sorted([sample_image.ref, "elsewhere/copy:v2"])
    # By name, each goes; the last name takes the image's blobs with it.
    gone = ok(root, "rmi", "elsewhere/copy:v2", sample_image.ref).splitlines()
    assert gone[:2] == ["Untagged: elsewhere/copy:v2", f"Untagged: {sample_image.ref}"]
    assert gone[2] == f"Untagged: {sample_image.ref.rpartition(':')[0]}@{sample_image.digest}"
    assert not list((root / "blobs" / "sha256").iterdir())


def test_images_lists_digest_pulls_and_images_untagged_while_mounted(
    tmp_path: Path, sample_image: SampleImage, registry: LocalRegistry
) -> None:
    root = tmp_path / "root"
    by_digest = cli(root, "pull", sample_image.pushed.digest_ref)
    assert by_digest.returncode == 0
    repo = sample_image.ref.rpartition(":")[0]
    assert ok(root, "images", "--format", "{{.Repository}} {{.Tag}} {{.Digest}}").split() == [
        repo,
        "<none>",
        sample_image.digest,
    ]
    again = cli(root, "pull", sample_image.pushed.digest_ref)
    assert f"Status: Image is up to date for {repo}@{sample_image.digest}" in again.stdout
    ok(root, "pull", sample_image.ref)  # now tagged: one row, as docker shows it
    assert ok(root, "images", "--format", "{{.Repository}} {{.Tag}}").splitlines() == [f"{repo} v1"]
    root = tmp_path / "root2"  # an image known by its tag only, mounted
    ok(root, "pull", sample_image.ref)
    with mounted(root, sample_image.ref, tmp_path / "mnt") as mnt:
        refused = cli(root, "rmi", sample_image.ref)
        assert refused.returncode == 1 and "is mounted at" in refused.stderr
        forced = cli(root, "rmi", "-f", sample_image.ref)
        assert forced.returncode == 0, forced.stderr
        assert f"Untagged: {sample_image.ref}" in forced.stdout
        assert "Deleted:" not in forced.stdout  # the mount still uses it
        # docker keeps it as a dangling <none> image while it is in use.
        listed = ok(root, "images", "--format", "{{.Repository}} {{.Tag}}").splitlines()
        assert listed == ["<none> <none>"]
        dangling = ok(root, "images", "-q", "--filter", "dangling=true").split()
        assert len(dangling) == 1
        assert ok(root, "images", "-q", "--filter", "dangling=false") == ""
        assert (mnt / "etc" / "hello.txt").read_bytes() == sample_image.files["etc/hello.txt"]
        assert "Total reclaimed space: 0B" in ok(root, "prune")  # still mounted: kept
    ok(root, "prune")
    assert ok(root, "images", "-q") == ""
    assert not list((root / "blobs" / "sha256").iterdir())


# -- item 5: --format and --filter ------------------------------------------------------------


def test_formats_and_filters_speak_docker(
    tmp_path: Path, sample_image: SampleImage, registry: LocalRegistry, repo_name: str
) -> None:
    root = tmp_path / "root"
    mp = push_multiplatform(tmp_path / "mp", registry, f"{repo_name}:v1")
    ok(root, "pull", mp.image.ref)  # built first: the older image
    ok(root, "pull", sample_image.ref)
    info = json.loads(ok(root, "inspect", sample_image.ref))[0]
    short = info["Id"][7:19]
    assert ok(root, "images", "--format", "{{.ID}}", sample_image.ref) == short + "\n"
    table = ok(root, "images", "--format", "table {{.Repository}}\\t{{.Tag}}", sample_image.ref)
    repo = sample_image.ref.rpartition(":")[0]
    assert table.splitlines() == [
        "REPOSITORY" + " " * (len(repo) + 3 - 10) + "TAG",
        f"{repo}   v1",
    ]
    as_json = json.loads(ok(root, "images", "--format", "{{json .}}", sample_image.ref))
    assert as_json["ID"] == short and as_json["Tag"] == "v1" and as_json["Size"].endswith("kB")
    as_json_too = json.loads(ok(root, "images", "--format", "json", sample_image.ref))
    for obj in (as_json, as_json_too):
        del obj["CreatedSince"]  # "1 minute ago" may have become "2 minutes ago" meanwhile
    assert as_json_too == as_json
    # inspect -f: Go template on docker's keys
    env = ok(root, "inspect", "-f", "{{.Config.Env}}", sample_image.ref).strip()
    assert env == "[" + " ".join(info["Config"]["Env"]) + "]"
    assert (
        json.loads(ok(root, "inspect", "-f", "{{json .Config.Cmd}}", sample_image.ref))
        == (info["Config"]["Cmd"])
    )
    joined = ok(root, "inspect", "--format", '{{join .RepoTags ","}}', sample_image.ref)
    assert joined == sample_image.ref + "\n"
    # filters
    assert ok(root, "images", "-q", "-f", f"reference={repo}") == short + "\n"
    assert ok(root, "images", "-q", "-f", "reference=*/small") == ""  # `*` stops at a `/`
    assert ok(root, "images", "-q", "-f", "reference=*/*/small") == short + "\n"
    assert ok(root, "images", "-q", "-f", f"reference={repo}:v*") == short + "\n"
    assert ok(root, "images", "-q", "-f", "label=nope") == ""
    title = "label=org.opencontainers.image.title"
    assert ok(root, "images", "-q", "-f", title) == short + "\n"
    assert ok(root, "images", "-q", "-f", f"{title}=imagefs sample") == short + "\n"
    assert ok(root, "images", "-q", "-f", f"{title}=other") == ""
    mp_id = json.loads(ok(root, "inspect", mp.image.ref))[0]["Id"][7:19]
    assert sorted(ok(root, "images", "-q", "-f", "dangling=false").split()) == sorted(
        [short, mp_id]
    )
    assert ok(root, "images", "-q", "-f", "dangling=true") == ""
    created = {i: json.loads(ok(root, "inspect", i))[0]["Created"] for i in (short, mp_id)}
    older, newer = sorted(created, key=lambda i: created[i])
    if created[older] != created[newer]:
        assert ok(root, "images", "-q", "-f", f"since={older}").split() == [newer]
        assert ok(root, "images", "-q", "-f", f"before={newer}").split() == [older]
    bad = cli(root, "images", "-f", "colour=red")
    assert (bad.returncode, bad.stderr) == (2, "imagefs: invalid filter 'colour'\n")
    bad_template = cli(root, "images", "--format", "{{.Nope}}")
    assert bad_template.returncode == 2
    assert bad_template.stderr.startswith("imagefs: template: ")
    assert 'map has no entry for key "Nope"' in bad_template.stderr
    unknown = cli(root, "images", "--bogus")
    assert unknown.returncode == 2
    assert unknown.stderr.splitlines()[-1] == "imagefs images: error: unknown flag: --bogus"
    assert unknown.stderr.startswith("usage: imagefs images ")


@pytest.mark.fuse
def test_mounts_and_stats_take_templates(tmp_path: Path, sample_image: SampleImage) -> None:
    root = tmp_path / "root"
    with mounted(root, sample_image.ref, tmp_path / "mnt") as mnt:
        (mnt / "etc" / "hello.txt").read_bytes()
        line = ok(root, "mounts", "--format", "{{.Mountpoint}} {{.Image}}")
        assert line == f"{mnt} {sample_image.ref}\n"
        [obj] = [json.loads(x) for x in ok(root, "mounts", "--format", "json").splitlines()]
        assert obj["Mountpoint"] == str(mnt) and obj["PID"] > 0
        raw = json.loads(ok(root, "stats", str(mnt), "--json"))
        fetched = ok(root, "stats", str(mnt), "--format", "{{.BytesFetched}} {{.Image}}")
        n, image = fetched.split()
        assert int(n) >= raw["bytes_fetched"] > 0 and image == raw["image"]


# -- item 7: wording --------------------------------------------------------------------------


def test_pull_wording_is_docker_s(
    tmp_path: Path, sample_image: SampleImage, registry: LocalRegistry, repo_name: str
) -> None:
    root = tmp_path / "root"
    one = push_multiplatform(tmp_path / "mp", registry, f"{repo_name}:latest")
    no_tag = one.image.ref.rpartition(":")[0]
    first = ok(root, "pull", "--platform", "linux/amd64", no_tag).splitlines()
    assert first[0] == "Using default tag: latest"
    assert first[1] == "latest: Pulled metadata (1 layer, fetched lazily when read)"
    again = ok(root, "pull", "--platform", "linux/amd64", one.image.ref)
    assert "Using default tag" not in again
    assert f"Status: Image is up to date for {one.image.ref}" in again
    sample = ok(root, "pull", sample_image.ref)
    assert "(3 layers, fetched lazily when read)" in sample
    # Off a terminal, --full prints a line per layer (docker's words), not nothing.
    full = ok(root, "pull", "--full", sample_image.ref).splitlines()
    inspect = json.loads(ok(root, "inspect", sample_image.ref))[0]
    for layer in inspect["ImageFS"]["Layers"]:
        short = layer["Digest"][7:19]
        assert f"{short}: Pull complete" in full
    assert "Status: Downloaded newer image for" in full[-2]
    again_full = ok(root, "pull", "--full", sample_image.ref).splitlines()
    for layer in inspect["ImageFS"]["Layers"]:
        assert f"{layer['Digest'][7:19]}: Already exists" in again_full
    assert f"Status: Image is up to date for {sample_image.ref}" in again_full
    missing = cli(root, "pull", f"{no_tag}@sha256:{'0' * 64}")
    assert missing.returncode == 1
    assert f"manifest for {repo_name}@sha256:{'0' * 64} not found" in missing.stderr


def test_inspect_prints_what_it_finds_and_an_error_for_the_rest(
    tmp_path: Path, sample_image: SampleImage
) -> None:
    root = tmp_path / "root"
    ok(root, "pull", sample_image.ref)
    out = cli(root, "inspect", sample_image.ref, "ghost:1")
    assert out.returncode == 1
    [found] = json.loads(out.stdout)
    assert found["RepoTags"] == [sample_image.ref]
    assert out.stderr == "imagefs: no such image: ghost:1\n"


def test_cat_of_a_directory_exits_1_like_gnu_cat(tmp_path: Path, sample_image: SampleImage) -> None:
    out = cli(tmp_path / "root", "cat", sample_image.ref, "etc")
    assert (out.returncode, out.stdout, out.stderr) == (1, "", "imagefs cat: etc: Is a directory\n")


def test_unauthorized_push_says_push(
    tmp_path: Path, sample_image: SampleImage, tls_registry: LocalRegistry
) -> None:
    root = tmp_path / "root"
    ok(root, "pull", sample_image.ref)
    target = f"{tls_registry.host}/team/pushed:v1"
    ok(root, "tag", sample_image.ref, target)
    conf = tmp_path / "conf"  # trust the registry's CA the docker way: certs.d/HOST/ca.crt
    (conf / "certs.d" / tls_registry.host).mkdir(parents=True)
    assert tls_registry.ca_file is not None
    shutil.copy(tls_registry.ca_file, conf / "certs.d" / tls_registry.host / "ca.crt")
    out = cli(root, "--config", str(conf), "push", target)
    assert out.returncode == 1
    [line] = out.stderr.splitlines()
    assert line.startswith(f"imagefs: {tls_registry.host}: unauthorized to push to team/pushed")
    assert "imagefs login" in line and ":pull" not in line
