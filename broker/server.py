"""The broker's trio loops: accept control connections, answer requests, pass fds.

Each connection is served by its own task: identify the peer from the kernel, read
newline-framed requests under a deadline, answer each (an `acquire` reply carries the
granted fds as one SCM_RIGHTS message). A slow, silent, malformed or vanishing client
costs one task and one fd until its deadline, never anyone else's time. Everything is
bounded: connections (`max_connections`), request size (protocol.MAX_REQUEST_BYTES),
time per request (`client_timeout`) and the shutdown grace.

Ownership: the server owns each accepted connection and closes it when its task ends,
on every path. It never owns, accepts on or changes a granted socket: those belong to
the `Intake`, and the kernel duplicates them into each reply.
"""

from __future__ import annotations

import array
import errno
import os
import signal
import socket
import time
import traceback
from collections import Counter, deque
from contextlib import suppress
from typing import Any, Final

import trio

from broker import __version__
from broker.activation import Intake
from broker.audit import Audit
from broker.config import Config
from broker.errors import Code, ProtocolError
from broker.identity import USER_CACHE_SECONDS, Peer, UserDatabase, peer_credentials
from broker.names import Level
from broker.protocol import (
    MAX_REQUEST_BYTES,
    SCM_MAX_FD,
    Acquire,
    Granted,
    LineBuffer,
    Listing,
    Refusal,
    Reply,
    Request,
    Status,
    StatusReport,
    encode_reply,
    parse_request,
)

ACCEPT_BACKOFF: Final = 0.1
"""Seconds to pause accepting when out of fds or memory (EMFILE, ENOMEM…), as trio does:
retrying at once would spin; the pause lets finishing clients free resources."""

_BACKOFF_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_IGNORED_ACCEPT_ERRNOS: Final = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})

SHUTDOWN_GRACE: Final = 1.0
"""Seconds clients in the middle of a request get after SIGTERM: far more than a grant
takes, and well inside systemd's TimeoutStopSec."""

REFUSAL_SEND_TIMEOUT: Final = 0.5
"""Seconds we try to tell a client why it is dropped (a protocol error, a timeout)
before giving up: such a client gets no more of our time than that."""

STATUS_INTERVAL: Final = 1.0
"""Seconds between STATUS= updates to systemd: often enough for `systemctl status`,
rare enough to cost nothing under a storm of grants."""

MAX_REQUESTS_PER_CONNECTION: Final = 100
"""Requests one connection may carry; the broker closes it after answering the last.
A worker needs one: the cap keeps a chatty client from holding its slot for ever."""

USER_LOOKUP_THREADS: Final = 4
"""User-database lookups running at once, each in a thread: NSS may wait on LDAP or
sssd, and the event loop must not."""

REFUSAL_LOG_BURST: Final = 20
REFUSAL_LOG_WINDOW: Final = 10.0
"""At most REFUSAL_LOG_BURST refusals per uid are logged in each REFUSAL_LOG_WINDOW
seconds, the rest only counted and summed up: one user's flood of refused requests must
not push grants past journald's rate limit. Grants are always logged."""

REFUSAL_LOG_UIDS: Final = 4096
"""uids whose refusal-log windows are tracked at once; past that all windows end early."""

RECENT_EVENTS: Final = 32
"""Grants and denials kept for `port-broker status`; the journal keeps them all."""

RECV_CHUNK: Final = MAX_REQUEST_BYTES
"""Bytes asked of the kernel per recv(): a whole request in one call."""

ACCEPT_BATCH: Final = 8
"""Connections accepted per wakeup of the accept loop before it yields: fewer wakeups
under a burst of clients (measured: +25 % grants/s), while larger batches let new
clients overtake connected ones (at 64 per batch the p99 latency doubled)."""


def _notify(state: str) -> None:
    if os.environ.get("NOTIFY_SOCKET"):
        from systemd import daemon  # noqa: PLC0415 (imported once, then cached)

        daemon.notify(state)


