"""One client connection's rules, without I/O (h11's `Connection` is the model).

The driver (broker/daemon/driver.py) moves bytes and fds and keeps time; this object
decides. It is given the peer's identity and the configuration in force, fed the bytes
the peer sent and what became of what it said, and asked for the next action:
`NEED_DATA` (read more), a `Send` (these bytes, with these fds on the first one),
`RELOAD` or `CLOSE`. It says how long each wait may last (`wait`, set anew whenever
`waits` changes). Every outcome worth counting or logging (a grant, a denial, a protocol
error, a failure of ours) comes out as an `Outcome` attached to the `Send` that answers
it, for the driver to record. Even a connection refused before it has one (`busy`) is
answered by `refuse_busy` here.

The rules, each enforced here alone (tests/test_connection.py checks them one by one):

1. Requests are newline-framed lines of at most MAX_REQUEST_BYTES. A connection carries
   at most MAX_REQUESTS_PER_CONNECTION of them; it is closed after the last answer.
2. A request that is malformed, too large, or not complete by its deadline gets one
   refusal, after which the connection is closed: nothing more is read. That refusal
   gets FINAL_SEND_TIMEOUT to go, no more.
3. An `acquire` is all or none: either every name is granted, its sockets' fds in
   request order on the reply's first byte, or the reply is one refusal carrying no fd.
4. A grant is an outcome only once its fds have gone: the `Send` carries the grants
   separately from other outcomes, for the driver to record after the kernel took the
   first byte, and never if nothing went.
5. There is one deadline at a time, and its meaning follows the phase: while READING it
   is for the next complete request (missing it is rule 2's timeout); while SENDING it
   is for the peer to take the reply (missing it closes without a word: the peer is not
   reading).
6. End of stream closes. A partial request at end of stream is dropped: nobody is left
   to answer.
7. A failure of the broker's own while answering is refused with `internal`, reported
   as an outcome with its traceback, and the connection goes on.
8. A reload is for the broker's own uid and root only (whoever could send it SIGHUP).
   The driver carries it out (`RELOAD`) and reports back (`reloaded`); meanwhile the
   connection is WORKING and has no deadline of its own (the reload has its bound).
9. A grant the kernel would not pass (too many fds in flight: broker/daemon/inflight.py)
   is answered `busy` instead (`undeliverable`), naming who holds them; the connection
   goes on, and the peer may ask again.
10. A connection the broker cannot take (a limit, a rate: broker/daemon/admission.py)
    gets `busy` before anything is read, then is closed (`refuse_busy`).

Must never: do I/O or look at a clock; hand out an fd the policy does not grant this
peer; answer a request after its refusal-and-close.
"""

from __future__ import annotations

import enum
import traceback
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any, Final, NamedTuple

from broker.daemon.identity import Peer
from broker.daemon.standing import Standing
from broker.errors import Code, ProtocolError
from broker.messages import (
    Acquire,
    Granted,
    Listing,
    Refusal,
    Reload,
    Reloaded,
    Reply,
    Request,
    Status,
    StatusReport,
)
from broker.protocol import MAX_REQUEST_BYTES, SCM_MAX_FD, LineBuffer, encode_reply, parse_request

MAX_REQUESTS_PER_CONNECTION: Final = 100
"""Requests one connection may carry; the broker closes it after answering the last.
A worker needs one: the cap keeps a chatty client from holding its slot for ever."""

FINAL_SEND_TIMEOUT: Final = 0.5
"""Seconds a last refusal (rule 2) gets to go before the connection is closed anyway:
a client that is being dropped gets no more of the broker's time than that."""


class Phase(enum.Enum):
    """What the connection waits for."""

    READING = "reading"
    """A complete request from the peer (the deadline is the request's)."""
    WORKING = "working"
    """The driver to carry out a reload (rule 8: the reload's own bound applies)."""
    SENDING = "sending"
    """The driver to have sent the last `Send` (the deadline is the reply's)."""
    CLOSED = "closed"


