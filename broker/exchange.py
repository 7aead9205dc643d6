"""What every client shares: one exchange with the broker, synchronous (`ask`: what
`port-broker exec` and broker/client.py's functions use), and the sans-IO parts the
event-loop variants (trio in broker/client.py, asyncio in broker/aio.py) drive
themselves: the reply reader, when to ask again after `busy` (`Attempts`, the one
rule for all three), what each failure means for the user, and grants as fds.

Must never: leave an fd received open on an error; raise anything but the
`broker.errors.ClientError` family (and ValueError for a bad timeout); or import a
module a bare interpreter has not already loaded but C ones (`_socket`, `errno`):
`port-broker exec`, on every worker's start, connects, asks and reads here, and `socket`
alone (its enums) would cost it a third of an interpreter's start.
"""

from __future__ import annotations

import _socket
import _struct
import errno
import os
import stat
import time

from broker.errors import BrokerUnavailable, ClientError, Code, ProtocolError, refusal
from broker.messages import Granted, Refusal, Reply, Request
from broker.names import LOAD_TIMEOUT, MOST_SECONDS, SOCKET_ENV, socket_path, timeout_ok
from broker.protocol import MAX_REPLY_BYTES, SCM_MAX_FD, LineBuffer, encode_request, parse_reply

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from types import TracebackType
    from typing import Final

    Outcome = tuple[Reply, list[int]]
    """A reply and the fds that came with it (the caller's to close)."""

DEFAULT_TIMEOUT: Final = 5.0
"""Seconds for a whole exchange: a grant takes well under a millisecond; this only
bounds a broker that is starting (socket activation) or stuck."""

RELOAD_WAIT: Final = 2 * LOAD_TIMEOUT + 5
"""Seconds a reload is waited for by default: one may be running when it is asked for,
and each takes at most LOAD_TIMEOUT; then a little for the answer."""

BUSY_RETRY_FIRST: Final = 0.01
BUSY_RETRY_MAX: Final = 0.1
"""After a `busy` refusal a client asks again, 10 ms later, then 20, 40, up to 100 ms
apart, while its deadline allows: a full broker, or a flood that takes a named
worker's turn, costs it a wait, not a failure."""

CONNECT_RETRY_FIRST: Final = 0.001
CONNECT_RETRY_MAX: Final = 0.02
"""The event-loop clients' wait between connect() attempts while the broker's queue is
full: doubling from 1 ms to 20 ms, so a queue that empties is noticed within 20 ms."""

RECV_BYTES: Final = 65536
ANCILLARY_BYTES: Final = _socket.CMSG_SPACE(SCM_MAX_FD * 4)  # an fd is a C int
_TIMEVAL: Final = _struct.Struct("@ll")
"""struct timeval, as SO_SNDTIMEO takes it."""


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
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                whole = len(payload) - len(payload) % 4
                self.fds.extend(memoryview(payload)[:whole].cast("i").tolist())
        if flags & _socket.MSG_CTRUNC:
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

    def result(self) -> Outcome:
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


def unavailable(path: str, error: OSError, timeout: float) -> BrokerUnavailable:
    """What a failed exchange with the broker at `path` means, and what to do."""
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


class ClosedOnFailure:
    """Around one exchange: on any failure the fds received so far are closed, and an
    OSError, or `too_slow` (the event loop's deadline), becomes the BrokerUnavailable
    that names the socket and what to do; `reader.queued` says the deadline passed
    while the broker's queue was full."""

    def __init__(
        self,
        reader: ReplyReader,
        timeout: float,
        too_slow: type[BaseException] | tuple[type[BaseException], ...] = (),
    ) -> None:
        self._reader = reader
        self._timeout = timeout
        self._too_slow = too_slow

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        if error is None:
            return
        reader = self._reader
        reader.close_fds()
        if isinstance(error, self._too_slow):
            late = OSError(errno.EAGAIN, "queue full") if reader.queued else TimeoutError()
            raise unavailable(reader.path, late, self._timeout) from None
        if isinstance(error, OSError):
            raise unavailable(reader.path, error, self._timeout) from None


def is_busy(reply: Reply) -> bool:
    return isinstance(reply, Refusal) and reply.code == Code.BUSY


