"""One connection's bytes, on trio: carry out what its `Connection` decides (read, send
with fds, reload, close), within the deadlines it sets, and record what came of it.

Connections are non-blocking stdlib sockets driven with trio's readiness waits: a
system call that can complete at once does, with no trip through the scheduler (trio's
socket wrappers take two per call); each helper waits only when the kernel says so, and
only then is the deadline armed (setting a cancel scope's deadline costs as much as a
small request).

Must never: decide anything the connection's rules decide; wait without a deadline but
where those rules say so (a reload, rule 8; unread grants, broker/daemon/inflight.py rule
2, which keep the connection's slot on purpose); or close the connection (its owner, the
driver, does).
"""

from __future__ import annotations

import array
import errno
import math
import socket
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from broker import status
from broker.daemon.connection import CLOSE, NEED_DATA, RELOAD, Connection, Send
from broker.daemon.inflight import Delivery
from broker.daemon.ledger import Ledger
from broker.protocol import MAX_REQUEST_BYTES

RECV_CHUNK: Final = MAX_REQUEST_BYTES
"""Bytes asked of the kernel per recv(): a whole request in one call."""

Reload = Callable[[], Awaitable[tuple[status.Configuration, str | None]]]
"""The driver's reload, for a connection that asked for one (rule 8)."""


class _Deadline:
    """The connection's current deadline: when it falls due, and the scope that enforces
    it, armed only before a wait."""

    def __init__(self, scope: trio.CancelScope) -> None:
        self.scope = scope
        self.due = math.inf

    def arm(self) -> None:
        if self.scope.deadline != self.due:
            self.scope.deadline = self.due


async def converse(
    conn: socket.socket,
    connection: Connection,
    ledger: Ledger,
    reload: Reload,
    delivery: Delivery,
) -> None:
    """Move bytes until the connection's rules say close."""
    waits = 0
    while True:
        with trio.CancelScope() as scope:
            deadline = _Deadline(scope)
            while True:
                if connection.waits != waits:
                    waits = connection.waits
                    wait = connection.wait
                    deadline.due = math.inf if wait is None else trio.current_time() + wait
                action = connection.next_action()
                if action is NEED_DATA:
                    connection.receive_data(await _receive(conn, deadline))
                elif action is RELOAD:
                    deadline.arm()  # none (rule 8): the reloads are bounded on their own
                    connection.reloaded(*await reload())
                elif action is CLOSE:
                    return
                elif await _send_reply(conn, action, connection, ledger, delivery,
                                       deadline=deadline):  # fmt: skip
                    connection.sent()
                    # Let the others in before this client's next request (it may be
                    # buffered already); by then a client that is done has usually
                    # closed, and the next read finds the end of stream without a wait.
                    await trio.lowlevel.cancel_shielded_checkpoint()
        connection.timed_out()  # the scope's deadline passed: rules 2 and 5 say what now


async def _send_reply(
    conn: socket.socket,
    send: Send,
    connection: Connection,
    ledger: Ledger,
    delivery: Delivery,
    *,
    deadline: _Deadline,
) -> bool:
    """Send a reply, recording its outcomes now and its grants once its fds went; a
    grant waits until the peer has read the last one's fds (broker/daemon/inflight.py).
    Return whether it went whole (else the connection has been told why not)."""
    peer = connection.peer
    try:
        if send.fds:
            deadline.arm()
            await delivery.wait_taken()
            try:
                sent = await _send_fds(conn, send.data, list(send.fds), deadline)
            except OSError as e:
                if e.errno != errno.ETOOMANYREFS:
                    raise
                connection.undeliverable(delivery.inflight.refused())  # rule 9
                return False
            delivery.sent(len(send.fds))
            for grant in send.grants:  # the peer has the fds from here on
                ledger.record(grant, peer)
            rest = memoryview(send.data)[sent:]
        else:
            rest = memoryview(send.data)
        for outcome in send.outcomes:
            ledger.record(outcome, peer)
        await _send(conn, rest, deadline)
    except OSError as e:
        if not send.final:  # a last refusal to a peer already gone is no news
            ledger.notice(peer, f"dropped {peer.describe()}: {e.strerror}", PEER_PID=peer.pid)
        connection.gone()
        return False
    return True


async def until_taken(delivery: Delivery, connection: Connection, ledger: Ledger) -> None:
    """Keep a done connection (and its slot) until its peer has read the fds sent to
    it, or closed (broker/daemon/inflight.py, rule 2)."""
    if delivery.taken():
        return
    peer = connection.peer
    ledger.notice(
        peer,
        f"{peer.describe()} has not read the {delivery.fds} socket(s) granted to it; its "
        "connection keeps its place among its uid's connections until it does, or closes",
        PEER_PID=peer.pid,
        UNREAD_FDS=delivery.fds,
    )
    await delivery.wait_taken()


async def _receive(conn: socket.socket, deadline: _Deadline) -> bytes:
    """Return what the peer sent next; b"" at end of stream or if it is gone."""
    while True:
        try:
            return conn.recv(RECV_CHUNK)
        except BlockingIOError:
            deadline.arm()
            await trio.lowlevel.wait_readable(conn)
        except OSError:  # ECONNRESET and the like: the peer is gone, as at EOF
            return b""


async def _send(conn: socket.socket, data: memoryview, deadline: _Deadline) -> None:
    """Send all of `data`."""
    while data:
        try:
            data = data[conn.send(data) :]
        except BlockingIOError:
            deadline.arm()
            await trio.lowlevel.wait_writable(conn)


async def _send_fds(conn: socket.socket, data: bytes, fds: list[int], deadline: _Deadline) -> int:
    """Send the start of `data` with `fds` riding on its first byte as one SCM_RIGHTS;
    return how many bytes went (at least one). Once this returns the peer has the fds,
    whatever happens to the rest of `data`."""
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
    while True:
        try:
            return conn.sendmsg([data], ancillary)
        except BlockingIOError:  # nothing went, fds included
            deadline.arm()
            await trio.lowlevel.wait_writable(conn)
