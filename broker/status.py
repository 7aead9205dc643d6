"""The status report's schema, written once: what `{"op":"status"}` answers, what
`port-broker status` renders (`format_status`), and what docs/protocol.md's table lists
(tests/test_cli.py checks the table against `Report`).

Must never: grow a key without docs/protocol.md, or put in it anything but counts,
names and what the audit trail already records.
"""

from __future__ import annotations

import time
from typing import Any, TypedDict

from broker.names import transport


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


class Holder(TypedDict):
    uid: int
    fds: int


class Unread(TypedDict):
    fds: int
    holders: list[Holder]


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
    unread: Unread


# --- rendering (`port-broker status`) -------------------------------------------


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    return "".join(f"{n}{u}" for n, u in parts if n) or "0s"


def format_status(report: dict[str, Any]) -> str:
    """Render a status report as the table `port-broker status` prints."""
    conns = report.get("connections", {})
    lines = [
        f"port-broker {report.get('version', '?')}, pid {report.get('pid', '?')}, "
        f"up {_duration(float(report.get('uptime', 0)))}, config {report.get('config', '?')}",
        f"clients: {conns.get('active', 0)} connected, {conns.get('total', 0)} served "
        f"(limit {conns.get('limit', '?')}); {report.get('grants', 0)} grants, "
        f"{report.get('denials', 0)} denials",
    ]
    configuration = report.get("configuration")
    if isinstance(configuration, dict):
        loaded = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(configuration["loaded"]))
        lines.append(f"configuration: generation {configuration['generation']}, loaded {loaded}")
        refused = configuration.get("refused")
        if refused:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(refused["time"]))
            lines.append(f"  last reload refused at {when}: {refused['reason']}")
    log = report.get("log")
    if isinstance(log, dict) and (log.get("suppressed") or log.get("lost")):
        lines.append(
            f"log: {log.get('suppressed', 0)} notices about clients summed up, not logged "
            f"one by one; {log.get('lost', 0)} records the journal did not take"
        )
    unread = report.get("unread")
    if isinstance(unread, dict) and unread.get("fds"):
        holders = ", ".join(f"uid {h['uid']}: {h['fds']}" for h in unread.get("holders", []))
        lines.append(
            f"unread: {unread['fds']} granted sockets not read yet by their receivers ({holders})"
        )
    lines.append("")
    rows = [["NAME", "PROTO", "ADDRESS", "GRANTS", "DENIALS"]]
    for s in report.get("sockets", []):
        rows.append(
            [
                s["name"],
                transport(s["family"], s["type"]),
                s["address"],
                str(s["grants"]),
                str(s["denials"]),
            ]
        )
    lines.append(table(rows) if len(rows) > 1 else "holding no sockets")
    recent = report.get("recent", [])
    if recent:
        lines += ["", "recent:"]
        for event in recent[-10:]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["time"]))
            who = event.get("user") or "-"
            unit = event.get("unit") or "-"
            lines.append(
                f"  {when} {event['decision']:5} {event['socket']} uid {event['uid']}"
                f" ({who}) pid {event['pid']} unit {unit}"
            )
    return "\n".join(lines)


def table(rows: list[list[str]]) -> str:
    """`rows` as columns padded to their widest cell (`status`, `list`)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
