"""The broker's trio driver: accept control connections, move their bytes, keep time.

Each connection takes a slot as it is accepted (broker/daemon/admission.py, knowing only the
peer's uid), then is served by its own task: identify the peer from the kernel, count
it against its uid and its share, then move bytes between the socket and the
connection's rules (broker/daemon/connection.py), which decide every reply; outcomes go to the
ledger (broker/daemon/ledger.py). A slow, silent, malformed or vanishing client costs one task and
one fd until its deadline, never anyone else's time. Everything is bounded:
connections (`max_connections`, `max_connections_per_user`), request size and count,
time per request and reply (`client_timeout`), and the shutdown grace.

Ownership: the server owns each accepted connection and closes it when its task ends,
on every path. It never owns, accepts on or changes a granted socket: those belong to
the `Intake`, and the kernel duplicates them into each reply.
"""

from __future__ import annotations

import array
import errno
import functools
import math
import os
import signal
import socket
import time
import traceback
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Final

import trio

from broker import __version__, status
from broker.daemon.accepting import accept_loop
from broker.daemon.activation import CONTROL_BACKLOG, Intake
from broker.daemon.admission import Admission
from broker.daemon.audit import Audit, Level
from broker.daemon.config import Config, unheld_rules
from broker.daemon.connection import CLOSE, NEED_DATA, RELOAD, Connection, Holdings, Phase, Send
from broker.daemon.identity import Marks, Peer, peer_credentials, peer_marks, peer_uid
from broker.daemon.inflight import Delivery, InFlight
from broker.daemon.ledger import Ledger
from broker.daemon.reload import Reloader, Standing
from broker.daemon.sdnotify import keep_watchdog, notify, publish_status
from broker.daemon.users import UserDatabase
from broker.errors import Code, ConfigError
from broker.protocol import MAX_REQUEST_BYTES, Refusal, encode_reply

SHUTDOWN_GRACE: Final = 1.0
"""Seconds clients in the middle of a request get after SIGTERM: far more than a grant
takes, and well inside systemd's TimeoutStopSec."""

REFUSAL_SEND_TIMEOUT: Final = 0.5
"""Seconds we try to tell a client why it is dropped (a protocol error, a timeout)
before giving up: such a client gets no more of our time than that."""

RECV_CHUNK: Final = MAX_REQUEST_BYTES
"""Bytes asked of the kernel per recv(): a whole request in one call."""


