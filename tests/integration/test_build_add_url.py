"""ADD of a URL whose body does not fit on the disk: one line naming the problem (a BuildError,
which the CLI prints as one line), never an OSError traceback."""

from __future__ import annotations

import http.server
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from imagefs.build.fetch import download
from imagefs.errors import BuildError
from imagefs.registry.transport import TransportOptions

BODY = 4 << 20  # 4 MiB, on a 1 MiB tmpfs


class _Big(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(BODY))
        self.end_headers()
        block = b"\0" * (64 << 10)
        for _ in range(BODY // len(block)):
            try:
                self.wfile.write(block)
            except OSError:  # the client gave up: that is the point
                return

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def big_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Big)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/big.bin"
    server.shutdown()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "disk"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_add_url_on_a_full_disk_is_one_build_error(big_url: str, small_disk: Path) -> None:
    with pytest.raises(BuildError) as caught:
        trio.run(download, big_url, small_disk / "big.bin", TransportOptions())
    assert str(caught.value) == "writing big.bin: No space left on device"
