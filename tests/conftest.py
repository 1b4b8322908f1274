"""Shared pytest fixtures: real registries and real images (see `imagefs.testing`).

The registries are session-scoped to keep the suite fast; tests sharing one must use their
own repository names (the `repo_name` fixture makes one). A test that needs a registry
nobody else touched (counting every request, deleting, restarting) takes `fresh_registry`.

Nothing here skips: a missing `docker-registry`, `skopeo` or `umoci` fails the test with a
message saying to run tools/test, because a silently skipped integration suite is a lie.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagefs.testing.images import SampleImage, small_sample_image
from imagefs.testing.registry import InfraError, LocalRegistry, require_binary

ALICE = ("alice", "wonderland")
"""The one user of the auth fixtures: may push and pull."""

_counter = itertools.count()


def _started(registry: LocalRegistry) -> LocalRegistry:
    try:
        for tool in ("skopeo", "umoci"):
            require_binary(tool)
        registry.start()
    except InfraError as e:
        pytest.fail(f"test infrastructure: {e}", pytrace=False)
    return registry


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """Plain-HTTP registry without auth, deletes enabled, shared by the session."""
    reg = LocalRegistry(tmp_path_factory.mktemp("registry"), delete_enabled=True)
    with _started(reg):
        yield reg


@pytest.fixture
def fresh_registry(tmp_path: Path) -> Iterator[LocalRegistry]:
    """A plain-HTTP registry of this test's own (empty storage, empty request log)."""
    reg = LocalRegistry(tmp_path / "registry", delete_enabled=True)
    with _started(reg):
        yield reg


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """HTTPS (throwaway CA in `.ca_file`) + htpasswd basic auth; user alice/wonderland."""
    reg = LocalRegistry(
        tmp_path_factory.mktemp("tls-registry"),
        tls=True,
        auth="htpasswd",
        users=dict([ALICE]),
        delete_enabled=True,
    )
    with _started(reg):
        yield reg


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """Plain HTTP + token auth (issuer at `.token_issuer`): alice pushes, anonymous pulls."""
    reg = LocalRegistry(
        tmp_path_factory.mktemp("token-registry"),
        auth="token",
        users=dict([ALICE]),
        anonymous_pull=True,
        delete_enabled=True,
    )
    with _started(reg):
        yield reg


@pytest.fixture(scope="session")
def tls_token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """HTTPS registry and HTTPS token issuer (same CA); alice pushes, anonymous pulls."""
    reg = LocalRegistry(
        tmp_path_factory.mktemp("tls-token-registry"),
        tls=True,
        auth="token",
        users=dict([ALICE]),
        anonymous_pull=True,
        token_algorithm="RS256",
    )
    with _started(reg):
        yield reg


@pytest.fixture(scope="session")
def sample_image(registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory) -> SampleImage:
    """The 3-layer sample (whiteout, opaque dir, symlink, Env/Cmd) in `registry`, once."""
    try:
        return small_sample_image(tmp_path_factory.mktemp("sample"), registry, "sample/small:v1")
    except InfraError as e:
        pytest.fail(f"test infrastructure: {e}", pytrace=False)


@pytest.fixture
def repo_name(request: pytest.FixtureRequest) -> str:
    """A repository name no other test uses, readable in registry logs: `test/<name>-<n>`."""
    base = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:60] or "t"
    return f"test/{base}-{next(_counter)}"


@pytest.fixture
def pull_through_mirror(registry: LocalRegistry, tmp_path: Path) -> Iterator[LocalRegistry]:
    """A cold pull-through cache of `registry` (distribution's `proxy.remoteurl` mode), as
    users put behind `--registry-mirror`. Its request log shows what it sent a client."""
    mirror = LocalRegistry(tmp_path / "mirror", proxy_remote=registry.url)
    with _started(mirror):
        yield mirror
