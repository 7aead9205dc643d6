"""Socket intake: the sockets the broker holds, from systemd or bound here as root.

From systemd, sockets are found by name (FileDescriptorName=, LISTEN_FDNAMES), never by
position, and each is checked — a socket, of a family and type we serve, listening (or
bound, for datagrams) — before anything is served. A bad fd is a startup error naming
the fd and its name, never a silently skipped socket. The name `control` is the
broker's own Unix control socket; every other name is grantable. Several fds may share
one name (an IPv4 and an IPv6 socket for one port); they are granted together.

Without systemd, `--bind NAME=ADDR` and `--control PATH` bind here, as root, and
`broker.privileges.drop_privileges` then leaves root for good before any client is read.

Must never: accept() on, listen() again on, or change the flags of a grantable socket.
Its open file description is shared with every worker it is granted to (O_NONBLOCK
included), so the broker only holds it and passes it on.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from broker.errors import IntakeError
from broker.messages import SocketInfo
from broker.names import CONTROL_NAME, DEFAULT_SOCKET, NAME_RULE, valid_name
from broker.sockets import Family, SocketType, format_address

BACKLOG: Final = 4096
"""Listen backlog for sockets bound here: SOMAXCONN, as systemd's Backlog= default."""

CONTROL_BACKLOG: Final = 512
"""The control socket's queue, set by the broker whoever bound it (listen() again only
changes the backlog): a connection waits in it for every one ahead, and under a
connect/close flood the queue stays full, so its length is a worker's wait. 512 is
served in ~20 ms even with a flooder taking most of the CPU; a longer queue only makes
a worker's wait behind the flood longer, and clients wait for room in a full one."""

CONTROL_MODE: Final = 0o666
"""Everyone may connect to the control socket; the policy decides (SocketMode= default)."""


@dataclass(frozen=True)
class HeldSocket:
    """One socket the broker holds for granting.

    Attributes:
        name: Its name (FileDescriptorName=).
        sock: The socket; owned by the broker for its whole life. Never accepted on.
        info: Family, type and address, as told to clients.
    """

    name: str
    sock: socket.socket
    info: SocketInfo


@dataclass
class Intake:
    """Everything the broker serves: its control socket and the grantable sockets.

    Attributes:
        control: The listening Unix stream socket clients connect to.
        held: Name → sockets of that name, in the order systemd passed them.
    """

    control: socket.socket
    held: dict[str, list[HeldSocket]] = field(default_factory=dict)

    def close(self) -> None:
        """Close every socket (at exit; systemd keeps its own copies)."""
        self.control.close()
        for sockets in self.held.values():
            for held in sockets:
                held.sock.close()


def inspect(sock: socket.socket, name: str, what: str) -> SocketInfo:
    """Check that `sock` is a socket the broker can serve under `name`.

    Args:
        sock: The socket; only queried, never changed.
        name: Its name; `control` must be a Unix stream socket.
        what: How to name it in errors, e.g. "fd 3 (named 'http')".

    Raises:
        IntakeError: if it is not of a served family or type, or not listening
            (stream) / not bound (datagram), or a control socket of the wrong kind.
    """
    family = sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
    type_ = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
    kind = Family.from_kernel(family), SocketType.from_kernel(type_)
    if kind[0] is None:
        raise IntakeError(
            f"{what} has address family {family}; port-broker serves IPv4, IPv6 and Unix sockets"
        )
    if kind[1] is None:
        raise IntakeError(
            f"{what} has socket type {type_}; port-broker serves stream "
            "(ListenStream=) and datagram (ListenDatagram=) sockets"
        )
    raw = sock.getsockname()
    address = format_address(family, raw)
    if type_ == socket.SOCK_STREAM and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise IntakeError(f"{what} ({address}) is a stream socket that is not listening")
    # Unbound: port 0 (inet), or no address at all (unix); a path may well end in ":0".
    if type_ == socket.SOCK_DGRAM and (raw[1] == 0 if isinstance(raw, tuple) else not raw):
        raise IntakeError(f"{what} is a datagram socket that is not bound to a port")
    if name == CONTROL_NAME and (family, type_) != (socket.AF_UNIX, socket.SOCK_STREAM):
        raise IntakeError(
            f"{what}: the control socket must be a Unix stream socket "
            f"(ListenStream={DEFAULT_SOCKET}), not {kind[0]} {kind[1]} {address}"
        )
    return SocketInfo(name, kind[0], kind[1], address)


