"""What the --intercept supervisor does to the traced program: open a pidfd for one of
its threads, duplicate one of its fds (with the flags pidfd_getfd does not carry), read
the sockaddr a bind() passes from its memory, tell whether one of its sockets lives in
the supervisor's own network namespace. Each read is checked against the
notification afterwards (seccomp_unotify(2)): what a task that has exited or been
interrupted meanwhile left behind is dropped, never acted on.

Must never: act on what was read of a task whose notification is no longer valid, or
leave an fd of ours open on any path.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from typing import Final

from broker import syscalls
from broker.intercept import seccomp

SO_NETNS_COOKIE: Final = getattr(socket, "SO_NETNS_COOKIE", 71)
"""Linux 5.14+: a number naming the network namespace a socket lives in, for the life
of the boot (asm-generic/socket.h); no capability needed to read it."""


def netns_cookie(sock: socket.socket) -> int | None:
    """The cookie of `sock`'s network namespace, or None before Linux 5.14."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    except OSError:
        return None
    return int.from_bytes(raw, sys.byteorder)


class Tracee:
    """The programs under one seccomp listener.

    Args:
        listener: The seccomp notification fd (to check notifications are still valid).
    """

    def __init__(self, listener: int) -> None:
        self.listener = listener
        self.thread_pidfds = True  # until the kernel says PIDFD_THREAD is unknown
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ours:
            self.netns = netns_cookie(ours)

    def in_our_network(self, sock: socket.socket) -> bool:
        """Whether the program's socket `sock` (a duplicate) lives in our network
        namespace: the only one whose ports the held sockets stand for. A container's
        own namespace has its own port 80. (Before Linux 5.14 this cannot be told:
        every socket counts as ours.)"""
        return self.netns is None or netns_cookie(sock) in (None, self.netns)

    def pidfd_open(self, tid: int) -> int:
        """A pidfd for thread `tid` (a notification names threads), or its process
        before Linux 6.9."""
        if self.thread_pidfds:
            try:
                return os.pidfd_open(tid, syscalls.PIDFD_THREAD)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.thread_pidfds = False  # before 6.9: only thread-group leaders
        with open(f"/proc/{tid}/status", "rb") as f:
            tgid = next(int(line.split()[1]) for line in f if line.startswith(b"Tgid:"))
        return os.pidfd_open(tgid)

    def fd(self, n: seccomp.Notification, fd: int, *, fd_flags: bool) -> tuple[int, int] | None:
        """Duplicate the program's fd `fd` into ours (ours to close), with its fd flags.

        Returns None if the notification is gone. The flags (O_NONBLOCK, and O_CLOEXEC
        from /proc/PID/fdinfo, which pidfd_getfd does not carry over) only if asked.
        """
        pidfd = fdinfo = -1
        try:
            pidfd = self.pidfd_open(n.pid)
            if fd_flags:
                fdinfo = os.open(f"/proc/{n.pid}/fdinfo/{fd}", os.O_RDONLY | os.O_CLOEXEC)
            if not seccomp.id_valid(self.listener, n.id):
                return None
            info = os.read(fdinfo, 4096) if fd_flags else b"flags: 0"
            flags = next(
                int(ln.split()[1], 8) for ln in info.split(b"\n") if ln.startswith(b"flags:")
            )
            dup = syscalls.pidfd_getfd(pidfd, fd)
            valid = False
            try:
                valid = seccomp.id_valid(
                    self.listener, n.id
                )  # what we read may predate an exit: then drop it
            finally:
                if not valid:
                    os.close(dup)
            return (dup, flags) if valid else None
        finally:
            for opened in (pidfd, fdinfo):
                if opened >= 0:
                    os.close(opened)

    def sockaddr(self, n: seccomp.Notification) -> bytes | None:
        """The sockaddr a bind() passes (at most seccomp.SOCKADDR_MAX bytes); b"" for a kernel
        address, None if the notification is gone."""
        addr, length = n.args[1], n.sockaddr_length
        if addr >= 1 << 63:
            return b""  # a kernel address: not the program's to pass (the kernel: EFAULT)
        mem = os.open(f"/proc/{n.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if not seccomp.id_valid(
                self.listener, n.id
            ):  # the fd is known to be this task's memory
                return None
            raw = os.pread(mem, min(length, seccomp.SOCKADDR_MAX), addr)
            # Re-check after reading (seccomp_unotify(2)): a task that exited or was
            # interrupted meanwhile has no syscall left to answer.
            return raw if seccomp.id_valid(self.listener, n.id) else None
        finally:
            os.close(mem)
