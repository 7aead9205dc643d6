"""Who gets a connection slot: the global limit, the per-uid limit, the room kept for
the peers the policy names, and the rate at which the others may connect.

The accept loop asks `admit(uid)` before a connection gets a task, knowing only the
peer's uid (one getsockopt), and `admit_peer()` once the kernel has said who it is;
both say why not, for a `busy` refusal. A refusal at accept costs the broker a few
microseconds (no task, no /proc read, nothing logged), a served connection a hundred:
so a connect/close flood is refused at accept, faster than it can fill the queue, and a
worker behind it waits milliseconds, not the time it takes to serve the whole queue.

Fairness under a flood (docs/security.md has the reasoning): one uid holds at most
`max_per_user` slots, and peers that no rule names (those the broker can only refuse)
share at most `max_connections - reserved` of them, so that however many uids flood it
with slow or idle connections, `reserved` slots (a quarter) stay for the workers and
admins the policy names. Whether a peer is named is decided from the kernel's account of
it (uid, groups, unit) and the user database's cached groups, before any wait.

Connection rate: a uid that no `users` entry names (nor root, nor the broker's uid) may
open UNNAMED_RATE connections a second (bursts of UNNAMED_BURST), and all such uids
together UNNAMED_TOTAL_RATE. A peer found named by a group or a unit once it was
identified leaves a mark for KNOWN_NAMED_SECONDS: its uid with that group, or with that
unit. A later connection of the uid over the rate is let in only if it shows the same
mark (the kernel's groups, its cgroup's unit; looked up only then, so a flood costs that
lookup only past the rate): a shared service account's other processes, which the policy
does not name, are held to the rate like anyone's. Whether a peer is named that way is
only known after the costly part of identifying it, which the rate spares; so the first
connection of such a worker counts against the rates (clients retry `busy` within their
deadline).

Must never: let `active` or a uid's count drift (every admit has exactly one leave);
refuse a named peer while a slot not taken by a named peer is held back for it; limit
the connection rate of a uid a `users` entry names; exempt from the rate a process that
shows no mark the policy named.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from broker.daemon.identity import Marks
from broker.status import Connections

NAMED_RESERVE: Final = 4
"""1/NAMED_RESERVE of the slots (at least one) are for peers the policy names."""

UNNAMED_RATE: Final = 200.0
UNNAMED_BURST: Final = 400.0
"""Connections a second one uid that no `users` entry names may open, and how many at
once: `port-broker list` in a loop, a worker named by a group or unit starting, a
hundred workers of one user restarting at once, all fit; a flood does not."""
UNNAMED_TOTAL_RATE: Final = 2000.0
UNNAMED_TOTAL_BURST: Final = 2000.0
"""The same for all such uids together (a rootless-container user owns 65,536): about a
fifth of what the broker serves a second, so that a flood from any number of uids leaves
it time for the named ones."""
RATE_UIDS: Final = 4096
"""uids whose connection rate is tracked at once; past that the least recently seen are
forgotten (they start again with a full bucket, within the total rate)."""
KNOWN_NAMED_SECONDS: Final = 300.0
"""How long a mark the policy was found to name (a uid with a group, or with a unit, once
its peer was identified) lets that uid's connections past the rate: a worker named by its
unit is held to no rate after its first connection, whatever floods the broker."""


KNOWN_UNITS: Final = 16
"""Units remembered per uid (the latest): a glob may name a uid's units by the hundred
(`run-*.scope`); a worker's is among the latest unless it has not connected for long."""


@dataclass
class _Known:
    """The marks found named lately for one uid, and until when they count."""

    until: float
    groups: frozenset[int] = frozenset()
    units: tuple[str, ...] = ()

    def shown_by(self, peer: Marks) -> bool:
        return bool(self.groups & peer.groups) or peer.unit in self.units


