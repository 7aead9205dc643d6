"""The client library for asyncio (uvicorn, aiohttp, hypercorn and most Python servers
run on it): `acquire` and `acquire_many` as coroutines, beside broker.client's sync and
trio versions, with the same requests, reply reader, deadline, waits and errors.

    import asyncio, broker.aio
    sock = await broker.aio.acquire("http")   # a listening socket.socket, non-blocking
    server = await asyncio.start_server(handle, sock=sock)

Ownership: sockets returned are the caller's to close; on any error, every fd received
is closed before the exception propagates.

Standard library only, as broker.client.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Sequence

from broker.client import DEFAULT_TIMEOUT, socket_path
from broker.exchange import (
    ANCILLARY_BYTES,
    CONNECT_RETRY_FIRST,
    CONNECT_RETRY_MAX,
    RECV_BYTES,
    Grant,
    ReplyReader,
    as_names,
    asked_until_not_busy,
    check_timeout,
    closed_on_failure,
    connected,
    delays,
    grants_from,
    single,
)
from broker.protocol import Acquire, Reply, Request, encode_request

__all__ = ["acquire", "acquire_many"]


async def acquire_many(
    names: Sequence[str], *, path: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> list[Grant]:
    """asyncio version of `broker.client.acquire_many`: all of the sockets, or none.

    Raises:
        As `broker.client.acquire_many`.
    """
    reply, fds = await _exchange(Acquire(as_names(names)), path, timeout)
    return grants_from(reply, fds, socket_path(path))


async def acquire(
    name: str, *, path: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> socket.socket:
    """asyncio version of `broker.client.acquire`.

    Raises:
        As `broker.client.acquire`.
    """
    return single(name, await acquire_many([name], path=path, timeout=timeout))


async def _exchange(request: Request, path: str | None, timeout: float) -> tuple[Reply, list[int]]:
    """As broker.client's: asked again after `busy`, with a backoff, within the deadline."""
    where = socket_path(path)
    check_timeout(timeout)
    return await asked_until_not_busy(
        lambda deadline: _exchange_once(request, where, timeout, deadline),
        asyncio.get_running_loop().time,
        asyncio.sleep,
        timeout,
    )


async def _exchange_once(
    request: Request, path: str, timeout: float, deadline: float
) -> tuple[Reply, list[int]]:
    loop = asyncio.get_running_loop()
    reader = ReplyReader(path)
    flags = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
    with closed_on_failure(reader, timeout, TimeoutError):
        async with asyncio.timeout_at(deadline):
            with socket.socket(socket.AF_UNIX, flags) as sock:
                for delay in delays(CONNECT_RETRY_FIRST, CONNECT_RETRY_MAX):
                    if connected(sock, path):  # (not sock_connect: see connected)
                        break
                    reader.queued = True
                    await asyncio.sleep(delay)
                reader.queued = False
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    await loop.sock_sendall(sock, encode_request(request))
                while not reader.done:
                    await _readable(loop, sock)
                    with contextlib.suppress(BlockingIOError):
                        reader.feed(
                            *sock.recvmsg(RECV_BYTES, ANCILLARY_BYTES, socket.MSG_CMSG_CLOEXEC)
                        )
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
