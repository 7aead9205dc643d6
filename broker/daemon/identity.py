"""Who is on the other end of a control connection, from the kernel alone.

The peer's uid, gid and pid come from SO_PEERCRED and its supplementary groups from
SO_PEERGROUPS (both recorded by the kernel at connect time); its systemd unit from its
cgroup, read through a pidfd (SO_PEERPIDFD) so that a recycled pid cannot lend a dead
peer another process's unit; its user name, and the groups its user has in the user
database, from NSS. Nothing a client *says* about itself is ever used.

`peer_credentials` asks only the kernel (cheap, never blocks); broker/daemon/users.py adds the
user database's part, which may block (LDAP, sssd).

Must never: trust a pid without the pidfd check, or credit a peer whose uid the kernel
could not map into our user namespace (it shows as the overflow uid, `nobody`).
"""

from __future__ import annotations

import errno
import functools
import os
import select
import socket
import struct
from dataclasses import dataclass, field
from typing import Final, Protocol

SO_PEERPIDFD: Final = getattr(socket, "SO_PEERPIDFD", 77)
"""Linux 6.5+: a pidfd for the process that connect()ed (asm-generic/socket.h)."""
SO_PEERGROUPS: Final = getattr(socket, "SO_PEERGROUPS", 59)
"""Linux 4.13+: the supplementary groups of the process that connect()ed."""
PEERGROUPS_BUFFER: Final = 1024
"""Bytes asked for with SO_PEERGROUPS: 256 groups, the most CPython's getsockopt() can
return; a peer in more groups is matched by its user-database groups only."""

_INT: Final = struct.Struct("i")
_UCRED: Final = struct.Struct("iII")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }
_NO_ID: Final = 2**32 - 1
"""(uid_t)-1: what SO_PEERCRED reports for a socket with no peer credentials."""

PROCESS_UNIT_SUFFIXES: Final = (".service", ".scope")
"""The only unit types that contain processes."""

CGROUP_FILE_MAX: Final = 65536
"""Read limit for /proc/PID/cgroup: a line per hierarchy (a dozen), each a path. A file
past it (paths kilobytes deep, which only their owner can make) is not used: that peer
has no unit."""


class SupportsGetsockopt(Protocol):
    """A socket, stdlib or trio: all `peer_credentials` needs of it."""

    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Peer:
    """The kernel's account of a connected client.

    Attributes:
        pid: Process id in the broker's pid namespace (0 if not visible there).
        uid: Effective uid when it connected, as seen from the broker's user namespace.
        gid: Effective gid when it connected.
        user: User name from the user database, or None for a uid with no entry.
        groups: gid, the supplementary groups the kernel recorded at connect (when
            asked for: see `peer_credentials`), and the user's groups in the user
            database.
        unit: The systemd unit (service or scope) the process ran in, or None.
        cgroup: The process's cgroup path, or None if it could not be read safely.
        mapped: False if the peer's uid has no mapping in the broker's user namespace:
            the kernel then shows the overflow uid, which identifies nobody.
        gid_mapped: The same for its gid. Supplementary groups that have no mapping
            show as the overflow gid, and are left out of `groups`.
    """

    pid: int
    uid: int
    gid: int
    user: str | None = None
    groups: frozenset[int] = field(default_factory=frozenset)
    unit: str | None = None
    cgroup: str | None = None
    mapped: bool = True
    gid_mapped: bool = True

    def describe(self) -> str:
        """Return a short human description: 'user nobody (uid 65534, pid 7, unit x)'."""
        details = [f"uid {self.uid}", f"pid {self.pid}"]
        if self.unit:
            details.append(f"unit {self.unit}")
        who = f"user {self.user}" if self.user else "unnamed user"
        return f"{who} ({', '.join(details)})"

    def with_user(self, name: str | None, groups: frozenset[int]) -> Peer:
        """Return this peer with its user-database name and groups added."""
        return Peer(self.pid, self.uid, self.gid, name, self.groups | groups, self.unit,
                    self.cgroup, self.mapped, self.gid_mapped)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Marks:
    """What of a peer besides its uid a rule may name: groups (as the kernel recorded
    them at connect) and its unit. Of a peer found named: the groups and unit a rule
    names."""

    groups: frozenset[int] = field(default_factory=frozenset)
    unit: str | None = None

    def __bool__(self) -> bool:
        return bool(self.groups) or self.unit is not None


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
    """Return the unified-hierarchy cgroup of `pid`, or None if it cannot be read whole.

    On a hybrid cgroup setup the v1 name=systemd hierarchy is used when the unified
    one has no entry (see `parse_cgroup_file`).
    """
    try:  # os.open/os.read: this runs for every client, and file objects cost more
        fd = os.open(f"/proc/{pid}/cgroup", os.O_RDONLY | os.O_CLOEXEC)
        try:
            # procfs makes this file whole and gives all of it to a read() big enough
            # (a single_open seq_file): one read, asking one byte more than the limit.
            data = os.read(fd, CGROUP_FILE_MAX + 1)
        finally:
            os.close(fd)
    except OSError:
        return None
    if len(data) > CGROUP_FILE_MAX:
        return None  # cut short, its last line would be a part of a path: no answer
    return parse_cgroup_file(data)


