"""Give an unmodified program a held listening socket when it calls bind() itself.

`run_intercepted` forks; the child turns on no_new_privs, installs a seccomp filter that
turns every bind() and listen() into a *user notification* for us, and execs the program.
We (the supervisor, unprivileged like the program) read each bind()'s address from the
program's memory. If it names a port we hold a socket for, on the wildcard address or on
the held socket's own address, with a socket of the same family, type and protocol, we
put the held socket at the program's own fd number (SECCOMP_IOCTL_NOTIF_ADDFD with
SECCOMP_ADDFD_FLAG_SETFD) and answer "bind() returned 0". A listen() on a held socket is
answered "0" without running: a second listen() would silently shrink the backlog the
holder set (Node asks for 511 where systemd set 4096). Everything else continues to the
kernel unchanged (SECCOMP_USER_NOTIF_FLAG_CONTINUE). This serves programs that cannot
take LISTEN_FDS: statically linked binaries, process managers, code we cannot change.

Must never:
- inject a socket of another family, type or protocol than the program's own: an AF_INET
  program given a dual-stack AF_INET6 socket misreads every peer address (CPython fails
  to decode them). With no held socket of the program's family for a mapped port, that
  bind() fails with EAFNOSUPPORT and one line on stderr saying what to hold instead;
- widen what the program asked for: a bind() to 127.0.0.1:80 never gets a socket held
  on 0.0.0.0:80 (it continues to the kernel and fails there, with a note on stderr);
- answer a bind() of a socket in another network namespace (a container's): its port 80
  is its own, not the held socket's;
- block in the notification loop: every bind()/listen() of the program and of all its
  descendants waits for us, so a stalled supervisor stalls them all;
- leak: the held sockets, the listener fd and our socketpair never reach the program as
  extra fds; the program gets a held socket only at the fd number it bound;
- pretend to be a sandbox: the filter is a convenience, not a security boundary.
  "Continue" lets the kernel re-read the address, which another thread of the program
  may have changed since we read it; that is harmless here because the program runs
  without privileges and can only get what the kernel would give it anyway.

Known limits (see also the docstring of `run_intercepted`):
- Socket options the program set before bind() (SO_REUSEPORT, SO_RCVBUF, TCP_NODELAY,
  IPV6_V6ONLY, ...) stay on its own socket, which the injected one replaces: they are
  lost. Options it sets after bind() apply to the held socket (shared with the holder).
- O_NONBLOCK belongs to the open file description, which the holder, we and every
  process given the same held socket share. We set it to what the program's own socket
  had just before injecting; two programs wanting different settings on one held socket
  cannot both be satisfied (the last bind() wins, and we say so on stderr), and we say so
  too when a blocking program makes a non-blocking held socket blocking (the shipped
  units hand them over non-blocking).
- io_uring's IORING_OP_BIND / IORING_OP_LISTEN (Linux 6.11+) do not pass through
  seccomp: such binds are not intercepted and fail as they would without us.
- Only x86_64 tasks are intercepted. x32 syscalls (nr | 0x40000000; same bind/listen
  numbers and argument layout) are intercepted too. i386 tasks (int 0x80, socketcall)
  are let through unchanged: their bind() to a privileged port fails as without us.
- If the supervisor dies (SIGKILL, OOM), every later bind()/listen() of the program
  fails with ENOSYS; sockets it already has keep working.
- A task already under a seccomp user-notification filter cannot get another one
  (EBUSY): interception does not nest (e.g. inside LXD/sysbox-style supervisors).
- Reading the program's memory and duplicating its socket need ptrace access to it
  (same uid and dumpable, or CAP_SYS_PTRACE; with Yama ptrace_scope=1, a descendant:
  hence we are a child subreaper, so orphans stay our descendants). A program that makes
  itself non-dumpable gets its binds passed to the kernel, with a note on stderr.
- A signal sent to both us and the program (KillMode=control-group) reaches the program
  twice: use KillMode=mixed. A terminal's ^C to our process group is not forwarded again.
- no_new_privs disarms setuid programs: broker/intercept/idmap.py runs newuidmap/newgidmap for it.

Standard library only (ctypes for the syscalls Python lacks): a worker's start-up path.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import select
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Final

from broker import syscalls
from broker.errors import InterceptError, InterceptUnsupported
from broker.intercept import seccomp, spawn
from broker.intercept.bindings import (
    Endpoint,
    Held,
    Pass,
    Refuse,
    build_map,
    decide,
    parse_sockaddr,
    show_endpoint,
    v6only_note,
)
from broker.intercept.notes import Notes, task_name
from broker.intercept.seccomp import check_supported
from broker.intercept.spawn import FORWARDED_SIGNALS
from broker.intercept.tracee import Tracee

__all__ = [
    "InterceptError",
    "InterceptUnsupported",
    "check_supported",
    "run_intercepted",
]

# --------------------------------------------------------------------------------------
# Limits, each with its reason.

_MESSAGE_PREFIX = "port-broker: "


# --------------------------------------------------------------------------------------
# The supervisor: serve notifications, forward signals, reap.


_NOT_INSPECTABLE: Final = (
    " (it is non-dumpable, or Yama's ptrace_scope forbids it; run it under plain "
    "`port-broker exec`, which passes the sockets as LISTEN_FDS)"
)


def _say(message: str) -> None:
    """One line on stderr; never raises. Written at once: a stderr that nobody reads
    (a full pipe) stalls the supervisor, and with it the program's next bind()."""
    with contextlib.suppress(OSError):
        os.write(2, (_MESSAGE_PREFIX + message + "\n").encode(errors="replace"))


