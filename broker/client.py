"""The client library: ask the broker for listening sockets.

    import broker.client
    sock = broker.client.acquire("http")        # a listening socket.socket for :80
    ...                                         # e.g. asyncio.start_server(sock=sock)

Under the shipped units the socket is non-blocking (O_NONBLOCK, shared by every process
holding it; docs/protocol.md): wait until it is readable (selectors, asyncio, trio)
before accept(), and expect BlockingIOError when another holder was quicker. Do not
make it blocking: that would change it for every other worker too. (Python does not
read the flag of an fd it is given: `getblocking()` says True regardless.)

Synchronous functions use only the standard library, so a worker's start-up stays
cheap (no trio, no pydantic): `acquire`, `acquire_many`, `list_sockets`, `status`,
`reload`.
The trio equivalents (`acquire_trio`, `acquire_many_trio`) import trio when called;
the asyncio ones are in broker/aio.py. What all three share (the exchange, the reply
reader, when to ask again, the error messages) is broker/exchange.py.

The broker's socket is found at the `path` argument, else $PORT_BROKER_SOCKET, else
/run/port-broker.sock. Every call has a deadline (`timeout`, default 5 s) covering
connect, request and reply.

Ownership: sockets returned are the caller's to close. On any error, every fd received
is closed before the exception propagates.

Must never: import trio (but in the trio variants, when called), pydantic or anything of
the broker's daemon or supervisor: a worker imports this to serve.

Raises (all subclasses of `broker.errors.ClientError`): `BrokerUnavailable` (cannot
connect, timed out, nonsense reply), `AccessDenied`, `UnknownSocket`, or
`RequestRefused` for other refusals, each carrying the broker's message; and
`ValueError` for a timeout not above 0 and at most 1e9 seconds (`names.timeout_ok`).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from broker.errors import BrokerUnavailable, refusal
from broker.exchange import (
    ANCILLARY_BYTES,
    CONNECT_RETRY_FIRST,
    CONNECT_RETRY_MAX,
    DEFAULT_TIMEOUT,
    RECV_BYTES,
    RELOAD_WAIT,
    Attempts,
    ClosedOnFailure,
    ReplyReader,
    as_names,
    ask,
    close_all,
    connected,
    delays,
    granted,
    one,
)
from broker.messages import (
    Acquire,
    Listing,
    ListSockets,
    Refusal,
    Reload,
    Reloaded,
    Request,
    SocketInfo,
    Status,
    StatusReport,
)
from broker.names import socket_path
from broker.protocol import encode_request

if TYPE_CHECKING:
    import trio

    from broker.exchange import Outcome

__all__ = [
    "DEFAULT_TIMEOUT",
    "acquire",
    "acquire_many",
    "acquire_many_trio",
    "acquire_trio",
    "list_sockets",
    "reload",
    "socket_path",
    "status",
]

Grant = tuple[str, socket.socket]
"""A granted socket with its name."""

ReplyT = TypeVar("ReplyT", Listing, StatusReport, Reloaded)
SocketT = TypeVar("SocketT", socket.socket, "trio.socket.SocketType")


def sockets(pairs: list[tuple[str, int]]) -> list[Grant]:
    """(name, fd) pairs from `exchange.granted` as (name, socket) pairs; each fd is the
    socket's from then on."""
    return [(name, socket.socket(fileno=fd)) for name, fd in pairs]


def single(name: str, grants: list[tuple[str, SocketT]]) -> SocketT:
    """The one socket of `grants`, for acquire(); all are closed if there are more."""
    try:
        one(name, len(grants))
    except BaseException:
        for _, sock in grants:
            sock.close()
        raise
    return grants[0][1]


