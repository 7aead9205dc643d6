"""What the `--intercept` supervisor says on stderr later, on timers its poll waits for:
a held family the program left unserved (FAMILIES_CHECK_DELAY after its first held
bind()), and processes the program left running under the filter (LINGER_DELAY after
it exited). Each is said at most once, and only if it still holds when due: a server
binds its families within milliseconds, and a helper ending with the program is not
worth a word.

Must never: wait (the supervisor answers every bind() of the program), or say a note
twice.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Final

from broker.intercept.bindings import Held, unserved_families

FAMILIES_CHECK_DELAY: Final = 2.0
"""Seconds after its first bind() to a held socket before the program is told of a held
family it left unserved: a server binds each of its families within milliseconds."""

LINGER_DELAY: Final = 2.0
"""Seconds after the program exited before what it left under the filter is named (it
keeps the supervisor serving, and so running)."""


class Later:
    """One note's timer: idle, then due `delay` after `start`, then spent."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self._due: float | None = None  # None: not started; inf: spent

    def start(self, now: float) -> None:
        """Start the timer, unless it is running or spent."""
        if self._due is None:
            self._due = now + self.delay

    def timeout_ms(self, now: float) -> int | None:
        """How long a poll may wait before the timer is due; None: as long as it likes."""
        if self._due is None or self._due == math.inf:
            return None
        return max(0, math.ceil((self._due - now) * 1000))

    def fired(self, now: float) -> bool:
        """Whether it is due now, once: it is spent from then on."""
        if self._due is None or now < self._due:
            return False
        self._due = math.inf
        return True


class Notes:
    """The supervisor's later notes, for one program.

    Args:
        mapping: Port → the held sockets a bind() to it may get (for the families).
    """

    def __init__(self, mapping: Mapping[int, Sequence[Held]]) -> None:
        self.mapping = mapping
        self.given: set[tuple[int, int]] = set()  # held sockets the program took
        self.families = Later(FAMILIES_CHECK_DELAY)
        self.lingering = Later(LINGER_DELAY)
        self._code = 0

    def took(self, inode: tuple[int, int], now: float) -> None:
        """The program took the held socket `inode`."""
        self.given.add(inode)
        self.families.start(now)

    def exited(self, code: int, now: float) -> None:
        """The program exited with `code`."""
        self._code = code
        self.lingering.start(now)

    def timeout_ms(self, now: float) -> int | None:
        """How long the supervisor's poll may wait before a note falls due."""
        waits = [t for t in (self.families.timeout_ms(now), self.lingering.timeout_ms(now))
                 if t is not None]  # fmt: skip
        return min(waits, default=None)

    def due(self, now: float) -> list[str]:
        """What to say now."""
        said = []
        if self.families.fired(now):
            said += unserved_families(self.mapping, self.given)
        if self.lingering.fired(now) and (left := [task_name(p) for p in our_children()]):
            said.append(
                f"the program exited ({self._code}); what it started still runs under the "
                f"filter, served until it ends or a signal comes: {', '.join(left)}"
            )
        return said


def task_name(pid: int) -> str:
    """`pid 42 (comm)` for messages; `pid 42` once it is gone."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f"pid {pid} ({f.read().strip().decode(errors='replace')})"
    except OSError:
        return f"pid {pid}"


def our_children() -> list[int]:
    """The pids of this process's children (orphans we took in as subreaper included)."""
    found: list[int] = []
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children", "rb") as f:
                found += map(int, f.read().split())
    except OSError:  # a kernel without CONFIG_PROC_CHILDREN: name none
        return []
    return found
