"""Which held socket a program's bind() gets, without I/O: the sockets a launcher holds,
described once (`describe_held`, `build_map`), and the decision for one bind()
(`decide`): inject a held socket, refuse with an errno and a message that says what to
hold, or pass the call on to the kernel. broker/intercept/supervisor.py's supervisor asks; the
tests ask directly.

Must never: give a program a socket of another type or protocol than it asked for, or
one that would answer on an address it did not ask for without saying so.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from broker.errors import InterceptError
from broker.sockets import Family, format_address


class Endpoint(NamedTuple):
    """What matters about a socket (or a bind() request) for matching."""

    family: int
    type: int
    proto: int
    ip: bytes
    """The packed address: 4 bytes for AF_INET, 16 for AF_INET6."""
    port: int


class Inject(NamedTuple):
    choice: int
    """Which candidate to inject."""


class Refuse(NamedTuple):
    error: int
    message: str


class Pass(NamedTuple):
    note: str | None
    """Said on stderr when the program probably expected to get a held socket."""


Decision = Inject | Refuse | Pass
WILDCARD: dict[int, bytes] = {socket.AF_INET: bytes(4), socket.AF_INET6: bytes(16)}


def parse_sockaddr(raw: bytes) -> tuple[int, bytes, int] | None:
    """Return (family, packed ip, port) of an AF_INET/AF_INET6 sockaddr, else None.

    None also for anything the kernel itself would reject as too short: such a bind()
    continues to the kernel, which returns its own error.
    """
    if len(raw) < 2:
        return None
    (family,) = struct.unpack_from("=H", raw)
    if family == socket.AF_INET and len(raw) >= 16:  # sizeof(struct sockaddr_in)
        return family, raw[4:8], int.from_bytes(raw[2:4], "big")
    if family == socket.AF_INET6 and len(raw) >= 24:  # SIN6_LEN_RFC2133
        return family, raw[8:24], int.from_bytes(raw[2:4], "big")
    return None


def show_endpoint(family: int, ip: bytes, port: int) -> str:
    """How messages show an address: "[::1]:80", "0.0.0.0:443"."""
    return format_address(family, (socket.inet_ntop(family, ip), port))


def decide(candidates: Sequence[Endpoint], want: Endpoint, who: str) -> Decision:
    """Decide what to do with a bind() of `want` given the sockets held for its port.

    Args:
        candidates: The held sockets mapped to `want.port`, in preference order.
        want: The program's socket (family, type, protocol) and the address it binds.
        who: The program, for messages ("pid 42 (node)").

    Returns:
        Inject the first candidate of the same family, type and protocol whose address
        is `want`'s, else (if `want` is the wildcard address) the first of them at all;
        refuse with EAFNOSUPPORT if only other families are held for this type; else
        pass the bind() to the kernel, with a note when the address was the obstacle.
    """
    asked = show_endpoint(want.family, want.ip, want.port)
    same_type = [c for c in candidates if (c.type, c.proto) == (want.type, want.proto)]
    if not same_type:
        return Pass(None)
    usable = [
        i
        for i, c in enumerate(candidates)
        if (c.type, c.proto, c.family) == (want.type, want.proto, want.family)
    ]
    if not usable:
        held = ", ".join(show_endpoint(c.family, c.ip, c.port) for c in same_type)
        other = "IPv4" if want.family == socket.AF_INET else "IPv6"
        family = Family.from_kernel(want.family)
        return Refuse(
            errno.EAFNOSUPPORT,
            f"refused bind() of an {family.label if family else want.family} "
            f"socket to {asked} by {who}: the sockets held for port {want.port} are "
            f"{held}, another family. Hold an {other} socket for port {want.port} too "
            "(for systemd, a ListenStream= line for it), or make the program bind an "
            "address of the held family.",
        )
    for i in usable:
        if candidates[i].ip == want.ip:
            return Inject(i)
    if want.ip == WILDCARD.get(want.family):
        return Inject(usable[0])
    held = ", ".join(
        show_endpoint(candidates[i].family, candidates[i].ip, candidates[i].port) for i in usable
    )
    return Pass(
        f"bind() to {asked} by {who} passed to the kernel: the sockets held for port "
        f"{want.port} are on {held}, and a bind() to one address never gets a socket "
        "listening on another. Bind the wildcard address or the held one, or hold a "
        "socket on this address."
    )


# --------------------------------------------------------------------------------------
# The held sockets.


class Held(NamedTuple):
    sock: socket.socket
    endpoint: Endpoint
    v6only: bool
    inode: tuple[int, int]


def describe_held(sock: socket.socket) -> Held:
    family, kind = sock.family, sock.type
    where = f"held socket fd {sock.fileno()}"
    if family not in WILDCARD:
        raise InterceptError(f"{where} is {family!r}; only AF_INET and AF_INET6 can be held")
    ip, port = sock.getsockname()[:2]
    if port == 0:
        raise InterceptError(f"{where} is not bound to a port; the holder must bind it")
    if kind == socket.SOCK_STREAM and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise InterceptError(
            f"{where} ({show_endpoint(family, socket.inet_pton(family, ip), port)}) "
            "is not listening; the holder must call listen() on it"
        )
    proto = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
    v6only = family == socket.AF_INET6 and bool(
        sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    )
    st = os.fstat(sock.fileno())
    endpoint = Endpoint(family, kind, proto, socket.inet_pton(family, ip), port)
    return Held(sock, endpoint, v6only, (st.st_dev, st.st_ino))


def build_map(
    grants: Sequence[tuple[str, socket.socket]], mapping: Mapping[int, str] | None = None
) -> tuple[list[Held], dict[int, list[Held]]]:
    """The held sockets, described (each checked), and which of them a bind() to each
    port gets, in order: every socket for its own port, and with `mapping` (--map
    PORT=NAME) every socket named NAME for PORT as well.

    Raises:
        InterceptError: a socket cannot be held (see `describe_held`).
        ValueError: a `mapping` key is not a port, or names no socket given.
    """
    described: dict[int, Held] = {}
    for _, sock in grants:
        if sock.fileno() not in described:
            described[sock.fileno()] = describe_held(sock)
    ports: dict[int, list[Held]] = {}
    for held in described.values():
        ports.setdefault(held.endpoint.port, []).append(held)
    for port, name in (mapping or {}).items():
        if not 0 < port < 65536:
            raise ValueError(f"mapping key {port!r} is not a port number")
        named = [described[sock.fileno()] for granted, sock in grants if granted == name]
        if not named:
            raise ValueError(f"mapping {port}={name}: no socket named {name!r} is held")
        ports[port] = named
    return list(described.values()), ports


def v6only_note(wanted_v6only: bool, held: Held, who: str) -> str | None:
    """What to tell `who`, given the IPv6 socket `held`, if it asked for the other
    IPV6_V6ONLY: the held socket's setting is the one that counts."""
    if held.endpoint.family != socket.AF_INET6 or wanted_v6only == held.v6only:
        return None
    where = show_endpoint(held.endpoint.family, held.endpoint.ip, held.endpoint.port)
    if held.v6only:
        return (
            f"{who} wants a dual-stack socket but the one held on {where} is IPv6-only: it "
            "gets no IPv4 connections"
        )
    return (
        f"{who} set IPV6_V6ONLY but the socket held on {where} is dual-stack: it also gets "
        "IPv4 connections"
    )


def unserved_families(
    mapping: Mapping[int, Sequence[Held]], given: set[tuple[int, int]]
) -> list[str]:
    """For each port where the program took a held socket of one family but not the one
    held for the other (an IPv4-only program under the IPv4 + IPv6-only pair): what
    happens to the other family's clients, and what to do."""
    notes = []
    for held in mapping.values():
        taken = [h for h in held if h.inode in given]
        for left in (h for h in held if h.inode not in given):
            if not taken or any(h.endpoint.family == left.endpoint.family for h in taken):
                continue
            took = taken[0].endpoint
            where = show_endpoint(left.endpoint.family, left.endpoint.ip, left.endpoint.port)
            family = "IPv6" if left.endpoint.family == socket.AF_INET6 else "IPv4"
            notes.append(
                f"the program took the socket held on "
                f"{show_endpoint(took.family, took.ip, took.port)} but not the one held on "
                f"{where}: its {family} clients connect and wait until they time out, and "
                "a worker given that socket next gets their dead connections; serve both "
                "families (bind :: too), or hold one family only"
            )
    return notes
