"""The access policy: a peer's kernel identity and a socket name in, a decision out.

Pure: no I/O, no clock, no globals; the server asks, this module answers. Deny by
default: a socket with no rule, or a rule the peer matches in no way, is refused, and
root is no exception. Rules are built (names resolved to ids) by
broker/daemon/settings.py, and travel as data in broker/daemon/config.py.

Must never: grant what no rule names (root included), count a uid or group the kernel
could not map into the broker's user namespace, or do I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import cached_property

from broker.daemon.identity import Marks, Peer


@dataclass(frozen=True)
class Rule:
    """Who may have one thing: any listed uid, any member of a listed gid, or any
    process in a unit matching a listed name or glob pattern (`machine-*.scope`).

    Attributes:
        uids: Allowed uids.
        gids: Allowed gids (matched against the peer's gid, its supplementary groups
            and its user's groups in the user database).
        units: Allowed systemd units, exact names or fnmatch patterns.

    A peer whose uid the kernel could not map into the broker's user namespace
    (`Peer.mapped` false) matches no uid or gid: its overflow uid names nobody in
    particular, nor do the groups the user database gives that uid. Its unit, read
    from its cgroup, still counts. An unmapped gid alone (`Peer.gid_mapped` false)
    just does not count as a group.
    """

    uids: frozenset[int] = field(default_factory=frozenset)
    gids: frozenset[int] = field(default_factory=frozenset)
    units: tuple[str, ...] = ()

    def match(self, peer: Peer) -> str | None:
        """Return which entry allows `peer` ("uid 33 is in users", …) or None."""
        if peer.mapped:
            if peer.uid in self.uids:
                return f"uid {peer.uid} is in users"
            common = self.gids & (peer.groups | {peer.gid} if peer.gid_mapped else peer.groups)
            if common:
                return f"gid {min(common)} is in groups"
        if peer.unit is not None:
            for pattern in self.units:
                if fnmatchcase(peer.unit, pattern):
                    return f"unit {peer.unit} matches {pattern!r} in units"
        return None

    @property
    def empty(self) -> bool:
        """True if the rule allows nobody."""
        return not (self.uids or self.gids or self.units)


@dataclass(frozen=True)
class Decision:
    """The answer to one question, with a reason fit for the audit log and the peer."""

    allowed: bool
    reason: str


@dataclass(frozen=True)
class Policy:
    """Rules per socket name, plus the rule for `status`.

    Attributes:
        sockets: Socket name → rule. A held socket with no entry is granted to nobody.
        status: Who may ask for the broker's status report.
        source: Where the policy lives, for messages ("/etc/port-broker/broker.toml").
    """

    sockets: Mapping[str, Rule] = field(default_factory=dict)
    status: Rule = field(default_factory=Rule)
    source: str = "(no configuration)"

    @cached_property
    def names_groups(self) -> bool:
        """Whether any rule names a group: if none does, a peer's groups need not be
        asked of the kernel. (Worked out once: rules do not change.)"""
        return any(rule.gids for rule in (*self.sockets.values(), self.status))

    def check_acquire(self, name: str, peer: Peer) -> Decision:
        """Decide whether `peer` may have the socket called `name`."""
        rule = self.sockets.get(name)
        if rule is None:
            return Decision(
                False,
                f"{peer.describe()} may not acquire socket {name!r}: "
                f"{self.source} has no [sockets.{name}] rule, so nobody "
                "may; add one with users, groups or units",
            )
        return self._check(rule, peer, f"acquire socket {name!r}", f"[sockets.{name}]")

    def check_status(self, peer: Peer) -> Decision:
        """Decide whether `peer` may read the status report."""
        return self._check(self.status, peer, "read the broker's status", "[status]")

    def _check(self, rule: Rule, peer: Peer, what: str, section: str) -> Decision:
        why = rule.match(peer)
        if why is not None:
            return Decision(True, why)
        reason = f"not in users, groups or units of {section} in {self.source}"
        if not peer.mapped:
            reason = (
                f"its uid is not mapped into the broker's user namespace (it shows as the "
                f"overflow uid), so only a units rule can name it; {reason}"
            )
        return Decision(False, f"{peer.describe()} may not {what}: {reason}")

    @property
    def named_uids(self) -> frozenset[int]:
        """Every uid a `users` entry names, in any rule."""
        return self.status.uids.union(*(rule.uids for rule in self.sockets.values()))

    @cached_property
    def named_gids(self) -> frozenset[int]:
        """Every gid a `groups` entry names, in any rule."""
        return frozenset().union(*(rule.gids for rule in (*self.sockets.values(), self.status)))

    def names_unit(self, unit: str | None) -> bool:
        """Whether a `units` entry of any rule matches `unit`."""
        return unit is not None and any(
            fnmatchcase(unit, pattern)
            for rule in (*self.sockets.values(), self.status)
            for pattern in rule.units
        )

    def naming(self, peer: Peer) -> Marks | None:
        """How the rules name `peer`: None if none does; else what of it besides its uid
        they name (its groups a `groups` entry names, its unit if a `units` entry
        matches), for admission's connection rate."""
        if not self.names(peer):
            return None
        unit = peer.unit if self.names_unit(peer.unit) else None
        return Marks(peer.groups & self.named_gids if peer.mapped else frozenset(), unit)

    def names(self, peer: Peer) -> bool:
        """Whether any rule (a socket's, or the status rule) names `peer`: whom the
        broker keeps room for under a flood (broker/daemon/admission.py)."""
        return self.status.match(peer) is not None or any(
            rule.match(peer) is not None for rule in self.sockets.values()
        )

    def may_acquire(self, name: str, peer: Peer) -> bool:
        """Return whether `peer` may have `name` (for `list`)."""
        rule = self.sockets.get(name)
        return rule is not None and rule.match(peer) is not None
