"""Who is on the other end of a control connection, from the kernel alone.

The peer's uid, gid and pid come from SO_PEERCRED (recorded by the kernel at connect
time); its systemd unit from its cgroup, read through a pidfd (SO_PEERPIDFD) so that a
recycled pid cannot lend a dead peer another process's unit; its groups from the user
database. Nothing a client *says* about itself is ever used.

Must never: trust a pid without the pidfd check, or block on anything but local files
and the user database (NSS; cached for a few seconds per uid).
"""

from __future__ import annotations

import errno
import os
import pwd
import select
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Final, Protocol

SO_PEERPIDFD: Final = getattr(socket, "SO_PEERPIDFD", 77)
"""Linux 6.5+: a pidfd for the process that connect()ed (asm-generic/socket.h)."""

_INT: Final = struct.Struct("i")
_UCRED: Final = struct.Struct("iII")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }
_NO_ID: Final = 2**32 - 1
"""(uid_t)-1: what SO_PEERCRED reports for a socket with no peer credentials."""

USER_CACHE_SECONDS: Final = 5.0
"""How long a uid's name and groups are reused: a group change reaches the policy within
this time, and a burst of grants costs one user-database lookup, not one each."""

PROCESS_UNIT_SUFFIXES: Final = (".service", ".scope")
"""The only unit types that contain processes."""

CGROUP_FILE_MAX: Final = 65536
"""Read limit for /proc/PID/cgroup: a line per hierarchy (a dozen), each a path."""


class SupportsGetsockopt(Protocol):
    """A socket, stdlib or trio: all `identify` needs of it."""

    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...


@dataclass(frozen=True)
class Peer:
    """The kernel's account of a connected client.

    Attributes:
        pid: Process id in the broker's pid namespace (0 if not visible there).
        uid: Effective uid when it connected, as seen from the broker's user namespace.
        gid: Effective gid when it connected.
        user: User name from the user database, or None for a uid with no entry.
        groups: gid plus the user's groups from the user database.
        unit: The systemd unit (service or scope) the process ran in, or None.
        cgroup: The process's cgroup path, or None if it could not be read safely.
    """

    pid: int
    uid: int
    gid: int
    user: str | None = None
    groups: frozenset[int] = field(default_factory=frozenset)
    unit: str | None = None
    cgroup: str | None = None

    def describe(self) -> str:
        """Return a short human description: 'user nobody (uid 65534, pid 7, unit x)'."""
        details = [f"uid {self.uid}", f"pid {self.pid}"]
        if self.unit:
            details.append(f"unit {self.unit}")
        who = f"user {self.user}" if self.user else "unnamed user"
        return f"{who} ({', '.join(details)})"


def unit_from_cgroup(path: str) -> str | None:
    """Return the system unit owning a cgroup path, as systemd's cg_path_get_unit() does.

    Slices are skipped; the first other component must be a service or a scope.
    "/system.slice/web.service/x" gives "web.service"; "/" gives None.
    """
    for part in path.split("/"):
        if not part or part.endswith(".slice"):
            continue
        return part if part.endswith(PROCESS_UNIT_SUFFIXES) else None
    return None


def cgroup_of(pid: int) -> str | None:
    """Return the unified-hierarchy cgroup of `pid`, or None if it cannot be read.

    On a hybrid cgroup setup the v1 name=systemd hierarchy is used when the unified
    one has no entry.
    """
    try:  # os.open/os.read: this runs for every client, and file objects cost more
        fd = os.open(f"/proc/{pid}/cgroup", os.O_RDONLY | os.O_CLOEXEC)
        try:
            lines = os.read(fd, CGROUP_FILE_MAX).decode("utf-8", "replace").splitlines()
        finally:
            os.close(fd)
    except OSError:
        return None
    fallback = None
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            return path
        if controllers == "name=systemd":
            fallback = path
    return fallback


def _pidfd_alive(pidfd: int) -> bool:
    # A pidfd polls readable once its process has exited; no permission is needed.
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return not poller.poll(0)


def _peer_pidfd(sock: SupportsGetsockopt, pid: int) -> int | None:
    try:
        return int(_INT.unpack(sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, _INT.size))[0])
    except OSError as e:
        if e.errno not in (errno.ENOPROTOOPT, errno.EINVAL, errno.EOPNOTSUPP):
            return None  # ESRCH: the peer is gone already
    # Older kernel: open a pidfd now. A pid recycled between connect() and this call
    # could still fool us; SO_PEERPIDFD (Linux 6.5) closes that window.
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def _unit_and_cgroup(sock: SupportsGetsockopt, pid: int) -> tuple[str | None, str | None]:
    if pid <= 0:
        return None, None
    pidfd = _peer_pidfd(sock, pid)
    if pidfd is None:
        return None, None
    try:
        path = cgroup_of(pid)
        if path is None or not _pidfd_alive(pidfd):
            return None, None  # exited: the pid may already be someone else's
        return unit_from_cgroup(path), path
    finally:
        os.close(pidfd)


class UserDatabase:
    """uid → (name, groups), from NSS, cached for USER_CACHE_SECONDS."""

    def __init__(self, ttl: float = USER_CACHE_SECONDS) -> None:
        self._ttl = ttl
        self._cache: dict[int, tuple[float, str | None, frozenset[int]]] = {}

    def lookup(self, uid: int) -> tuple[str | None, frozenset[int]]:
        """Return the user name (or None) and supplementary groups of `uid`."""
        now = time.monotonic()
        hit = self._cache.get(uid)
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1], hit[2]
        try:
            entry = pwd.getpwuid(uid)
            name: str | None = entry.pw_name
            groups = frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid))
        except KeyError:
            name, groups = None, frozenset()
        if len(self._cache) > 4096:  # bound memory against a flood of distinct uids
            self._cache.clear()
        self._cache[uid] = (now, name, groups)
        return name, groups


def identify(sock: int | SupportsGetsockopt, users: UserDatabase) -> Peer:
    """Return the identity of the process connected to the Unix socket `sock`.

    Args:
        sock: The connected socket (stdlib or trio), or its fd. The caller keeps
            ownership; it is neither closed nor changed.
        users: Where user names and groups are looked up.

    Raises:
        OSError: if `sock` has no peer credentials (not a connected Unix socket).
    """
    if isinstance(sock, int):
        borrowed = socket.socket(fileno=sock)  # a view; detached below, never closed
        try:
            return identify(borrowed, users)
        finally:
            borrowed.detach()
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    if uid == _NO_ID:  # unconnected, or not a Unix socket: no credentials to read
        raise OSError(errno.ENOTCONN, "no peer credentials: not a connected Unix socket")
    unit, cgroup = _unit_and_cgroup(sock, pid)
    name, groups = users.lookup(uid)
    return Peer(
        pid=pid, uid=uid, gid=gid, user=name, groups=groups | {gid}, unit=unit, cgroup=cgroup
    )