@dataclass(frozen=True)
class Limits:
    """What admission holds connections to: part of the configuration in force
    (broker/daemon/standing.py), read at each decision.

    Attributes:
        max_connections: Connections served at once.
        max_per_user: Connections one uid may hold at once.
        source: Where the limits are set, for messages.
        named_uids: The uids whose connection rate is not limited (`users` entries,
            root, the broker's uid).
    """

    max_connections: int
    max_per_user: int
    source: str
    named_uids: frozenset[int] = frozenset()

    @property
    def reserved(self) -> int:
        """Slots only peers the policy names may take: a quarter, at least one."""
        return max(1, self.max_connections // NAMED_RESERVE)


@dataclass
class _Bucket:
    tokens: float
    at: float

    def fill(self, now: float, rate: float, burst: float) -> bool:
        """Add what `rate` gave since the last time; whether a token is there."""
        self.tokens = min(burst, self.tokens + (now - self.at) * rate)
        self.at = now
        return self.tokens >= 1


class Admission:
    """Connection slots, counted globally, per uid, and for unnamed peers.

    Args:
        limits: The limits in force, asked at each decision (a reload changes them for
            the next connection; connections over a new limit are not cut).
        clock: Seconds, monotonic (trio's clock in the broker, so tests can move it).
    """

    def __init__(self, limits: Callable[[], Limits], clock: Callable[[], float]) -> None:
        self.active = 0
        self.connections = 0
        self.unnamed = 0
        self.per_uid: Counter[int] = Counter()
        self._limits = limits
        self._clock = clock
        self._buckets: OrderedDict[int, _Bucket] = OrderedDict()
        self._known_named: OrderedDict[int, _Known] = OrderedDict()
        self._total: _Bucket | None = None

    def report(self) -> Connections:
        """The status report's `connections`."""
        limit = self._limits().max_connections
        return {"active": self.active, "total": self.connections, "limit": limit}

    def admit(self, uid: int | None, marks: Callable[[], Marks] | None = None) -> str | None:
        """Take a slot for a new connection of `uid` (None: the kernel knows of none);
        return why not (it holds no slot then). `marks` tells the peer's groups and unit,
        asked only when the uid is past its rate and has a mark the policy named."""
        self.connections += 1
        limits = self._limits()
        if self.active >= limits.max_connections:  # before the rate: it spends a token
            return (
                f"the broker is serving its limit of {limits.max_connections} connections; "
                "retry shortly"
            )
        if uid is None or uid not in limits.named_uids:
            why = self._rate(uid, limits.source)
            if why is not None and not self._marked(uid, marks):
                return why
        self.active += 1
        return None

    def leave(self) -> None:
        """Give back a slot `admit` took."""
        self.active -= 1

    def _marked(self, uid: int | None, marks: Callable[[], Marks] | None) -> bool:
        """Whether the peer shows a mark the policy named for `uid` lately."""
        known = None if uid is None else self._known_named.get(uid)
        if known is None or marks is None or known.until <= self._clock():
            return False
        return known.shown_by(marks())

    def _rate(self, uid: int | None, source: str) -> str | None:
        now = self._clock()
        if self._total is None:
            self._total = _Bucket(UNNAMED_TOTAL_BURST, now)
        key = -1 if uid is None else uid
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= RATE_UIDS:
                self._buckets.popitem(last=False)  # the least recently seen
            bucket = self._buckets[key] = _Bucket(UNNAMED_BURST, now)
        else:
            self._buckets.move_to_end(key)
        if not bucket.fill(now, UNNAMED_RATE, UNNAMED_BURST):
            who = "a peer with no credentials" if uid is None else f"uid {uid}"
            return (
                f"{who} opens connections faster than {UNNAMED_RATE:g} a second, the "
                f"most for a uid no rule in {source} names; retry shortly"
            )
        if not self._total.fill(now, UNNAMED_TOTAL_RATE, UNNAMED_TOTAL_BURST):
            return (
                f"peers no rule in {source} names open connections faster than "
                f"{UNNAMED_TOTAL_RATE:g} a second together; retry shortly"
            )
        bucket.tokens -= 1  # both had one: only now is either spent
        self._total.tokens -= 1
        return None

    def admit_peer(
        self, uid: int, *, named: bool, mapped: bool = True, by: Marks | None = None
    ) -> str | None:
        """Count one more connection of `uid`, named by the policy or not; return why
        not (not counted then). What named it besides its uid (`by`: a group, a unit) is
        remembered for the connection rate (see `admit`), unless the peer is unmapped:
        the overflow uid is anyone's."""
        limits = self._limits()
        if self.per_uid[uid] >= limits.max_per_user:
            return (
                f"uid {uid} already has {limits.max_per_user} connections to the broker, its "
                f"limit (max_connections_per_user in {limits.source}); retry shortly"
            )
        if not named and self.unnamed >= limits.max_connections - limits.reserved:
            return (
                f"the broker is serving {self.unnamed} connections of peers no rule in "
                f"{limits.source} names, all it keeps for them; retry shortly"
            )
        self.per_uid[uid] += 1
        self.unnamed += not named
        if named and mapped and by and uid not in limits.named_uids:  # a group, a unit
            self._remember(uid, by)
        return None

    def _remember(self, uid: int, by: Marks) -> None:
        now = self._clock()
        until = now + KNOWN_NAMED_SECONDS
        known = self._known_named.get(uid)
        if known is None or known.until <= now:
            known = self._known_named[uid] = _Known(until)
        known.until = until
        known.groups |= by.groups
        if by.unit is not None and by.unit not in known.units:
            known.units = (*known.units, by.unit)[-KNOWN_UNITS:]
        self._known_named.move_to_end(uid)
        if len(self._known_named) > RATE_UIDS:
            self._known_named.popitem(last=False)

    def leave_peer(self, uid: int, *, named: bool) -> None:
        """Give back what `admit_peer` counted."""
        self.per_uid[uid] -= 1
        if not self.per_uid[uid]:
            del self.per_uid[uid]
        self.unnamed -= not named
