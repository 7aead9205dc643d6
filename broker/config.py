"""The broker's configuration as the server uses it, and where it comes from.

`Config` is plain data: the resolved `Policy` plus the limits, with its JSON form. It is
made from a TOML file and `PORT_BROKER_*` environment overrides by `broker.settings`
(validation, pydantic-settings), which `broker.loader` runs (in a child process for the
serving broker). The layers go one way: data ← validation ← loader.

Example (docs/configuration.md has the whole reference)::

    [sockets.http]
    users = ["www-data", 1000]
    groups = ["web"]
    units = ["node-app.service", "machine-*.scope"]

Standard library only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker import names
from broker.policy import Policy, Rule


@dataclass(frozen=True)
class Config:
    """The loaded configuration.

    Attributes:
        path: The file it came from.
        exists: False if `path` did not exist (the default path may be absent).
        policy: The resolved access policy.
        max_connections: Concurrent control connections served.
        client_timeout: Seconds a client has to send each request.
        max_connections_per_user: Concurrent control connections of one uid, so that
            one user cannot take every connection slot.
    """

    path: str
    exists: bool
    policy: Policy
    max_connections: int
    client_timeout: float
    max_connections_per_user: int

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-able form; `from_json` turns it back into an equal Config."""
        return {
            "path": self.path,
            "exists": self.exists,
            "sockets": {name: _rule_json(rule) for name, rule in self.policy.sockets.items()},
            "status": _rule_json(self.policy.status),
            "source": self.policy.source,
            "max_connections": self.max_connections,
            "max_connections_per_user": self.max_connections_per_user,
            "client_timeout": self.client_timeout,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Config:
        """Rebuild a Config from `to_json`'s output.

        Raises:
            KeyError, TypeError, ValueError: if `data` is not such output.
        """
        policy = Policy(
            sockets={name: _rule(rule) for name, rule in data["sockets"].items()},
            status=_rule(data["status"]),
            source=str(data["source"]),
        )
        return cls(
            path=str(data["path"]),
            exists=bool(data["exists"]),
            policy=policy,
            max_connections=int(data["max_connections"]),
            max_connections_per_user=int(data["max_connections_per_user"]),
            client_timeout=float(data["client_timeout"]),
        )


def _rule_json(rule: Rule) -> dict[str, list[Any]]:
    return {"uids": sorted(rule.uids), "gids": sorted(rule.gids), "units": list(rule.units)}


def _rule(data: Mapping[str, Any]) -> Rule:
    return Rule(
        uids=frozenset(int(u) for u in data["uids"]),
        gids=frozenset(int(g) for g in data["gids"]),
        units=tuple(str(u) for u in data["units"]),
    )


def resolve_path(path: str | None, environ: Mapping[str, str] = os.environ) -> tuple[str, bool]:
    """Return the config path to use and whether it was asked for explicitly."""
    if path:
        return path, True
    if environ.get(names.CONFIG_ENV):
        return environ[names.CONFIG_ENV], True
    return names.DEFAULT_CONFIG, False
