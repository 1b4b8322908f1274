"""Security posture: mount options, secrets in outputs and logs, TLS and plain-HTTP rules.

Read-only and EROFS for writes are shown by test_mount.py::test_writes_are_refused; TLS without
the CA and login storage (0600) by test_auth.py. This module adds what those do not show.
"""

from __future__ import annotations

import base64
import os
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from imagefs.registry.transport import (
    TransportOptions,
    is_loopback,
    plain_http_allowed,
    ssl_context,
)
from imagefs.testing.images import SampleImage, small_sample_image
from imagefs.testing.mounts import imagefs, mounted
from imagefs.testing.registry import LocalRegistry

ALICE = ("alice", "wonderland")


def _mountinfo(mnt: Path) -> tuple[set[str], set[str]]:
    """(mount options, super options) of `mnt` in /proc/self/mountinfo."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        head, _, tail = line.partition(" - ")
        parts = head.split()
        if parts[4] == str(mnt):
            return set(parts[5].split(",")), set(tail.split()[2].split(","))
    raise AssertionError(f"{mnt} not in mountinfo")


@pytest.mark.fuse
def test_allow_other_only_when_asked(tmp_path: Path, sample_image: SampleImage) -> None:
    root = tmp_path / "root"
    with mounted(root, sample_image.ref, tmp_path / "plain") as mnt:
        opts, sup = _mountinfo(mnt)
        assert {"ro", "nosuid", "nodev"} <= opts
        assert "allow_other" not in opts | sup
    with mounted(
        root, sample_image.ref, tmp_path / "shared", mount_args=["-o", "allow_other"]
    ) as mnt:
        opts, sup = _mountinfo(mnt)
        assert "allow_other" in sup
        assert {"ro", "nosuid", "nodev"} <= opts  # asking for one thing grants nothing else
    with mounted(root, sample_image.ref, tmp_path / "devs", mount_args=["-o", "suid,dev"]) as mnt:
        opts, _ = _mountinfo(mnt)
        assert "ro" in opts and "nosuid" not in opts and "nodev" not in opts
    (tmp_path / "rw").mkdir()
    rw = imagefs(root, "mount", "-o", "rw", sample_image.ref, str(tmp_path / "rw"), check=False)
    assert rw.returncode == 2 and "read-only" in rw.stderr
    assert not os.path.ismount(tmp_path / "rw")


@pytest.fixture(scope="module")
def secret_sample(
    tls_registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory
) -> SampleImage:
    return small_sample_image(
        tmp_path_factory.mktemp("secret"), tls_registry, "secret/app:v1", creds=ALICE
    )


@pytest.mark.fuse
def test_password_never_appears_in_outputs_or_logs_even_with_debug(
    tmp_path: Path,
    tls_registry: LocalRegistry,
    secret_sample: SampleImage,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    docker_config = tmp_path / "docker-config"
    monkeypatch.setenv("DOCKER_CONFIG", str(docker_config))
    conf = tmp_path / "conf"
    (conf / "certs.d" / tls_registry.host).mkdir(parents=True)
    assert tls_registry.ca_file is not None
    shutil.copy(tls_registry.ca_file, conf / "certs.d" / tls_registry.host / "ca.crt")
    root = tmp_path / "root"
    base = [sys.executable, "-m", "imagefs", "--root", str(root), "--config", str(conf)]
    outputs: list[str] = []

    def run(*args: str, stdin: str | None = None) -> None:
        proc = subprocess.run(
            [*base, "--debug", *args], input=stdin, capture_output=True, text=True, timeout=120
        )
        outputs.extend([proc.stdout, proc.stderr])
        assert proc.returncode == 0, proc.stderr

    run("login", "-u", ALICE[0], "--password-stdin", tls_registry.host, stdin=ALICE[1] + "\n")
    cfg = docker_config / "config.json"
    assert cfg.stat().st_mode & 0o777 == 0o600
    run("pull", "--full", secret_sample.ref)
    root2 = tmp_path / "root2"
    with mounted(
        root2, secret_sample.ref, tmp_path / "mnt", extra=["--config", str(conf), "--debug"]
    ) as mnt:
        assert (mnt / "etc" / "hello.txt").read_bytes() == secret_sample.files["etc/hello.txt"]
    # a failed login with --debug prints a traceback: it must not carry the password either
    proc = subprocess.run(
        [*base, "--debug", "login", "-u", "alice", "--password-stdin", tls_registry.host],
        input="not-the-password-xyzzy\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    outputs.extend([proc.stdout, proc.stderr])
    logs = [p.read_text(errors="replace") for r in (root, root2) for p in r.rglob("*.log")]
    assert logs and any("GET" in log or "mounted" in log for log in logs)
    secrets = [
        ALICE[1],
        "not-the-password-xyzzy",
        base64.b64encode(f"{ALICE[0]}:{ALICE[1]}".encode()).decode(),
        base64.b64encode(ALICE[1].encode()).decode(),
    ]
    for text in outputs + logs:
        for secret in secrets:
            assert secret not in text, f"secret {secret!r} leaked into: {text[:300]}"


def test_tls_is_verified_unless_the_registry_is_named_insecure(
    tmp_path: Path, tls_registry: LocalRegistry, secret_sample: SampleImage
) -> None:
    root = tmp_path / "root"
    refused = imagefs(root, "pull", secret_sample.ref, check=False)
    assert refused.returncode == 1 and "TLS certificate not trusted" in refused.stderr
    # --insecure-registry skips the certificate check (docker's rule): now it is only auth
    named = imagefs(
        root, "--insecure-registry", tls_registry.host, "pull", secret_sample.ref, check=False
    )
    assert "TLS certificate" not in named.stderr and "unauthorized" in named.stderr


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("localhost:5000", True),
        ("127.0.0.1:5000", True),
        ("127.1.2.3", True),
        ("[::1]:5000", True),
        ("::1", True),
        ("registry.example.com", False),
        ("registry.example.com:5000", False),
        ("10.0.0.1:5000", False),
        ("192.168.1.10", False),
        ("localhost.example.com", False),
        ("127.0.0.1.nip.io", False),
        ("[2001:db8::1]:5000", False),
        ("docker.io", False),
    ],
)
def test_plain_http_only_for_loopback_and_named_insecure(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    assert plain_http_allowed(host, TransportOptions()) is loopback
    named = TransportOptions(insecure_registries=frozenset({host}))
    assert plain_http_allowed(host, named)
    if not loopback:
        # naming another registry (or another port of this host) does not open this one
        other = TransportOptions(insecure_registries=frozenset({"other.example.com"}))
        assert not plain_http_allowed(host, other)


def test_certificates_are_verified_by_default(tmp_path: Path) -> None:
    strict = ssl_context("registry.example.com", TransportOptions(config_dir=tmp_path))
    assert strict.verify_mode == ssl.CERT_REQUIRED and strict.check_hostname
    loose = ssl_context(
        "registry.example.com",
        TransportOptions(insecure_registries=frozenset({"registry.example.com"})),
    )
    assert loose.verify_mode == ssl.CERT_NONE and not loose.check_hostname
    # a loopback registry is plain-HTTP-able, but if it speaks TLS it is still verified
    local = ssl_context("127.0.0.1:5000", TransportOptions())
    assert local.verify_mode == ssl.CERT_REQUIRED


def test_a_token_server_on_another_host_is_verified_though_the_registry_is_insecure(
    tmp_path: Path, tls_token_registry: LocalRegistry
) -> None:
    """`--insecure-registry REG` skips verification for REG only: its token realm on another
    host:port gets credentials, so its certificate is checked (was: the registry's
    unverified pool fetched the token)."""
    sample = small_sample_image(tmp_path / "img", tls_token_registry, "sec/tok:v1", creds=ALICE)
    issuer = tls_token_registry.token_issuer
    assert issuer is not None
    realm_host = issuer.realm.split("/")[2]
    assert realm_host != tls_token_registry.host
    issuer.clear()
    insecure = ["--insecure-registry", tls_token_registry.host]
    refused = imagefs(tmp_path / "root", *insecure, "pull", sample.ref, check=False)
    assert refused.returncode == 1 and f"token server {realm_host}" in refused.stderr, refused
    assert issuer.requests() == []  # the handshake failed: nothing reached the token server
    both = [*insecure, "--insecure-registry", realm_host]
    imagefs(tmp_path / "root", *both, "pull", sample.ref)
    assert issuer.requests()
