"""The audit trail: every grant and denial, with who, what and why.

Under systemd (stderr is the journal stream), each event goes to the journal with
structured fields, through journald's native socket without ever waiting for it
(broker/daemon/journal.py: a stalled journald costs records, counted, not grants) —
`journalctl -u port-broker MESSAGE_ID=<grant id>`, or
`journalctl -o json` to see PEER_UID, PEER_PID, PEER_UNIT, PEER_CGROUP, SOCKET,
DECISION, REASON.
Otherwise each event is one `key=value` line on stderr.

Every message and field is made printable (`names.printable`) before it is written:
whatever a client or the system puts in it (a request's keys, a cgroup's name, a user
name), one event is one line on stderr and one single-line MESSAGE in the journal,
without control characters. Only EXCEPTION, a traceback, keeps its line breaks (a
journal field of its own; escaped too on stderr).

Must never: raise into the server, or wait for the journal (a full or stopped journal
must not stop grants), or log what a client sent verbatim beyond a bounded length.
"""

from __future__ import annotations

import enum
import os
import re
import sys
from collections.abc import Mapping
from typing import Final

from broker.daemon.identity import Peer
from broker.daemon.journal import BACKLOG, SOCKET, Journal
from broker.names import printable, unprintable


class Level(enum.StrEnum):
    """How much an audit event matters (syslog's levels, as the journal takes them)."""

    DEBUG = "debug"
    INFO = "info"
    NOTICE = "notice"
    WARNING = "warning"
    ERROR = "error"

    @property
    def priority(self) -> int:
        """The journal's PRIORITY= (syslog's numbering)."""
        return _PRIORITY[self]


_PRIORITY: Final = {
    Level.DEBUG: 7,
    Level.INFO: 6,
    Level.NOTICE: 5,
    Level.WARNING: 4,
    Level.ERROR: 3,
}


GRANT_MESSAGE_ID: Final = "5c8a1f3e2b7d4e0a9f6c1b2d3e4f5a01"
"""MESSAGE_ID of grant events: `journalctl MESSAGE_ID=5c8a1f3e…a01`."""
DENIAL_MESSAGE_ID: Final = "5c8a1f3e2b7d4e0a9f6c1b2d3e4f5a02"
"""MESSAGE_ID of denial events."""


def _stderr_is_journal() -> bool:
    # systemd sets JOURNAL_STREAM=dev:inode when stderr is connected to journald.
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(x) for x in stream.split(":"))
        st = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


_BARE: Final = re.compile(r"[\w.\-/@:\[\]]+")
"""Values written without quotes in key=value lines."""


def _quote(value: object) -> str:
    text = str(value)
    if _BARE.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


MULTILINE_FIELDS: Final = frozenset({"EXCEPTION"})
"""Fields that keep their line breaks (each line made printable): tracebacks."""


def _field(key: str, value: object) -> object:
    if isinstance(value, int):
        return value
    text = str(value)
    if key in MULTILINE_FIELDS:
        return "\n".join(printable(line) for line in text.split("\n"))
    return printable(text)


class Audit:
    """Where events go: the journal if stderr is connected to it, else stderr lines.

    Args:
        journal: Write to the journal (default: if stderr is the journal stream).
        socket: journald's native socket (tests point it elsewhere).
    """

    def __init__(self, *, journal: bool | None = None, socket: str = SOCKET) -> None:
        self.journal = _stderr_is_journal() if journal is None else journal
        self._journal = Journal(_lost, socket) if self.journal else None
        self._stderr_lost = 0

    @property
    def lost(self) -> int:
        """Records the journal (or stderr) did not take."""
        return self._stderr_lost + (self._journal.lost if self._journal else 0)

    @property
    def unsent(self) -> int:
        """Records waiting for journald to take them."""
        return self._journal.waiting if self._journal else 0

    def close(self) -> None:
        """At exit: give records waiting for journald a moment to go."""
        if self._journal is not None:
            self._journal.close()

    def log(self, level: Level, message: str, **fields: object) -> None:
        """Record `message` at `level` with extra structured `fields` (UPPER_CASE keys)."""
        # One search over the whole record first: a grant's record is written thousands
        # of times a second, and holds nothing to escape but in an attack.
        if unprintable(" ".join([message, *map(str, fields.values())])):
            message = printable(message)
            fields = {key: _field(key, value) for key, value in fields.items()}
        if self._journal is not None:
            self._journal.send({"MESSAGE": message, "PRIORITY": level.priority,
                                "SYSLOG_IDENTIFIER": "port-broker", **fields})  # fmt: skip
            return
        try:
            extras = "".join(
                f" {k.lower()}={_quote(v)}" for k, v in fields.items() if k != "MESSAGE_ID"
            )
            sys.stderr.write(f"port-broker: {level}: {message}{extras}\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            self._stderr_lost += 1  # never take the broker down; `status` shows the gap

    def decision(
        self, allowed: bool, peer: Peer, socket: str, reason: str, code: str | None = None
    ) -> None:
        """Record one grant or denial of `socket` to `peer`."""
        verb = "granted" if allowed else "denied"
        fields: Mapping[str, object] = {
            "MESSAGE_ID": GRANT_MESSAGE_ID if allowed else DENIAL_MESSAGE_ID,
            "DECISION": "grant" if allowed else "deny",
            "SOCKET": socket,
            "PEER_UID": peer.uid,
            "PEER_GID": peer.gid,
            "PEER_PID": peer.pid,
            "PEER_USER": peer.user or "",
            "PEER_UNIT": peer.unit or "",
            "PEER_CGROUP": peer.cgroup or "",
            "REASON": reason[:512],
        }
        if code is not None:
            fields = {**fields, "REFUSAL_CODE": code}
        self.log(
            Level.INFO if allowed else Level.NOTICE,
            f"{verb} socket {socket!r} to {peer.describe()}",
            **fields,
        )


def _lost(records: int, seconds: float) -> dict[str, object]:
    """The record saying that `records` were lost while journald took none."""
    return {
        "MESSAGE": (
            f"{records} audit records were lost: the journal took none for {seconds:.1f} s, "
            f"and the broker keeps at most {BACKLOG} meanwhile (status: log.lost)"
        ),
        "PRIORITY": Level.WARNING.priority,
        "SYSLOG_IDENTIFIER": "port-broker",
        "LOST_RECORDS": records,
    }
