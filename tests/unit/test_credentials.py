import base64
import errno
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from imagefs.errors import StoreError
from imagefs.registry import credentials
from imagefs.registry.credentials import Credentials, docker_config_path, erase, lookup, store

HUB_KEY = "https://index.docker.io/v1/"

# A credential helper speaking the real protocol (`docker-credential-NAME get|store|erase`,
# request on stdin, JSON on stdout), keeping one file per server URL in $FAKE_HELPER_DB.
FAKE_HELPER = r"""#!/bin/sh
key() { printf %s "$1" | od -An -tx1 | tr -d ' \n'; }
input=$(cat)
case "$1" in
  store)
    url=$(printf %s "$input" | sed -n 's/.*"ServerURL": *"\([^"]*\)".*/\1/p')
    printf %s "$input" > "$FAKE_HELPER_DB/$(key "$url")" ;;
  get|erase)
    f="$FAKE_HELPER_DB/$(key "$input")"
    if [ ! -f "$f" ]; then echo "credentials not found in native keychain"; exit 1; fi
    if [ "$1" = get ]; then cat "$f"; else rm "$f"; fi ;;
  *) echo "unknown action $1" >&2; exit 2 ;;
esac
"""

BROKEN_HELPER = """#!/bin/sh
cat >/dev/null
echo "error getting credentials - err: exit status 1, out: keyring locked" >&2
exit 1
"""


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "docker"
    monkeypatch.setenv("DOCKER_CONFIG", str(directory))
    return directory


@pytest.fixture
def helper_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, script in [("test", FAKE_HELPER), ("broken", BROKEN_HELPER)]:
        program = bin_dir / f"docker-credential-{name}"
        program.write_text(script)
        program.chmod(0o755)
    db = tmp_path / "helper-db"
    db.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_HELPER_DB", str(db))
    return db


def _write(config_dir: Path, config: dict[str, Any]) -> Path:
    config_dir.mkdir(parents=True, exist_ok=True)
    path = config_dir / "config.json"
    path.write_text(json.dumps(config))
    return path


