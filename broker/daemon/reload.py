"""Reloading the configuration while serving (SIGHUP, `systemctl reload`): load it again
in a child interpreter, put it in force if it is valid, else keep the one in force and
say why (in the log and in `status`).

The child is a fresh interpreter, not a fork: the serving broker has threads (trio's,
the user-database lookups'), and forking them is unsafe.

A reload is asked for by SIGHUP (nobody waits for it), or over the control socket by
`port-broker reload` (systemd's ExecReload=), which waits and is told how it went: so
`systemctl reload` returns once the new policy is in force, and fails if it was refused.

Must never: let a failed reload, of any kind, stop the broker or change the policy in
force; run two reloads at once (a SIGHUP during one makes it run once more).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from broker.daemon import loader
from broker.daemon.audit import Level
from broker.errors import BrokerError

if TYPE_CHECKING:
    from broker.daemon.audit import Audit
    from broker.daemon.config import Config
    from broker.daemon.standing import Standing


class Reloader:
    """Runs reloads one at a time, in the order they were asked for.

    Args:
        audit: Where the outcome is logged.
        notify: sd_notify (RELOADING=1 before, READY=1 after).
        status_line: What systemd's STATUS= says once a reload is done.
    """

    def __init__(
        self, audit: Audit, notify: Callable[[str], None], status_line: Callable[[], str]
    ) -> None:
        self._audit = audit
        self._notify = notify
        self._status_line = status_line
        self._turn = trio.Lock()
        self._signalled = False  # a reload for SIGHUP is waiting for its turn

    def ask(self, nursery: trio.Nursery, reload: Callable[[], Awaitable[object]]) -> None:
        """SIGHUP: start `reload` (which calls `reload(..., signalled=True)`), unless
        one asked for by a signal already waits for its turn: signals that come while
        one waits are one reload, not one each."""
        if not self._signalled:
            self._signalled = True
            nursery.start_soon(reload)

    async def reload(
        self, current: Callable[[], Standing], *, signalled: bool = False
    ) -> tuple[Standing, str | None]:
        """Reload once the running reload, if any, is done: the configuration to put in
        force now (the new one, or `current()` noting the refusal) and why the new one
        was refused, if it was. The caller puts it in force before its next checkpoint,
        so that the next reload, which waits for this one's turn, starts from it."""
        async with self._turn:
            if signalled:
                self._signalled = False
            return await self._run(current())

    async def _run(self, standing: Standing) -> tuple[Standing, str | None]:
        now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._notify(f"RELOADING=1\nMONOTONIC_USEC={now_us}")
        path = standing.config.path
        reason = None
        try:
            # A default file that was missing at start is not "asked for" now.
            config = await self._load(path if standing.config.exists else None)
            standing = standing.replaced(config, time.time())
        except Exception as e:  # the configuration in force stays, whatever failed
            reason = e.message if isinstance(e, BrokerError) else f"{path}: {e!r}"
            if not isinstance(e, BrokerError):
                self._audit.log(Level.ERROR, f"reloading {path} failed: {e!r}",
                                EXCEPTION=traceback.format_exc(limit=20))  # fmt: skip
            standing = standing.refusing(reason, time.time())
            reason += f"; generation {standing.generation} of {path} stays in force"
            self._audit.log(Level.WARNING, f"refused the new configuration: {reason}")
        else:
            self._audit.log(
                Level.INFO, f"reloaded {path}: generation {standing.generation} in force"
            )
        self._notify(f"READY=1\nSTATUS={self._status_line()}")
        return standing, reason

    @property
    def busy(self) -> bool:
        """Whether a reload runs or waits for its turn."""
        return self._turn.locked() or self._signalled

    @staticmethod
    async def _load(path: str | None) -> Config:
        """`loader.Load(path)`, waited for in a thread (it is bounded by LOAD_TIMEOUT);
        cancelled (the broker stops), the child is killed, not left behind."""
        load = loader.Load(path)
        try:
            return await trio.to_thread.run_sync(load.result, abandon_on_cancel=True)
        except trio.Cancelled:
            load.kill()
            raise