def describe_fd(fd: int, name: str) -> tuple[socket.socket, SocketInfo]:
    """Check an inherited fd (see `inspect`) and return it as a socket with its info.

    The returned socket object owns `fd`, now close-on-exec; its blocking mode is left
    exactly as it was. On error the caller still owns `fd`.

    Raises:
        IntakeError: naming the fd and name, if it is not a socket the broker serves.
    """
    what = f"fd {fd} (named '{name}')"
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        raise IntakeError(f"{what}: not an open file descriptor ({e.strerror})") from None
    if not stat.S_ISSOCK(mode):
        raise IntakeError(f"{what} is not a socket; check the .socket unit that names it")
    sock = socket.socket(fileno=fd)
    try:
        info = inspect(sock, name, what)
        sock.set_inheritable(False)
    except BaseException:
        sock.detach()
        raise
    return sock, info


def intake_fds(fds: Mapping[int, str], *, control: socket.socket | None = None) -> Intake:
    """Check and take ownership of named fds (as passed by systemd).

    Args:
        fds: fd → name, in fd order.
        control: A control socket bound by us, if systemd passes none.

    Raises:
        IntakeError: for any fd that cannot be served, a missing or duplicate control
            socket, or an invalid name. On error no fd has been closed.
    """
    held: dict[str, list[HeldSocket]] = {}
    for fd, name in fds.items():
        if name == "unknown" or not name:
            raise IntakeError(
                f"fd {fd} has no name: set FileDescriptorName= in the .socket "
                "unit that passes it (e.g. FileDescriptorName=http)"
            )
        if not valid_name(name):
            raise IntakeError(
                f"fd {fd} is named {name!r}, which is not a valid socket name ({NAME_RULE})"
            )
    taken: list[socket.socket] = []
    try:
        for fd, name in fds.items():
            sock, info = describe_fd(fd, name)
            taken.append(sock)
            if name == CONTROL_NAME:
                if control is not None:
                    raise IntakeError(
                        f"fd {fd}: more than one socket is named "
                        f"{CONTROL_NAME!r}; only port-broker.socket may be"
                    )
                control = sock
            else:
                held.setdefault(name, []).append(HeldSocket(name, sock, info))
    except BaseException:
        for sock in taken:
            sock.detach()
        raise
    if control is None:
        for sock in taken:
            sock.detach()
        raise IntakeError(
            f"no control socket: no fd is named {CONTROL_NAME!r}; start "
            "port-broker.socket (FileDescriptorName=control) with the broker, "
            "or pass --control PATH"
        )
    return Intake(control=control, held=held)


def from_systemd() -> Intake:
    """Take the sockets systemd passed (LISTEN_FDS / LISTEN_FDNAMES).

    Raises:
        IntakeError: if systemd passed none, passed them malformed, or any of them
            cannot be served.
    """
    from systemd import daemon  # noqa: PLC0415  (server-only dependency)

    try:
        fds: dict[int, str] = daemon.listen_fds_with_names(unset_environment=True)
    except OSError as e:  # EINVAL: LISTEN_FDS not a positive number, or names miscounted
        raise IntakeError(
            f"systemd passed LISTEN_FDS={os.environ.get('LISTEN_FDS')!r} and "
            f"LISTEN_FDNAMES={os.environ.get('LISTEN_FDNAMES')!r}, which are not valid "
            f"({e.strerror}): start the broker through its .socket units"
        ) from None
    if not fds:
        raise IntakeError(
            "systemd passed no sockets (LISTEN_FDS is unset or 0): start the "
            "broker through its .socket units (systemctl start "
            "port-broker.socket), or give --bind NAME=ADDR and --control PATH"
        )
    return intake_fds(fds)


# --- binding without systemd ------------------------------------------------------