def acquire_many(
    names: Iterable[str], *, path: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> list[Grant]:
    """Acquire several sockets at once: all of them or none.

    A name the broker holds as several sockets (IPv4 and IPv6) yields one entry each.

    Args:
        names: Socket names, e.g. ["http", "https"].
        path: The broker's control socket (default: $PORT_BROKER_SOCKET or
            /run/port-broker.sock).
        timeout: Seconds for the whole exchange.

    Returns:
        (name, listening socket) pairs in request order; the caller owns the sockets.

    Raises:
        BrokerUnavailable: the broker cannot be reached or did not answer in time.
        AccessDenied: the policy does not allow this process one of the sockets.
        UnknownSocket: the broker holds no socket by one of the names.
        RequestRefused: any other refusal (e.g. busy).
    """
    outcome = ask(Acquire(as_names(names)), path, timeout)
    return sockets(granted(outcome, socket_path(path)))


def acquire(
    name: str, *, path: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> socket.socket:
    """Acquire one listening socket by name.

    Returns:
        The listening socket; the caller owns it.

    Raises:
        ClientError: if the name is held as several sockets (use `acquire_many`), and
            everything `acquire_many` raises.
    """
    return single(name, acquire_many([name], path=path, timeout=timeout))


def _inquiry(request: Request, expected: type[ReplyT], path: str | None, timeout: float
             ) -> ReplyT:  # fmt: skip
    """Send a request that carries no fds back; return its reply or raise its refusal."""
    reply, fds = ask(request, path, timeout)
    close_all(fds)  # only a (wrong) acquire reply carries any
    if isinstance(reply, Refusal):
        raise refusal(reply.code, reply.message)
    if not isinstance(reply, expected):
        raise BrokerUnavailable(
            f"{socket_path(path)}: expected a {expected.__name__} reply, got {type(reply).__name__}"
        )
    return reply


def list_sockets(*, path: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> list[SocketInfo]:
    """Return the sockets this process may acquire.

    Raises:
        BrokerUnavailable, RequestRefused: as `acquire_many`.
    """
    return list(_inquiry(ListSockets(), Listing, path, timeout).sockets)


def status(*, path: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """Return the broker's status report (see docs/protocol.md for its fields).

    Raises:
        AccessDenied: the caller is not allowed by the [status] rule.
        BrokerUnavailable, RequestRefused: as `acquire_many`.
    """
    return dict(_inquiry(Status(), StatusReport, path, timeout).report)


def reload(*, path: str | None = None, timeout: float = RELOAD_WAIT) -> dict[str, Any]:
    """Make the broker load its configuration again; return, once it is in force, its
    `configuration` object (path, generation, loaded; docs/protocol.md). Only root and
    the broker's own uid may.

    Raises:
        ReloadRefused: the new configuration is invalid (the message says why); the one
            in force stays.
        AccessDenied: the caller is neither root nor the broker's uid.
        BrokerUnavailable, RequestRefused: as `acquire_many`.
    """
    return dict(_inquiry(Reload(), Reloaded, path, timeout).configuration)


# --- trio ------------------------------------------------------------------------


async def _ask_trio(request: Request, path: str | None, timeout: float) -> Outcome:
    """`exchange.ask` on trio: the same attempts, without stopping the event loop."""
    import trio  # noqa: PLC0415  (only trio users pay for importing trio)

    where = socket_path(path)
    attempts = Attempts(trio.current_time(), timeout)
    while True:
        try:
            outcome = await _ask_trio_once(request, where, timeout, attempts.deadline)
        except BrokerUnavailable as e:
            return attempts.failed(e, trio.current_time())
        delay = attempts.again(outcome, trio.current_time())
        if delay is None:
            return outcome
        await trio.sleep(delay)


async def _ask_trio_once(request: Request, path: str, timeout: float, deadline: float) -> Outcome:
    import trio  # noqa: PLC0415

    reader = ReplyReader(path)
    with ClosedOnFailure(reader, timeout, trio.TooSlowError), trio.fail_at(deadline):
        plain = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        with plain, trio.socket.from_stdlib_socket(plain) as sock:  # non-blocking now
            for delay in delays(CONNECT_RETRY_FIRST, CONNECT_RETRY_MAX):
                if connected(plain, path):
                    break
                reader.queued = True  # full: wait without stopping the event loop
                await trio.sleep(delay)
            reader.queued = False
            data = memoryview(encode_request(request))
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # (as ask)
                while data:
                    data = data[await sock.send(data) :]
            while not reader.done:
                reader.feed(
                    *await sock.recvmsg(RECV_BYTES, ANCILLARY_BYTES, socket.MSG_CMSG_CLOEXEC)
                )
        return reader.result()


async def acquire_many_trio(
    names: Sequence[str], *, path: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> list[tuple[str, trio.socket.SocketType]]:
    """Trio version of `acquire_many`; returns trio sockets.

    Note that a trio socket is non-blocking, and O_NONBLOCK is shared by every process
    holding the same listening socket (harmless for event-loop servers).

    Raises:
        As `acquire_many`.
    """
    import trio  # noqa: PLC0415

    outcome = await _ask_trio(Acquire(as_names(names)), path, timeout)
    grants = sockets(granted(outcome, socket_path(path)))
    return [(name, trio.socket.from_stdlib_socket(sock)) for name, sock in grants]


async def acquire_trio(
    name: str, *, path: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> trio.socket.SocketType:
    """Trio version of `acquire`.

    Raises:
        As `acquire`.
    """
    return single(name, await acquire_many_trio([name], path=path, timeout=timeout))
