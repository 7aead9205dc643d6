"""One client connection's rules, without I/O (h11's `Connection` is the model).

The driver (broker/daemon/driver.py) moves bytes and time; this object decides. It is given
the peer's identity and what the broker holds, fed the bytes the peer sent, and asked
for the next action: `NEED_DATA` (read more), a `Send` (these bytes, with these fds on
the first one), or `CLOSE`. Every outcome worth counting or logging (a grant, a denial,
a protocol error, a failure of ours) comes out as an `Outcome` attached to the `Send`
that answers it, for the driver to record.

The rules, each enforced here alone (tests/test_connection.py checks them one by one):

1. Requests are newline-framed lines of at most MAX_REQUEST_BYTES. A connection carries
   at most MAX_REQUESTS_PER_CONNECTION of them; it is closed after the last answer.
2. A request that is malformed, too large, or not complete by its deadline gets one
   refusal, after which the connection is closed: nothing more is read.
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
9. A grant the kernel would not pass (too many fds in flight: broker/daemon/inflight.py) is
   answered `busy` instead (`undelivered`), naming who holds them; the connection goes
   on, and the peer may ask again.

Must never: do I/O or look at a clock; hand out an fd the policy does not grant this
peer; answer a request after its refusal-and-close.
"""

from __future__ import annotations

import enum
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from broker.daemon.activation import HeldSocket
from broker.daemon.identity import Peer
from broker.daemon.policy import Policy
from broker.errors import Code, ProtocolError
from broker.protocol import (
    MAX_REQUEST_BYTES,
    SCM_MAX_FD,
    Acquire,
    Granted,
    LineBuffer,
    Listing,
    Refusal,
    Reload,
    Reloaded,
    Reply,
    Request,
    Status,
    StatusReport,
    encode_reply,
    parse_request,
)

MAX_REQUESTS_PER_CONNECTION: Final = 100
"""Requests one connection may carry; the broker closes it after answering the last.
A worker needs one: the cap keeps a chatty client from holding its slot for ever."""


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
        final: A refusal after which the connection closes (rule 2): worth only a short
            try to deliver.
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


@dataclass(frozen=True)
class Holdings:
    """What a connection answers from: the policy, the held sockets, the status report.

    Attributes:
        policy: Who may have what.
        held: Name → the sockets of that name (the broker's; only their fds are read).
        report: The status report, built when asked for.
        owner: The broker's effective uid: it and root may ask for a reload (rule 8).
    """

    policy: Policy
    held: Mapping[str, Sequence[HeldSocket]]
    report: Callable[[], Mapping[str, Any]]
    owner: int = 0