class Attempts:
    """When to ask again (sans-IO; each client loops with its own clock and sleep):
    after `busy`, BUSY_RETRY_FIRST later, doubling up to BUSY_RETRY_MAX, while the
    deadline allows. An attempt after `busy` that runs out of time gives that `busy`:
    the deadline may leave the last one a millisecond, too little for the broker's
    answer on a busy machine, and the broker did answer.

    Args:
        now: The client's clock, now.
        timeout: Seconds for all the attempts together.
    """

    def __init__(self, now: float, timeout: float) -> None:
        check_timeout(timeout)
        self.deadline = now + timeout
        self._waits = delays(BUSY_RETRY_FIRST, BUSY_RETRY_MAX)
        self._busy: Outcome | None = None

    def again(self, outcome: Outcome, now: float) -> float | None:
        """Seconds to wait before asking again, or None: `outcome` is the answer. (A
        `busy` carries no fds: `ReplyReader.result` holds replies to that.)"""
        delay = next(self._waits)
        if not is_busy(outcome[0]) or self.deadline - now <= delay:
            return None
        self._busy = outcome
        return delay

    def failed(self, error: BrokerUnavailable, now: float) -> Outcome:
        """An attempt failed with `error`: the answer is the `busy` before it, if the
        deadline is what ended it.

        Raises:
            BrokerUnavailable: `error`, otherwise.
        """
        if self._busy is None or now < self.deadline:
            raise error
        return self._busy


def ask(request: Request, path: str | None, timeout: float) -> Outcome:
    """Connect, send `request`, return the reply and its fds (the caller owns them);
    asked again after `busy` as `Attempts` says.

    Raises:
        BrokerUnavailable: the broker cannot be reached or did not answer in time.
        ValueError: `timeout` is not above 0 and at most MOST_SECONDS.
    """
    where = socket_path(path)
    attempts = Attempts(time.monotonic(), timeout)
    while True:
        try:
            outcome = _ask_once(request, where, timeout, attempts.deadline)
        except BrokerUnavailable as e:
            return attempts.failed(e, time.monotonic())
        delay = attempts.again(outcome, time.monotonic())
        if delay is None:
            return outcome
        time.sleep(delay)


def _ask_once(request: Request, path: str, timeout: float, deadline: float) -> Outcome:
    reader = ReplyReader(path)

    def remaining() -> float:  # one deadline for the whole exchange
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    with ClosedOnFailure(reader, timeout):  # its TimeoutError is an OSError
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        try:
            _connect_waiting(sock, path, remaining)
            # A broker that refuses at once (busy) answers and closes before reading the
            # request: the reply is still there to read after our send fails.
            try:
                sock.settimeout(remaining())
                sock.sendall(encode_request(request))
            except (BrokenPipeError, ConnectionResetError):
                pass
            while not reader.done:
                sock.settimeout(remaining())
                reader.feed(*sock.recvmsg(RECV_BYTES, ANCILLARY_BYTES, _socket.MSG_CMSG_CLOEXEC))
        finally:
            sock.close()
        return reader.result()


def _connect_waiting(sock: _socket.socket, path: str, remaining: Callable[[], float]) -> None:
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
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDTIMEO, timeval)
        sock.connect(path)
        try:
            sock.getpeername()
        except OSError as e:
            if e.errno != errno.ENOTCONN:
                raise
        else:
            return


def delays(first: float, most: float) -> Iterator[float]:
    """The waits between attempts, for every variant: `first`, doubling up to `most`."""
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, most)


def check_timeout(timeout: float) -> None:
    if not timeout_ok(timeout):
        raise ValueError(
            f"timeout must be a number of seconds above 0 and at most {MOST_SECONDS:g}, "
            f"not {timeout!r}"
        )


def connected(sock: _socket.socket, path: str) -> bool:
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


def granted(outcome: Outcome, path: str) -> list[tuple[str, int]]:
    """Turn an acquire's outcome from `path` into (name, fd) pairs, or raise its refusal.

    Raises:
        BrokerUnavailable: if the reply is not a grant, or carried an fd that is not a
            socket (every fd is closed then).
        RequestRefused: the broker's refusal.
    """
    reply, fds = outcome
    if isinstance(reply, Granted) and all(map(_is_socket, fds)):
        return [(info.name, fd) for info, fd in zip(reply.sockets, fds, strict=True)]
    close_all(fds)
    if isinstance(reply, Refusal):
        raise refusal(reply.code, reply.message)
    if isinstance(reply, Granted):
        raise BrokerUnavailable(f"{path}: the reply carried an fd that is not a socket")
    raise BrokerUnavailable(f"{path}: expected an acquire reply, got {type(reply).__name__}")


def _is_socket(fd: int) -> bool:
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False


def as_names(names: Iterable[str] | str) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else tuple(names)


def one(name: str, count: int) -> None:
    """Check that `name` came as one socket, for acquire() (the caller closes them).

    Raises:
        ClientError: it is held as several (IPv4 and IPv6): acquire_many() takes them.
    """
    if count != 1:
        raise ClientError(
            f"socket {name!r} is held as {count} sockets (e.g. IPv4 and IPv6); use "
            "acquire_many() to receive all of them"
        )
