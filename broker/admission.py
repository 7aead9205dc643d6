"""Who gets a connection slot: the global limit, the per-uid limit, and the room kept
for the peers the policy names.

The accept loop asks `admit()` before a connection gets a task, and `admit_peer()` once
the kernel has said who it is; both say why not, for a `busy` refusal.

Fairness under a flood (docs/security.md has the reasoning): one uid holds at most
`max_per_user` slots, and peers that no rule names (those the broker can only refuse)
share at most `max_connections - reserved` of them, so that however many uids flood it
with slow or idle connections, `reserved` slots (a quarter) stay for the workers and
admins the policy names. Whether a peer is named is decided from the kernel's account of
it (uid, groups, unit) and the user database's cached groups, before any wait.

Must never: let `active` or a uid's count drift (every admit has exactly one leave);
refuse a named peer while a slot not taken by a named peer is held back for it.
"""

from __future__ import annotations

from collections import Counter
from typing import Final

from broker.status import Connections

NAMED_RESERVE: Final = 4
"""1/NAMED_RESERVE of the slots (at least one) are for peers the policy names."""


class Admission:
    """Connection slots, counted globally, per uid, and for unnamed peers.

    Args:
        max_connections: Connections served at once.
        max_per_user: Connections one uid may hold at once.
        source: Where the limits are set, for messages.
    """

    def __init__(self, max_connections: int, max_per_user: int, source: str) -> None:
        self.active = 0
        self.connections = 0
        self.unnamed = 0
        self.per_uid: Counter[int] = Counter()
        self.limit(max_connections, max_per_user, source)

    def limit(self, max_connections: int, max_per_user: int, source: str) -> None:
        """Set the limits (a reload): connections over a new limit are not cut."""
        self.max_connections = max_connections
        self.max_per_user = max_per_user
        self.source = source
        self.reserved = max(1, max_connections // NAMED_RESERVE)

    def report(self) -> Connections:
        """The status report's `connections`."""
        return {"active": self.active, "total": self.connections, "limit": self.max_connections}

    def admit(self) -> str | None:
        """Take a slot for a new connection; return why not (it holds no slot then)."""
        self.connections += 1
        if self.active >= self.max_connections:
            return (
                f"the broker is serving its limit of {self.max_connections} connections; "
                "retry shortly"
            )
        self.active += 1
        return None

    def leave(self) -> None:
        """Give back a slot `admit` took."""
        self.active -= 1

    def admit_peer(self, uid: int, *, named: bool) -> str | None:
        """Count one more connection of `uid`, named by the policy or not; return why
        not (not counted then)."""
        if self.per_uid[uid] >= self.max_per_user:
            return (
                f"uid {uid} already has {self.max_per_user} connections to the broker, its "
                f"limit (max_connections_per_user in {self.source}); retry shortly"
            )
        if not named and self.unnamed >= self.max_connections - self.reserved:
            return (
                f"the broker is serving {self.unnamed} connections of peers no rule in "
                f"{self.source} names, all it keeps for them; retry shortly"
            )
        self.per_uid[uid] += 1
        self.unnamed += not named
        return None

    def leave_peer(self, uid: int, *, named: bool) -> None:
        """Give back what `admit_peer` counted."""
        self.per_uid[uid] -= 1
        if not self.per_uid[uid]:
            del self.per_uid[uid]
        self.unnamed -= not named