class Connection:
    """The rules of one client connection (see the module's docstring).

    Args:
        peer: Who connected, from the kernel (and the user database).
        holdings: What to answer from, asked at each request: a reload between two
            requests of one connection applies to the second.
        timeout: Seconds each deadline of rule 5 lasts (the driver keeps the time).
        max_requests: Rule 1's limit (default MAX_REQUESTS_PER_CONNECTION).
    """

    def __init__(
        self,
        peer: Peer,
        holdings: Callable[[], Holdings],
        *,
        timeout: float,
        max_requests: int | None = None,
    ) -> None:
        self.peer = peer
        self.timeout = timeout
        self.phase = Phase.READING
        self.requests = 0
        self._holdings = holdings
        self._max_requests = MAX_REQUESTS_PER_CONNECTION if max_requests is None else max_requests
        self._buffer = LineBuffer(MAX_REQUEST_BYTES)
        self._eof = False
        self._close_after_send = False

    # --- input -------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Take bytes the peer sent; b"" means end of stream (rule 6)."""
        if data:
            self._buffer.feed(data)
        else:
            self._eof = True

    def reloaded(self, configuration: Mapping[str, Any], refused: str | None) -> Send:
        """The driver's reload (rule 8) is done: the configuration now in force (as in
        the status report) and, if the new one was refused, why. Returns the reply."""
        if self.phase is not Phase.WORKING:
            raise RuntimeError(f"reloaded() while {self.phase.value}")
        self.phase = Phase.SENDING
        if refused is not None:
            return self._reply(Refusal(Code.INVALID_CONFIG, refused))
        return self._reply(Reloaded(configuration))

    def sent(self) -> None:
        """The driver sent the last `Send` whole: read the next request, or close."""
        if self.phase is not Phase.SENDING:
            raise RuntimeError(f"sent() while {self.phase.value}")
        done = self._close_after_send or self.requests >= self._max_requests
        self.phase = Phase.CLOSED if done else Phase.READING

    def undelivered(self, reason: str) -> Send:
        """The grant just asked for could not be passed (rule 9): its `busy` refusal,
        which replaces it."""
        if self.phase is not Phase.SENDING:
            raise RuntimeError(f"undelivered() while {self.phase.value}")
        return self._reply(Refusal(Code.BUSY, reason), Outcome(Kind.BUSY, reason, code=Code.BUSY))

    def timed_out(self) -> Action:
        """The deadline passed (rule 5): what to do about it."""
        if self.phase is Phase.READING:
            message = f"no complete request within {self.timeout:g} seconds"
            return self._refuse(ProtocolError(Code.TIMEOUT, message))
        self.phase = Phase.CLOSED
        return CLOSE

    def gone(self) -> None:
        """The peer went away (the driver could not read or send): close."""
        self.phase = Phase.CLOSED

    # --- output ------------------------------------------------------------------

    def next_action(self) -> Action:
        """Return what to do next: NEED_DATA, a `Send`, RELOAD or CLOSE.

        Raises:
            RuntimeError: while SENDING or WORKING (call `sent()` or `reloaded()` first).
        """
        if self.phase is Phase.CLOSED:
            return CLOSE
        if self.phase is not Phase.READING:
            raise RuntimeError(f"next_action() while {self.phase.value}")
        try:
            line = self._buffer.next_line()
            if line is None:
                if not self._eof:
                    return NEED_DATA
                self.phase = Phase.CLOSED  # rule 6: a partial request is dropped
                return CLOSE
            request = parse_request(line)
        except ProtocolError as e:
            return self._refuse(e)
        self.requests += 1
        self.phase = Phase.SENDING
        if isinstance(request, Reload):
            return self._reload()
        return self._answer(request)

    def _refuse(self, error: ProtocolError) -> Send:
        """Rule 2: one refusal, then close."""
        self.phase = Phase.SENDING
        self._close_after_send = True
        outcome = Outcome(Kind.PROTOCOL, error.message, code=error.code)
        reply = encode_reply(Refusal(error.code, error.message))
        return Send(reply, outcomes=(outcome,), final=True)

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
        holdings = self._holdings()
        policy, held = holdings.policy, holdings.held
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
            for held_socket in sockets:
                fds.append(held_socket.sock.fileno())
                infos.append(held_socket.info)
        if len(fds) > SCM_MAX_FD:
            message = (
                f"request would pass {len(fds)} fds; at most {SCM_MAX_FD} per request: "
                "ask for fewer names at a time"
            )
            return self._deny(Code.TOO_LARGE, ",".join(request.names), message)
        return Send(encode_reply(Granted(tuple(infos))), tuple(fds), grants=tuple(grants))

    def _deny(self, code: str, name: str, reason: str) -> Send:
        return self._reply(Refusal(code, reason), Outcome(Kind.DENIAL, reason, name, code))

    def _status(self) -> Send:
        holdings = self._holdings()
        decision = holdings.policy.check_status(self.peer)
        if not decision.allowed:
            denial = Outcome(Kind.STATUS_DENIAL, decision.reason, code=Code.DENIED)
            return self._reply(Refusal(Code.DENIED, decision.reason), denial)
        return self._reply(StatusReport(holdings.report()))

    def _reload(self) -> Action:
        """Rule 8: the broker's own uid and root may; then the driver does it."""
        owner = self._holdings().owner
        if self.peer.uid not in {0, owner}:
            reason = (
                f"{self.peer.describe()} may not reload the broker: only root and uid "
                f"{owner}, the broker's own, may (as they could send it SIGHUP)"
            )
            denial = Outcome(Kind.RELOAD_DENIAL, reason, code=Code.DENIED)
            return self._reply(Refusal(Code.DENIED, reason), denial)
        self.phase = Phase.WORKING
        return RELOAD

    def _listing(self) -> Listing:
        holdings = self._holdings()
        policy = holdings.policy
        return Listing(
            tuple(
                held.info
                for name, sockets in holdings.held.items()
                if policy.may_acquire(name, self.peer)
                for held in sockets
            )
        )
