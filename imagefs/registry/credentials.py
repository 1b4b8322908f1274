"""Registry credentials shared with docker through `config.json` and credential helpers.

Reading docker's own file means `docker login` once is enough for imagefs too, and `imagefs
login` leaves docker logged in. The file may hold many other settings (proxies, plugins,
aliases), so every write keeps whatever it does not understand.

Everything here blocks (files, helper processes); async callers use `trio.to_thread`.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagefs.errors import StoreError

log = logging.getLogger(__name__)

# Docker Hub's credentials live under its v1 index URL, for historical reasons.
DOCKER_HUB_SERVER = "https://index.docker.io/v1/"
_DOCKER_HUB_ALIASES = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)
# The username a helper returns when the secret is an identity (refresh) token.
IDENTITY_TOKEN_USERNAME = "<token>"
_HELPER_TIMEOUT = 120.0  # helpers may wait for a keyring unlock or a GPG pinentry


@dataclass(frozen=True)
class Credentials:
    """A username and secret; the secret never appears in a repr or a log line.

    With `identity_token`, `password` is an OAuth refresh token to trade for bearer tokens
    (what Docker Hub hands out after a browser login), not a password.
    """

    username: str
    password: str = field(repr=False)
    identity_token: bool = False


def docker_config_path() -> Path:
    """Where docker keeps config.json: `$DOCKER_CONFIG`, else `~/.docker`."""
    directory = os.environ.get("DOCKER_CONFIG")
    base = Path(directory) if directory else Path.home() / ".docker"
    return base / "config.json"


def lookup(registry: str, path: Path | None = None) -> Credentials | None:
    """The credentials for `registry` (a host like `docker.io` or `localhost:5000`), if any.

    Order: the registry's `credHelpers` entry, then `credsStore`, then `auths`. Falling back
    to `auths` when a helper has nothing differs from docker, which stops at the helper; it
    lets a config copied from another machine (whose helper is absent here) still work.
    """
    path = path or docker_config_path()
    config = _read_config(path)
    host = _hostname(registry)
    for helper in _helpers(config, host):
        found = _helper_get(helper, _server_url(host))
        if found is not None:
            return found
    entry = _find_auth_entry(config, host)
    if entry is None:
        return None
    return _decode_auth_entry(entry[1], entry[0], path)


def store(registry: str, credentials: Credentials, path: Path | None = None) -> None:
    """Save `credentials` for `registry`, where docker would: a helper, else `auths`."""
    path = path or docker_config_path()
    config = _read_config(path)
    host = _hostname(registry)
    helpers = _helpers(config, host)
    if helpers:
        username = IDENTITY_TOKEN_USERNAME if credentials.identity_token else credentials.username
        payload = {
            "ServerURL": _server_url(host),
            "Username": username,
            "Secret": credentials.password,
        }
        _run_helper(helpers[0], "store", json.dumps(payload), host)
    auths = _auths(config, path)
    # Drop spellings of the same host (`https://host`, `http://host/v1/`) so a stale entry
    # cannot shadow the new one on the next lookup.
    for key in [k for k in auths if _hostname(k) == host]:
        del auths[key]
    if helpers:
        # Like docker: an empty entry records the login, the secret stays in the helper, and
        # any plaintext secret from before is gone.
        entry: dict[str, str] = {}
    elif credentials.identity_token:
        entry = {"auth": _b64(f"{credentials.username}:"), "identitytoken": credentials.password}
    else:
        entry = {"auth": _b64(f"{credentials.username}:{credentials.password}")}
    auths[_auth_key(host)] = entry
    config["auths"] = auths
    _write_config(path, config)


def erase(registry: str, path: Path | None = None) -> bool:
    """Forget the credentials for `registry`; whether there was anything to forget."""
    path = path or docker_config_path()
    config = _read_config(path)
    host = _hostname(registry)
    erased = False
    for helper in _helpers(config, host)[:1]:
        erased = _run_helper(helper, "erase", _server_url(host), host, missing_ok=True)
    auths = config.get("auths")
    if isinstance(auths, dict):
        keys = [k for k in auths if _hostname(k) == host]
        for key in keys:
            del auths[key]
        if keys:
            _write_config(path, config)
            erased = True
    return erased


def _hostname(registry: str) -> str:
    """docker's ConvertToHostname, plus folding Docker Hub's aliases into one name."""
    host = registry.removeprefix("https://").removeprefix("http://").split("/", 1)[0]
    return "docker.io" if host in _DOCKER_HUB_ALIASES else host


def _server_url(host: str) -> str:
    """The name docker passes to helpers and uses as the `auths` key."""
    return DOCKER_HUB_SERVER if host == "docker.io" else host


_auth_key = _server_url


def _helpers(config: dict[str, Any], host: str) -> list[str]:
    names: list[str] = []
    cred_helpers = config.get("credHelpers")
    if isinstance(cred_helpers, dict):
        for key, name in cred_helpers.items():
            if _hostname(key) == host and isinstance(name, str) and name:
                names.append(name)
                break
    store_name = config.get("credsStore")
    if isinstance(store_name, str) and store_name:
        names.append(store_name)
    return names


def _find_auth_entry(config: dict[str, Any], host: str) -> tuple[str, dict[str, Any]] | None:
    auths = config.get("auths")
    if not isinstance(auths, dict):
        return None
    exact = _auth_key(host)
    keys = [exact] if exact in auths else []
    keys += [k for k in auths if k != exact and _hostname(k) == host]
    for key in keys:
        entry = auths[key]
        if isinstance(entry, dict):
            return key, entry
    return None


def _decode_auth_entry(entry: dict[str, Any], key: str, path: Path) -> Credentials | None:
    username = entry.get("username") or ""
    password = entry.get("password") or ""
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            decoded = base64.b64decode(auth, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise StoreError(
                f'{path}: the "auth" of "{key}" is not base64 of user:password'
            ) from None
        username, sep, password = decoded.partition(":")
        if not sep:
            raise StoreError(f'{path}: the "auth" of "{key}" is not base64 of user:password')
    if not isinstance(username, str) or not isinstance(password, str):
        raise StoreError(f'{path}: the username/password of "{key}" must be strings')
    token = entry.get("identitytoken")
    if isinstance(token, str) and token:
        return Credentials(username or IDENTITY_TOKEN_USERNAME, token, identity_token=True)
    if not username and not password:
        return None  # docker writes `{}` entries when a helper holds the secret
    return Credentials(username, password)


def _helper_get(helper: str, server_url: str) -> Credentials | None:
    program = shutil.which(f"docker-credential-{helper}")
    if program is None:
        log.debug("credential helper docker-credential-%s not found on PATH", helper)
        return None
    result = _spawn(program, "get", server_url)
    if result.returncode != 0:
        message = (result.stdout or result.stderr).strip()
        if "credentials not found" in message.lower():
            return None
        raise StoreError(f"docker-credential-{helper} get {server_url} failed: {message}")
    try:
        answer = json.loads(result.stdout)
        username, secret = answer["Username"], answer["Secret"]
    except (ValueError, KeyError, TypeError):
        raise StoreError(
            f"docker-credential-{helper} get {server_url}: unexpected output"
        ) from None
    if not isinstance(username, str) or not isinstance(secret, str):
        raise StoreError(f"docker-credential-{helper} get {server_url}: unexpected output")
    if not secret:
        return None
    if username == IDENTITY_TOKEN_USERNAME:
        return Credentials(username, secret, identity_token=True)
    return Credentials(username, secret)


def _run_helper(helper: str, action: str, stdin: str, host: str, missing_ok: bool = False) -> bool:
    program = shutil.which(f"docker-credential-{helper}")
    if program is None:
        if missing_ok:
            log.debug("credential helper docker-credential-%s not found on PATH", helper)
            return False
        raise StoreError(f"credential helper docker-credential-{helper} is not on PATH")
    result = _spawn(program, action, stdin)
    if result.returncode != 0:
        # Helpers print only their own error messages, never the secret they were given.
        message = (result.stdout or result.stderr).strip()
        if missing_ok and "credentials not found" in message.lower():
            return False
        raise StoreError(f"docker-credential-{helper} {action} for {host} failed: {message}")
    return True


def _spawn(program: str, action: str, stdin: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [program, action],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=_HELPER_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise StoreError(f"could not run {program} {action}: {err}") from None


def _read_config(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise StoreError(f"cannot read {path}: {err.strerror}") from None
    if not text.strip():
        return {}
    try:
        config = json.loads(text)
    except ValueError as err:
        raise StoreError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise StoreError(f"{path} must hold a JSON object")
    return config


def _auths(config: dict[str, Any], path: Path) -> dict[str, Any]:
    auths = config.get("auths", {})
    if not isinstance(auths, dict):
        raise StoreError(f'{path}: "auths" must be an object')
    return auths


def _write_config(path: Path, config: dict[str, Any]) -> None:
    """Replace the file atomically with a private (0600) copy; a crash leaves old or new."""
    # Write through a symlink rather than replacing it: dotfile managers link config.json.
    target = Path(os.path.realpath(path))
    data = json.dumps(config, indent="\t").encode() + b"\n"
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".config.json.", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:  # mkstemp creates the file with mode 0600
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as err:
        raise StoreError(f"cannot write {path}: {err.strerror or err}") from None


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")