class Kind(enum.Enum):
    """What an outcome records."""

    GRANT = "grant"
    """Sockets went to the peer (`socket` names them)."""
    DENIAL = "denial"
    """An acquire refused: unknown socket, not allowed, too many fds."""
    STATUS_DENIAL = "status-denial"
    """The status report refused to a peer the [status] rule does not name."""
    RELOAD_DENIAL = "reload-denial"
    """A reload refused to a peer that could not send the broker SIGHUP either."""
    PROTOCOL = "protocol"
    """A malformed, too large or late request; the connection closes after it."""
    INTERNAL = "internal"
    """A failure of the broker's own (`detail` has the traceback)."""
    BUSY = "busy"
    """A grant the kernel would not pass (rule 9)."""


class Outcome(NamedTuple):
    """One thing worth counting and logging.

    Attributes:
        kind: What happened.
        reason: Why, in words (the policy's reason, the refusal message).
        socket: The socket name(s) concerned, if any ("http", "http,https").
        code: The refusal code, for everything but a grant.
        detail: A traceback, for INTERNAL.
    """

    kind: Kind
    reason: str
    socket: str | None = None
    code: str | None = None
    detail: str | None = None


class Send(NamedTuple):
    """Send `data` whole, `fds` on its first byte (one SCM_RIGHTS message).

    Attributes:
        data: The reply line.
        fds: Descriptors to pass, in order; they stay the holder's.
        outcomes: To record now.
        grants: To record once the first byte (and so the fds) has gone (rule 4).
        final: The connection closes after it, whether it went or not (rules 2, 10).
    """

    data: bytes
    fds: tuple[int, ...] = ()
    outcomes: tuple[Outcome, ...] = ()
    grants: tuple[Outcome, ...] = ()
    final: bool = False


class _Signal(enum.Enum):
    NEED_DATA = "need-data"
    RELOAD = "reload"
    CLOSE = "close"


NEED_DATA: Final = _Signal.NEED_DATA
"""Read more from the peer, then `receive_data` it."""
RELOAD: Final = _Signal.RELOAD
"""Reload the configuration, then tell `reloaded` how it went (rule 8)."""
CLOSE: Final = _Signal.CLOSE
"""Close the connection; nothing more is to be sent or read."""

Action = Send | _Signal


@lru_cache(maxsize=256)
def refuse_busy(message: str) -> Send:
    """Rule 10: what a connection the broker cannot take is told, before anything is
    read (a flood repeats a few messages, at most one per flooding uid: each is made
    once while it recurs)."""
    return Send(encode_reply(Refusal(Code.BUSY, message)), final=True)


