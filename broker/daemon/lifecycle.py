"""When the broker stops serving: on SIGTERM or SIGINT, giving the clients in the
middle of a request SHUTDOWN_GRACE; and, if systemd started it and `idle_exit` is set
(it is not by default), once idle, so that an idle broker costs no memory: systemd keeps
every socket and starts the broker again on the next connection to any of them
(docs/configuration.md says when that pays and what it costs).

An exit must lose nothing and loop nowhere. A connection that arrives while the broker
stops waits in the control socket's queue, and the next start accepts it; no exit
happens while a client is connected or a grant is unread (both hold a connection slot).
A socket the broker holds with a connection or a datagram waiting and no worker to take
it would make systemd start the broker again at once, and again after each exit: so the
broker does not exit while one waits. And a restart must forgive nothing an attacker
spent: the broker exits only once its rate buckets are full again and its log windows
have ended (IDLE_FLOOR), so that a new one starts as the old one would have gone on. What
it forgets is only in workers' disfavour: the marks of peers found named by a group or a
unit, so a worker named that way counts against the rates with its first connection
again, as after a boot (broker/daemon/admission.py).

Must never: cut short a client that came while the broker stopped for idleness (it is
served whole), or give one more than SHUTDOWN_GRACE after a signal; stop for idleness
while a client is connected, a reload runs, records wait for the journal or anything
waits on a socket the broker holds or on its control socket, or sooner than IDLE_FLOOR
after the last connection.
"""

from __future__ import annotations

import select
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Final

import trio

from broker.daemon import admission
from broker.daemon.activation import Intake
from broker.daemon.audit import Audit, Level
from broker.daemon.ledger import REFUSAL_LOG_WINDOW

SHUTDOWN_GRACE: Final = 1.0
"""Seconds clients in the middle of a request get after SIGTERM: far more than a grant
takes, and well inside systemd's TimeoutStopSec."""

IDLE_CHECK: Final = 1.0
"""Seconds between looks while `idle_exit` is set: a second late is nothing against
the least idle_exit (IDLE_FLOOR)."""

IDLE_FLOOR: Final = max(
    REFUSAL_LOG_WINDOW,
    admission.UNNAMED_BURST / admission.UNNAMED_RATE,
    admission.UNNAMED_TOTAL_BURST / admission.UNNAMED_TOTAL_RATE,
)
"""The least time without a connection before an exit, whatever idle_exit says: by
then every log window has ended and every rate bucket is full (10 s)."""

IDLE_OFF_CHECK: Final = IDLE_FLOOR
"""Seconds between looks at whether a reload set `idle_exit` while it is 0 (the
default): an idle broker that never exits wakes up this seldom for it."""


async def until_idle(
    slots: admission.Admission,
    idle_exit: Callable[[], float],
    busy: Callable[[], bool],
    sockets: Iterable[socket.socket],
    *,
    floor: float = IDLE_FLOOR,
) -> float:
    """Return once no connection has come for `idle_exit()` seconds (the value in force
    at each look; 0: never) and at least `floor`, none is served, the broker is not
    `busy()` (a reload, records for the journal) and nothing waits on `sockets`: how long
    that was."""
    poller = select.poll()
    for sock in sockets:
        poller.register(sock, select.POLLIN)
    seen, since = slots.connections, trio.current_time()
    while True:
        if not idle_exit():  # off: idleness counts from when a reload sets it
            await trio.sleep(IDLE_OFF_CHECK)
            seen, since = slots.connections, trio.current_time()
            continue
        await trio.sleep(IDLE_CHECK)
        now, wanted = trio.current_time(), idle_exit()
        if slots.connections != seen or slots.active or busy() or poller.poll(0):
            seen, since = slots.connections, now
        elif wanted and now - since >= max(wanted, floor):
            return now - since


async def stop_on_signals(
    signals: AsyncIterator[int],
    reload: Callable[[], None],
    audit: Audit,
    main: trio.Nursery,
    clients: trio.Nursery,
) -> None:
    """Call `reload` on each SIGHUP; on SIGTERM or SIGINT, stop accepting (cancel `main`)
    and give the connected `clients` SHUTDOWN_GRACE."""
    async for signum in signals:
        if signum == signal.SIGHUP:
            reload()
            continue
        audit.log(Level.INFO, f"stopping on {signal.Signals(signum).name}")
        clients.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE
        main.cancel_scope.cancel()
        return


async def stop_when_idle(
    slots: admission.Admission,
    intake: Intake,
    audit: Audit,
    main: trio.Nursery,
    *,
    idle_exit: Callable[[], float],
    reloading: Callable[[], bool],
) -> None:
    """Stop accepting (cancel `main`) once `until_idle` returns, looking at every socket
    of `intake`, and with no record left for the journal; a client that came meanwhile
    is served to its end."""
    held = [h.sock for group in intake.held.values() for h in group]
    idle = await until_idle(
        slots, idle_exit, lambda: reloading() or audit.unsent > 0, [*held, intake.control]
    )
    audit.log(
        Level.INFO,
        f"no client for {idle:.0f} s (idle_exit): exiting; systemd starts the broker again "
        "on the next connection",
    )
    main.cancel_scope.cancel()
