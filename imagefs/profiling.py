"""`imagefs profile record`: mount with a trace, run a workload, keep what it read.

Synchronous and process-based on purpose: the mount is a real `imagefs mount` daemon (as a
user would run it) and the workload a real child process with `$IMAGEFS_MOUNT` set, e.g.
`chroot "$IMAGEFS_MOUNT" /usr/bin/python3 -c 'import json'`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from imagefs.errors import ImageFSError
from imagefs.fs import lifecycle
from imagefs.profiles import Profile, from_trace
from imagefs.store import Store, fsutil


@dataclass(frozen=True)
class Recorded:
    profile: Profile
    exit_code: int
    output: Path


def record_profile(
    root: Path,
    global_argv: Sequence[str],
    reference: str,
    manifest_digest: str,
    layer_digests: Sequence[str],
    output: Path,
    command: Sequence[str],
) -> Recorded:
    if not command:
        raise ImageFSError("profile record: give the command to run after `--`")
    work = Path(tempfile.mkdtemp(prefix="imagefs-record-"))
    mountpoint = work / "mnt"
    mountpoint.mkdir()
    trace = work / "trace.jsonl"
    store = Store(root)
    log_path = lifecycle.log_path_for(root, mountpoint)
    argv = [
        *global_argv,
        "mount",
        "-f",
        "--trace",
        str(trace),
        "--no-prefetch-landmark",
        reference,
        str(mountpoint),
    ]
    try:
        lifecycle.spawn_daemon(argv, log_path, mountpoint, root)
        try:
            env = {**os.environ, "IMAGEFS_MOUNT": str(mountpoint)}
            code = subprocess.run(list(command), env=env, stdin=sys.stdin).returncode
        finally:
            lifecycle.unmount(mountpoint, store)
        lines = trace.read_bytes().splitlines() if trace.exists() else []
        profile = from_trace(lines, manifest_digest, layer_digests)
        fsutil.atomic_write(output, profile.to_json())
        return Recorded(profile, code, output)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(work)
