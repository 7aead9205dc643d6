"""The broker's configuration as the server uses it, and where it comes from.

`Config` is plain data: the resolved `Policy` plus the limits, with its JSON form. It is
made from a TOML file and `PORT_BROKER_*` environment overrides by `settings`
(validation, pydantic-settings), which `loader` runs (in a child process for the
serving broker). The layers go one way: data ← validation ← loader.

Example (docs/configuration.md has the whole reference)::

    [sockets.http]
    users = ["www-data", 1000]
    groups = ["web"]
    units = ["node-app.service", "machine-*.scope"]

Must never: validate (broker/daemon/settings.py does, with pydantic, in a child
interpreter) or import pydantic: the serving broker holds this, and pydantic's 15 MB
stay out of it.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import Field, dataclass, field, fields
from typing import Any

from broker import names
from broker.daemon.policy import Policy, Rule


def setting(default: float, description: str, **bounds: float) -> Any:
    """Declare a scalar setting of `Config`, once: its default, what it means, and its
    bounds (pydantic's ge/gt/le), which `settings` validates the file against."""
    metadata = {"kind": type(default), "description": description, "bounds": bounds}
    return field(default=default, metadata=metadata)


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
        idle_exit: Seconds with no client after which a broker started by systemd exits
            (the next connection starts it again: broker/daemon/driver.py); 0: never.
    """

    path: str
    exists: bool
    policy: Policy
    max_connections: int = setting(1024, "concurrent control connections served", ge=1, le=65536)
    max_connections_per_user: int = setting(
        64, "concurrent control connections of one uid", ge=1, le=65536
    )
    client_timeout: float = setting(5.0, "seconds a client has to send each request", gt=0, le=300)
    idle_exit: float = setting(
        0.0,
        "seconds without a client after which a broker systemd started exits (0: never)",
        ge=0,
        le=86400,
    )

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-able form; `from_json` turns it back into an equal Config."""
        return {
            "path": self.path,
            "exists": self.exists,
            "sockets": {name: _rule_json(rule) for name, rule in self.policy.sockets.items()},
            "status": _rule_json(self.policy.status),
            "source": self.policy.source,
            **{f.name: getattr(self, f.name) for f in SETTINGS},
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
            **{f.name: f.metadata["kind"](data[f.name]) for f in SETTINGS},
        )


SETTINGS: tuple[Field[Any], ...] = tuple(f for f in fields(Config) if "bounds" in f.metadata)
"""Config's scalar settings, each declared once with `setting`: the file's top-level
keys besides `sockets` and `status`, and their PORT_BROKER_* variables."""


def _rule_json(rule: Rule) -> dict[str, list[Any]]:
    return {"uids": sorted(rule.uids), "gids": sorted(rule.gids), "units": list(rule.units)}


def _rule(data: Mapping[str, Any]) -> Rule:
    return Rule(
        uids=frozenset(int(u) for u in data["uids"]),
        gids=frozenset(int(g) for g in data["gids"]),
        units=tuple(str(u) for u in data["units"]),
    )


def unheld_rules(config: Config, held: Collection[str]) -> str | None:
    """Why `config` cannot be served with the sockets named `held` (it has rules for
    others), or None. The one check, at start and on reload."""
    missing = sorted(set(config.policy.sockets) - set(held))
    if not missing:
        return None
    return (
        f"{config.path} has rules for {', '.join(missing)} but the broker holds no such "
        f"socket (it holds: {', '.join(sorted(held)) or 'none'}); add a .socket unit with "
        "that FileDescriptorName= and Service=port-broker.service, then restart the broker "
        "(sockets come with a start, not a reload), or remove the rule"
    )


def resolve_path(path: str | None, environ: Mapping[str, str] = os.environ) -> tuple[str, bool]:
    """Return the config path to use and whether it was asked for explicitly."""
    if path:
        return path, True
    if environ.get(names.CONFIG_ENV):
        return environ[names.CONFIG_ENV], True
    return names.DEFAULT_CONFIG, False