@dataclass(frozen=True)
class BindSpec:
    """A socket to bind ourselves: NAME=ADDR, ADDR being [udp:]HOST:PORT, PORT or PATH."""

    name: str
    family: int
    type: int
    address: str | tuple[str, int]

    @classmethod
    def parse(cls, spec: str) -> BindSpec:
        """Parse `http=[::]:80`, `http=0.0.0.0:80`, `http=80`, `quic=udp:[::]:443`.

        A bare port means [::]:PORT accepting IPv4 too, as systemd's ListenStream=80.

        Raises:
            IntakeError: if `spec` is not of that form.
        """
        name, sep, address = spec.partition("=")
        if not sep or not valid_name(name) or name == CONTROL_NAME:
            raise IntakeError(
                f"--bind {spec!r}: expected NAME=ADDRESS with a socket name "
                f"other than {CONTROL_NAME!r}, e.g. http=[::]:80"
            )
        type_ = socket.SOCK_STREAM
        if address.startswith("udp:"):
            type_, address = socket.SOCK_DGRAM, address[4:]
        elif address.startswith("tcp:"):
            address = address[4:]
        if address.startswith(("/", "@")):
            unix = "\0" + address[1:] if address.startswith("@") else address
            return cls(name, socket.AF_UNIX, type_, unix)
        host, colon, port_text = address.rpartition(":")
        if not colon:
            host, port_text = "[::]", address
        family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
        host = host.strip("[]")
        try:
            port = int(port_text)
            socket.inet_pton(family, host)
            if not 0 < port < 65536:
                raise ValueError(port)
        except (ValueError, OSError):
            raise IntakeError(
                f"--bind {spec!r}: {address!r} is not HOST:PORT, [HOST]:PORT, "
                "PORT or a /path (add udp: for a datagram socket)"
            ) from None
        return cls(name, family, type_, (host, port))

    def bind(self, *, v6only: bool = False) -> socket.socket:
        """Create, bind and (for streams) listen, as systemd would; non-blocking.

        Args:
            v6only: For IPv6, accept IPv6 only (else IPv4 too, like systemd's default).

        Raises:
            IntakeError: if the address cannot be bound, naming it and the likely fix.
        """
        sock = socket.socket(self.family, self.type)
        try:
            if self.family != socket.AF_UNIX:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
            sock.bind(self.address)
            if self.type == socket.SOCK_STREAM:
                sock.listen(BACKLOG)
            # As the shipped unit's NonBlocking=yes: workers get non-blocking sockets
            # either way (O_NONBLOCK is shared by every holder; see port-broker.service).
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            shown = format_address(self.family, self.address)
            hint = ""
            if e.errno == errno.EACCES:
                hint = ": ports below 1024 need root; run serve as root with --user NAME"
            elif e.errno == errno.EADDRINUSE:
                hint = ": something else holds it (see ss -ltnp)"
            raise IntakeError(f"--bind {self.name}={shown}: {e.strerror}{hint}") from None
        return sock


def bind_control(path: str) -> socket.socket:
    """Bind and listen on the Unix control socket at `path`, mode 0666.

    A stale socket file left by an earlier broker is replaced; a live one is an error.

    Raises:
        IntakeError: if another broker is listening there, or the path cannot be bound.
    """
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise IntakeError(
                f"--control {path}: exists and is not a socket; refusing to replace it"
            )
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale: nobody listens
            else:
                raise IntakeError(f"--control {path}: another broker is listening there")
    # Bind and listen under a temporary name, then rename into place: a client never
    # finds the path bound but not yet listening (or not yet mode 0666).
    building = f"{path}.{os.getpid()}.new"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(building)
        try:
            os.chmod(building, CONTROL_MODE)
            sock.listen(BACKLOG)
            os.rename(building, path)
        except BaseException:
            os.unlink(building)
            raise
    except OSError as e:
        sock.close()
        raise IntakeError(f"--control {path}: cannot bind: {e.strerror or e}") from None
    return sock


def bind_all(specs: Iterable[BindSpec], control_path: str) -> Intake:
    """Bind every spec and the control socket; on any failure close what was bound.

    An IPv6 socket on a port for which an IPv4 one is bound too accepts IPv6 only (as
    systemd's BindIPv6Only=ipv6-only), so that both can exist: programs of either family
    then find one of their own (`port-broker exec --intercept`).

    Raises:
        IntakeError: from the first socket that cannot be bound.
    """
    specs = list(specs)
    ipv4 = {
        (spec.type, spec.address[1])
        for spec in specs
        if spec.family == socket.AF_INET and isinstance(spec.address, tuple)
    }
    bound: list[socket.socket] = []
    try:
        held: dict[str, list[HeldSocket]] = {}
        for spec in specs:
            port = spec.address[1] if isinstance(spec.address, tuple) else None
            sock = spec.bind(v6only=(spec.type, port) in ipv4)
            bound.append(sock)
            info = inspect(sock, spec.name, f"--bind {spec.name}")
            held.setdefault(spec.name, []).append(HeldSocket(spec.name, sock, info))
        control = bind_control(control_path)
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    return Intake(control=control, held=held)