class Connection:
    """The rules of one client connection (see the module's docstring).

    Args:
        peer: Who connected, from the kernel (and the user database).
        standing: The configuration in force, asked at each request: a reload between
            two requests of one connection applies to the second.
        report: The status report, made when asked for.
        timeout: Seconds each deadline of rule 5 lasts (the driver keeps the time).
        max_requests: Rule 1's limit (default MAX_REQUESTS_PER_CONNECTION).

    Attributes:
        wait: Seconds the current wait may last, None for no limit (rule 8).
        waits: How many waits have begun: a new one (with its own `wait`) whenever this
            changes.
    """

    def __init__(
        self,
        peer: Peer,
        standing: Callable[[], Standing],
        report: Callable[[], Mapping[str, Any]],
        *,
        timeout: float,
        max_requests: int | None = None,
    ) -> None:
        self.peer = peer
        self.timeout = timeout
        self.phase = Phase.READING
        self.requests = 0
        self.wait: float | None = timeout
        self.waits = 1
        self._standing = standing
        self._report = report
        self._max_requests = MAX_REQUESTS_PER_CONNECTION if max_requests is None else max_requests
        self._buffer = LineBuffer(MAX_REQUEST_BYTES)
        self._eof = False
        self._pending: Send | None = None
        self._close_after_send = False

    def _enter(self, phase: Phase, wait: float | None) -> None:
        """Rule 5: a new phase, and with it a new deadline."""
        self.phase = phase
        self.wait = wait
        self.waits += 1

    # --- what happened -----------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Take bytes the peer sent; b"" means end of stream (rule 6)."""
        if data:
            self._buffer.feed(data)
        else:
            self._eof = True

    def reloaded(self, configuration: Mapping[str, Any], refused: str | None) -> None:
        """The driver's reload (rule 8) is done: the configuration now in force (as in
        the status report) and, if the new one was refused, why."""
        if self.phase is not Phase.WORKING:
            raise RuntimeError(f"reloaded() while {self.phase.value}")
        if refused is not None:
            self._answer_with(self._reply(Refusal(Code.INVALID_CONFIG, refused)))
        else:
            self._answer_with(self._reply(Reloaded(configuration)))

    def undeliverable(self, reason: str) -> None:
        """The grant just asked for could not be passed (rule 9): its `busy` refusal
        replaces it, and is the next action."""
        if self.phase is not Phase.SENDING:
            raise RuntimeError(f"undeliverable() while {self.phase.value}")
        outcome = Outcome(Kind.BUSY, reason, code=Code.BUSY)
        self._pending = self._reply(Refusal(Code.BUSY, reason), outcome)

    def sent(self) -> None:
        """The driver sent the last `Send` whole: read the next request, or close."""
        if self.phase is not Phase.SENDING:
            raise RuntimeError(f"sent() while {self.phase.value}")
        if self._close_after_send or self.requests >= self._max_requests:
            self._enter(Phase.CLOSED, None)
        else:
            self._enter(Phase.READING, self.timeout)

    def timed_out(self) -> None:
        """The deadline passed (rule 5): a request late is refused (rule 2); a peer that
        does not take its reply is closed without a word."""
        if self.phase is Phase.READING:
            message = f"no complete request within {self.timeout:g} seconds"
            self._refuse(ProtocolError(Code.TIMEOUT, message))
        else:
            self.gone()

    def gone(self) -> None:
        """The peer went away (the driver could not read or send): close."""
        self._pending = None
        self._enter(Phase.CLOSED, None)

    # --- what to do --------------------------------------------------------------

    def next_action(self) -> Action:
        """Return what to do next: NEED_DATA, a `Send`, RELOAD or CLOSE.

        Raises:
            RuntimeError: while WORKING (call `reloaded()` first), or SENDING once the
                `Send` was given (call `sent()` first).
        """
        if self.phase is Phase.CLOSED:
            return CLOSE
        if self._pending is not None:
            pending, self._pending = self._pending, None
            return pending
        if self.phase is not Phase.READING:
            raise RuntimeError(f"next_action() while {self.phase.value}")
        request = self._next_request()
        if isinstance(request, _Signal):
            return request
        if isinstance(request, Reload):
            return self._reload()
        if request is not None:
            self._answer_with(self._answer(request))
        return self.next_action()  # the answer, or rule 2's refusal

    def _next_request(self) -> Request | _Signal | None:
        """The next whole request; NEED_DATA or CLOSE (rule 6) if there is none; None if
        it was refused (rule 2)."""
        try:
            line = self._buffer.next_line()
            if line is None:
                if not self._eof:
                    return NEED_DATA
                self._enter(Phase.CLOSED, None)  # rule 6: a partial request is dropped
                return CLOSE
            request = parse_request(line)
        except ProtocolError as e:
            self._refuse(e)
            return None
        self.requests += 1
        return request

    def _answer_with(self, send: Send) -> None:
        self._enter(Phase.SENDING, FINAL_SEND_TIMEOUT if send.final else self.timeout)
        self._pending = send

    def _refuse(self, error: ProtocolError) -> None:
        """Rule 2: one refusal, then close."""
        self._close_after_send = True
        outcome = Outcome(Kind.PROTOCOL, error.message, code=error.code)
        reply = encode_reply(Refusal(error.code, error.message))
        self._answer_with(Send(reply, outcomes=(outcome,), final=True))

    # --- answers -----------------------------------------------------------------

    def _answer(self, request: Request) -> Send:
        try:
            if isinstance(request, Acquire):
                return self._acquire(request)
            if isinstance(request, Status):
                return self._status()
            return self._reply(self._listing())
        except Exception as e:  # rule 7: a bug of ours; say so (docs/protocol.md)
            message = "the broker failed on this request; its log has the details"
            failure = Outcome(
                Kind.INTERNAL,
                f"internal error answering {self.peer.describe()}: {e!r}",
                code=Code.INTERNAL,
                detail=traceback.format_exc(limit=20),
            )
            return self._reply(Refusal(Code.INTERNAL, message), failure)

    @staticmethod
    def _reply(reply: Reply, *outcomes: Outcome) -> Send:
        return Send(encode_reply(reply), outcomes=outcomes)

    def _acquire(self, request: Acquire) -> Send:
        """Rule 3: every name, or one refusal and no fd."""
        standing = self._standing()
        policy, held = standing.policy, standing.held
        fds: list[int] = []
        infos = []
        grants = []
        for name in request.names:
            sockets = held.get(name)
            if not sockets:
                # Name only what this peer may have: `list` shows no more either.
                mine = [n for n in sorted(held) if policy.may_acquire(n, self.peer)]
                message = f"no socket named {name!r} (you may acquire: {', '.join(mine) or 'none'})"
                return self._deny(Code.UNKNOWN_SOCKET, name, message)
            decision = policy.check_acquire(name, self.peer)
            if not decision.allowed:
                return self._deny(Code.DENIED, name, decision.reason)
            grants.append(Outcome(Kind.GRANT, decision.reason, socket=name))
            for fd, info in sockets:
                fds.append(fd)
                infos.append(info)
        if len(fds) > SCM_MAX_FD:
            message = (
                f"request would pass {len(fds)} fds; at most {SCM_MAX_FD} per request: "
                "ask for fewer names at a time"
            )
            return self._deny(Code.TOO_LARGE, ",".join(request.names), message)
        if len(request.names) == 1:  # the common case: its reply is encoded already
            data = standing.granted[request.names[0]]
        else:
            data = encode_reply(Granted(tuple(infos)))
        return Send(data, tuple(fds), grants=tuple(grants))

    def _deny(self, code: str, name: str, reason: str) -> Send:
        return self._reply(Refusal(code, reason), Outcome(Kind.DENIAL, reason, name, code))

    def _status(self) -> Send:
        decision = self._standing().policy.check_status(self.peer)
        if not decision.allowed:
            denial = Outcome(Kind.STATUS_DENIAL, decision.reason, code=Code.DENIED)
            return self._reply(Refusal(Code.DENIED, decision.reason), denial)
        return self._reply(StatusReport(self._report()))

    def _reload(self) -> Action:
        """Rule 8: the broker's own uid and root may; then the driver does it."""
        owner = self._standing().owner
        if self.peer.uid not in {0, owner}:
            reason = (
                f"{self.peer.describe()} may not reload the broker: only root and uid "
                f"{owner}, the broker's own, may (as they could send it SIGHUP)"
            )
            denial = Outcome(Kind.RELOAD_DENIAL, reason, code=Code.DENIED)
            self._answer_with(self._reply(Refusal(Code.DENIED, reason), denial))
            return self.next_action()
        self._enter(Phase.WORKING, None)
        return RELOAD

    def _listing(self) -> Listing:
        standing = self._standing()
        policy = standing.policy
        return Listing(
            tuple(
                info
                for name, sockets in standing.held.items()
                if policy.may_acquire(name, self.peer)
                for _, info in sockets
            )
        )
