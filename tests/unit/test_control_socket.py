"""The stats control socket: private from the moment it exists, and nothing left beside it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import trio

from imagefs.lazy.telemetry import ask_stats, serve_control


def test_the_socket_is_0600_from_the_start_and_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "mounts" / "m.sock"
    seen: dict[str, object] = {}
    chmod = os.chmod
    early: list[int] = []  # the socket's mode at its final path when its mode was being set

    def spy(target: os.PathLike[str] | str, mode: int) -> None:
        if path.exists():
            early.append(stat.S_IMODE(os.lstat(path).st_mode))
        chmod(target, mode)

    monkeypatch.setattr(os, "chmod", spy)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_control, path, lambda: {"reads": 7})
            while not path.exists():
                await trio.sleep(0.01)
            mode = os.lstat(path).st_mode
            seen["socket"] = stat.S_ISSOCK(mode)
            seen["mode"] = stat.S_IMODE(mode)
            seen["beside"] = sorted(p.name for p in path.parent.iterdir())
            seen["answer"] = await trio.to_thread.run_sync(ask_stats, path)
            nursery.cancel_scope.cancel()

    old = os.umask(0)  # the widest umask: bind() alone would make the socket 0777
    try:
        trio.run(main)
    finally:
        os.umask(old)
    assert early == []  # never reachable at its path before it was private
    assert seen == {"socket": True, "mode": 0o600, "beside": ["m.sock"], "answer": {"reads": 7}}
    assert not path.exists()  # removed when the mount stops serving
