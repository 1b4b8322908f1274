"""Auth and TLS against the real registry: htpasswd over TLS, and token auth with an issuer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from imagefs import api
from imagefs.errors import RegistryUnreachable, Unauthorized
from imagefs.registry import credentials
from imagefs.registry.transport import TransportOptions
from imagefs.testing.images import SampleImage, skopeo_inspect, small_sample_image
from imagefs.testing.registry import LocalRegistry

ALICE = ("alice", "wonderland")


@pytest.fixture(autouse=True)
def docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "docker-config"
    monkeypatch.setenv("DOCKER_CONFIG", str(path))
    return path


def trusting(tmp_path: Path, reg: LocalRegistry) -> TransportOptions:
    """A config dir with the registry's CA in certs.d/HOST:PORT/ca.crt (docker's layout)."""
    conf = tmp_path / "conf"
    (conf / "certs.d" / reg.host).mkdir(parents=True, exist_ok=True)
    assert reg.ca_file is not None
    shutil.copy(reg.ca_file, conf / "certs.d" / reg.host / "ca.crt")
    return TransportOptions(config_dir=conf)


@pytest.fixture(scope="module")
def tls_sample(
    tls_registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory
) -> SampleImage:
    return small_sample_image(
        tmp_path_factory.mktemp("tls"), tls_registry, "secure/app:v1", creds=ALICE
    )


async def test_tls_registry_without_its_ca_is_refused(
    tmp_path: Path, tls_registry: LocalRegistry, tls_sample: SampleImage
) -> None:
    async with api.Session(root=tmp_path / "root") as s:
        with pytest.raises(RegistryUnreachable, match="TLS certificate not trusted"):
            await api.pull(s, tls_sample.ref)


async def test_a_plain_http_loopback_registry_is_reached_without_loading_certificates(
    tmp_path: Path, sample_image: SampleImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scheme probe asks whether a loopback registry speaks TLS over a context that
    loads no certificate: with the CA bundle unreadable, a plain-HTTP registry is still
    pulled from (loading the bundle would have failed, naming the file)."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))
    async with api.Session(root=tmp_path / "root") as s:
        pulled = await api.pull(s, sample_image.ref, full=True)
    assert str(pulled.image.repo_digest) == sample_image.digest


async def test_a_loopback_tls_registry_is_still_probed_with_its_verified_context(
    tmp_path: Path,
    tls_registry: LocalRegistry,
    tls_sample: SampleImage,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once the sniff finds TLS, the registry's own context (its certificates loaded) is
    what connects: an unreadable CA bundle is then the error, named."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))
    options = trusting(tmp_path, tls_registry)
    async with api.Session(root=tmp_path / "root", options=options) as s:
        unreadable = r"cannot load TLS certificates from .*missing\.pem"
        with pytest.raises(RegistryUnreachable, match=unreadable):
            await api.pull(s, tls_sample.ref)


async def test_tls_with_ca_but_no_login_suggests_login(
    tmp_path: Path, tls_registry: LocalRegistry, tls_sample: SampleImage
) -> None:
    async with api.Session(root=tmp_path / "root", options=trusting(tmp_path, tls_registry)) as s:
        with pytest.raises(Unauthorized, match=f"imagefs login {tls_registry.host}"):
            await api.pull(s, tls_sample.ref)


async def test_login_checks_and_stores_basic_credentials(
    tmp_path: Path, tls_registry: LocalRegistry, tls_sample: SampleImage, docker_config: Path
) -> None:
    options = trusting(tmp_path, tls_registry)
    async with api.Session(root=tmp_path / "root", options=options) as s:
        with pytest.raises(Unauthorized):
            await api.login(s, tls_registry.host, "alice", "wrong")
        assert not (docker_config / "config.json").exists()
        await api.login(s, tls_registry.host, *ALICE)
    cfg = docker_config / "config.json"
    assert cfg.stat().st_mode & 0o777 == 0o600
    assert tls_registry.host in json.loads(cfg.read_text())["auths"]
    async with api.Session(root=tmp_path / "root", options=options) as s:
        pulled = await api.pull(s, tls_sample.ref, full=True)
        assert str(pulled.image.repo_digest) == tls_sample.digest
        target = f"{tls_registry.host}/secure/pushed:v2"
        await api.tag(s, tls_sample.ref, target)
        await api.push(s, target)
        assert await api.logout(s, tls_registry.host)
    assert credentials.lookup(tls_registry.host) is None
    assert (
        skopeo_inspect(tls_registry, "secure/pushed:v2", creds=ALICE)["Digest"] == tls_sample.digest
    )


def test_cli_login_password_stdin(
    tmp_path: Path, tls_registry: LocalRegistry, docker_config: Path
) -> None:
    options = trusting(tmp_path, tls_registry)
    assert options.config_dir is not None
    base = [
        sys.executable,
        "-m",
        "imagefs",
        "--root",
        str(tmp_path / "r"),
        "--config",
        str(options.config_dir),
    ]
    ok = subprocess.run(
        [*base, "login", "-u", "alice", "--password-stdin", tls_registry.host],
        input="wonderland\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0 and ok.stdout.strip() == "Login Succeeded", ok.stderr
    bad = subprocess.run(
        [*base, "login", "-u", "alice", "--password-stdin", tls_registry.host],
        input="nope\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "unauthorized" in bad.stderr and "Traceback" not in bad.stderr
    assert "nope" not in bad.stderr and "wonderland" not in bad.stderr + bad.stdout
    out = subprocess.run([*base, "logout", tls_registry.host], capture_output=True, text=True)
    assert out.stdout.strip() == f"Removing login credentials for {tls_registry.host}"


async def test_token_auth_anonymous_pull_reuses_tokens(
    tmp_path: Path, token_registry: LocalRegistry
) -> None:
    sample = small_sample_image(tmp_path / "b", token_registry, "tok/app:v1", creds=ALICE)
    issuer = token_registry.token_issuer
    assert issuer is not None
    issuer.clear()
    async with api.Session(root=tmp_path / "root") as s:
        await api.pull(s, sample.ref, full=True)
    seen = issuer.requests()
    assert len(seen) == 1, seen  # one token for manifest, config and every layer
    assert seen[0].scopes == ("repository:tok/app:pull",) and not seen[0].authenticated


async def test_token_auth_push_needs_login_then_asks_pull_push(
    tmp_path: Path, token_registry: LocalRegistry
) -> None:
    sample = small_sample_image(tmp_path / "b", token_registry, "tok/src:v1", creds=ALICE)
    issuer = token_registry.token_issuer
    assert issuer is not None
    target = f"{token_registry.host}/tok/dst:v1"
    async with api.Session(root=tmp_path / "root") as s:
        await api.pull(s, sample.ref)
        await api.tag(s, sample.ref, target)
        with pytest.raises(Unauthorized, match="imagefs login"):
            await api.push(s, target)
        await api.login(s, token_registry.host, *ALICE)
    issuer.clear()
    async with api.Session(root=tmp_path / "root") as s:
        result = await api.push(s, target)
    assert result.mounted  # same registry: blobs are mounted from tok/src
    scopes = {sc for r in issuer.requests() for sc in r.scopes}
    assert "repository:tok/dst:pull,push" in scopes
    assert all(r.authenticated for r in issuer.requests())
    assert skopeo_inspect(token_registry, "tok/dst:v1", creds=ALICE)["Digest"] == sample.digest


async def test_token_realm_on_another_host_gets_the_registrys_credentials(
    tmp_path: Path, token_registry: LocalRegistry
) -> None:
    """The registry's *own* challenge names its token realm on another port (as Docker Hub
    names auth.docker.io): that realm gets the registry's credentials (docker's rule)."""
    sample = small_sample_image(tmp_path / "b", token_registry, "tok/realm:v1", creds=ALICE)
    issuer = token_registry.token_issuer
    assert issuer is not None and issuer.port != token_registry.port
    issuer.clear()
    creds = credentials.Credentials(*ALICE)
    async with api.Session(root=tmp_path / "root", credential_lookup=lambda host: creds) as s:
        await api.pull(s, sample.ref)
    seen = issuer.requests()
    assert seen and all(r.authenticated and r.account == ALICE[0] for r in seen)


async def test_credential_helper_is_used(
    tmp_path: Path,
    tls_registry: LocalRegistry,
    tls_sample: SampleImage,
    docker_config: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An existing docker setup with `credsStore` just works (helper protocol on stdin/out)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-testing"
    helper.write_text(
        "#!/bin/sh\n"
        "read server\n"
        'if [ "$1" = get ]; then printf \'{"ServerURL":"%s","Username":"alice",'
        '"Secret":"wonderland"}\' "$server"; fi\n'
    )
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    docker_config.mkdir(parents=True, exist_ok=True)
    (docker_config / "config.json").write_text(json.dumps({"credsStore": "testing"}))
    async with api.Session(root=tmp_path / "root", options=trusting(tmp_path, tls_registry)) as s:
        pulled = await api.pull(s, tls_sample.ref)
    assert str(pulled.image.repo_digest) == tls_sample.digest


def test_skopeo_push_helper_sanity(tls_registry: LocalRegistry, tls_sample: SampleImage) -> None:
    """The fixture image really is behind auth: anonymous skopeo is refused."""
    with pytest.raises(Exception, match=r"401|unauthorized|authentication required"):
        skopeo_inspect(tls_registry, "secure/app:v1", anonymous=True)
