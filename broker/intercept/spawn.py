"""Starting a program under the bind() filter, for `exec --intercept`.

`start` forks; the child restores the signal dispositions a shell would give, turns on
no_new_privs, installs the seccomp filter, hands its notification listener to us over a
socketpair, waits for our go, and execs. We learn that the exec succeeded when the
child's end of the socketpair closes (it is close-on-exec); a step that failed is
reported back as "E:stage:errno" and raised here as the exception that names it.

Must never: leave the child running or unreaped when starting fails, let a held socket
reach the program as an inherited fd (it gets one only at the fd its bind() names), or
leak the listener or the socketpair.

Standard library only: this runs on a worker's start-up path.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import socket
from collections.abc import Iterable, Mapping, Sequence
from typing import Final, NoReturn

from broker import syscalls
from broker.errors import InterceptError, InterceptUnsupported
from broker.intercept import seccomp

SETUP_TIMEOUT: Final = 60.0
"""Seconds the child may take to install the filter and exec; generous for slow disks."""
FORWARDED_SIGNALS: Final = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
"""Signals sent to us go to the program, as a process manager expects."""
CHILD_DEFAULT_SIGNALS: Final = (signal.SIGPIPE, signal.SIGXFSZ)
"""Python ignores these; a program started by a shell has them at default (subprocess's
restore_signals does the same)."""


def start(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None,
    held_fds: Iterable[int],
    old_mask: Iterable[int],
) -> tuple[int, int]:
    """Fork and exec `argv` (searched on PATH) under the bind() filter.

    Args:
        argv: The program and its arguments.
        env: Its environment; default ours.
        held_fds: Our fds it must not inherit.
        old_mask: The signal mask it gets (ours before we blocked signals to serve it).

    Returns:
        (pid, listener): the program's pid, ours to reap, and the filter's
        notification fd, ours to close.

    Raises:
        OSError: exec failed (FileNotFoundError, PermissionError, ...); the child is
            reaped, as it is on any failure.
        InterceptUnsupported: the filter cannot be installed here.
        InterceptError: another step failed, or the program did not start in time.
    """
    code = seccomp.filter_program()
    program = ctypes.create_string_buffer(code, len(code))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child execs or exits
            ours.close()
            _child(theirs, argv, env=env, held_fds=held_fds, program=program, old_mask=old_mask)
        theirs.close()
        try:
            return pid, _handshake(ours, argv[0])
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise


def _child(
    chan: socket.socket,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None,
    held_fds: Iterable[int],
    program: ctypes.Array[ctypes.c_char],
    old_mask: Iterable[int],
) -> NoReturn:
    """In the forked child: install the filter, hand the listener over, exec. Never returns."""
    stage = "setup"
    try:
        for fd in held_fds:
            os.set_inheritable(fd, False)  # held sockets reach the program only via bind()
        for sig in CHILD_DEFAULT_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        for sig in FORWARDED_SIGNALS:
            if callable(signal.getsignal(sig)):
                signal.signal(sig, signal.SIG_DFL)  # as exec would; ignored ones stay so
        stage = "no_new_privs"
        syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
        stage = "seccomp"
        listener = seccomp.install_filter(program)
        try:
            socket.send_fds(chan, [b"L"], [listener])
        finally:
            os.close(listener)
        if chan.recv(1) != b"G":
            os._exit(127)
        stage = "exec"
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        if env is None:
            os.execvp(argv[0], list(argv))
        os.execvpe(argv[0], list(argv), dict(env))
    except OSError as exc:
        with contextlib.suppress(OSError):
            chan.send(f"E:{stage}:{exc.errno or 0}".encode())
    finally:
        os._exit(127)


def _setup_error(stage: str, err: int, argv0: str) -> Exception:
    reason = os.strerror(err)
    if stage == "exec":
        return OSError(err, reason, argv0)
    if stage == "seccomp" and err == errno.EBUSY:
        return InterceptUnsupported(
            "cannot install the bind() filter: this process already runs under a "
            "seccomp user-notification filter (EBUSY), and they do not nest; run "
            "port-broker outside the other supervisor, or pass sockets with LISTEN_FDS"
        )
    if stage == "seccomp" and err in (errno.EINVAL, errno.ENOSYS, errno.EACCES):
        return InterceptUnsupported(
            f"cannot install the bind() filter ({reason}); pass sockets with LISTEN_FDS instead"
        )
    return InterceptError(f"cannot start {argv0!r}: {stage} failed: {reason}")


def _handshake(chan: socket.socket, argv0: str) -> int:
    """Receive the listener from the child, let it exec, and wait until it has.

    Returns the listener fd (ours to close). Raises what the child reported.
    """
    chan.settimeout(SETUP_TIMEOUT)
    try:
        msg, fds, _flags, _addr = socket.recv_fds(chan, 64, 1)
        if msg != b"L" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise _report(msg, argv0)
        listener = fds[0]
        try:
            chan.sendall(b"G")
            msg = chan.recv(64)  # b"" once exec succeeded: the child's end is close-on-exec
            if msg:
                raise _report(msg, argv0)
        except BaseException:
            os.close(listener)
            raise
    except TimeoutError as exc:
        raise InterceptError(f"{argv0!r} did not start within {SETUP_TIMEOUT:.0f} s") from exc
    return listener


def _report(msg: bytes, argv0: str) -> Exception:
    parts = msg.decode(errors="replace").split(":")
    if len(parts) == 3 and parts[0] == "E" and parts[2].isdigit():
        return _setup_error(parts[1], int(parts[2]), argv0)
    return InterceptError(f"{argv0!r} exited before it could be started")
