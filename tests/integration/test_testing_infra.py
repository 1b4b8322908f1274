"""The test infrastructure is real: registries speak the protocol, images are what we say.

If these fail, every other integration test's verdict is worthless, so they check the
fixtures with independent tools (skopeo, umoci, urllib), never with imagefs itself.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Literal

import pytest

from imagefs.testing.images import (
    LayoutImage,
    SampleImage,
    SkopeoError,
    build_umoci_image,
    layout_add_tar_layer,
    push,
    push_multiplatform,
    registry_args,
    run_skopeo,
    skopeo_copy,
    skopeo_inspect,
    umoci_unpack,
)
from imagefs.testing.registry import LocalRegistry

pytestmark = pytest.mark.registry


@pytest.fixture(scope="module")
def tiny_image(tmp_path_factory: pytest.TempPathFactory) -> LayoutImage:
    """A one-layer umoci image to push around."""

    def layer(rootfs: Path) -> None:
        (rootfs / "hello.txt").write_text("hi\n")

    return build_umoci_image(tmp_path_factory.mktemp("tiny") / "layout", [layer], tag="tiny")


def _get(url: str, reg: LocalRegistry, headers: dict[str, str] | None = None) -> int:
    req = urllib.request.Request(url, headers=headers or {})
    ctx = reg.ssl_context() if reg.tls else None
    try:
        with urllib.request.urlopen(req, timeout=5, context=ctx) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


# -- registry modes ---------------------------------------------------------------------------


def test_plain_registry_push_inspect_and_access_log(
    fresh_registry: LocalRegistry, tiny_image: LayoutImage
) -> None:
    pushed = push(tiny_image, fresh_registry, "plain/tiny:1")
    assert pushed.digest == tiny_image.digest  # pushed byte for byte
    assert skopeo_inspect(fresh_registry, "plain/tiny:1", raw=True) == tiny_image.manifest()

    fresh_registry.mark()
    assert fresh_registry.requests() == []
    layer = tiny_image.layers()[0]
    url = f"{fresh_registry.url}/v2/plain/tiny/blobs/{layer['digest']}"
    assert _get(url, fresh_registry) == 200
    assert _get(url, fresh_registry, {"Range": "bytes=0-9"}) == 206
    gets = fresh_registry.blob_gets("plain/tiny")
    assert [(g.status, g.bytes_written) for g in gets] == [(200, layer["size"]), (206, 10)]


def test_tls_htpasswd_registry(
    tls_registry: LocalRegistry, tiny_image: LayoutImage, repo_name: str
) -> None:
    assert tls_registry.url.startswith("https://")
    assert tls_registry.ca_file is not None and tls_registry.ca_file.exists()
    assert tls_registry.users == {"alice": "wonderland"}
    pushed = push(tiny_image, tls_registry, f"{repo_name}:1")
    manifest = skopeo_inspect(tls_registry, f"{repo_name}:1", raw=True)
    assert manifest == tiny_image.manifest()

    with pytest.raises(SkopeoError, match=r"401|unauthorized"):
        skopeo_inspect(tls_registry, f"{repo_name}:1", raw=True, creds=("alice", "wrong"))
    with pytest.raises(SkopeoError, match=r"401|unauthorized"):
        skopeo_inspect(tls_registry, f"{repo_name}:1", raw=True, anonymous=True)
    # The CA really is needed: default trust refuses the throwaway certificate.
    with pytest.raises(SkopeoError, match="certificate"):
        run_skopeo(["inspect", "--raw", "--creds=alice:wonderland", f"docker://{pushed.ref}"])

    basic = base64.b64encode(b"alice:wonderland").decode()
    assert _get(f"{tls_registry.url}/v2/", tls_registry) == 401
    assert _get(f"{tls_registry.url}/v2/", tls_registry, {"Authorization": f"Basic {basic}"}) == 200
    assert any(r.user == "alice" for r in tls_registry.requests())


@pytest.mark.parametrize("fixture", ["token_registry", "tls_token_registry"])
def test_token_registry(
    fixture: str, request: pytest.FixtureRequest, tiny_image: LayoutImage, repo_name: str
) -> None:
    reg: LocalRegistry = request.getfixturevalue(fixture)
    issuer = reg.token_issuer
    assert issuer is not None
    issuer.clear()
    push(tiny_image, reg, f"{repo_name}:1")  # as alice (the registry's first user)
    pushes = [t for t in issuer.requests() if t.account == "alice"]
    assert pushes and all(t.authenticated and t.status == 200 for t in pushes)
    assert any("push" in t.scopes[0] for t in pushes if t.scopes)

    # Anonymous pull is allowed, and the issuer grants it pull only.
    issuer.clear()
    manifest = skopeo_inspect(reg, f"{repo_name}:1", raw=True, anonymous=True)
    assert manifest == tiny_image.manifest()
    anon = issuer.requests()
    assert anon and all(t.account is None and not t.authenticated for t in anon)
    assert all(actions == ("pull",) for t in anon for _, _, actions in t.granted)

    # Anonymous push is refused by the registry (token lacks "push").
    with pytest.raises(SkopeoError, match=r"401|unauthorized|denied"):
        push(tiny_image, reg, f"{repo_name}:2", anonymous=True)

    # Wrong password: the issuer refuses with 401.
    issuer.clear()
    with pytest.raises(SkopeoError, match=r"401|unauthorized"):
        skopeo_inspect(reg, f"{repo_name}:1", raw=True, creds=("alice", "wrong"))
    assert [t.status for t in issuer.requests()] == [401]

    # Without a token the registry challenges with our realm.
    req = urllib.request.Request(f"{reg.url}/v2/")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=5, context=reg.ssl_context() if reg.tls else None)
    challenge = info.value.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ") and issuer.realm in challenge
    assert any(r.status == 401 for r in reg.requests())


def test_token_issuer_speaks_the_protocol(token_registry: LocalRegistry, repo_name: str) -> None:
    issuer = token_registry.token_issuer
    assert issuer is not None
    basic = base64.b64encode(b"alice:wonderland").decode()
    url = f"{issuer.realm}?service={issuer.service}&scope=repository:{repo_name}:pull,push"
    req = urllib.request.Request(url, headers={"Authorization": f"Basic {basic}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        body = json.load(resp)
    assert set(body) == {"token", "access_token", "expires_in", "issued_at"}
    claims = json.loads(base64.urlsafe_b64decode(body["token"].split(".")[1] + "=="))
    assert claims["access"] == [
        {"type": "repository", "name": repo_name, "actions": ["pull", "push"]}
    ]
    # The registry accepts it.
    tok = {"Authorization": f"Bearer {body['token']}"}
    assert _get(f"{token_registry.url}/v2/{repo_name}/tags/list", token_registry, tok) == 404


# -- images -----------------------------------------------------------------------------------


def test_sample_image_unpacks_as_described(sample_image: SampleImage, tmp_path: Path) -> None:
    rootfs = umoci_unpack(sample_image.layout, tmp_path / "bundle")
    for rel, content in sample_image.files.items():
        assert (rootfs / rel).read_bytes() == content, rel
        mode = (rootfs / rel).stat().st_mode & 0o777
        assert mode == (0o755 if rel in sample_image.executables else 0o644), rel
    for rel, target in sample_image.symlinks.items():
        assert os.readlink(rootfs / rel) == target
    for rel in sample_image.dirs:
        assert (rootfs / rel).is_dir(), rel
    for rel in sample_image.absent:
        assert not os.path.lexists(rootfs / rel), rel
    assert sorted(os.listdir(rootfs / "opt/app")) == ["new.txt"]

    config = sample_image.layout.config()
    assert config["config"]["Env"] == list(sample_image.env)
    assert config["config"]["Cmd"] == list(sample_image.cmd)
    assert config["config"]["WorkingDir"] == sample_image.working_dir
    assert len(config["rootfs"]["diff_ids"]) == sample_image.layer_count


def test_sample_image_layers_hold_real_whiteouts(
    sample_image: SampleImage, registry: LocalRegistry
) -> None:
    manifest = skopeo_inspect(registry, "sample/small:v1", raw=True)
    assert len(manifest["layers"]) == 3
    names = []
    for layer in manifest["layers"]:
        blob = sample_image.layout.blob(layer["digest"])
        listing = subprocess.run(
            ["tar", "-tz"], input=blob, capture_output=True, check=True
        ).stdout.decode()
        names.append(listing.split())
    assert "etc/.wh.removed.txt" in names[1]  # umoci's whiteout for a deleted file
    assert "opt/app/.wh..wh..opq" in names[2]  # GNU tar's opaque marker
    config = skopeo_inspect(registry, "sample/small:v1", config=True)
    assert config["rootfs"]["diff_ids"] == sample_image.layout.config()["rootfs"]["diff_ids"]


def test_tar_layer_keeps_config_consistent(tiny_image: LayoutImage, tmp_path: Path) -> None:
    def populate(root: Path) -> None:
        (root / "extra").mkdir()
        (root / "extra/file").write_bytes(b"x" * 1000)

    image = layout_add_tar_layer(tiny_image, populate, compression="zstd", tag="tiny-plus")
    layers = image.layers()
    assert layers[-1]["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd"
    assert len(image.config()["rootfs"]["diff_ids"]) == len(layers) == 2
    # skopeo re-verifies every digest and size on copy.
    skopeo_copy(image.skopeo_ref, f"dir:{tmp_path / 'copy'}")


@pytest.mark.parametrize(
    ("fmt", "compression", "layer_type"),
    [
        ("v2s2", None, "application/vnd.docker.image.rootfs.diff.tar.gzip"),
        (None, "zstd", "application/vnd.oci.image.layer.v1.tar+zstd"),
        (None, "zstd:chunked", "application/vnd.oci.image.layer.v1.tar+zstd"),
    ],
)
def test_push_formats_and_compressions(
    registry: LocalRegistry,
    sample_image: SampleImage,
    repo_name: str,
    tmp_path: Path,
    fmt: str | None,
    compression: str | None,
    layer_type: str,
) -> None:
    # The gzip variant of these layers is already in this registry (sample_image): push
    # must still produce the asked-for compression, not cross-mount the gzip blobs.
    pushed = push(
        sample_image.layout,
        registry,
        f"{repo_name}:1",
        format=fmt,  # type: ignore[arg-type]
        compression=compression,  # type: ignore[arg-type]
    )
    manifest = skopeo_inspect(registry, pushed.repo_tag, raw=True)
    assert {layer["mediaType"] for layer in manifest["layers"]} == {layer_type}
    if compression == "zstd:chunked":
        for layer in manifest["layers"]:
            keys = set(layer.get("annotations", {}))
            assert any(k.endswith("zstd-chunked.manifest-position") for k in keys)
    # Round trip back to a gzip layout; umoci checks every diff_id while unpacking.
    copy = tmp_path / "roundtrip"
    skopeo_copy(
        f"docker://{pushed.ref}",
        f"oci:{copy}:x",
        [*registry_args(registry, "src"), "--dest-compress-format=gzip"],
    )
    rootfs = umoci_unpack(LayoutImage(copy, "x"), tmp_path / "bundle")
    assert (rootfs / "etc/hello.txt").read_bytes() == sample_image.files["etc/hello.txt"]
    assert not (rootfs / "etc/removed.txt").exists()


def test_multiplatform_index(registry: LocalRegistry, tmp_path: Path, repo_name: str) -> None:
    index = push_multiplatform(tmp_path, registry, f"{repo_name}:multi")
    raw = skopeo_inspect(registry, f"{repo_name}:multi", raw=True)
    assert raw["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert [(m["platform"]["os"], m["platform"]["architecture"]) for m in raw["manifests"]] == [
        ("linux", "amd64"),
        ("linux", "arm64"),
    ]
    assert [m["digest"] for m in raw["manifests"]] == [p.digest for p in index.platforms]
    for p in index.platforms:
        child = skopeo_inspect(registry, f"{repo_name}@{p.digest}", config=True)
        assert child["architecture"] == p.architecture


def test_restart_keeps_port_and_storage(
    fresh_registry: LocalRegistry, tiny_image: LayoutImage
) -> None:
    push(tiny_image, fresh_registry, "keep/tiny:1")
    url = fresh_registry.url
    fresh_registry.stop()
    assert not fresh_registry.running
    fresh_registry.start()
    assert fresh_registry.url == url
    assert skopeo_inspect(fresh_registry, "keep/tiny:1", raw=True) == tiny_image.manifest()


def _token(issuer_realm: str, service: str, scope: str) -> str:
    basic = base64.b64encode(b"alice:wonderland").decode()
    url = f"{issuer_realm}?service={service}&scope={scope}"
    req = urllib.request.Request(url, headers={"Authorization": f"Basic {basic}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return str(json.load(resp)["token"])


@pytest.mark.parametrize("algorithm", ["ES256", "RS256"])
@pytest.mark.parametrize("key_hint", ["kid", "x5c"])
def test_registry_verifies_token_signatures(
    tmp_path: Path, algorithm: Literal["ES256", "RS256"], key_hint: Literal["kid", "x5c"]
) -> None:
    users = {"alice": "wonderland"}
    with (
        LocalRegistry(
            tmp_path / "a",
            auth="token",
            users=users,
            token_algorithm=algorithm,
            token_key_hint=key_hint,
        ) as reg,
        LocalRegistry(tmp_path / "b", auth="token", users=users) as other,
    ):
        assert reg.token_issuer is not None and other.token_issuer is not None
        scope = "repository:x/y:pull"
        good = _token(reg.token_issuer.realm, reg.service, scope)
        forged = _token(other.token_issuer.realm, reg.service, scope)  # another signer
        catalog = f"{reg.url}/v2/x/y/tags/list"
        assert _get(catalog, reg, {"Authorization": f"Bearer {good}"}) == 404  # accepted
        assert _get(catalog, reg, {"Authorization": f"Bearer {forged}"}) == 401


def test_plain_registry_needs_no_test_only_dependency(tmp_path: Path) -> None:
    """tools/demo runs on a fresh clone, whose venv lacks the test extra (issue 11, item 1)."""
    script = f"""
import sys
for name in ("bcrypt", "trustme", "cryptography"):
    sys.modules[name] = None  # `import bcrypt` now fails as it does without the test extra
import imagefs.testing, imagefs.testing.mounts
from imagefs.testing.registry import LocalRegistry
with LocalRegistry({str(tmp_path)!r}) as reg:
    print(reg.url)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("http://127.0.0.1:")
