"""The status report's schema, written once: what `{"op":"status"}` answers, what
`port-broker status` renders (`format_status`), and what docs/protocol.md's table lists
(tests/test_cli.py checks the table against `Report`).

Must never: grow a key without docs/protocol.md, or put in it anything but counts,
names and what the audit trail already records.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Final, NotRequired, TypedDict, cast

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
    configuration: NotRequired[Configuration]  # (since 0.1: a broker before has none)
    connections: Connections
    sockets: list[SocketStatus]
    grants: int
    denials: int
    refusals: dict[str, int]
    recent: list[Event]
    log: NotRequired[Log]
    unread: NotRequired[Unread]


# --- rendering (`port-broker status`) -------------------------------------------


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    return "".join(f"{n}{u}" for n, u in parts if n) or "0s"


REQUIRED: Final = ("version", "pid", "uptime", "config", "connections", "sockets", "grants",
                   "denials", "refusals", "recent")  # fmt: skip
"""What every broker's report has had since the protocol's first version; the rest
(configuration, log, unread) came later, and a report from an older broker lacks them."""


def report_from(obj: Mapping[str, Any]) -> Report:
    """A report as a broker of any version sends it, as this version's `Report` (the
    sections an older broker lacks are absent; keys a newer one adds are kept).

    Raises:
        ValueError: it lacks what every report has (naming it).
    """
    missing = [key for key in REQUIRED if key not in obj]
    if missing:
        raise ValueError(f"the status report lacks {', '.join(missing)}")
    return cast("Report", dict(obj))


def format_status(report: Report) -> str:
    """Render a status report as the table `port-broker status` prints."""
    conns = report["connections"]
    lines = [
        f"port-broker {report['version']}, pid {report['pid']}, "
        f"up {_duration(report['uptime'])}, config {report['config']}",
        f"clients: {conns['active']} connected, {conns['total']} served "
        f"(limit {conns['limit']}); {report['grants']} grants, {report['denials']} denials",
    ]
    configuration = report.get("configuration")
    if configuration is not None:
        lines.append(
            f"configuration: generation {configuration['generation']}, loaded "
            f"{_when(configuration['loaded'])}"
        )
        refused = configuration["refused"]
        if refused:
            lines.append(f"  last reload refused at {_when(refused['time'])}: {refused['reason']}")
    no_log: Log = {"suppressed": 0, "lost": 0}
    log = report.get("log", no_log)
    if log["suppressed"] or log["lost"]:
        lines.append(
            f"log: {log['suppressed']} notices about clients summed up, not logged one by "
            f"one; {log['lost']} records the journal did not take"
        )
    none_unread: Unread = {"fds": 0, "holders": []}
    unread = report.get("unread", none_unread)
    if unread["fds"]:
        holders = ", ".join(f"uid {h['uid']}: {h['fds']}" for h in unread["holders"])
        lines.append(
            f"unread: {unread['fds']} granted sockets not read yet by their receivers ({holders})"
        )
    lines.append("")
    rows = [["NAME", "PROTO", "ADDRESS", "GRANTS", "DENIALS"]]
    rows += [[s["name"], transport(s["family"], s["type"]), s["address"], str(s["grants"]),
              str(s["denials"])] for s in report["sockets"]]  # fmt: skip
    lines.append(table(rows) if len(rows) > 1 else "holding no sockets")
    if report["recent"]:
        lines += ["", "recent:"]
        for event in report["recent"][-10:]:
            lines.append(
                f"  {_when(event['time'])} {event['decision']:5} {event['socket']} uid "
                f"{event['uid']} ({event['user'] or '-'}) pid {event['pid']} unit "
                f"{event['unit'] or '-'}"
            )
    return "\n".join(lines)


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def table(rows: list[list[str]]) -> str:
    """`rows` as columns padded to their widest cell (`status`, `list`)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