class Broker:
    """Serves one `Intake` under one `Config`.

    Args:
        intake: The control socket and the held sockets; the broker serves them but
            the caller keeps ownership (closes them after `serve` returns).
        config: Policy and limits.
        audit: Where grants and denials are recorded.
    """

    def __init__(self, intake: Intake, config: Config, audit: Audit) -> None:
        self.intake = intake
        self.config = config
        self.policy = config.policy
        self.audit = audit
        self.users = UserDatabase()
        self.lookups = trio.CapacityLimiter(USER_LOOKUP_THREADS)
        self.per_uid: Counter[int] = Counter()
        self.refusal_log: dict[int, list[float]] = {}  # uid → [window start, logged, dropped]
        self.active = 0
        self.connections = 0
        self.grants: Counter[str] = Counter()
        self.denials: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)
        self.started = time.monotonic()

    # --- lifecycle ---------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until SIGTERM or SIGINT, then stop accepting and let clients finish.

        Tells systemd READY=1 once accepting, STATUS= as counts change, STOPPING=1 at the
        end; pings the watchdog if WatchdogSec= is set.
        """
        listener = self.intake.control
        listener.setblocking(False)  # ours (and systemd's, which never reads it)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as clients:
                async with trio.open_nursery() as main:
                    main.start_soon(self._accept_loop, listener, clients)
                    main.start_soon(self._status_loop)
                    main.start_soon(self._watchdog_loop)
                    _notify(f"READY=1\nSTATUS={self.status_line()}")
                    task_status.started()
                    async for signum in signals:
                        self.audit.log(Level.INFO, f"stopping on {signal.Signals(signum).name}")
                        break
                    main.cancel_scope.cancel()
                _notify("STOPPING=1")
                clients.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE

    async def _accept_loop(self, listener: socket.socket, clients: trio.Nursery) -> None:
        paused_since: float | None = None  # out of fds or memory: logged once, not per retry
        while True:
            await trio.lowlevel.wait_readable(listener)
            for _ in range(ACCEPT_BATCH):
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno in _IGNORED_ACCEPT_ERRNOS:
                        continue
                    if e.errno not in _BACKOFF_ERRNOS:
                        raise
                    if paused_since is None:
                        paused_since = trio.current_time()
                        self.audit.log(
                            Level.WARNING,
                            f"accept on the control socket: {e.strerror}; retrying every "
                            f"{ACCEPT_BACKOFF:g}s (raise LimitNOFILE= or lower "
                            "max_connections)",
                        )
                    await trio.sleep(ACCEPT_BACKOFF)
                    break
                if paused_since is not None:
                    paused = trio.current_time() - paused_since
                    self.audit.log(
                        Level.NOTICE,
                        f"accept on the control socket: accepting again after {paused:.1f}s",
                    )
                    paused_since = None
                conn.setblocking(False)
                self._admit(conn, clients)

    def _admit(self, conn: socket.socket, clients: trio.Nursery) -> None:
        """Start serving a new connection, or refuse it if the broker is full."""
        self.connections += 1
        if self.active >= self.config.max_connections:
            limit = self.config.max_connections
            self._refuse_busy(conn, f"the broker is serving its limit of {limit} "
                                    "connections; retry shortly")  # fmt: skip
            return
        self.active += 1
        clients.start_soon(self._handle, conn)

    async def _status_loop(self) -> None:
        last = ""
        while True:
            await trio.sleep(STATUS_INTERVAL)
            self._flush_refusals()
            line = self.status_line()
            if line != last:
                _notify(f"STATUS={line}")
                last = line

    async def _watchdog_loop(self) -> None:
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", str(os.getpid()))
        if not usec.isdigit() or pid != str(os.getpid()):
            return
        while True:
            _notify("WATCHDOG=1")
            await trio.sleep(int(usec) / 2e6)

    # --- one connection ----------------------------------------------------------

    def _refuse_busy(self, conn: socket.socket, message: str) -> None:
        """Tell a client over a limit to retry, without a task or a wait: a flood of
        connections costs one fd each for no longer than this call. Closes `conn`."""
        self.refusals[Code.BUSY] += 1
        reply = encode_reply(Refusal(Code.BUSY, message))
        with conn, suppress(OSError):  # a full buffer or a vanished peer: just close
            conn.send(reply)  # non-blocking

    async def _handle(self, conn: socket.socket) -> None:
        try:
            with conn:
                try:
                    peer = peer_credentials(conn, groups=self.policy.names_groups)
                except OSError:
                    return  # gone before we could ask the kernel who it was
                limit = self.config.max_connections_per_user
                if self.per_uid[peer.uid] >= limit:
                    self._refuse_busy(
                        conn,
                        f"uid {peer.uid} already has {limit} connections to the broker, its "
                        f"limit (max_connections_per_user in {self.policy.source}); retry shortly",
                    )
                    return
                self.per_uid[peer.uid] += 1
                try:
                    hit = self.users.cached(peer.uid)  # the common case: no await
                    peer = peer.with_user(*hit) if hit else await self._with_user(peer)
                    await self._converse(conn, peer)
                finally:
                    self.per_uid[peer.uid] -= 1
                    if not self.per_uid[peer.uid]:
                        del self.per_uid[peer.uid]
        except Exception as e:  # one client's trouble must never stop the others
            self.refusals[Code.INTERNAL] += 1
            self.audit.log(
                Level.ERROR,
                f"internal error serving a client: {e!r}",
                EXCEPTION=traceback.format_exc(limit=20),
            )
        finally:
            self.active -= 1

    async def _with_user(self, peer: Peer) -> Peer:
        """Add the user database's name and groups after a cache miss, asking NSS in a
        thread; a lookup slower than `client_timeout` leaves them out (and says so)."""
        hit = None
        with trio.move_on_after(self.config.client_timeout):
            hit = await trio.to_thread.run_sync(
                UserDatabase.query, peer.uid, limiter=self.lookups, abandon_on_cancel=True
            )
        if hit is None:
            # Remembered like an answer, so that the next clients of this uid do not
            # each wait (and log) again: uid and unit rules still hold meanwhile.
            hit = (None, frozenset())
            self.audit.log(
                Level.WARNING,
                f"the user database did not answer for uid {peer.uid} within "
                f"{self.config.client_timeout:g}s; going on without its user name and "
                f"groups for {USER_CACHE_SECONDS:g}s (check NSS: sssd, LDAP, nscd)",
            )
        self.users.store(peer.uid, hit)
        return peer.with_user(*hit)

    async def _converse(self, conn: socket.socket, peer: Peer) -> None:
        """Answer requests until the peer closes, errs, runs out of time, or has made
        MAX_REQUESTS_PER_CONNECTION requests.

        Each request, and each reply, gets `client_timeout` seconds: one cancel scope
        whose deadline moves on at every step (cheaper than a scope per step).
        """
        buffer = LineBuffer(MAX_REQUEST_BYTES)
        timeout = self.config.client_timeout
        reading = True
        with trio.CancelScope() as deadline:
            for count in range(MAX_REQUESTS_PER_CONNECTION):
                if count:  # requests may all be buffered: let the others in between
                    await trio.lowlevel.checkpoint()
                reading = True
                deadline.deadline = trio.current_time() + timeout
                try:
                    line = await _read_line(conn, buffer)
                    if line is None:
                        return
                    request = parse_request(line)
                except ProtocolError as e:
                    reading = False  # one refusal: not a timeout too if this one is slow
                    await self._protocol_error(conn, peer, e)
                    return
                reading = False
                deadline.deadline = trio.current_time() + timeout
                try:
                    await self._answer(conn, peer, request)
                except OSError as e:
                    self.audit.log(Level.NOTICE, f"dropped {peer.describe()}: {e.strerror}")
                    return
        if deadline.cancelled_caught and reading:
            message = f"no complete request within {timeout:g} seconds"
            await self._protocol_error(conn, peer, ProtocolError(Code.TIMEOUT, message))
        # A peer that stopped reading its replies is simply dropped.

    async def _protocol_error(self, conn: socket.socket, peer: Peer, error: ProtocolError) -> None:
        self.refusals[error.code] += 1
        if self._may_log_refusal(peer.uid):
            self.audit.log(
                Level.NOTICE,
                f"refused {peer.describe()}: {error.message}",
                REFUSAL_CODE=str(error.code),
                PEER_UID=peer.uid,
                PEER_PID=peer.pid,
            )
        with trio.move_on_after(REFUSAL_SEND_TIMEOUT), _peer_gone():
            await _send(conn, encode_reply(Refusal(error.code, error.message)))

    async def _answer(self, conn: socket.socket, peer: Peer, request: Request) -> None:
        """Answer one request.

        Raises:
            OSError: if the reply cannot be sent; the connection should be dropped.
        """
        try:
            if isinstance(request, Acquire):
                reply, fds, reasons = self._decide(request, peer)
            else:
                reply, fds, reasons = self._inquire(request, peer), [], []
        except Exception as e:  # a bug of ours: say so (docs/protocol.md), keep serving
            self.refusals[Code.INTERNAL] += 1
            self.audit.log(
                Level.ERROR,
                f"internal error answering {peer.describe()}: {e!r}",
                EXCEPTION=traceback.format_exc(limit=20),
            )
            message = "the broker failed on this request; its log has the details"
            reply, fds, reasons = Refusal(Code.INTERNAL, message), [], []
        data = encode_reply(reply)
        if not fds:
            await _send(conn, data)
            return
        sent = await _send_fds(conn, data, fds)
        for name, reason in reasons:  # granted: the peer has the fds from here on
            self.grants[name] += 1
            self._record(True, peer, name, reason)
        await _send(conn, memoryview(data)[sent:])

    # --- decisions (synchronous: no awaits between check and use) ---------------

    def _decide(
        self, request: Acquire, peer: Peer
    ) -> tuple[Reply, list[int], list[tuple[str, str]]]:
        """Return the reply, the fds to attach and (name, reason) per grant: all or none."""
        fds: list[int] = []
        infos = []
        reasons = []
        for name in request.names:
            sockets = self.intake.held.get(name)
            if not sockets:
                self.refusals[Code.UNKNOWN_SOCKET] += 1
                # Name only what this peer may have: `list` shows no more either.
                mine = [n for n in sorted(self.intake.held) if self.policy.may_acquire(n, peer)]
                message = f"no socket named {name!r} (you may acquire: {', '.join(mine) or 'none'})"
                self._record(False, peer, name, message, Code.UNKNOWN_SOCKET)
                return Refusal(Code.UNKNOWN_SOCKET, message), [], []
            decision = self.policy.check_acquire(name, peer)
            if not decision.allowed:
                self.denials[name] += 1
                self.refusals[Code.DENIED] += 1
                self._record(False, peer, name, decision.reason, Code.DENIED)
                return Refusal(Code.DENIED, decision.reason), [], []
            reasons.append((name, decision.reason))
            for held_socket in sockets:
                fds.append(held_socket.sock.fileno())
                infos.append(held_socket.info)
        if len(fds) > SCM_MAX_FD:
            self.refusals[Code.TOO_LARGE] += 1
            message = (
                f"request would pass {len(fds)} fds; at most {SCM_MAX_FD} per request: "
                "ask for fewer names at a time"
            )
            self._record(False, peer, ",".join(request.names), message, Code.TOO_LARGE)
            return Refusal(Code.TOO_LARGE, message), [], []
        return Granted(tuple(infos)), fds, reasons

    def _inquire(self, request: Request, peer: Peer) -> Reply:
        if isinstance(request, Status):
            decision = self.policy.check_status(peer)
            if not decision.allowed:
                self.refusals[Code.DENIED] += 1
                if self._may_log_refusal(peer.uid):
                    self.audit.log(Level.NOTICE, f"denied the status report to {peer.describe()}",
                                   DECISION="deny", OPERATION="status", PEER_UID=peer.uid,
                                   PEER_PID=peer.pid, REASON=decision.reason[:512])  # fmt: skip
                return Refusal(Code.DENIED, decision.reason)
            return StatusReport(self.report())
        return Listing(
            tuple(
                held.info
                for name, sockets in self.intake.held.items()
                if self.policy.may_acquire(name, peer)
                for held in sockets
            )
        )

    def _record(
        self, allowed: bool, peer: Peer, name: str, reason: str, code: Code | None = None
    ) -> None:
        if allowed or self._may_log_refusal(peer.uid):
            self.audit.decision(allowed, peer, name, reason, None if code is None else str(code))
        self.recent.append(
            {
                "time": time.time(),
                "decision": "grant" if allowed else "deny",
                "socket": name,
                "uid": peer.uid,
                "user": peer.user,
                "pid": peer.pid,
                "unit": peer.unit,
                "reason": reason,
            }
        )

    def _may_log_refusal(self, uid: int) -> bool:
        """Whether another refusal of `uid` may be logged now (REFUSAL_LOG_BURST per
        REFUSAL_LOG_WINDOW); the others are counted and summed up when the window ends."""
        now = trio.current_time()
        window = self.refusal_log.get(uid)
        if window is not None and now - window[0] >= REFUSAL_LOG_WINDOW:
            self._end_window(uid, window)
            window = None
        if window is None:
            if len(self.refusal_log) >= REFUSAL_LOG_UIDS:
                self._flush_refusals(everything=True)
            window = self.refusal_log[uid] = [now, 0, 0]
        if window[1] < REFUSAL_LOG_BURST:
            window[1] += 1
            return True
        window[2] += 1
        return False

    def _end_window(self, uid: int, window: list[float]) -> None:
        del self.refusal_log[uid]
        if window[2]:
            self.audit.log(
                Level.NOTICE,
                f"{int(window[2])} more refusals of uid {uid} in {REFUSAL_LOG_WINDOW:g} s "
                "were not logged",
                PEER_UID=uid,
                SUPPRESSED=int(window[2]),
            )

    def _flush_refusals(self, *, everything: bool = False) -> None:
        """End the refusal-log windows that are over (all of them, if `everything`)."""
        now = trio.current_time()
        for uid, window in list(self.refusal_log.items()):
            if everything or now - window[0] >= REFUSAL_LOG_WINDOW:
                self._end_window(uid, window)

    # --- reporting ---------------------------------------------------------------

    def status_line(self) -> str:
        """One line for systemd's STATUS=: what is held, granted, denied, connected."""
        names = ", ".join(self.intake.held) or "nothing"
        return (
            f"Holding {names}; {sum(self.grants.values())} grants, "
            f"{sum(self.denials.values())} denials, {self.active} clients"
        )

    def report(self) -> dict[str, Any]:
        """The status report (its shape is documented in docs/protocol.md)."""
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": round(time.monotonic() - self.started, 3),
            "config": self.config.path,
            "connections": {
                "active": self.active,
                "total": self.connections,
                "limit": self.config.max_connections,
            },
            "sockets": [
                {**held.info.to_json(), "grants": self.grants[name], "denials": self.denials[name]}
                for name, sockets in self.intake.held.items()
                for held in sockets
            ],
            "grants": sum(self.grants.values()),
            "denials": sum(self.denials.values()),
            "refusals": dict(self.refusals),
            "recent": list(self.recent),
        }


