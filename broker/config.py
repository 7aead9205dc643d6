"""The broker's configuration as the server uses it, and where it comes from.

`Config` is plain data: the resolved `Policy` plus the limits. It is read from a TOML
file and `PORT_BROKER_*` environment overrides by `broker.settings` (pydantic-settings).
The serving broker calls `load_isolated`, which does that in a short-lived child
process and receives the result as JSON, so that pydantic (about 15 MB of memory and
150 ms of imports) never enters the long-running broker; while the child works, the
broker imports its own modules.

Example (docs/configuration.md has the whole reference)::

    [sockets.http]
    users = ["www-data", 1000]
    groups = ["web"]
    units = ["node-app.service", "machine-*.scope"]

Standard library only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from broker import names
from broker.errors import ConfigError
from broker.policy import Policy, Rule

MAX_RESULT_BYTES: Final = 16 << 20
"""Most a loader child may send back: a policy with a million uids is about 10 MB."""


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


def load(path: str | None = None, environ: Mapping[str, str] = os.environ) -> Config:
    """Load, validate and resolve the configuration in this process (imports pydantic).

    Raises:
        ConfigError: see `broker.settings.load`.
    """
    from broker import settings  # noqa: PLC0415 (pydantic only when asked for)

    return settings.load(path, environ)


class IsolatedLoad:
    """`load` run in a forked child; `result()` collects it.

    Start it before importing anything heavy: the child then loads while this process
    imports. The calling process must be single-threaded (it forks).
    """

    def __init__(self, path: str | None = None, environ: Mapping[str, str] = os.environ) -> None:
        self.path = resolve_path(path, environ)[0]
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            self.pid = os.fork()
        except BaseException:
            os.close(read_end)
            os.close(write_end)
            raise
        if self.pid == 0:  # pragma: no cover - the child reports through the pipe
            os.close(read_end)
            _child(write_end, path, environ)
        os.close(write_end)
        self._read_end = read_end

    def result(self) -> Config:
        """Wait for the child and return what it loaded.

        Raises:
            ConfigError: what the child's `load` raised, or that the child failed.
        """
        chunks, size = [], 0
        with open(self._read_end, "rb") as pipe:
            while chunk := pipe.read(65536):
                size += len(chunk)
                if size > MAX_RESULT_BYTES:
                    break
                chunks.append(chunk)
        _, status = os.waitpid(self.pid, 0)
        try:
            reply = json.loads(b"".join(chunks))
            if "error" in reply:
                raise ConfigError(str(reply["error"]))
            return Config.from_json(reply["config"])
        except (ValueError, KeyError, TypeError):
            raise ConfigError(
                f"{self.path}: the configuration loader failed (exit status "
                f"{os.waitstatus_to_exitcode(status)}); run `port-broker check-config "
                f"{self.path}` to see why"
            ) from None


def _child(write_end: int, path: str | None, environ: Mapping[str, str]) -> None:
    """In the forked child: load, write the result as JSON, exit. Never returns."""
    try:
        status = 1
        try:
            reply: dict[str, Any] = {"config": load(path, environ).to_json()}
            status = 0
        except ConfigError as e:
            reply = {"error": e.message}
        except Exception as e:
            reply = {"error": f"{resolve_path(path, environ)[0]}: cannot load: {e!r}"}
        with open(write_end, "wb") as pipe:
            pipe.write(json.dumps(reply).encode())
    finally:
        os._exit(status)


def load_isolated(path: str | None = None, environ: Mapping[str, str] = os.environ) -> Config:
    """`load` in a child process, so that its imports stay out of this one.

    Raises:
        ConfigError: as `load`.
    """
    return IsolatedLoad(path, environ).result()
