"""`lifecycle.fork_daemon`: how the launcher of `imagefs mount` hears from the daemon it forks
(READY, an ERROR line, or nothing before it died), and where the daemon's output goes.

Each launch is a fresh `python -c` (as the command line is): pytest's own capture of
stdout/stderr is not what a forked daemon inherits in real use."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

LAUNCHER = """
import json, os, sys
from pathlib import Path
from imagefs.errors import ImageFSError
from imagefs.fs.lifecycle import fork_daemon, log_path_for, report_error, report_ready

root, mnt = Path(sys.argv[1]), Path(sys.argv[2])
log = log_path_for(root, mnt)
log.parent.mkdir(parents=True, exist_ok=True)

def serve(ready_fd):
{body}

try:
    pid = fork_daemon(serve, log, mnt, root)
except ImageFSError as exc:
    print(json.dumps({{"error": str(exc), "code": exc.exit_code, "log": str(log)}}))
else:
    _, status = os.waitpid(pid, 0)
    print(json.dumps({{"pid": pid, "status": os.waitstatus_to_exitcode(status), "log": str(log)}}))
"""


def _launch(tmp_path: Path, body: str) -> dict[str, Any]:
    (tmp_path / "mnt").mkdir()
    code = LAUNCHER.format(body=textwrap.indent(textwrap.dedent(body), "    "))
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "root"), str(tmp_path / "mnt")],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def test_ready_returns_the_daemon_s_pid_and_its_output_goes_to_the_log(tmp_path: Path) -> None:
    got = _launch(
        tmp_path,
        """
        stdin = os.readlink("/proc/self/fd/0")
        print(f"daemon {os.getpid()} in session {os.getsid(0)}, stdin {stdin}")
        sys.stdout.flush()
        report_ready(ready_fd)
        return 0
        """,
    )
    pid = got["pid"]
    assert got["status"] == 0
    assert Path(got["log"]).read_text() == f"daemon {pid} in session {pid}, stdin /dev/null\n"


def test_an_error_the_daemon_reports_is_raised_with_its_exit_code(tmp_path: Path) -> None:
    got = _launch(
        tmp_path,
        """
        err = ImageFSError("registry says no")
        err.exit_code = 3
        report_error(ready_fd, err)
        return 3
        """,
    )
    assert (got["error"], got["code"]) == ("registry says no", 3)


@pytest.mark.parametrize("how", ["returns", "raises"])
def test_a_daemon_that_dies_silently_is_reported_with_its_status_and_log(
    tmp_path: Path, how: str
) -> None:
    """Nothing on the pipe: the launcher says the status and the log's last line; a bug in
    the daemon (an exception out of `serve`) leaves its traceback in the log, status 1."""
    body = 'raise RuntimeError("a bug")' if how == "raises" else 'print("gave up early")\nreturn 4'
    got = _launch(tmp_path, body)
    log = got["log"]
    if how == "returns":
        assert got["error"] == f"mount daemon exited with status 4: gave up early (log: {log})"
    else:
        want = f"mount daemon exited with status 1: RuntimeError: a bug (log: {log})"
        assert got["error"] == want
        assert "Traceback" in Path(log).read_text()
    assert got["code"] == 1
