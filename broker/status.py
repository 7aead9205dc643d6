"""The status report's schema, written once: what `{"op":"status"}` answers, what
`port-broker status` renders, and what docs/protocol.md's table lists (tests/test_cli.py
checks the table against `Report`).

Must never: grow a key without docs/protocol.md, or put in it anything but counts,
names and what the audit trail already records.
"""

from __future__ import annotations

from typing import TypedDict


class Connections(TypedDict):
    active: int
    total: int
    limit: int


class SocketStatus(TypedDict):
    name: str
    family: str
    type: str
    address: str
    grants: int
    denials: int


class Refused(TypedDict):
    time: float
    reason: str


class Configuration(TypedDict):
    path: str
    generation: int
    loaded: float
    refused: Refused | None


class Event(TypedDict):
    time: float
    decision: str
    socket: str
    uid: int
    user: str | None
    pid: int
    unit: str | None
    reason: str


class Log(TypedDict):
    suppressed: int
    lost: int


class Report(TypedDict):
    """The reply's `status` object, key by key (docs/protocol.md, "status")."""

    version: str
    pid: int
    uptime: float
    config: str
    configuration: Configuration
    connections: Connections
    sockets: list[SocketStatus]
    grants: int
    denials: int
    refusals: dict[str, int]
    recent: list[Event]
    log: Log
