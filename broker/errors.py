"""One exception hierarchy for the whole project, and the broker's stable refusal codes.

Every error a user can see is a `BrokerError` whose message says what happened, to which
socket, user or file, and what to do about it. `OSError` from the kernel is translated
into these at one boundary per layer (intake, server, client), never passed on raw.

Must never: import anything a bare interpreter has not already loaded (a worker's
`exec` imports this), nor anything of the broker's own.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final


class Code:
    """Stable codes carried by every refusal on the wire (see docs/protocol.md): plain
    strings, so that they cost nothing to import and compare equal to what the wire says.

    Clients may switch on these; their spelling never changes within a protocol version.
    """

    MALFORMED: Final = "malformed"
    """The request is not a JSON object of the documented shape."""
    TOO_LARGE: Final = "too-large"
    """The request is too large: longer than the broker reads before its end is seen,
    or asking for more fds than one reply can carry."""
    UNSUPPORTED_VERSION: Final = "unsupported-version"
    """The request names a protocol version the broker does not speak."""
    UNKNOWN_OPERATION: Final = "unknown-operation"
    """The request's `op` is not one the broker knows."""
    UNKNOWN_SOCKET: Final = "unknown-socket"
    """A requested name is not among the sockets the broker holds."""
    DENIED: Final = "denied"
    """The policy does not allow this peer to have this socket (or to ask for status)."""
    BUSY: Final = "busy"
    """The broker is at its connection limit, or this uid at its own; retry shortly."""
    TIMEOUT: Final = "timeout"
    """The peer did not send a complete request within the broker's deadline."""
    INTERNAL: Final = "internal"
    """The broker failed to carry out a valid, permitted request."""
    INVALID_CONFIG: Final = "invalid-config"
    """A reload found the configuration invalid; the one in force stays."""


CODES: Final = frozenset(
    value for key, value in vars(Code).items() if key.isupper() and isinstance(value, str)
)
"""Every refusal code this side knows."""


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

    def __init__(self, code: str, message: str) -> None:
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

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class AccessDenied(RequestRefused):
    """The policy does not allow the caller to have the socket."""


class UnknownSocket(RequestRefused):
    """The broker holds no socket by the requested name."""


class ReloadRefused(RequestRefused):
    """The broker refused the new configuration; the one in force stays."""


def refusal(code: str, message: str) -> RequestRefused:
    """Return the most specific client exception for a refusal code."""
    if code == Code.DENIED:
        return AccessDenied(code, message)
    if code == Code.UNKNOWN_SOCKET:
        return UnknownSocket(code, message)
    if code == Code.INVALID_CONFIG:
        return ReloadRefused(code, message)
    return RequestRefused(code, message)
