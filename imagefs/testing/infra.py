"""What every piece of the test infrastructure shares: its own error, and finding what it runs."""

from __future__ import annotations

import shutil
import socket


class InfraError(RuntimeError):
    """The test infrastructure itself failed (missing binary, registry did not start).

    Deliberately not an `ImageFSError`: it is never something imagefs should handle, and a
    test that sees it should fail loudly with the message (which says how to fix the machine).
    """


def require_binary(name: str) -> str:
    """Return the path of `name` or raise with the fix, so no test is silently skipped."""
    path = shutil.which(name)
    if path is None:
        raise InfraError(
            f"{name!r} is not installed; run tools/test (it installs the Debian packages "
            "docker-registry, skopeo, umoci) or apt-get install it"
        )
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the caller retries on a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
