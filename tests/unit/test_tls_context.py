"""A registry's TLS context loads its certificates at its first TLS connection: a command or a
mount that only ever speaks plain HTTP (a loopback registry) never parses the CA bundle."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest

from imagefs.errors import RegistryUnreachable
from imagefs.registry.transport import TransportOptions, ssl_context


def test_certificates_are_loaded_at_the_first_connection_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))
    ctx = ssl_context("registry.example:5000", TransportOptions())  # nothing read yet
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.get_ca_certs() == []
    for _ in range(2):  # the first TLS use reads it; each one fails the same way, in one line
        with socket.socket() as sock, pytest.raises(RegistryUnreachable) as info:
            ctx.wrap_socket(sock, server_hostname="registry.example")
        assert str(tmp_path / "missing.pem") in str(info.value) and "\n" not in str(info.value)


def test_the_first_connection_loads_the_whole_ca_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import certifi

    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    ctx = ssl_context("registry.example:5000", TransportOptions())
    with socket.socket() as sock:
        ctx.wrap_socket(sock, server_hostname="registry.example", do_handshake_on_connect=False)
    bundle = ssl.create_default_context(cafile=certifi.where())
    assert len(ctx.get_ca_certs()) == len(bundle.get_ca_certs()) > 0


def test_a_bad_certificate_in_certs_d_is_a_one_line_error_at_every_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    certs = tmp_path / "certs.d" / "registry.example:5000"
    certs.mkdir(parents=True)
    (certs / "ca.crt").write_text("not a certificate\n")
    ctx = ssl_context("registry.example:5000", TransportOptions(config_dir=tmp_path))
    for _ in range(2):  # none goes ahead with the bundle alone
        with socket.socket() as sock, pytest.raises(RegistryUnreachable) as info:
            ctx.wrap_socket(sock, server_hostname="registry.example")
        assert "ca.crt" in str(info.value)
