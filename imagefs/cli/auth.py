"""Registry credentials: login, logout (docker's config.json)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from imagefs.cli.options import Verb, flag
from imagefs.errors import UsageError

if TYPE_CHECKING:
    from imagefs import api


def _login_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("registry", nargs="?", default="docker.io", help="default: docker.io")
    p.add_argument("-u", "--username", help="asked for on a terminal when not given")
    p.add_argument("-p", "--password", help="insecure: prefer --password-stdin")
    flag(p, "--password-stdin", help="read the password from stdin")


async def run_login(s: api.Session, a: argparse.Namespace) -> int:
    from imagefs import api

    username = a.username
    if username is None:
        if not sys.stdin.isatty() or a.password_stdin:
            raise UsageError("login: --username is required when not on a terminal")
        username = input("Username: ")
    if a.password_stdin:
        password = sys.stdin.read().rstrip("\r\n")
    elif a.password is not None:
        print(
            "WARNING! Using --password via the CLI is insecure. Use --password-stdin.",
            file=sys.stderr,
        )
        password = a.password
    elif sys.stdin.isatty():
        password = api.read_password_interactively()
    else:
        raise UsageError("login: give the password with --password-stdin")
    if not password:
        raise UsageError("login: empty password")
    await api.login(s, a.registry, username, password)
    print("Login Succeeded")
    return 0


def _logout_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("registry", nargs="?", default="docker.io", help="default: docker.io")


async def run_logout(s: api.Session, a: argparse.Namespace) -> int:
    from imagefs import api

    host = api.normalize_registry_host(a.registry)
    if await api.logout(s, a.registry):
        print(f"Removing login credentials for {host}")
    else:
        print(f"Not logged in to {host}")
    return 0


LOGIN = Verb(
    "login",
    "Store credentials for a registry (docker's config.json)",
    _login_arguments,
    run_login,
)
LOGOUT = Verb("logout", "Remove stored credentials for a registry", _logout_arguments, run_logout)
