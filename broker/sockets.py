"""Socket families and types as the kernel numbers them, and addresses in words: what
the broker (broker/daemon/activation.py: the sockets it holds) and the `--intercept`
supervisor (broker/intercept/bindings.py: the sockets a program binds) both speak.

Must never: import anything of the broker's own but names (both programs import this),
or be imported on a worker's `exec` path (it imports `socket` and `enum`).
"""

from __future__ import annotations

import enum
import socket
from typing import Final

from broker import names


class Family(enum.StrEnum):
    """A socket family, as the protocol spells it."""

    INET = names.INET
    INET6 = names.INET6
    UNIX = names.UNIX

    @property
    def kernel(self) -> int:
        """The AF_* constant."""
        return _FAMILY_KERNEL[self]

    @property
    def label(self) -> str:
        """How messages name it: "IPv4 (AF_INET)"."""
        return _FAMILY_LABEL[self]

    @classmethod
    def from_kernel(cls, family: int) -> Family | None:
        """The family of an AF_* constant; None for one the broker does not serve."""
        return _FAMILY_OF.get(family)


class SocketType(enum.StrEnum):
    """A socket type, as the protocol spells it."""

    STREAM = names.STREAM
    DATAGRAM = names.DATAGRAM

    @property
    def kernel(self) -> int:
        """The SOCK_* constant."""
        return _TYPE_KERNEL[self]

    @classmethod
    def from_kernel(cls, type_: int) -> SocketType | None:
        """The type of a SOCK_* constant; None for one the broker does not serve."""
        return _TYPE_OF.get(type_)


_FAMILY_KERNEL: Final[dict[Family, int]] = {
    Family.INET: socket.AF_INET,
    Family.INET6: socket.AF_INET6,
    Family.UNIX: socket.AF_UNIX,
}
_FAMILY_OF: Final[dict[int, Family]] = {kernel: family for family, kernel in _FAMILY_KERNEL.items()}
_FAMILY_LABEL: Final = {
    Family.INET: "IPv4 (AF_INET)",
    Family.INET6: "IPv6 (AF_INET6)",
    Family.UNIX: "Unix (AF_UNIX)",
}
_TYPE_KERNEL: Final[dict[SocketType, int]] = {
    SocketType.STREAM: socket.SOCK_STREAM,
    SocketType.DATAGRAM: socket.SOCK_DGRAM,
}
_TYPE_OF: Final[dict[int, SocketType]] = {kernel: kind for kind, kernel in _TYPE_KERNEL.items()}


def format_address(family: int, address: object) -> str:
    """Return a printable local address: "[::]:80", "127.0.0.1:443", a path or @name."""
    if family == socket.AF_INET6 and isinstance(address, tuple):
        return f"[{address[0]}]:{address[1]}"
    if family == socket.AF_INET and isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    if isinstance(address, bytes):  # abstract Unix socket
        return "@" + address[1:].decode(errors="replace")
    return str(address) or "(unnamed)"
