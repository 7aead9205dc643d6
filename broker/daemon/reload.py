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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import trio

from broker.daemon import loader
from broker.daemon.audit import Level
from broker.errors import ConfigError
from broker.names import LOAD_TIMEOUT as RELOAD_TIMEOUT

if TYPE_CHECKING:
    from broker.daemon.audit import Audit
    from broker.daemon.config import Config
    from broker.status import Configuration, Refused


@dataclass
class Standing:
    """The configuration in force: which, since when, and the last reload refused.

    Attributes:
        config: The configuration in force.
        generation: 1 at start, one more at each reload put in force.
        loaded: When `config` was put in force (seconds since the epoch).
        refused: The last reload refused since then, if any.
    """

    config: Config
    generation: int = 1
    loaded: float = field(default_factory=time.time)
    refused: Refused | None = None

    def replace(self, config: Config) -> None:
        """Put `config` in force."""
        self.config = config
        self.generation += 1
        self.loaded = time.time()
        self.refused = None

    def report(self) -> Configuration:
        """The status report's `configuration`."""
        return {
            "path": self.config.path,
            "generation": self.generation,
            "loaded": round(self.loaded, 3),
            "refused": self.refused,
        }


class Reloadable(Protocol):
    """What a reload needs of the broker."""

    standing: Standing

    def apply(self, config: Config) -> None: ...

    def status_line(self) -> str: ...


class Reloader:
    """Runs reloads for `broker`, one at a time, in the order they were asked for.

    Args:
        broker: Whose configuration is reloaded.
        audit: Where the outcome is logged.
        notify: sd_notify (RELOADING=1 before, READY=1 after).
    """

    def __init__(self, broker: Reloadable, audit: Audit, notify: Callable[[str], None]) -> None:
        self._broker = broker
        self._audit = audit
        self._notify = notify
        self._turn = trio.Lock()
        self._signalled = False  # a reload for SIGHUP is waiting for its turn

    def ask(self, nursery: trio.Nursery) -> None:
        """SIGHUP: reload once the running reload, if any, is done. Signals that come
        while one waits for its turn are one reload, not one each."""
        if not self._signalled:
            self._signalled = True
            nursery.start_soon(self._on_signal)

    async def _on_signal(self) -> None:
        async with self._turn:
            self._signalled = False
            await self._run()

    async def reload(self) -> str | None:
        """Reload after the running reload, if any (`port-broker reload` waits for this);
        return why the new configuration was refused, or None if it is in force."""
        async with self._turn:
            return await self._run()

    async def _run(self) -> str | None:
        broker = self._broker
        standing = broker.standing
        now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._notify(f"RELOADING=1\nMONOTONIC_USEC={now_us}")
        path = standing.config.path
        reason = None
        try:
            # A default file that was missing at start is not "asked for" now.
            broker.apply(await self._load(path if standing.config.exists else None))
        except Exception as e:  # the configuration in force stays, whatever failed
            reason = e.message if isinstance(e, ConfigError) else f"{path}: {e!r}"
            if not isinstance(e, ConfigError):
                self._audit.log(Level.ERROR, f"reloading {path} failed: {e!r}",
                                EXCEPTION=traceback.format_exc(limit=20))  # fmt: skip
            standing.refused = {"time": time.time(), "reason": reason}
            reason += f"; generation {standing.generation} of {path} stays in force"
            self._audit.log(Level.WARNING, f"refused the new configuration: {reason}")
        else:
            self._audit.log(
                Level.INFO, f"reloaded {path}: generation {standing.generation} in force"
            )
        self._notify(f"READY=1\nSTATUS={broker.status_line()}")
        return reason

    async def _load(self, path: str | None) -> Config:
        """`loader.load(path)` in a child interpreter, within RELOAD_TIMEOUT."""
        shown = path or self._broker.standing.config.path
        with trio.move_on_after(RELOAD_TIMEOUT):
            done = await trio.run_process(
                loader.subprocess_command(path),
                stdin=b"",
                capture_stdout=True,
                stderr=None,
                check=False,
            )
            if len(done.stdout) > loader.MAX_RESULT_BYTES:
                raise ConfigError(f"{shown}: the loader's answer is too large")
            return loader.parse_result(done.stdout, done.returncode, shown)
        raise ConfigError(f"{shown}: loading took longer than {RELOAD_TIMEOUT:g}s")
