"""What the serving broker tells systemd (sd_notify(3)): READY, STATUS, RELOADING,
STOPPING, and the watchdog's pings. Outside systemd (no NOTIFY_SOCKET) it says nothing.

Must never: raise into the broker, or ping the watchdog for another process
(WATCHDOG_PID names who is watched).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Final

import trio

STATUS_INTERVAL: Final = 1.0
"""Seconds between STATUS= updates to systemd: often enough for `systemctl status`,
rare enough to cost nothing under a storm of grants."""


def notify(state: str) -> None:
    """Send `state` (newline-separated assignments) to systemd, if it listens; a
    notification systemd does not take is lost, never raised (sd_notify can fail)."""
    if os.environ.get("NOTIFY_SOCKET"):
        from systemd import daemon  # noqa: PLC0415 (imported once, then cached)

        with contextlib.suppress(OSError):
            daemon.notify(state)


async def publish_status(line: Callable[[], str], before: Callable[[], None]) -> None:
    """Every STATUS_INTERVAL, call `before`, then send STATUS=`line()` if it changed."""
    last = ""
    while True:
        await trio.sleep(STATUS_INTERVAL)
        before()
        current = line()
        if current != last:
            notify(f"STATUS={current}")
            last = current


async def keep_watchdog() -> None:
    """Ping systemd's watchdog at half its WatchdogSec=; return at once if it is off."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", str(os.getpid()))
    if not usec.isdigit() or pid != str(os.getpid()):
        return
    while True:
        notify("WATCHDOG=1")
        await trio.sleep(int(usec) / 2e6)