class Broker:
    """Serves one `Intake` under the configuration in force (`standing`).

    Args:
        intake: The control socket and the held sockets; the broker serves them but
            the caller keeps ownership (closes them after `serve` returns).
        config: Policy and limits, until a reload replaces them.
        audit: Where grants and denials are recorded.
    """

    def __init__(self, intake: Intake, config: Config, audit: Audit) -> None:
        self.intake = intake
        self.standing = Standing(config)
        self.audit = audit
        self.ledger = Ledger(audit, trio.current_time)
        self.users = UserDatabase(self.ledger.warning)
        self.admission = Admission(*_limits(config), trio.current_time)
        self.holdings = self._holdings(config)
        self.inflight = InFlight()
        self.started = time.monotonic()
        self.reloader = Reloader(self, audit, notify)
        self._current = lambda: self.holdings  # what connections answer from, now

    def apply(self, config: Config) -> None:
        """Put `config` in force for every request from now on (connected clients
        included); the held sockets stay as they are.

        Raises:
            ConfigError: if it has rules for sockets the broker does not hold.
        """
        problem = unheld_rules(config, self.intake.held)
        if problem is not None:
            raise ConfigError(problem)
        self.holdings = self._holdings(config)
        self.admission.limit(*_limits(config))
        self.standing.replace(config)

    def _holdings(self, config: Config) -> Holdings:
        """What connections answer from under `config` (rule 8: our uid may reload);
        tells admission whose connection rate it must not limit."""
        owner = os.geteuid()
        self.admission.named_uids = config.policy.named_uids | {0, owner}
        return Holdings(config.policy, self.intake.held, self.report, owner)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until SIGTERM or SIGINT, then stop accepting and let clients finish;
        reload on SIGHUP. Tells systemd READY=1 once accepting, STATUS= as counts
        change, STOPPING=1 at the end; pings the watchdog if WatchdogSec= is set."""
        listener = self.intake.control
        listener.setblocking(False)  # ours (and systemd's, which never reads it)
        listener.listen(CONTROL_BACKLOG)  # the backlog only: it stays the same socket
        stop = (signal.SIGTERM, signal.SIGINT)
        with trio.open_signal_receiver(*stop, signal.SIGHUP) as signals:
            async with trio.open_nursery() as clients:
                async with trio.open_nursery() as main:
                    main.start_soon(accept_loop, listener, self._admitter(clients), self.audit)
                    main.start_soon(publish_status, self.status_line, self.ledger.limiter.flush)
                    main.start_soon(keep_watchdog)
                    notify(f"READY=1\nSTATUS={self.status_line()}")
                    task_status.started()
                    async for signum in signals:
                        if signum in stop:
                            self.audit.log(Level.INFO, f"stopping on {signal.Signals(signum).name}")
                            break
                        self.reloader.ask(main)
                    main.cancel_scope.cancel()
                notify("STOPPING=1")
                clients.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE
            self.ledger.limiter.flush(everything=True)  # sum up what was left out

    def _admitter(self, clients: trio.Nursery) -> Callable[[socket.socket], bool]:
        def admit(conn: socket.socket) -> bool:
            """Start serving a new connection, or refuse it (full, or too fast)."""
            refusal = self.admission.admit(peer_uid(conn), functools.partial(peer_marks, conn))
            if refusal is not None:
                _refuse_busy(conn, refusal, self.ledger)
                return False
            clients.start_soon(self._handle, conn)
            return True

        return admit

    async def _handle(self, conn: socket.socket) -> None:
        try:
            with conn:
                try:
                    peer = peer_credentials(conn, groups=self.holdings.policy.names_groups)
                except OSError:
                    return  # gone before we could ask the kernel who it was
                uid, naming = peer.uid, self._naming(peer)
                named = naming is not None
                refusal = self.admission.admit_peer(uid, named=named, mapped=peer.mapped, by=naming)
                if refusal is not None:
                    _refuse_busy(conn, refusal, self.ledger)
                    return
                delivery = Delivery(conn, uid, self.inflight)
                try:
                    timeout = self.standing.config.client_timeout
                    peer = await self.users.complete(peer, timeout)
                    connection = Connection(peer, self._current, timeout=timeout)
                    await _converse(conn, connection, self.ledger, self._reload, delivery)
                    await _until_taken(delivery, peer, self.ledger)
                finally:
                    delivery.abandon()  # stopping, or a failure: nothing is waited for
                    self.admission.leave_peer(uid, named=named)
        except Exception as e:  # one client's trouble must never stop the others
            self.ledger.failure(
                f"internal error serving a client: {e!r}", traceback.format_exc(limit=20)
            )
        finally:
            self.admission.leave()

    def _naming(self, peer: Peer) -> Marks | None:
        """How the policy names `peer`, for admission (None: not at all); no wait."""
        if peer.mapped and peer.uid in self.admission.named_uids:
            return Marks()
        return self.holdings.policy.naming(self.users.known(peer))

    async def _reload(self) -> tuple[status.Configuration, str | None]:
        """A reload asked for over the control socket: what is in force once it is done,
        and why the new configuration was refused, if it was."""
        refused = await self.reloader.reload()
        return self.standing.report(), refused

    def status_line(self) -> str:
        """One line for systemd's STATUS=: what is held, granted, denied, connected."""
        names = ", ".join(self.intake.held) or "nothing"
        return (
            f"Holding {names}; {self.ledger.grants.total()} grants, "
            f"{self.ledger.denials.total()} denials, {self.admission.active} clients"
        )

    def report(self) -> status.Report:
        """The status report (broker/status.py has its schema)."""
        ledger = self.ledger
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": round(time.monotonic() - self.started, 3),
            "config": self.standing.config.path,
            "configuration": self.standing.report(),
            "connections": self.admission.report(),
            "sockets": ledger.sockets(self.intake.held),
            "grants": ledger.grants.total(),
            "denials": ledger.denials.total(),
            "refusals": dict(ledger.refusals),
            "recent": list(ledger.recent),
            "log": {"suppressed": ledger.limiter.suppressed, "lost": self.audit.lost},
            "unread": self.inflight.report(),
        }


def _limits(config: Config) -> tuple[int, int, str]:
    return config.max_connections, config.max_connections_per_user, config.policy.source


# --- one connection's bytes ---------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _busy_reply(message: str) -> bytes:
    return encode_reply(Refusal(Code.BUSY, message))


