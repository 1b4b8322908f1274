"""Which command lines fork the daemon-to-be early (`imagefs.cli.prefork`); a false guess only
costs a child the launcher kills on its way out (tests/integration/test_mount_startup.py)."""

from __future__ import annotations

import pytest

from imagefs.cli.prefork import looks_like_a_detached_mount


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["mount", "alpine", "/mnt"], True),
        (["--root", "/r", "--debug", "mount", "--trust-published-index", "a", "/m"], True),
        (["mount", "-f", "alpine", "/mnt"], False),  # foreground: no launcher, no fork
        (["mount", "--foreground", "alpine", "/mnt"], False),
        (["mount", "--help"], False),
        (["umount", "/mnt"], False),
        (["mounts"], False),
        (["pull", "alpine"], False),
    ],
)
def test_only_a_detached_mount_forks_early(argv: list[str], expected: bool) -> None:
    assert looks_like_a_detached_mount(argv) is expected
