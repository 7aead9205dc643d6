"""Names the whole project shares, each written once: how the protocol spells socket
families and types, the socket-name rule, exit statuses, environment variables and
default paths, and how text from outside is made printable or read as seconds.

Must never: import anything of the broker's own, or any module a bare interpreter has not
already loaded (enum, re, socket, typing…: each costs a worker's start-up milliseconds,
and `port-broker exec` imports this first); or change a value without the documentation
that quotes it (docs/protocol.md, README.md; tests compare them).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    import re
    from typing import Final

# --- socket families and types, as the protocol spells them ------------------------

INET: Final = "inet"
INET6: Final = "inet6"
UNIX: Final = "unix"
FAMILIES: Final = (INET, INET6, UNIX)
"""The families the broker serves (broker/sockets.py maps them to the kernel's)."""

STREAM: Final = "stream"
DATAGRAM: Final = "datagram"
TYPES: Final = (STREAM, DATAGRAM)
"""The socket types the broker serves."""


def transport(family: str, type_: str) -> str:
    """How `port-broker list` names a socket's kind, as `ss` does: tcp, tcp6, udp, udp6,
    unix-stream, unix-datagram."""
    if family == UNIX:
        return f"unix-{type_}"
    proto = "tcp" if type_ == STREAM else "udp"
    return proto + ("6" if family == INET6 else "")


# --- socket names -----------------------------------------------------------------

NAME_MAX_LENGTH: Final = 64
NAME_FIRST: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
NAME_REST: Final = NAME_FIRST | frozenset("_.@-")
"""Socket names (systemd's FileDescriptorName=): a letter or digit, then letters,
digits and `_.@-`, up to NAME_MAX_LENGTH characters. Stricter than systemd's own rule so
that a name is safe in a comma-separated list, a journal field, a TOML key, a message
and a JSON string without escaping."""
NAME_RULE: Final = "letters, digits, '_.@-', up to 64 characters"
"""The rule in words, for messages."""
NAME_REGEX: Final = r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}"
"""The rule as a regular expression, for those who have `re` loaded anyway (tests)."""

CONTROL_NAME: Final = "control"
"""The name of the broker's own Unix control socket; never grantable."""


def valid_name(name: str) -> bool:
    """Return whether `name` is acceptable as a socket name."""
    return (
        0 < len(name) <= NAME_MAX_LENGTH
        and name[0] in NAME_FIRST
        and all(character in NAME_REST for character in name)
    )


def grantable_name_problem(name: str) -> str | None:
    """Why `name` cannot name a grantable socket, or None if it can."""
    if name == CONTROL_NAME:
        return f"{CONTROL_NAME!r} is the broker's own control socket and cannot be granted"
    if not valid_name(name):
        return f"{name!r} is not a valid socket name ({NAME_RULE})"
    return None


# --- exit statuses ----------------------------------------------------------------


class Exit:
    """Exit statuses of the command line (sysexits.h where one fits)."""

    OK: Final = 0
    FAILURE: Final = 1
    USAGE: Final = 2
    UNKNOWN_SOCKET: Final = 66  # EX_NOINPUT
    UNAVAILABLE: Final = 69  # EX_UNAVAILABLE
    DENIED: Final = 77  # EX_NOPERM
    CONFIG: Final = 78  # EX_CONFIG
    CANNOT_EXECUTE: Final = 126  # as a shell says it
    NOT_FOUND: Final = 127


EXIT_MEANINGS: Final = {
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
"""Every exit status, in order, with what it tells in a few words."""

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


def exit_statuses(statuses: tuple[int, ...] = EXEC_EXIT_STATUSES) -> str:
    """`statuses` in words: "2 usage error, 66 unknown socket, …" (--help, README)."""
    return ", ".join(f"{status} {EXIT_MEANINGS[status]}" for status in statuses)


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


LOAD_TIMEOUT: Final = 30.0
"""Seconds loading the configuration may take, at start and on a reload (the loader
imports pydantic, ~0.2 s, and asks the user database for every user and group named):
past that the start fails, or the reload is refused and the configuration in force
stays. A client asking for a reload waits for two (one may be running) and a little."""


def socket_path(path: str | None = None) -> str:
    """Where the broker listens: `path`, else $PORT_BROKER_SOCKET, else DEFAULT_SOCKET."""
    return path or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


# --- printable text ---------------------------------------------------------------

_UNPRINTABLE: list[re.Pattern[str]] = []
"""C0 and C1 controls (newline, CR, ESC, NEL...), the line and paragraph separators,
bidirectional and zero-width marks, and lone surrogates (a name that was not UTF-8),
compiled when first needed: a worker's `exec` never needs it."""


def _unprintable() -> re.Pattern[str]:
    if not _UNPRINTABLE:
        import re  # noqa: PLC0415 (see _UNPRINTABLE)

        _UNPRINTABLE.append(
            re.compile(
                "[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff"
                "\ud800-\udfff]"
            )
        )
    return _UNPRINTABLE[0]


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


MOST_SECONDS: Final = 1e9
"""The longest timeout a client takes (31 years: longer than any wait means, and within
what every clock and timeval it reaches holds)."""


def timeout_ok(seconds: float) -> bool:
    """Whether `seconds` is a timeout a client takes: above 0, at most MOST_SECONDS."""
    return 0 < seconds <= MOST_SECONDS  # NaN is neither


def positive_seconds(text: str) -> float | None:
    """`text` as a timeout a client takes (`timeout_ok`), or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if timeout_ok(value) else None