def parse_cgroup_file(data: bytes) -> str | None:
    """Return the cgroup that /proc/PID/cgroup's content `data` gives: the unified
    hierarchy's ("0::PATH"), else the v1 name=systemd one's, else None.

    Only "\n" ends a line: it is the one character the kernel refuses in a cgroup name,
    so a name holding any other line break (CR, VT, FF, U+2028, ...) cannot forge a
    line of its own. A name that is not UTF-8 is kept as its bytes (surrogate escapes):
    it can equal no unit name in a policy.
    """
    fallback = None
    for line in data.decode("utf-8", "surrogateescape").split("\n"):
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
        # Only ENOPROTOOPT means "this kernel has no SO_PEERPIDFD". Anything else
        # (EINVAL from 6.5-6.15 for a reaped peer, ESRCH) means the peer is gone: a
        # pidfd opened now by pid could name a newer process with the same pid.
        if e.errno != errno.ENOPROTOOPT:
            return None
    # A kernel before 6.5: open a pidfd now. A pid recycled between connect() and this
    # call could still fool us; SO_PEERPIDFD closes that window.
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def _peer_groups(sock: SupportsGetsockopt) -> frozenset[int]:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, PEERGROUPS_BUFFER)
    except OSError:  # ERANGE: more groups than fit; ENOPROTOOPT: a kernel before 4.13
        return frozenset()
    return frozenset(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))


@functools.cache
def overflow_ids() -> tuple[int, int] | None:
    """Return (overflowuid, overflowgid) if we run in a user namespace other than the
    initial one (where unmapped peers show as those ids), else None."""
    try:
        with open("/proc/self/uid_map", encoding="ascii") as f:
            if f.read().split() == ["0", "0", "4294967295"]:
                return None  # the initial user namespace: every id is mapped
        with open("/proc/sys/kernel/overflowuid", encoding="ascii") as f:
            uid = int(f.read())
        with open("/proc/sys/kernel/overflowgid", encoding="ascii") as f:
            gid = int(f.read())
    except (OSError, ValueError):
        return (65534, 65534)  # the kernel's defaults
    return (uid, gid)


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


Ucred = tuple[int, int, int]
"""What SO_PEERCRED says: pid, uid, gid."""


def peer_ucred(sock: SupportsGetsockopt) -> Ucred | None:
    """The pid, uid and gid the kernel recorded for the peer of `sock` (one getsockopt),
    or None if it has none: what the accept loop may know of a connection before it
    costs more (`peer_credentials` takes it on from there)."""
    try:
        pid, uid, gid = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
    except OSError:
        return None
    return None if uid == _NO_ID else (pid, uid, gid)


def peer_marks(sock: SupportsGetsockopt) -> Marks:
    """The peer's kernel groups and unit, without the rest of `peer_credentials` (for a
    connection that is about to be refused for its rate: see broker/daemon/admission.py); none
    if the kernel has no credentials for it."""
    try:
        peer = peer_credentials(sock)
    except OSError:
        return Marks()
    return Marks(peer.groups if peer.mapped else frozenset(), peer.unit)


def peer_credentials(
    sock: int | SupportsGetsockopt, *, groups: bool = True, ucred: Ucred | None = None
) -> Peer:
    """Return what the kernel says of the process connected to the Unix socket `sock`:
    everything but the user-database name and groups (see `Peer.with_user`).

    Args:
        sock: The connected socket (stdlib or trio), or its fd. The caller keeps
            ownership; it is neither closed nor changed.
        groups: Ask for the supplementary groups (not needed where no rule names a
            group: one system call less per client).
        ucred: What `peer_ucred` read of it already (one system call less).

    Raises:
        OSError: if `sock` has no peer credentials (not a connected Unix socket).
    """
    if isinstance(sock, int):
        borrowed = socket.socket(fileno=sock)  # a view; detached below, never closed
        try:
            return peer_credentials(borrowed, groups=groups, ucred=ucred)
        finally:
            borrowed.detach()
    pid, uid, gid = ucred or _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    if uid == _NO_ID:  # unconnected, or not a Unix socket: no credentials to read
        raise OSError(errno.ENOTCONN, "no peer credentials: not a connected Unix socket")
    unit, cgroup = _unit_and_cgroup(sock, pid)
    overflow = overflow_ids()
    kernel_groups = (_peer_groups(sock) if groups else frozenset()) | {gid}
    if overflow is not None:  # an unmapped id shows as the overflow id: it names no one
        kernel_groups -= {overflow[1]}
    return Peer(pid=pid, uid=uid, gid=gid, groups=kernel_groups, unit=unit, cgroup=cgroup,
                mapped=overflow is None or uid != overflow[0],
                gid_mapped=overflow is None or gid != overflow[1])  # fmt: skip
