"""The configuration in force, whole, as one immutable value: the policy and limits
(`Config`), the sockets held (each an fd and its description), whom the connection rate
never limits, and which generation it is since when. The driver replaces it with one
assignment, at start and at each reload (s6-fdholderd swaps its rules in one step on
SIGHUP); every reader (a connection's next request, admission's next decision, the
status report) sees one whole configuration, never half of two.

Must never: be changed in place, or hold a socket object (the intake owns the sockets;
this holds their fds, for connections to pass on).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property

from broker.daemon.admission import Limits
from broker.daemon.config import Config, unheld_rules
from broker.daemon.policy import Policy
from broker.errors import ConfigError
from broker.messages import Granted, SocketInfo
from broker.protocol import encode_reply
from broker.status import Configuration, Refused

Held = tuple[int, SocketInfo]
"""One held socket as connections see it: its fd (the broker's; passed on, never
closed or changed) and what clients are told of it."""


@dataclass(frozen=True)
class Standing:
    """The configuration in force.

    Attributes:
        config: The policy and limits.
        held: Socket name → the sockets of that name, in the order systemd passed them.
        owner: The broker's effective uid: it and root may ask for a reload, and are
            never held to the connection rate.
        generation: 1 at start, one more at each reload put in force.
        loaded: When `config` was put in force (seconds since the epoch).
        refused: The last reload refused since then, if any.
    """

    config: Config
    held: Mapping[str, tuple[Held, ...]]
    owner: int = field(default_factory=os.geteuid)
    generation: int = 1
    loaded: float = 0.0
    refused: Refused | None = None

    @classmethod
    def first(cls, config: Config, held: Mapping[str, tuple[Held, ...]], now: float) -> Standing:
        """The configuration at start.

        Raises:
            ConfigError: `config` has rules for sockets not held.
        """
        _check(config, held)
        return cls(config, held, loaded=now)

    @cached_property
    def policy(self) -> Policy:
        return self.config.policy

    @cached_property
    def granted(self) -> Mapping[str, bytes]:
        """Socket name → the wire form of the reply granting it alone: the same bytes
        for every peer, encoded once per configuration rather than at every grant."""
        return {
            name: encode_reply(Granted(tuple(info for _, info in sockets)))
            for name, sockets in self.held.items()
        }

    @cached_property
    def limits(self) -> Limits:
        """What admission holds connections to under this configuration."""
        return Limits(
            self.config.max_connections,
            self.config.max_connections_per_user,
            self.policy.source,
            self.policy.named_uids | {0, self.owner},
        )

    def replaced(self, config: Config, now: float) -> Standing:
        """The configuration in force once `config` is, the same sockets held.

        Raises:
            ConfigError: `config` has rules for sockets not held.
        """
        _check(config, self.held)
        return replace(self, config=config, generation=self.generation + 1, loaded=now,
                       refused=None)  # fmt: skip

    def refusing(self, reason: str, now: float) -> Standing:
        """This configuration, still in force after a reload refused for `reason`."""
        return replace(self, refused={"time": now, "reason": reason})

    def report(self) -> Configuration:
        """The status report's `configuration`."""
        return {
            "path": self.config.path,
            "generation": self.generation,
            "loaded": round(self.loaded, 3),
            "refused": self.refused,
        }


def _check(config: Config, held: Mapping[str, object]) -> None:
    problem = unheld_rules(config, held)
    if problem is not None:
        raise ConfigError(problem)
