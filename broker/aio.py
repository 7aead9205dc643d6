"""The client library for asyncio (uvicorn, aiohttp, hypercorn and most Python servers
run on it): `acquire` and `acquire_many` as coroutines, beside broker.client's sync and
trio versions, with the same requests, reply reader, deadline, waits and errors.

    import asyncio, broker.aio
    sock = await broker.aio.acquire("http")   # a listening socket.socket, non-blocking
    server = await asyncio.start_server(handle, sock=sock)

Ownership: sockets returned are the caller's to close; on any error, every fd received
is closed before the exception propagates.

Must never: block the event loop (every wait is asyncio's), or import anything of the
broker's daemon or supervisor.

Standard library only, as broker.client.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING

from broker.client import DEFAULT_TIMEOUT, Grant, single, sockets
from broker.errors import BrokerUnavailable
from broker.exchange import (
    ANCILLARY_BYTES,
    CONNECT_RETRY_FIRST,
    CONNECT_RETRY_MAX,
    RECV_BYTES,
    Attempts,
    ClosedOnFailure,
    ReplyReader,
    as_names,
    connected,
    delays,
    granted,
)
from broker.messages import Acquire, Request
from broker.names import socket_path
from broker.protocol import encode_request

if TYPE_CHECKING:
    from broker.exchange import Outcome

__all__ = ["acquire", "acquire_many"]


async def acquire_many(
    names: Sequence[str], *, path: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> list[Grant]:
    """asyncio version of `broker.client.acquire_many`: all of the sockets, or none.

    Raises:
        As `broker.client.acquire_many`.
    """
    outcome = await _ask(Acquire(as_names(names)), path, timeout)
    return sockets(granted(outcome, socket_path(path)))


async def acquire(
    name: str, *, path: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> socket.socket:
    """asyncio version of `broker.client.acquire`.

    Raises:
        As `broker.client.acquire`.
    """
    return single(name, await acquire_many([name], path=path, timeout=timeout))


async def _ask(request: Request, path: str | None, timeout: float) -> Outcome:
    """`exchange.ask` on asyncio: the same attempts, without stopping the event loop."""
    loop = asyncio.get_running_loop()
    where = socket_path(path)
    attempts = Attempts(loop.time(), timeout)
    while True:
        try:
            outcome = await _ask_once(request, where, timeout, attempts.deadline)
        except BrokerUnavailable as e:
            return attempts.failed(e, loop.time())
        delay = attempts.again(outcome, loop.time())
        if delay is None:
            return outcome
        await asyncio.sleep(delay)


async def _ask_once(request: Request, path: str, timeout: float, deadline: float) -> Outcome:
    loop = asyncio.get_running_loop()
    reader = ReplyReader(path)
    flags = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
    with ClosedOnFailure(reader, timeout, TimeoutError):
        async with asyncio.timeout_at(deadline):
            with socket.socket(socket.AF_UNIX, flags) as sock:
                for delay in delays(CONNECT_RETRY_FIRST, CONNECT_RETRY_MAX):
                    if connected(sock, path):  # (not sock_connect: see connected)
                        break
                    reader.queued = True
                    await asyncio.sleep(delay)
                reader.queued = False
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    await loop.sock_sendall(sock, encode_request(request))  # (as exchange.ask)
                while not reader.done:
                    await _readable(loop, sock)
                    try:
                        reader.feed(
                            *sock.recvmsg(RECV_BYTES, ANCILLARY_BYTES, socket.MSG_CMSG_CLOEXEC)
                        )
                    except BlockingIOError:
                        continue
        return reader.result()


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Wait until `sock` has something to read (asyncio has no sock_recvmsg)."""
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():  # the loop may call again before the reader is removed
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())
