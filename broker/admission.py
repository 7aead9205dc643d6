"""Who gets a connection slot: the global limit and the per-uid limit.

The accept loop asks `admit()` before a connection gets a task, and `admit_peer()` once
the kernel has said who it is; both say why not, for a `busy` refusal. Fairness between
uids under a flood builds on this (see docs/protocol.md, "Limits").

Must never: let `active` or a uid's count drift (every admit has exactly one leave).
"""

from __future__ import annotations

from collections import Counter

from broker.status import Connections


class Admission:
    """Connection slots, counted globally and per uid.

    Args:
        max_connections: Connections served at once.
        max_per_user: Connections one uid may hold at once.
        source: Where the limits are set, for messages.
    """

    def __init__(self, max_connections: int, max_per_user: int, source: str) -> None:
        self.active = 0
        self.connections = 0
        self.per_uid: Counter[int] = Counter()
        self.limit(max_connections, max_per_user, source)

    def limit(self, max_connections: int, max_per_user: int, source: str) -> None:
        """Set the limits (a reload): connections over a new limit are not cut."""
        self.max_connections = max_connections
        self.max_per_user = max_per_user
        self.source = source

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

    def admit_peer(self, uid: int) -> str | None:
        """Count one more connection of `uid`; return why not (not counted then)."""
        if self.per_uid[uid] >= self.max_per_user:
            return (
                f"uid {uid} already has {self.max_per_user} connections to the broker, its "
                f"limit (max_connections_per_user in {self.source}); retry shortly"
            )
        self.per_uid[uid] += 1
        return None

    def leave_peer(self, uid: int) -> None:
        """Give back what `admit_peer` counted."""
        self.per_uid[uid] -= 1
        if not self.per_uid[uid]:
            del self.per_uid[uid]
