"""A detached mount's daemon, forked before the launcher has parsed its arguments.

`imagefs mount IMAGE DIR` used to import the command line (~90 ms warm, ~130 ms with the page
cache dropped), check its arguments, then fork the daemon, which imported trio, httpx,
pyfuse3 and the mount's own modules (~240 ms warm, ~345 cold) before its first request to
the registry: one after the other, on a 2-core machine with a core idle. Forked at the very
start instead, the daemon-to-be imports those on the other core while the launcher parses
and checks. The launcher then hands it the parsed arguments, the mount's log and the ready
pipe's write end (file descriptors over a socketpair, SCM_RIGHTS), and it goes on exactly as
`lifecycle.fork_daemon`'s child does (`lifecycle.run_daemon`).

Only from the command line itself (`main()` with no argv), only for what looks like a
detached mount, and only from a process with one thread that has not imported trio, as
`fork_daemon` requires. A launcher that does not hand over (a bad argument, `--help`, a
failed check) kills the child on its way out; a child that cannot be handed to (it died)
is replaced by the plain fork. Until the hand-over the child is silent: its stdio is
/dev/null and Ctrl-C ends it without a traceback.

This module is imported before the rest of the command line: its top level imports the
standard library only.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import pickle
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

# What the daemon imports before it can mount (tests/integration/test_mount_startup.py
# checks that this path imports no layer format module).
DAEMON_MODULES = (
    "trio",
    "httpcore",  # imported by its first registry client otherwise (`registry.connection`)
    "imagefs.cli.app",
    "imagefs.cli.mount",
    "imagefs.session",
    "imagefs.pulling",
    "imagefs.fs.daemon",
)
_MAX_ARGUMENTS = 1 << 20  # a pickled argparse.Namespace is a few hundred bytes

_waiting: tuple[int, socket.socket] | None = None  # the child's pid, the launcher's end


def looks_like_a_detached_mount(argv: Sequence[str]) -> bool:
    """`mount` among the words, no foreground or help flag. A false guess only costs a child
    that is killed when the launcher exits."""
    return "mount" in argv and not {"-f", "--foreground", "-h", "--help"} & set(argv)


def start(argv: Sequence[str], serve: Callable[[Any, int], int]) -> None:
    """Fork the daemon-to-be if `argv` looks like a detached mount (see the module). Once
    handed its arguments it runs `serve(arguments, ready_fd)` as the daemon (its exit
    status): what the launcher's own fork would have run."""
    global _waiting
    if (
        _waiting is not None
        or not looks_like_a_detached_mount(argv)
        or threading.active_count() > 1
        or "trio" in sys.modules
    ):
        return
    try:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError:
        return
    for stream in (sys.stdout, sys.stderr):  # or the child writes them a second time
        stream.flush()
    try:
        pid = os.fork()
    except OSError:
        ours.close()
        theirs.close()
        return
    if pid == 0:
        ours.close()
        _child(theirs, serve)
    theirs.close()
    _waiting = (pid, ours)
    atexit.register(_not_needed)


def waiting_pid() -> int | None:
    """The pid of the child waiting to be handed over to, if there is one."""
    return None if _waiting is None else _waiting[0]


def hand_over(arguments: Any, log: int, w: int) -> bool:
    """Give the waiting child `arguments` (pickled), the log and the ready pipe's write end:
    it is the daemon from now on. False if there is none or it cannot take them (it died:
    it is reaped), and the caller forks as before."""
    global _waiting
    if _waiting is None:
        return False
    (pid, sock), _waiting = _waiting, None  # handed over or gone: never killed at exit
    try:
        with sock:
            socket.send_fds(sock, [b"+"], [log, w])
            sock.sendall(pickle.dumps(arguments))
        return True
    except OSError:
        _end(pid)
        return False


def _not_needed() -> None:
    """At exit, a child never handed over (whatever stopped the launcher first) is killed
    and reaped."""
    global _waiting
    if _waiting is not None:
        (pid, sock), _waiting = _waiting, None
        sock.close()
        _end(pid)


def _end(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.waitpid(pid, 0)


def _child(sock: socket.socket, serve: Callable[[Any, int], int]) -> NoReturn:
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # the launcher's Ctrl-C: quietly gone
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # silent until it is the daemon (which points 1 and 2 at its log)
            os.dup2(null, fd)
        os.close(null)
        for name in DAEMON_MODULES:
            importlib.import_module(name)
        message, fds, _, _ = socket.recv_fds(sock, 1, 2)
        if message != b"+" or len(fds) != 2:
            os._exit(0)  # the launcher exited without handing over
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
            if len(data) > _MAX_ARGUMENTS:
                os._exit(1)
        sock.close()
        log, w = fds
        arguments = pickle.loads(data)  # from our own parent, over a socketpair
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as a plain fork has it
        from imagefs.fs.lifecycle import run_daemon

        run_daemon(lambda ready_fd: serve(arguments, ready_fd), log, w)
    except BaseException:
        code = 1
    os._exit(code)
