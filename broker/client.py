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
the asyncio ones are in broker/aio.py. What all three share (the reply reader, the
waits, the error messages) is broker/exchange.py.

The broker's socket is found at the `path` argument, else $PORT_BROKER_SOCKET, else
/run/port-broker.sock. Every call has a deadline (`timeout`, default 5 s) covering
connect, request and reply.

Ownership: sockets returned are the caller's to close. On any error, every fd received
is closed before the exception propagates.

Raises (all subclasses of `broker.errors.ClientError`): `BrokerUnavailable` (cannot
connect, timed out, nonsense reply), `AccessDenied`, `UnknownSocket`, or
`RequestRefused` for other refusals, each carrying the broker's message; and
`ValueError` for a timeout that is not above 0.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar

from broker.errors import BrokerUnavailable, refusal
from broker.exchange import (
    ANCILLARY_BYTES,
    BUSY_RETRY_FIRST,
    BUSY_RETRY_MAX,
    CONNECT_RETRY_FIRST,
    CONNECT_RETRY_MAX,
    RECV_BYTES,
    Grant,
    ReplyReader,
    as_names,
    asked_until_not_busy,
    check_timeout,
    close_all,
    closed_on_failure,
    connected,
    delays,
    grants_from,
    is_busy,
    single,
)
from broker.names import DEFAULT_SOCKET, SOCKET_ENV
from broker.protocol import (
    RELOAD_TIMEOUT,
    Acquire,
    Listing,
    ListSockets,
    Refusal,
    Reload,
    Reloaded,
    Reply,
    Request,
    SocketInfo,
    Status,
    StatusReport,
    encode_request,
)

if TYPE_CHECKING:
    import trio

DEFAULT_TIMEOUT: Final = 5.0
"""Seconds for a whole exchange: a grant takes well under a millisecond; this only
bounds a broker that is starting (socket activation) or stuck."""

_TIMEVAL: Final = struct.Struct("@ll")
"""struct timeval, as SO_SNDTIMEO takes it."""

ReplyT = TypeVar("ReplyT", Listing, StatusReport, Reloaded)


def socket_path(path: str | None = None) -> str:
    """Return where the broker listens: `path`, else $PORT_BROKER_SOCKET, else the default."""
    return path or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


def _connect_waiting(sock: socket.socket, path: str, remaining: Callable[[], float]) -> None:
    """connect(), waiting until the deadline for room in a full connection queue.

    A non-blocking connect() to a Unix socket whose queue is full fails at once with
    EAGAIN (one user's connect/close loop can fill it); a blocking one sleeps in the
    kernel until the broker accepts and makes room, for at most SO_SNDTIMEO. So: block,
    bounded by the deadline, and be woken in the kernel's order. A signal during that
    wait ends it with EINTR, which CPython takes for "in progress" and then for done:
    so check that it is connected, and wait again for the time left if not.
    """
    sock.settimeout(None)
    while True:
        seconds = max(remaining(), 0.001)  # raises TimeoutError past the deadline
        timeval = _TIMEVAL.pack(int(seconds), int(seconds % 1 * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        sock.connect(path)
        try:
            sock.getpeername()
        except OSError as e:
            if e.errno != errno.ENOTCONN:
                raise
        else:
            return


def _exchange(request: Request, path: str | None, timeout: float) -> tuple[Reply, list[int]]:
    """Connect, send `request`, return the reply and any fds (the caller owns them);
    asked again after a `busy` refusal, with a backoff, while the deadline allows (an
    attempt after `busy` that runs out of time gives that `busy`, as in
    exchange.asked_until_not_busy)."""
    path = socket_path(path)
    check_timeout(timeout)
    deadline = time.monotonic() + timeout
    waits = delays(BUSY_RETRY_FIRST, BUSY_RETRY_MAX)
    busy: tuple[Reply, list[int]] | None = None
    while True:
        try:
            reply, fds = _exchange_once(request, path, timeout, deadline)
        except BrokerUnavailable:
            if busy is None or time.monotonic() < deadline:
                raise
            return busy
        delay = next(waits)
        if not is_busy(reply) or deadline - time.monotonic() <= delay:
            return reply, fds
        busy = reply, fds
        time.sleep(delay)


def _exchange_once(
    request: Request, path: str, timeout: float, deadline: float
) -> tuple[Reply, list[int]]:
    reader = ReplyReader(path)

    def remaining() -> float:  # one deadline for the whole exchange
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    with closed_on_failure(reader, timeout):  # its TimeoutError is an OSError
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            _connect_waiting(sock, path, remaining)
            # A broker that refuses at once (busy) answers and closes before reading the
            # request: the reply is still there to read after our send fails.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.settimeout(remaining())
                sock.sendall(encode_request(request))
            while not reader.done:
                sock.settimeout(remaining())
                reader.feed(*sock.recvmsg(RECV_BYTES, ANCILLARY_BYTES, socket.MSG_CMSG_CLOEXEC))
        return reader.result()


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
    reply, fds = _exchange(Acquire(as_names(names)), path, timeout)
    return grants_from(reply, fds, socket_path(path))


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
    reply, fds = _exchange(request, path, timeout)
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


def reload(*, path: str | None = None, timeout: float = 2 * RELOAD_TIMEOUT + 5) -> dict[str, Any]:
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


async def _exchange_trio(
    request: Request, path: str | None, timeout: float
) -> tuple[Reply, list[int]]:
    import trio  # noqa: PLC0415  (only trio users pay for importing trio)

    where = socket_path(path)
    check_timeout(timeout)
    return await asked_until_not_busy(
        lambda deadline: _exchange_trio_once(request, where, timeout, deadline),
        trio.current_time,
        trio.sleep,
        timeout,
    )


async def _exchange_trio_once(
    request: Request, path: str, timeout: float, deadline: float
) -> tuple[Reply, list[int]]:
    import trio  # noqa: PLC0415

    reader = ReplyReader(path)
    with closed_on_failure(reader, timeout, trio.TooSlowError):
        with trio.fail_at(deadline):
            plain = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            with trio.socket.from_stdlib_socket(plain) as sock:  # non-blocking from here
                for delay in delays(CONNECT_RETRY_FIRST, CONNECT_RETRY_MAX):
                    if connected(plain, path):
                        break
                    reader.queued = True  # full: wait without stopping the event loop
                    await trio.sleep(delay)
                reader.queued = False
                data = memoryview(encode_request(request))
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    while data:  # (see _exchange)
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

    reply, fds = await _exchange_trio(Acquire(as_names(names)), path, timeout)
    grants = grants_from(reply, fds, socket_path(path))
    return [(name, trio.socket.from_stdlib_socket(sock)) for name, sock in grants]


async def acquire_trio(
    name: str, *, path: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> trio.socket.SocketType:
    """Trio version of `acquire`.

    Raises:
        As `acquire`.
    """
    return single(name, await acquire_many_trio([name], path=path, timeout=timeout))