class _Supervisor:
    """Owns the listener fd and the signalfd (closes neither: the caller does)."""

    def __init__(
        self,
        listener: int,
        sigfd: int,
        child: int,
        held: list[Held],
        mapping: dict[int, list[Held]],
        *,
        services: Mapping[int, Callable[[], None]],
    ) -> None:
        self.listener = listener
        self.services = services
        self.sigfd = sigfd
        self.child = child
        self.mapping = mapping
        self.held_inodes = {h.inode for h in held}
        self.listening_inodes = {h.inode for h in held if h.endpoint.type != socket.SOCK_DGRAM}
        self.nonblock_given: dict[tuple[int, int], bool] = {}
        self.notes = Notes(mapping)
        self.child_status: int | None = None
        self.tracee = Tracee(listener)

    # -- the loop -------------------------------------------------------------------
    def serve(self) -> int:
        """Serve until the child and every task under the filter are gone."""
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        poller.register(self.sigfd, select.POLLIN)
        for fd in self.services:
            poller.register(fd, select.POLLIN)
        filter_in_use, stop = True, False
        while not stop and (filter_in_use or self.child_status is None):
            for note in self.notes.due(time.monotonic()):
                _say(note)
            for fd, events in poller.poll(self.notes.timeout_ms(time.monotonic())):
                if fd == self.sigfd:
                    stop = self._on_signals()
                elif fd in self.services:
                    self.services[fd]()
                elif events & select.POLLIN:
                    self._on_notification()
                elif events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    # No task uses the filter any more, and none ever will again.
                    poller.unregister(self.listener)
                    filter_in_use = False
        if self.child_status is None:  # pragma: no cover - the loop only ends once it is set
            raise RuntimeError("supervisor stopped before the program was reaped")
        code = os.waitstatus_to_exitcode(self.child_status)
        return 128 - code if code < 0 else code

    def _on_signals(self) -> bool:
        """Reap and forward; return True when told to stop after the program exited."""
        stop = False
        while True:
            try:
                data = os.read(self.sigfd, syscalls.SIGNALFD_SIGINFO_SIZE * 16)
            except BlockingIOError:
                return stop
            for off in range(
                0, len(data) - syscalls.SIGNALFD_SIGINFO_SIZE + 1, syscalls.SIGNALFD_SIGINFO_SIZE
            ):
                signo, _err, code, _pid = syscalls.SIGNALFD_SIGINFO.unpack_from(data, off)
                if signo == signal.SIGCHLD:
                    self._reap()
                elif self.child_status is not None:
                    stop = True  # the program is gone: nobody to forward to; stop serving
                elif code == syscalls.SI_KERNEL and self._shares_our_process_group():
                    pass  # ^C, ^\ or hangup: the kernel sent it to the program too
                else:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.child, signo)

    def _shares_our_process_group(self) -> bool:
        try:
            return os.getpgid(self.child) == os.getpgrp()
        except ProcessLookupError:
            return False

    def _reap(self) -> None:
        """Reap the program and any orphaned descendant (we are their subreaper)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.child:
                self.child_status = status
                self.notes.exited(os.waitstatus_to_exitcode(status), time.monotonic())

    # -- notifications --------------------------------------------------------------
    def _on_notification(self) -> None:
        try:
            n = seccomp.receive(self.listener)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EINTR):  # ENOENT: the task died
                _say(f"cannot receive a bind()/listen() notification: {exc.strerror}")
            return
        try:
            if n.nr == seccomp.NR_BIND:
                self._on_bind(n)
            elif n.nr == seccomp.NR_LISTEN:
                self._on_listen(n)
            else:
                self._reply(n.id, flags=seccomp.SECCOMP_USER_NOTIF_FLAG_CONTINUE)
        except Exception as exc:  # a crashed loop would stall every bind()
            _say(f"internal error on a notification from pid {n.pid}: {exc!r}; passing it on")
            self._reply(n.id, flags=seccomp.SECCOMP_USER_NOTIF_FLAG_CONTINUE)

    def _reply(self, nid: int, val: int = 0, error: int = 0, flags: int = 0) -> None:
        try:
            seccomp.respond(self.listener, nid, val=val, error=error, flags=flags)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the task died or was interrupted
                _say(f"cannot answer a notification: {exc.strerror}")

    def _pass(self, n: seccomp.Notification) -> None:
        self._reply(n.id, flags=seccomp.SECCOMP_USER_NOTIF_FLAG_CONTINUE)

    def _on_bind(self, n: seccomp.Notification) -> None:
        fd = n.fd
        if n.sockaddr_length > seccomp.SOCKADDR_MAX:
            self._pass(n)  # longer than any sockaddr: the kernel's EINVAL, not ours
            return
        try:
            raw = self.tracee.sockaddr(n)
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EACCES):
                _say(
                    f"cannot read the memory of {task_name(n.pid)} ({exc.strerror}): "
                    f"its bind() goes to the kernel{_NOT_INSPECTABLE}"
                )
            raw = b""  # EFAULT, EIO: a bad pointer, for the kernel to report
        if raw is None:
            return
        parsed = parse_sockaddr(raw)
        if fd < 0 or parsed is None or parsed[2] not in self.mapping:
            self._pass(n)
            return
        try:
            target = self.tracee.fd(n, fd, fd_flags=True)
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EACCES):
                _say(
                    f"cannot inspect fd {fd} of {task_name(n.pid)} ({exc.strerror}): "
                    f"its bind() goes to the kernel{_NOT_INSPECTABLE}"
                )
            self._pass(n)  # EBADF, ESRCH: the kernel answers those itself
            return
        if target is None:
            return
        dup, fd_flags = target
        fd_flags |= fcntl.fcntl(dup, fcntl.F_GETFL)  # the file's flags, O_NONBLOCK among them
        try:
            sock = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            self._pass(n)  # ENOTSOCK: the kernel's answer
            return
        with sock:
            if not self.tracee.in_our_network(sock):
                self._pass(n)  # another network namespace: its own ports, its own bind()
            else:  # socket() may have set O_NONBLOCK (a default timeout): undo that
                fcntl.fcntl(dup, fcntl.F_SETFL, fd_flags & ~os.O_CLOEXEC)
                self._bind_mapped(n, sock, fd=fd, fd_flags=fd_flags, address=parsed)

    def _bind_mapped(
        self,
        n: seccomp.Notification,
        sock: socket.socket,
        *,
        fd: int,
        fd_flags: int,
        address: tuple[int, bytes, int],
    ) -> None:
        """Answer a bind() of the program's `sock` (its fd `fd`) to a mapped port."""
        family, ip, port = address
        st = os.fstat(sock.fileno())
        if (st.st_dev, st.st_ino) in self.held_inodes:
            # Already a held socket: a bind() restarted by a signal after we injected.
            self._reply(n.id)
            return
        if sock.family != family or sock.getsockname()[1] != 0:
            self._pass(n)  # the kernel's EINVAL: family mismatch, or already bound
            return
        proto = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
        want = Endpoint(family, sock.type, proto, ip, port)
        candidates = self.mapping[port]
        who = task_name(n.pid)
        decision = decide([h.endpoint for h in candidates], want, who)
        if isinstance(decision, Pass):
            if decision.note:
                _say(decision.note)
            self._pass(n)
            return
        if isinstance(decision, Refuse):
            _say(decision.message)
            self._reply(n.id, error=decision.error)
            return
        held = candidates[decision.choice]
        if held.endpoint.family == socket.AF_INET6:
            wanted = bool(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
            if note := v6only_note(wanted, held, who):
                _say(note)
        try:
            seccomp.add_fd(
                self.listener, n.id, held.sock.fileno(), fd, cloexec=bool(fd_flags & os.O_CLOEXEC)
            )
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                _say(
                    f"cannot give the held socket to {who} ({exc.strerror}): "
                    "its bind() goes to the kernel"
                )
                self._pass(n)
            return
        # Now that it is the program's (which waits in bind() until the reply), and
        # not before: a failed ADDFD leaves the flag as the other holders had it.
        self._match_nonblocking(bool(fd_flags & os.O_NONBLOCK), held, who)
        self._reply(n.id)
        self.notes.took(held.inode, time.monotonic())

    def _match_nonblocking(self, wanted: bool, held: Held, who: str) -> None:
        """Give the shared open file description the program's own O_NONBLOCK."""
        before = self.nonblock_given.setdefault(held.inode, wanted)
        if before != wanted:
            where = show_endpoint(held.endpoint.family, held.endpoint.ip, held.endpoint.port)
            _say(
                f"{who} wants the socket held on {where} {'non-' if wanted else ''}blocking, "
                "but an earlier bind() got it the other way; they share one O_NONBLOCK "
                "flag, and the last one wins"
            )
            self.nonblock_given[held.inode] = wanted
        elif not wanted and not os.get_blocking(held.sock.fileno()):
            where = show_endpoint(held.endpoint.family, held.endpoint.ip, held.endpoint.port)
            _say(
                f"{who}'s own socket is blocking, so the socket held on {where} is made "
                "blocking for it; every worker holding that socket shares the flag: one "
                "that accepts until EAGAIN (Node, asyncio) stops answering, and a restart "
                "of the broker (NonBlocking=yes in port-broker.service) makes it "
                "non-blocking again under this program"
            )
        os.set_blocking(held.sock.fileno(), not wanted)

    def _on_listen(self, n: seccomp.Notification) -> None:
        fd = n.fd
        target = None
        if fd >= 0:
            try:
                target = self.tracee.fd(n, fd, fd_flags=False)
            except OSError:
                pass  # no such fd, not a task we may inspect: the kernel's to answer
            else:
                if target is None:
                    return
        if target is None:
            self._pass(n)
            return
        dup, _ = target
        try:
            st = os.fstat(dup)
        finally:
            os.close(dup)
        if (st.st_dev, st.st_ino) in self.listening_inodes:
            self._reply(n.id)  # a held socket: the holder's backlog stands
        else:
            self._pass(n)


def run_intercepted(
    argv: Sequence[str],
    held: Sequence[tuple[str, socket.socket]],
    mapping: Mapping[int, str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    services: Mapping[int, Callable[[], None]] | None = None,
) -> int:
    """Run a program whose bind() to a held port gets the held socket; return its status.

    Forks; the child sets no_new_privs, installs a seccomp filter that sends bind() and
    listen() to us as user notifications, and execs `argv` (searched on PATH). We serve
    notifications for the program, its threads and all its descendants until all of
    them are gone, forwarding SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to
    the program meanwhile (except ^C, ^\\ and hangups from a terminal the program shares
    our process group with: it has them already).

    This takes over the calling process while it runs, which must be single-threaded
    and called from the main thread: it blocks those signals and SIGCHLD, becomes a
    child subreaper (so that orphaned descendants stay ours to inspect and reap) and
    reaps every child. All of that is restored on return. After the program has exited,
    a forwarded signal makes us return at once, even if descendants remain (their later
    bind() and listen() then fail with ENOSYS).

    Ownership: `held` stays the caller's (we never close it), but the program shares
    each socket it is given, and we set its O_NONBLOCK to what the program asked for.

    Args:
        argv: The program and its arguments.
        held: (name, socket) pairs: bound sockets (listening, if SOCK_STREAM) of AF_INET
            or AF_INET6, as granted.
        mapping: PORT → NAME (--map): a bind() to PORT gets the sockets named NAME too.
            Each held socket serves its own port regardless (`bindings.build_map`).
        env: The program's environment; default ours.
        services: fds to serve meanwhile, each with what to run when it is readable.

    Returns:
        The program's exit status, or 128 + the signal number that killed it.

    Raises:
        InterceptUnsupported: This machine cannot intercept bind() (see
            `check_supported`), or the process already runs under another supervisor.
        InterceptError: A held socket is unusable, or the program could not be started.
        OSError: exec failed (FileNotFoundError, PermissionError, ...).
        ValueError: `argv` is empty, a `mapping` key is not a port or names no held
            socket, or other threads run in this process.
    """
    if not argv:
        raise ValueError("argv is empty: nothing to run")
    check_supported()
    described, ports = build_map(held, mapping)
    threads = len(os.listdir("/proc/self/task"))
    if threads > 1:
        # Another thread with SIGCHLD unblocked would take the signals our signalfd
        # waits for, and the supervisor would wait for ever.
        raise ValueError(
            f"run_intercepted needs a single-threaded process; {threads} threads are running"
        )
    watched = {*FORWARDED_SIGNALS, signal.SIGCHLD}

    old_sigchld = signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # ValueError off main thread
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    subreaper = ctypes.c_int(0)
    sigfd = listener = -1
    pid = 0
    try:
        syscalls.prctl(
            syscalls.PR_GET_CHILD_SUBREAPER, ctypes.cast(ctypes.byref(subreaper), ctypes.c_void_p)
        )
        syscalls.prctl(syscalls.PR_SET_CHILD_SUBREAPER, 1)
        sigfd = syscalls.signalfd(watched)
        held_fds = [h.sock.fileno() for h in described]
        pid, listener = spawn.start(argv, env=env, held_fds=held_fds, old_mask=old_mask)
        supervisor = _Supervisor(listener, sigfd, pid, described, ports, services=services or {})
        try:
            return supervisor.serve()
        finally:
            if supervisor.child_status is not None:
                pid = 0  # reaped already: its pid may be someone else's by now
    finally:
        if pid > 0:  # setup failed, or serving raised: do not leave the program unserved
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        for fd in (listener, sigfd):
            if fd >= 0:
                os.close(fd)
        syscalls.prctl(syscalls.PR_SET_CHILD_SUBREAPER, subreaper.value)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        if old_sigchld is not None:  # None: set outside Python, cannot be put back
            signal.signal(signal.SIGCHLD, old_sigchld)