def _read(config_dir: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((config_dir / "config.json").read_text())
    return result


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _helper_has(db: Path, server_url: str) -> dict[str, Any] | None:
    f = db / server_url.encode().hex()
    if not f.exists():
        return None
    result: dict[str, Any] = json.loads(f.read_text())
    return result


# -- config path -------------------------------------------------------------------------------


def test_config_path_honours_docker_config(config_dir: Path) -> None:
    assert docker_config_path() == config_dir / "config.json"


def test_config_path_defaults_to_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert docker_config_path() == tmp_path / ".docker" / "config.json"


# -- lookup from auths -------------------------------------------------------------------------


def test_lookup_without_a_config_file(config_dir: Path) -> None:
    assert lookup("docker.io") is None


@pytest.mark.parametrize(
    ("key", "registry"),
    [
        (HUB_KEY, "docker.io"),
        (HUB_KEY, "index.docker.io"),
        (HUB_KEY, "registry-1.docker.io"),
        ("docker.io", "docker.io"),
        ("localhost:5000", "localhost:5000"),
        ("https://quay.io", "quay.io"),
        ("http://myreg:5000/v1/", "myreg:5000"),
        ("https://ghcr.io/v2/", "https://ghcr.io"),
    ],
)
def test_lookup_matches_every_spelling_of_the_host(
    key: str, registry: str, config_dir: Path
) -> None:
    _write(config_dir, {"auths": {key: {"auth": _b64("user:pa:ss")}}})
    assert lookup(registry) == Credentials("user", "pa:ss")


def test_lookup_does_not_mix_hosts(config_dir: Path) -> None:
    _write(config_dir, {"auths": {"localhost:5000": {"auth": _b64("u:p")}}})
    assert lookup("localhost:5001") is None
    assert lookup("docker.io") is None


def test_lookup_prefers_the_exact_key(config_dir: Path) -> None:
    _write(
        config_dir,
        {"auths": {"https://quay.io/v1/": {"auth": _b64("a:1")}, "quay.io": {"auth": _b64("b:2")}}},
    )
    assert lookup("quay.io") == Credentials("b", "2")


def test_lookup_separate_username_and_password(config_dir: Path) -> None:
    _write(config_dir, {"auths": {"r.example": {"username": "u", "password": "p"}}})
    assert lookup("r.example") == Credentials("u", "p")


def test_lookup_identity_token(config_dir: Path) -> None:
    _write(config_dir, {"auths": {HUB_KEY: {"auth": _b64("alice:"), "identitytoken": "refresh"}}})
    assert lookup("docker.io") == Credentials("alice", "refresh", identity_token=True)


def test_lookup_empty_entry_means_nothing_here(config_dir: Path) -> None:
    _write(config_dir, {"auths": {"r.example": {}}})
    assert lookup("r.example") is None


def test_lookup_explicit_path(tmp_path: Path) -> None:
    path = tmp_path / "elsewhere.json"
    path.write_text(json.dumps({"auths": {"r.example": {"auth": _b64("u:p")}}}))
    assert lookup("r.example", path) == Credentials("u", "p")


@pytest.mark.parametrize(
    "auth", ["!!!notbase64", _b64("no-colon"), base64.b64encode(b"\xff:x").decode()]
)
def test_lookup_bad_auth_field(auth: str, config_dir: Path) -> None:
    _write(config_dir, {"auths": {"r.example": {"auth": auth}}})
    with pytest.raises(
        StoreError, match=r'the "auth" of "r.example" is not base64 of user:password'
    ):
        lookup("r.example")


def test_corrupt_config_file(config_dir: Path) -> None:
    config_dir.mkdir()
    (config_dir / "config.json").write_text("{oops")
    with pytest.raises(StoreError, match=r"config.json is not valid JSON"):
        lookup("docker.io")


def test_empty_config_file_is_no_config(config_dir: Path) -> None:
    config_dir.mkdir()
    (config_dir / "config.json").write_text("")
    assert lookup("docker.io") is None


def test_credentials_repr_hides_the_password() -> None:
    assert "hunter2" not in repr(Credentials("u", "hunter2"))


# -- store / erase in the file ---------------------------------------------------------------


def test_store_creates_private_directory_and_file(config_dir: Path) -> None:
    store("docker.io", Credentials("alice", "s3cret"))
    assert stat.S_IMODE(config_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((config_dir / "config.json").stat().st_mode) == 0o600
    assert _read(config_dir) == {"auths": {HUB_KEY: {"auth": _b64("alice:s3cret")}}}
    assert lookup("docker.io") == Credentials("alice", "s3cret")


def test_store_preserves_everything_else(config_dir: Path) -> None:
    other: dict[str, Any] = {
        "auths": {"quay.io": {"auth": _b64("q:q")}, "localhost:5000": {"auth": _b64("old:old")}},
        "proxies": {"default": {"httpProxy": "http://proxy:3128"}},
        "HttpHeaders": {"User-Agent": "x"},
        "currentContext": "desktop-linux",
    }
    _write(config_dir, other)
    store("localhost:5000", Credentials("new", "pw"))
    expected = json.loads(json.dumps(other))
    expected["auths"]["localhost:5000"] = {"auth": _b64("new:pw")}
    assert _read(config_dir) == expected


def test_store_replaces_other_spellings_of_the_host(config_dir: Path) -> None:
    _write(config_dir, {"auths": {"https://quay.io": {"auth": _b64("old:old")}}})
    store("quay.io", Credentials("new", "pw"))
    assert _read(config_dir)["auths"] == {"quay.io": {"auth": _b64("new:pw")}}


def test_store_identity_token(config_dir: Path) -> None:
    store("docker.io", Credentials("alice", "refresh", identity_token=True))
    assert _read(config_dir)["auths"][HUB_KEY] == {
        "auth": _b64("alice:"),
        "identitytoken": "refresh",
    }
    assert lookup("docker.io") == Credentials("alice", "refresh", identity_token=True)


def test_store_writes_through_a_symlink(config_dir: Path, tmp_path: Path) -> None:
    real = tmp_path / "dotfiles" / "docker-config.json"
    real.parent.mkdir()
    real.write_text("{}")
    config_dir.mkdir()
    (config_dir / "config.json").symlink_to(real)
    store("r.example", Credentials("u", "p"))
    assert (config_dir / "config.json").is_symlink()
    assert json.loads(real.read_text()) == {"auths": {"r.example": {"auth": _b64("u:p")}}}


def test_store_leaves_no_temporary_files(config_dir: Path) -> None:
    store("r.example", Credentials("u", "p"))
    store("r.example", Credentials("u", "q"))
    assert sorted(p.name for p in config_dir.iterdir()) == ["config.json"]


def test_failed_write_keeps_the_old_file_and_no_temporary(
    config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(config_dir, {"auths": {"r.example": {"auth": _b64("old:old")}}})

    def disk_full(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(StoreError, match=r"cannot write .*config\.json: No space left on device"):
        store("r.example", Credentials("u", "p"))
    assert sorted(p.name for p in config_dir.iterdir()) == ["config.json"]
    assert lookup("r.example") == Credentials("old", "old")


def test_erase_from_file(config_dir: Path) -> None:
    _write(config_dir, {"auths": {HUB_KEY: {"auth": _b64("u:p")}, "q.io": {}}, "x": 1})
    assert erase("docker.io") is True
    assert _read(config_dir) == {"auths": {"q.io": {}}, "x": 1}
    assert erase("docker.io") is False
    assert lookup("docker.io") is None


def test_erase_without_file(config_dir: Path) -> None:
    assert erase("docker.io") is False
    assert not config_dir.exists()


# -- credential helpers ------------------------------------------------------------------------


def _helper_entry(db: Path, server_url: str, username: str, secret: str) -> None:
    payload = {"ServerURL": server_url, "Username": username, "Secret": secret}
    (db / server_url.encode().hex()).write_text(json.dumps(payload))


def test_cred_helpers_entry_is_asked_first(config_dir: Path, helper_db: Path) -> None:
    _write(
        config_dir,
        {"credHelpers": {"r.example": "test"}, "auths": {"r.example": {"auth": _b64("file:f")}}},
    )
    _helper_entry(helper_db, "r.example", "helper-user", "helper-secret")
    assert lookup("r.example") == Credentials("helper-user", "helper-secret")


def test_creds_store_uses_hub_server_url(config_dir: Path, helper_db: Path) -> None:
    _write(config_dir, {"credsStore": "test", "auths": {HUB_KEY: {}}})
    _helper_entry(helper_db, HUB_KEY, "alice", "pw")
    assert lookup("docker.io") == Credentials("alice", "pw")


def test_helper_identity_token(config_dir: Path, helper_db: Path) -> None:
    _write(config_dir, {"credsStore": "test"})
    _helper_entry(helper_db, "r.example", "<token>", "refresh")
    creds = lookup("r.example")
    assert creds == Credentials("<token>", "refresh", identity_token=True)


def test_helper_not_found_output_falls_back_to_auths(config_dir: Path, helper_db: Path) -> None:
    _write(config_dir, {"credsStore": "test", "auths": {"r.example": {"auth": _b64("f:f")}}})
    assert lookup("r.example") == Credentials("f", "f")
    assert lookup("other.example") is None


def test_missing_helper_is_not_fatal(
    config_dir: Path, helper_db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write(config_dir, {"credsStore": "nonexistent", "auths": {"r.example": {"auth": _b64("f:f")}}})
    with caplog.at_level(logging.DEBUG, logger=credentials.__name__):
        assert lookup("r.example") == Credentials("f", "f")
        assert lookup("other.example") is None
    assert "docker-credential-nonexistent not found" in caplog.text


def test_failing_helper_is_reported(config_dir: Path, helper_db: Path) -> None:
    _write(config_dir, {"credsStore": "broken"})
    with pytest.raises(
        StoreError, match=r"docker-credential-broken get r.example failed: .*keyring locked"
    ):
        lookup("r.example")


def test_store_through_helper_keeps_secret_out_of_the_file(
    config_dir: Path, helper_db: Path
) -> None:
    _write(config_dir, {"credsStore": "test", "auths": {HUB_KEY: {"auth": _b64("old:plain")}}})
    store("docker.io", Credentials("alice", "s3cret"))
    assert _helper_has(helper_db, HUB_KEY) == {
        "ServerURL": HUB_KEY,
        "Username": "alice",
        "Secret": "s3cret",
    }
    assert _read(config_dir) == {"credsStore": "test", "auths": {HUB_KEY: {}}}
    assert "s3cret" not in (config_dir / "config.json").read_text()
    assert lookup("docker.io") == Credentials("alice", "s3cret")


def test_store_identity_token_through_helper(config_dir: Path, helper_db: Path) -> None:
    _write(config_dir, {"credHelpers": {"r.example": "test"}})
    store("r.example", Credentials("alice", "refresh", identity_token=True))
    stored = _helper_has(helper_db, "r.example")
    assert stored is not None and (stored["Username"], stored["Secret"]) == ("<token>", "refresh")


def test_store_with_missing_helper_fails_clearly(config_dir: Path, helper_db: Path) -> None:
    _write(config_dir, {"credsStore": "nonexistent"})
    with pytest.raises(StoreError, match="docker-credential-nonexistent is not on PATH"):
        store("r.example", Credentials("u", "p"))


def test_erase_through_helper(config_dir: Path, helper_db: Path) -> None:
    _write(config_dir, {"credsStore": "test"})
    store("r.example", Credentials("u", "p"))
    assert _helper_has(helper_db, "r.example") is not None
    assert erase("r.example") is True
    assert _helper_has(helper_db, "r.example") is None
    assert lookup("r.example") is None
    assert erase("r.example") is False


def test_secrets_never_reach_the_log(
    config_dir: Path, helper_db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write(config_dir, {"credHelpers": {"h.example": "test"}, "auths": {}})
    with caplog.at_level(logging.DEBUG):
        store("h.example", Credentials("u", "secret-one"))
        store("f.example", Credentials("u", "secret-two"))
        assert lookup("h.example") is not None
        assert lookup("f.example") is not None
        erase("h.example")
        erase("f.example")
    assert "secret-" not in caplog.text
