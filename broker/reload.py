"""Reloading the configuration while serving (SIGHUP, `systemctl reload`): load it again
in a child interpreter, put it in force if it is valid, else keep the one in force and
say why (in the log and in `status`).

The child is a fresh interpreter, not a fork: the serving broker has threads (trio's,
the user-database lookups'), and forking them is unsafe.

Must never: let a failed reload, of any kind, stop the broker or change the policy in
force; run two reloads at once (a SIGHUP during one makes it run once more).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

import trio

from broker import loader
from broker.errors import ConfigError
from broker.names import Level

if TYPE_CHECKING:
    from broker.audit import Audit
    from broker.config import Config
    from broker.status import Configuration, Refused

RELOAD_TIMEOUT: Final = 30.0
"""Seconds a configuration reload may take (the loader imports pydantic, ~0.2 s, and
asks NSS for every user and group named): past that the reload is refused and the
configuration in force stays."""


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
    """Runs reloads for `broker`, one at a time.

    Args:
        broker: Whose configuration is reloaded.
        audit: Where the outcome is logged.
        notify: sd_notify (RELOADING=1 before, READY=1 after).
    """

    def __init__(self, broker: Reloadable, audit: Audit, notify: Callable[[str], None]) -> None:
        self._broker = broker
        self._audit = audit
        self._notify = notify
        self._running = False
        self._again = False

    def ask(self, nursery: trio.Nursery) -> None:
        """SIGHUP: reload, or reload again once the running reload is done."""
        if self._running:
            self._again = True
            return
        self._running = True
        nursery.start_soon(self._reload)

    async def _reload(self) -> None:
        broker = self._broker
        standing = broker.standing
        try:
            while True:
                self._again = False
                now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
                self._notify(f"RELOADING=1\nMONOTONIC_USEC={now_us}")
                path = standing.config.path
                try:
                    # A default file that was missing at start is not "asked for" now.
                    broker.apply(await self._load(path if standing.config.exists else None))
                except Exception as e:  # the configuration in force stays, whatever failed
                    reason = e.message if isinstance(e, ConfigError) else f"{path}: {e!r}"
                    if not isinstance(e, ConfigError):
                        self._audit.log(Level.ERROR, f"reloading {path} failed: {e!r}",
                                        EXCEPTION=traceback.format_exc(limit=20))  # fmt: skip
                    standing.refused = {"time": time.time(), "reason": reason}
                    self._audit.log(
                        Level.WARNING,
                        f"refused the new configuration: {reason}; generation "
                        f"{standing.generation} of {path} stays in force",
                    )
                else:
                    self._audit.log(
                        Level.INFO, f"reloaded {path}: generation {standing.generation} in force"
                    )
                self._notify(f"READY=1\nSTATUS={broker.status_line()}")
                if not self._again:
                    return
        finally:
            self._running = False

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
