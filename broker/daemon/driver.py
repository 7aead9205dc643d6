"""The broker's trio driver: its lifecycle, the accept loop's admissions, and one task
per connection.

Each connection takes a slot as it is accepted (broker/daemon/admission.py, knowing only
the peer's uid), then is served by its own task: identify the peer from the kernel,
count it against its uid and its share, then move bytes between the socket and the
connection's rules (broker/daemon/conversation.py, broker/daemon/connection.py), which
decide every reply; outcomes go to the ledger (broker/daemon/ledger.py). A slow,
silent, malformed or vanishing client costs one task and one fd until its deadline,
never anyone else's time. Everything is bounded: connections (`max_connections`,
`max_connections_per_user`), request size and count, time per request and reply
(`client_timeout`), and the shutdown grace.

The configuration in force is one value (`standing`, broker/daemon/standing.py),
replaced whole by one assignment at each reload.

Ownership: the driver owns each accepted connection and closes it when its task ends,
on every path. It never owns, accepts on or changes a granted socket: those belong to
the `Intake`, and the kernel duplicates them into each reply.

Must never: decide what a connection's rules decide (broker/daemon/connection.py), let
one client's failure stop the others, or change the configuration in force but by
replacing `standing` whole.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import time
import traceback
from collections.abc import Callable
from contextlib import suppress

import trio

from broker import __version__, status
from broker.daemon.accepting import accept_loop
from broker.daemon.activation import CONTROL_BACKLOG, Intake
from broker.daemon.admission import Admission
from broker.daemon.audit import Audit
from broker.daemon.config import Config
from broker.daemon.connection import Connection, refuse_busy
from broker.daemon.conversation import converse, until_taken
from broker.daemon.identity import Marks, Peer, Ucred, peer_credentials, peer_marks, peer_ucred
from broker.daemon.inflight import Delivery, InFlight
from broker.daemon.ledger import Ledger
from broker.daemon.lifecycle import stop_on_signals, stop_when_idle
from broker.daemon.reload import Reloader
from broker.daemon.sdnotify import keep_watchdog, notify, publish_status
from broker.daemon.standing import Standing
from broker.daemon.users import UserDatabase


class Broker:
    """Serves one `Intake` under the configuration in force (`standing`).

    Args:
        intake: The control socket and the held sockets; the broker serves them but
            the caller keeps ownership (closes them after `serve` returns).
        config: Policy and limits, until a reload replaces them.
        audit: Where grants and denials are recorded.
        restartable: Whether something starts the broker again on the next connection
            (systemd did start it, from its sockets): only then does `idle_exit` apply.

    Raises:
        ConfigError: `config` has rules for sockets the intake does not hold.
    """

    def __init__(
        self, intake: Intake, config: Config, audit: Audit, *, restartable: bool = False
    ) -> None:
        self.intake = intake
        self.restartable = restartable
        held = {n: tuple((h.sock.fileno(), h.info) for h in hs) for n, hs in intake.held.items()}
        self.standing = Standing.first(config, held, time.time())
        self.audit = audit
        self.ledger = Ledger(audit, trio.current_time)
        self.users = UserDatabase(self.ledger.warning)
        self.admission = Admission(lambda: self.standing.limits, trio.current_time)
        self.inflight = InFlight()
        self.started = time.monotonic()
        self.reloader = Reloader(audit, notify, self.status_line)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until SIGTERM or SIGINT (or idle_exit), then stop accepting and let
        clients finish; reload on SIGHUP. Tells systemd READY=1 once accepting, STATUS=
        as counts change, STOPPING=1 at the end; pings the watchdog if WatchdogSec= is
        set."""
        listener = self.intake.control
        listener.setblocking(False)  # ours (and systemd's, which never reads it)
        listener.listen(CONTROL_BACKLOG)  # the backlog only: it stays the same socket
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as clients:
                async with trio.open_nursery() as main:
                    main.start_soon(accept_loop, listener, self._admitter(clients), self.audit)
                    main.start_soon(publish_status, self.status_line, self.ledger.limiter.flush)
                    main.start_soon(keep_watchdog)
                    on_hup = functools.partial(self.reload, signalled=True)
                    reload = functools.partial(self.reloader.ask, main, on_hup)
                    main.start_soon(stop_on_signals, signals, reload, self.audit, main, clients)
                    if self.restartable:
                        main.start_soon(functools.partial(
                            stop_when_idle, self.admission, self.intake, self.audit, main,
                            idle_exit=lambda: self.standing.config.idle_exit,
                            reloading=lambda: self.reloader.busy,
                        ))  # fmt: skip
                    notify(f"READY=1\nSTATUS={self.status_line()}")
                    task_status.started()
                notify("STOPPING=1")
            self.ledger.limiter.flush(everything=True)  # sum up what was left out

    async def reload(self, *, signalled: bool = False) -> tuple[status.Configuration, str | None]:
        """Reload (SIGHUP, or a `reload` request): what is in force once it is done, and
        why the new configuration was refused, if it was."""
        self.standing, refused = await self.reloader.reload(
            lambda: self.standing, signalled=signalled
        )
        return self.standing.report(), refused

    def _admitter(self, clients: trio.Nursery) -> Callable[[socket.socket], bool]:
        def admit(conn: socket.socket) -> bool:
            """Start serving a new connection, or refuse it (full, or too fast)."""
            ucred = peer_ucred(conn)
            uid = None if ucred is None else ucred[1]
            refusal = self.admission.admit(uid, functools.partial(peer_marks, conn))
            if refusal is not None:
                _refuse_busy(conn, refusal, self.ledger)
                return False
            clients.start_soon(self._handle, conn, ucred)
            return True

        return admit

    async def _handle(self, conn: socket.socket, ucred: Ucred | None) -> None:
        try:
            with conn:
                try:
                    peer = peer_credentials(
                        conn, groups=self.standing.policy.names_groups, ucred=ucred
                    )
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
                    connection = Connection(peer, lambda: self.standing, self.report,
                                            timeout=timeout)  # fmt: skip
                    await converse(conn, connection, self.ledger, self.reload, delivery)
                    await until_taken(delivery, connection, self.ledger)
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
        if peer.mapped and peer.uid in self.standing.limits.named_uids:
            return Marks()
        return self.standing.policy.naming(self.users.known(peer))

    def status_line(self) -> str:
        """One line for systemd's STATUS=: what is held, granted, denied, connected."""
        names = ", ".join(self.intake.held) or "nothing"
        return (
            f"Holding {names}; {self.ledger.grants.total()} grants, "
            f"{self.ledger.denials.total()} denials, {self.admission.active} clients"
        )

    def report(self) -> status.Report:
        """The status report (broker/status.py has its schema)."""
        ledger, standing = self.ledger, self.standing
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": round(time.monotonic() - self.started, 3),
            "config": standing.config.path,
            "configuration": standing.report(),
            "connections": self.admission.report(),
            "sockets": ledger.sockets(standing.held),
            "grants": ledger.grants.total(),
            "denials": ledger.denials.total(),
            "refusals": dict(ledger.refusals),
            "recent": list(ledger.recent),
            "log": {"suppressed": ledger.limiter.suppressed, "lost": self.audit.lost},
            "unread": self.inflight.report(),
        }


def _refuse_busy(conn: socket.socket, message: str, ledger: Ledger) -> None:
    """Tell a client over a limit to retry (rule 10), without a task or a wait: a flood
    of connections costs one fd each for no longer than this call. Closes `conn`."""
    ledger.busy()
    with conn, suppress(OSError):  # a full buffer or a vanished peer: just close
        conn.send(refuse_busy(message).data)  # non-blocking
