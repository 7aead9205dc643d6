"""Names the whole project shares, each written once: socket families and types with
their kernel constants, the socket-name rule, exit statuses, environment variables and
default paths, audit levels, and how text from outside is made printable.

Must never: import anything of the broker's own or outside the standard library (the
client, `exec` and the broker all import it, and `exec` must stay cheap), or change a
value without the documentation that quotes it (docs/protocol.md, README.md; tests
compare them).
"""

from __future__ import annotations

import enum
import functools
import re
import socket
from typing import Final

# --- socket families and types ----------------------------------------------------


class Family(enum.StrEnum):
    """A socket family, as the protocol spells it."""

    INET = "inet"
    INET6 = "inet6"
    UNIX = "unix"

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

    STREAM = "stream"
    DATAGRAM = "datagram"

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


def transport(family: str, type_: str) -> str:
    """How `port-broker list` names a socket's kind, as `ss` does: tcp, tcp6, udp, udp6,
    unix-stream, unix-datagram."""
    if family == Family.UNIX:
        return f"unix-{type_}"
    proto = "tcp" if type_ == SocketType.STREAM else "udp"
    return proto + ("6" if family == Family.INET6 else "")


# --- socket names -----------------------------------------------------------------

NAME_MAX_LENGTH: Final = 64
NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
"""Socket names (systemd's FileDescriptorName=). Stricter than systemd's own rule so a
name is safe in a comma-separated list, a journal field, a TOML key and a message."""
NAME_RULE: Final = "letters, digits, '_.@-', up to 64 characters"
"""NAME_PATTERN in words, for messages."""

CONTROL_NAME: Final = "control"
"""The name of the broker's own Unix control socket; never grantable."""


def valid_name(name: str) -> bool:
    """Return whether `name` is acceptable as a socket name."""
    return NAME_PATTERN.fullmatch(name) is not None


def grantable_name_problem(name: str) -> str | None:
    """Why `name` cannot name a grantable socket, or None if it can."""
    if name == CONTROL_NAME:
        return f"{CONTROL_NAME!r} is the broker's own control socket and cannot be granted"
    if not valid_name(name):
        return f"{name!r} is not a valid socket name ({NAME_RULE})"
    return None


# --- exit statuses ----------------------------------------------------------------


class Exit(enum.IntEnum):
    """Exit statuses of the command line (sysexits.h where one fits)."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    UNKNOWN_SOCKET = 66  # EX_NOINPUT
    UNAVAILABLE = 69  # EX_UNAVAILABLE
    DENIED = 77  # EX_NOPERM
    CONFIG = 78  # EX_CONFIG
    CANNOT_EXECUTE = 126  # as a shell says it
    NOT_FOUND = 127

    @property
    def meaning(self) -> str:
        """What the status tells, in a few words."""
        return _EXIT_MEANING[self]


_EXIT_MEANING: Final = {
    Exit.OK: "success",
    Exit.FAILURE: "other refusal",
    Exit.USAGE: "usage error",
    Exit.UNKNOWN_SOCKET: "unknown socket",
    Exit.UNAVAILABLE: "broker unavailable",
    Exit.DENIED: "access denied",
    Exit.CONFIG: "invalid configuration or sockets",
    Exit.CANNOT_EXECUTE: "the command cannot be run",
    Exit.NOT_FOUND: "the command is not found",
}

EXEC_EXIT_STATUSES: Final = (
    Exit.USAGE,
    Exit.UNKNOWN_SOCKET,
    Exit.UNAVAILABLE,
    Exit.DENIED,
    Exit.FAILURE,
    Exit.CANNOT_EXECUTE,
    Exit.NOT_FOUND,
)
"""What `port-broker exec` itself may exit with, before the command replaces it."""


def exit_statuses(statuses: tuple[Exit, ...] = EXEC_EXIT_STATUSES) -> str:
    """`statuses` in words: "2 usage error, 66 unknown socket, …" (--help, README)."""
    return ", ".join(f"{int(status)} {status.meaning}" for status in statuses)


# --- environment and paths --------------------------------------------------------

SOCKET_ENV: Final = "PORT_BROKER_SOCKET"
"""Where clients find the broker's control socket, if not at DEFAULT_SOCKET."""
DEFAULT_SOCKET: Final = "/run/port-broker.sock"
"""The control socket units/port-broker.socket listens on."""
CONFIG_ENV: Final = "PORT_BROKER_CONFIG"
"""The broker's configuration file, if not DEFAULT_CONFIG."""
DEFAULT_CONFIG: Final = "/etc/port-broker/broker.toml"
ENV_PREFIX: Final = "PORT_BROKER_"
"""Prefix of the environment variables that override settings (PORT_BROKER_SOCKET and
PORT_BROKER_CONFIG excepted: they say where things are, not how to serve)."""
LOCATION_ENV: Final = frozenset({SOCKET_ENV, CONFIG_ENV})


# --- audit levels -----------------------------------------------------------------


class Level(enum.StrEnum):
    """How much an audit event matters (syslog's levels, as the journal takes them)."""

    DEBUG = "debug"
    INFO = "info"
    NOTICE = "notice"
    WARNING = "warning"
    ERROR = "error"

    @property
    def priority(self) -> int:
        """The journal's PRIORITY= (syslog's numbering)."""
        return _PRIORITY[self]


_PRIORITY: Final = {
    Level.DEBUG: 7,
    Level.INFO: 6,
    Level.NOTICE: 5,
    Level.WARNING: 4,
    Level.ERROR: 3,
}


# --- printable text ---------------------------------------------------------------


@functools.cache
def _unprintable() -> re.Pattern[str]:
    """C0 and C1 controls (newline, CR, ESC, NEL...), the line and paragraph separators,
    bidirectional and zero-width marks, and lone surrogates (a name that was not UTF-8).
    Compiled when first needed: `exec` imports this module and never needs it."""
    return re.compile(
        "[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]"
    )


def unprintable(text: str) -> bool:
    """Whether `printable` would change `text`."""
    return _unprintable().search(text) is not None


def printable(text: str) -> str:
    """`text` with every character that could end, hide or restyle a line written as
    its Python escape (\\r, \\x1b, \\u2028): text a client or the system influences
    (a request's keys, a cgroup, a user name) stays one line, shown as it is."""
    pattern = _unprintable()
    if pattern.search(text) is None:  # the common case: nothing to escape
        return text
    return pattern.sub(lambda m: ascii(m.group())[1:-1], text)