def _refuse_busy(conn: socket.socket, message: str, ledger: Ledger) -> None:
    """Tell a client over a limit to retry, without a task or a wait: a flood of
    connections costs one fd each for no longer than this call. Closes `conn`."""
    ledger.busy()
    with conn, suppress(OSError):  # a full buffer or a vanished peer: just close
        conn.send(_busy_reply(message))  # non-blocking


async def _converse(
    conn: socket.socket,
    connection: Connection,
    ledger: Ledger,
    reload: Callable[[], Awaitable[tuple[status.Configuration, str | None]]],
    delivery: Delivery,
) -> None:
    """Move bytes until the connection's rules say close; keep its one deadline, set
    anew as it starts reading a request and as it starts sending a reply."""
    peer = connection.peer
    with trio.CancelScope() as deadline:
        phase = None
        while True:
            if connection.phase is not phase:
                phase = connection.phase
                deadline.deadline = trio.current_time() + connection.timeout
            action = connection.next_action()
            if action is NEED_DATA:
                connection.receive_data(await _receive(conn))
                continue
            if action is CLOSE:
                return
            if action is RELOAD:
                deadline.deadline = math.inf  # bounded by the reloads: one running, then ours
                action = connection.reloaded(*await reload())
            phase = Phase.SENDING
            deadline.deadline = trio.current_time() + connection.timeout
            if action.final:
                await _send_final(conn, action, peer, ledger)
                return
            try:
                await _send_reply(conn, action, connection, ledger, delivery)
            except OSError as e:
                ledger.notice(peer, f"dropped {peer.describe()}: {e.strerror}", PEER_PID=peer.pid)
                return
            connection.sent()
            # Let the others in before this client's next request (it may already be
            # buffered); by then a client that is done has usually closed, and the
            # next read finds the end of stream without a wait.
            await trio.lowlevel.checkpoint()
    final = connection.timed_out()
    if isinstance(final, Send):
        await _send_final(conn, final, peer, ledger)


async def _send_reply(
    conn: socket.socket, send: Send, connection: Connection, ledger: Ledger, delivery: Delivery
) -> None:
    """Send a reply, recording its outcomes now and its grants once its fds went; a
    grant waits until the peer has read the last one's fds (broker/daemon/inflight.py)."""
    peer = connection.peer
    if send.fds:
        await delivery.wait_taken()  # within the reply's deadline
        try:
            sent = await _send_fds(conn, send.data, list(send.fds))
        except OSError as e:
            if e.errno != errno.ETOOMANYREFS:
                raise
            send = connection.undelivered(delivery.inflight.refused())
        else:
            delivery.sent(len(send.fds))
            for grant in send.grants:  # the peer has the fds from here on
                ledger.record(grant, peer)
            for outcome in send.outcomes:
                ledger.record(outcome, peer)
            await _send(conn, memoryview(send.data)[sent:])
            return
    for outcome in send.outcomes:
        ledger.record(outcome, peer)
    await _send(conn, send.data)


async def _until_taken(delivery: Delivery, peer: Peer, ledger: Ledger) -> None:
    """Keep a done connection (and its slot) until its peer has read the fds sent to
    it, or closed (broker/daemon/inflight.py, rule 2)."""
    if delivery.taken():
        return
    ledger.notice(
        peer,
        f"{peer.describe()} has not read the {delivery.fds} socket(s) granted to it; its "
        "connection keeps its place among its uid's connections until it does, or closes",
        PEER_PID=peer.pid,
        UNREAD_FDS=delivery.fds,
    )
    await delivery.wait_taken()


async def _send_final(conn: socket.socket, send: Send, peer: Peer, ledger: Ledger) -> None:
    """A last refusal: recorded, then tried for REFUSAL_SEND_TIMEOUT at most."""
    for outcome in send.outcomes:
        ledger.record(outcome, peer)
    with trio.move_on_after(REFUSAL_SEND_TIMEOUT), _peer_gone():
        await _send(conn, send.data)


def _peer_gone() -> suppress:
    """Swallow the errors of writing to a client that has gone away."""
    return suppress(BrokenPipeError, ConnectionResetError)


# Connections are non-blocking stdlib sockets driven with trio's readiness waits: a
# system call that can complete at once does, with no trip through the scheduler (trio's
# socket wrappers take two per call). Each helper waits only when the kernel says so.


async def _receive(conn: socket.socket) -> bytes:
    """Return what the peer sent next; b"" at end of stream or if it is gone."""
    while True:
        try:
            return conn.recv(RECV_CHUNK)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(conn)
        except OSError:  # ECONNRESET and the like: the peer is gone, as at EOF
            return b""


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
