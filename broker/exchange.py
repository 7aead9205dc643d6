"""What every client variant (sync and trio in broker/client.py, asyncio in
broker/aio.py) shares: reading one reply with its fds (sans I/O), turning a grant into
sockets, the waits between attempts, and what each failure means for the user.

Must never: leave an fd received open on an error, or raise anything but the
`broker.errors.ClientError` family (and ValueError for a bad timeout).

Standard library only: every worker's start-up imports this.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import socket
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Final, TypeVar

from broker.errors import BrokerUnavailable, ClientError, Code, ProtocolError, refusal
from broker.names import SOCKET_ENV
from broker.protocol import (
    MAX_REPLY_BYTES,
    SCM_MAX_FD,
    Granted,
    LineBuffer,
    Refusal,
    Reply,
    parse_reply,
)

if TYPE_CHECKING:
    import trio

BUSY_RETRY_FIRST: Final = 0.01
BUSY_RETRY_MAX: Final = 0.1
"""After a `busy` refusal a client asks again, 10 ms later, then 20, 40, up to 100 ms
apart, while its deadline allows: a full broker, or a flood that takes a named
worker's turn, costs it a wait, not a failure."""

CONNECT_RETRY_FIRST: Final = 0.001
CONNECT_RETRY_MAX: Final = 0.02
"""The trio client's wait between connect() attempts while the broker's queue is full:
doubling from 1 ms to 20 ms, so a queue that empties is noticed within 20 ms."""

RECV_BYTES: Final = 65536
ANCILLARY_BYTES: Final = socket.CMSG_SPACE(SCM_MAX_FD * array.array("i").itemsize)

Grant = tuple[str, socket.socket]
"""A granted socket with its name."""

SocketT = TypeVar("SocketT", socket.socket, "trio.socket.SocketType")


class ReplyReader:
    """Sans-IO collector of one reply: feed it what recvmsg returned until `done`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.queued = False  # still waiting for room in the broker's queue?
        self.buffer = LineBuffer(MAX_REPLY_BYTES)
        self.fds: list[int] = []
        self.line: bytes | None = None

    def feed(
        self,
        data: bytes,
        ancdata: list[tuple[int, int, bytes]],
        flags: int,
        _address: object = None,
    ) -> None:
        """Take one recvmsg() result.

        Raises:
            BrokerUnavailable: on end of stream, truncated fds or an oversized reply.
        """
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self.fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            raise BrokerUnavailable(f"{self.path}: reply carried more fds than expected")
        if not data:
            raise BrokerUnavailable(
                f"{self.path}: the broker closed the connection without answering"
            )
        self.buffer.feed(data)
        try:
            self.line = self.buffer.next_line()
        except ProtocolError as e:
            raise BrokerUnavailable(f"{self.path}: {e.message}") from None

    @property
    def done(self) -> bool:
        return self.line is not None

    def result(self) -> tuple[Reply, list[int]]:
        """Return the parsed reply and its fds; the caller owns the fds.

        Raises:
            BrokerUnavailable: if the reply is not valid or its fds do not match it.
        """
        if self.line is None:
            raise BrokerUnavailable(f"{self.path}: reply incomplete")
        try:
            reply = parse_reply(self.line)
        except ProtocolError as e:
            raise BrokerUnavailable(f"{self.path}: invalid reply: {e.message}") from None
        expected = len(reply.sockets) if isinstance(reply, Granted) else 0
        if len(self.fds) != expected:
            raise BrokerUnavailable(
                f"{self.path}: reply lists {expected} sockets but carried {len(self.fds)} fds"
            )
        return reply, self.fds

    def close_fds(self) -> None:
        close_all(self.fds)
        self.fds = []


def unavailable(path: str, error: OSError | TimeoutError, timeout: float) -> BrokerUnavailable:
    if isinstance(error, TimeoutError):
        return BrokerUnavailable(f"{path}: the broker did not answer within {timeout:g} s")
    hints = {
        FileNotFoundError: "no such socket: is port-broker.socket running? (set "
        f"{SOCKET_ENV} if the broker listens elsewhere)",
        ConnectionRefusedError: "nothing is listening there: is port-broker.socket running?",
        PermissionError: "permission denied: the socket or a directory above it is not "
        "accessible to this user",
    }
    for kind, hint in hints.items():
        if isinstance(error, kind):
            return BrokerUnavailable(f"{path}: {hint}")
    if error.errno == errno.EAGAIN:  # connect() waited for room until the deadline
        return BrokerUnavailable(
            f"{path}: the broker's connection queue stayed full for {timeout:g} s: it is "
            "overloaded or stuck; retry shortly"
        )
    return BrokerUnavailable(f"{path}: {error.strerror or error}")


def is_busy(reply: Reply) -> bool:
    return isinstance(reply, Refusal) and reply.code is Code.BUSY


async def asked_until_not_busy(
    once: Callable[[float], Awaitable[tuple[Reply, list[int]]]],
    clock: Callable[[], float],
    sleep: Callable[[float], Awaitable[object]],
    timeout: float,
) -> tuple[Reply, list[int]]:
    """The event-loop clients' exchange: `once(deadline)`, asked again after `busy`
    with a backoff while the deadline allows (the sync client's loop is the same, with
    time.monotonic and time.sleep). An attempt after `busy` that runs out of time gives
    that `busy`: the deadline may leave the last one a millisecond, too little for the
    broker's answer on a busy machine, and the broker did answer."""
    deadline = clock() + timeout
    waits = delays(BUSY_RETRY_FIRST, BUSY_RETRY_MAX)
    busy: tuple[Reply, list[int]] | None = None
    while True:
        try:
            reply, fds = await once(deadline)
        except BrokerUnavailable:
            if busy is None or clock() < deadline:
                raise
            return busy
        delay = next(waits)
        if not is_busy(reply) or deadline - clock() <= delay:
            return reply, fds
        busy = reply, fds
        await sleep(delay)