# --- I/O helpers ------------------------------------------------------------------


def _peer_gone() -> suppress:
    """Swallow the errors of writing to a client that has gone away."""
    return suppress(BrokenPipeError, ConnectionResetError)


# Connections are non-blocking stdlib sockets driven with trio's readiness waits: a
# system call that can complete at once does, with no trip through the scheduler (trio's
# socket wrappers take two per call). Each helper waits only when the kernel says so.


async def _read_line(conn: socket.socket, buffer: LineBuffer) -> bytes | None:
    """Return the next request line, or None at end of stream.

    Raises:
        ProtocolError: TOO_LARGE if the request exceeds its limit.
    """
    while True:
        line = buffer.next_line()
        if line is not None:
            return line
        try:
            data = conn.recv(RECV_CHUNK)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(conn)
            continue
        except OSError:  # ECONNRESET and the like: the peer is gone, as at EOF
            return None
        if not data:
            return None  # a half-sent request at EOF is dropped: nobody to answer
        buffer.feed(data)


async def _send(conn: socket.socket, data: bytes | memoryview) -> None:
    """Send all of `data`."""
    view = memoryview(data)
    while view:
        try:
            view = view[conn.send(view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(conn)


async def _send_fds(conn: socket.socket, data: bytes, fds: list[int]) -> int:
    """Send the start of `data` with `fds` riding on its first byte as one SCM_RIGHTS;
    return how many bytes went (at least one). Once this returns the peer has the fds,
    whatever happens to the rest of `data`."""
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
    while True:
        try:
            return conn.sendmsg([data], ancillary)
        except BlockingIOError:  # nothing went, fds included
            await trio.lowlevel.wait_writable(conn)
