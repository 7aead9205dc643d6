"""One exception hierarchy for the whole project, and the broker's stable refusal codes.

Every error a user can see is a `BrokerError` whose message says what happened, to which
socket, user or file, and what to do about it. `OSError` from the kernel is translated
into these at one boundary per layer (intake, server, client), never passed on raw.

Standard library only: the client imports this module.
"""

from __future__ import annotations

import enum


class Code(enum.StrEnum):
    """Stable codes carried by every refusal on the wire (see docs/protocol.md).

    Clients may switch on these; their spelling never changes within a protocol version.
    """

    MALFORMED = "malformed"
    """The request is not a JSON object of the documented shape."""
    TOO_LARGE = "too-large"
    """The request is too large: longer than the broker reads before its end is seen,
    or asking for more fds than one reply can carry."""
    UNSUPPORTED_VERSION = "unsupported-version"
    """The request names a protocol version the broker does not speak."""
    UNKNOWN_OPERATION = "unknown-operation"
    """The request's `op` is not one the broker knows."""
    UNKNOWN_SOCKET = "unknown-socket"
    """A requested name is not among the sockets the broker holds."""
    DENIED = "denied"
    """The policy does not allow this peer to have this socket (or to ask for status)."""
    BUSY = "busy"
    """The broker is at its connection limit, or this uid at its own; retry shortly."""
    TIMEOUT = "timeout"
    """The peer did not send a complete request within the broker's deadline."""
    INTERNAL = "internal"
    """The broker failed to carry out a valid, permitted request."""
    INVALID_CONFIG = "invalid-config"
    """A reload found the configuration invalid; the one in force stays."""


class BrokerError(Exception):
    """Base of every error this project raises on purpose.

    Attributes:
        message: What happened and what to do, in one or two sentences.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(BrokerError):
    """The configuration file or environment is invalid; names the file and the key."""


class IntakeError(BrokerError):
    """A socket passed by systemd (or asked for with --bind) cannot be served."""


class PrivilegeError(BrokerError):
    """Dropping from root to the serving user failed; the broker must not go on."""


class ProtocolError(BrokerError):
    """A message violates the wire protocol.

    Raised by the sans-IO layer for bytes from a peer. The broker turns it into a
    refusal with the same `code`; the client turns a malformed reply into
    `BrokerUnavailable`.

    Attributes:
        code: The stable refusal code for this violation.
    """

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code


class InterceptError(BrokerError):
    """Setting up bind() interception failed; the message says why and what to do."""


class InterceptUnsupported(InterceptError):
    """This kernel, architecture or process cannot intercept bind() with seccomp."""


class ClientError(BrokerError):
    """Base of the errors `broker.client` raises."""


class BrokerUnavailable(ClientError):
    """The broker could not be reached, timed out, or answered with nonsense."""


class RequestRefused(ClientError):
    """The broker answered with a refusal.

    Attributes:
        code: The broker's stable refusal code (`Code`).
    """

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code


class AccessDenied(RequestRefused):
    """The policy does not allow the caller to have the socket."""


class UnknownSocket(RequestRefused):
    """The broker holds no socket by the requested name."""


class ReloadRefused(RequestRefused):
    """The broker refused the new configuration; the one in force stays."""


def refusal(code: Code, message: str) -> RequestRefused:
    """Return the most specific client exception for a refusal code."""
    if code is Code.DENIED:
        return AccessDenied(code, message)
    if code is Code.UNKNOWN_SOCKET:
        return UnknownSocket(code, message)
    if code is Code.INVALID_CONFIG:
        return ReloadRefused(code, message)
    return RequestRefused(code, message)
