"""The protocol's messages as values: the requests a client sends and the replies the
broker gives (docs/protocol.md), immutable records that compare by their fields.
broker/protocol.py turns them into bytes and back.

Must never: import anything a bare interpreter has not already loaded (a worker's `exec`
builds and reads these; `dataclasses` alone would cost it a third of an interpreter's
start: hence `_Record`), nor anything of the broker's own.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any


class _Record:
    """A message: immutable, equal to another of its class with equal fields."""

    __slots__: tuple[str, ...] = ()

    def _fields(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Record) or type(other) is not type(self):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash((type(self), self._fields()))

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({shown})"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _set(self, **fields: object) -> None:
        for name, value in fields.items():
            object.__setattr__(self, name, value)


class Acquire(_Record):
    """Ask for the listening sockets called `names`: all of them, in this order, or none."""

    __slots__ = ("names",)
    names: tuple[str, ...]

    def __init__(self, names: tuple[str, ...]) -> None:
        self._set(names=names)


class ListSockets(_Record):
    """Ask which sockets the caller may acquire."""

    __slots__ = ()


class Status(_Record):
    """Ask for the broker's state: what it holds, grants and denials (admin only)."""

    __slots__ = ()


class Reload(_Record):
    """Ask the broker to load its configuration again and say, once done, what is in force
    (only the broker's own uid and root: whoever could send it SIGHUP)."""

    __slots__ = ()


Request = Acquire | ListSockets | Status | Reload


class SocketInfo(_Record):
    """What a client learns about one held socket.

    Attributes:
        name: The socket's name (FileDescriptorName=).
        family: "inet", "inet6" or "unix" (names.FAMILIES).
        type: "stream" or "datagram" (names.TYPES).
        address: Printable local address: "[::]:80", "127.0.0.1:443" or a path.
    """

    __slots__ = ("name", "family", "type", "address")  # noqa: RUF023 (the fields' order)
    name: str
    family: str
    type: str
    address: str

    def __init__(self, name: str, family: str, type: str, address: str) -> None:
        self._set(name=name, family=family, type=type, address=address)

    def to_json(self) -> dict[str, str]:
        """Return the wire form."""
        return {
            "name": self.name,
            "family": self.family,
            "type": self.type,
            "address": self.address,
        }


class Granted(_Record):
    """Reply to `Acquire`: one entry per fd attached, in order."""

    __slots__ = ("sockets",)
    sockets: tuple[SocketInfo, ...]

    def __init__(self, sockets: tuple[SocketInfo, ...]) -> None:
        self._set(sockets=sockets)


class Listing(_Record):
    """Reply to `ListSockets`: the sockets the caller may acquire."""

    __slots__ = ("sockets",)
    sockets: tuple[SocketInfo, ...]

    def __init__(self, sockets: tuple[SocketInfo, ...]) -> None:
        self._set(sockets=sockets)


class StatusReport(_Record):
    """Reply to `Status`: a JSON object whose shape docs/protocol.md describes."""

    __slots__ = ("report",)
    report: Mapping[str, Any]

    def __init__(self, report: Mapping[str, Any] | None = None) -> None:
        self._set(report={} if report is None else report)


class Reloaded(_Record):
    """Reply to `Reload`: the new configuration is in force; its `configuration` object
    as in the status report (docs/protocol.md)."""

    __slots__ = ("configuration",)
    configuration: Mapping[str, Any]

    def __init__(self, configuration: Mapping[str, Any] | None = None) -> None:
        self._set(configuration={} if configuration is None else configuration)


class Refusal(_Record):
    """Reply to anything the broker will not or cannot do; `code` is one of `Code`'s."""

    __slots__ = ("code", "message")
    code: str
    message: str

    def __init__(self, code: str, message: str) -> None:
        self._set(code=code, message=message)


Reply = Granted | Listing | StatusReport | Reloaded | Refusal