@contextlib.contextmanager
def closed_on_failure(
    reader: ReplyReader,
    timeout: float,
    too_slow: type[BaseException] | tuple[type[BaseException], ...] = (),
) -> Iterator[None]:
    """Around one exchange: on any failure the fds received so far are closed, and an
    OSError, or `too_slow` (the event loop's deadline), becomes the BrokerUnavailable
    that names the socket and what to do; `reader.queued` says the deadline passed
    while the broker's queue was full."""
    try:
        yield
    except too_slow:
        reader.close_fds()
        late = OSError(errno.EAGAIN, "queue full") if reader.queued else TimeoutError()
        raise unavailable(reader.path, late, timeout) from None
    except OSError as e:
        reader.close_fds()
        raise unavailable(reader.path, e, timeout) from None
    except BaseException:
        reader.close_fds()
        raise


def delays(first: float, most: float) -> Iterator[float]:
    """The waits between attempts, for every variant: `first`, doubling up to `most`."""
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, most)


def check_timeout(timeout: float) -> None:
    if not timeout > 0:
        raise ValueError(f"timeout must be more than 0 seconds, not {timeout!r}")


def connected(sock: socket.socket, path: str) -> bool:
    """connect() a non-blocking Unix socket: True, or False while the queue is full
    (a Unix socket connects at once or fails with EAGAIN; event loops' connect helpers
    take that EAGAIN for "in progress", and then for done)."""
    try:
        sock.connect(path)
    except BlockingIOError:
        return False
    return True


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def grants_from(reply: Reply, fds: list[int], path: str) -> list[Grant]:
    """Turn an acquire reply from `path` into (name, socket) pairs, or raise its refusal.

    Raises:
        BrokerUnavailable: if the reply is not a grant, or carried an fd that is not a
            socket (every fd is closed then).
        RequestRefused: the broker's refusal.
    """
    if isinstance(reply, Refusal):
        raise refusal(reply.code, reply.message)
    if not isinstance(reply, Granted):
        close_all(fds)
        raise BrokerUnavailable(f"{path}: expected an acquire reply, got {type(reply).__name__}")
    grants: list[Grant] = []
    try:
        for info, fd in zip(reply.sockets, fds, strict=True):
            try:
                sock = socket.socket(fileno=fd)
            except OSError as e:
                raise BrokerUnavailable(
                    f"{path}: the reply carried an fd that is not a socket ({e.strerror})"
                ) from None
            grants.append((info.name, sock))
    except BaseException:
        for _, sock in grants:
            sock.close()
        for fd in fds[len(grants) :]:
            os.close(fd)
        raise
    return grants


def as_names(names: Iterable[str] | str) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else tuple(names)


def single(name: str, grants: list[tuple[str, SocketT]]) -> SocketT:
    if len(grants) != 1:
        for _, sock in grants:
            sock.close()
        raise ClientError(
            f"socket {name!r} is held as {len(grants)} sockets (e.g. IPv4 and "
            "IPv6); use acquire_many() to receive all of them"
        )
    return grants[0][1]
