"""What the broker has done, counted and logged in one place: grants, denials, every
refusal by its code, the recent events for `port-broker status`, and the budgets for
logging refusals and every other notice about a client.

Every outcome of a connection (broker/daemon/connection.py) comes through `record`, every busy
refusal through `busy` and every other notice about a client through `notice`: the
counters, the audit trail and the `recent` list cannot disagree.

Must never: suppress or delay a grant's record (only refusals are rate-limited), or
raise into the server (the audit trail itself never does).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from broker.daemon.audit import Audit, Level
from broker.daemon.connection import Kind, Outcome
from broker.daemon.identity import Peer
from broker.errors import Code
from broker.status import Event, SocketStatus

if TYPE_CHECKING:
    from collections.abc import Mapping

    from broker.daemon.standing import Held

Summarize = Callable[[int | None, int, int], None]
"""(uid or None for "the others", notices not logged, how many uids)."""

REFUSAL_LOG_BURST: Final = 20
REFUSAL_LOG_WINDOW: Final = 10.0
"""At most REFUSAL_LOG_BURST notices per uid (refusals, dropped connections, user
database timeouts) are logged in each REFUSAL_LOG_WINDOW seconds, the rest only counted
and summed up: one user's flood of refused requests must not drown the trail, nor push
grants past the journal's limits. Grants are always logged."""

NOTICE_LOG_TOTAL: Final = 500
"""Notices logged in one REFUSAL_LOG_WINDOW from all uids together: many uids (a
rootless-container user owns 65,536) flood no more than one would, by much."""

SUMMARY_LINES: Final = 10
"""uids summed up one by one at each flush; the others share one line."""

REFUSAL_LOG_UIDS: Final = 4096
"""uids whose refusal-log windows are tracked at once; past that all windows end early."""

RECENT_EVENTS: Final = 32
"""Grants and denials kept for `port-broker status`; the journal keeps them all."""


_OPERATIONS: Final = {
    Kind.STATUS_DENIAL: ("status", "the status report"),
    Kind.RELOAD_DENIAL: ("reload", "a reload"),
}
"""Denials of an operation other than acquire: its name on the wire, and in words."""


@dataclass
class _Window:
    """One uid's refusal-log window."""

    start: float
    logged: int = 0
    dropped: int = 0


class RefusalLimiter:
    """The budgets for logging notices: REFUSAL_LOG_BURST per uid and NOTICE_LOG_TOTAL
    for all, per REFUSAL_LOG_WINDOW; what is left out is summed up per uid when its
    window ends (SUMMARY_LINES uids at each `flush`, one line for the rest).

    Args:
        clock: Seconds, monotonic (trio's clock in the broker, so tests can jump it).
        summarize: Called with (uid, how many were not logged, 1) for a window that
            dropped some, and with (None, total, how many uids) for the rest of a flush.
    """

    def __init__(self, clock: Callable[[], float], summarize: Summarize) -> None:
        self._clock = clock
        self._summarize = summarize
        self._windows: dict[int, _Window] = {}
        self._ended: list[tuple[int, int]] = []  # (uid, dropped), summed up at `flush`
        self._total_start = float("-inf")  # set by the first notice: trio's clock may not
        self._total = 0  # run yet when the broker is built
        self.suppressed = 0

    def allow(self, uid: int) -> bool:
        """Whether another notice of `uid` may be logged now; if not, it is counted."""
        now = self._clock()
        window = self._windows.get(uid)
        if window is not None and now - window.start >= REFUSAL_LOG_WINDOW:
            self._end(uid, window)
            window = None
        if window is None:
            if len(self._windows) >= REFUSAL_LOG_UIDS:
                self._end_windows(everything=True)
            window = self._windows[uid] = _Window(now)
        if now - self._total_start >= REFUSAL_LOG_WINDOW:
            self._total_start, self._total = now, 0
        if window.logged < REFUSAL_LOG_BURST and self._total < NOTICE_LOG_TOTAL:
            window.logged += 1
            self._total += 1
            return True
        window.dropped += 1
        self.suppressed += 1
        return False

    def flush(self, *, everything: bool = False) -> None:
        """End the windows that are over (all of them, if `everything`) and sum up
        what they left out."""
        self._end_windows(everything=everything)
        ended, self._ended = self._ended, []
        ended.sort(key=lambda item: -item[1])
        for uid, dropped in ended[:SUMMARY_LINES]:
            self._summarize(uid, dropped, 1)
        rest = ended[SUMMARY_LINES:]
        if rest:
            self._summarize(None, sum(dropped for _, dropped in rest), len(rest))

    def _end_windows(self, *, everything: bool) -> None:
        now = self._clock()
        for uid, window in list(self._windows.items()):
            if everything or now - window.start >= REFUSAL_LOG_WINDOW:
                self._end(uid, window)

    def _end(self, uid: int, window: _Window) -> None:
        del self._windows[uid]
        if window.dropped:
            self._ended.append((uid, window.dropped))


class Ledger:
    """The broker's counters, recent events and audit records.

    Args:
        audit: Where records go.
        clock: For the refusal-log windows (see `RefusalLimiter`).
    """

    def __init__(self, audit: Audit, clock: Callable[[], float]) -> None:
        self.audit = audit
        self.grants: Counter[str] = Counter()
        self.denials: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()
        self.recent: deque[Event] = deque(maxlen=RECENT_EVENTS)
        self.limiter = RefusalLimiter(clock, self._summarize)

    def record(self, outcome: Outcome, peer: Peer) -> None:
        """Count `outcome` and log it (refusals within the per-uid budget)."""
        name = outcome.socket or ""
        if outcome.kind is Kind.GRANT:
            self.grants[name] += 1
            self.audit.decision(True, peer, name, outcome.reason)
            self._remember(True, peer, name, outcome.reason)
            return
        if outcome.code is not None:
            self.refusals[outcome.code] += 1
        if outcome.kind is Kind.INTERNAL:  # always logged: a bug of ours
            self.audit.log(Level.ERROR, outcome.reason, EXCEPTION=outcome.detail or "")
            return
        logged = self.limiter.allow(peer.uid)
        if outcome.kind is Kind.DENIAL:
            if outcome.code == Code.DENIED:
                self.denials[name] += 1
            if logged:
                code = None if outcome.code is None else str(outcome.code)
                self.audit.decision(False, peer, name, outcome.reason, code)
            self._remember(False, peer, name, outcome.reason)
        elif not logged:
            pass
        elif outcome.kind in _OPERATIONS:
            operation, what = _OPERATIONS[outcome.kind]
            self.audit.log(Level.NOTICE, f"denied {what} to {peer.describe()}",
                           DECISION="deny", OPERATION=operation, PEER_UID=peer.uid,
                           PEER_PID=peer.pid, REASON=outcome.reason[:512])  # fmt: skip
        else:
            self.audit.log(
                Level.NOTICE,
                f"refused {peer.describe()}: {outcome.reason}",
                REFUSAL_CODE=str(outcome.code),
                PEER_UID=peer.uid,
                PEER_PID=peer.pid,
            )

    def notice(
        self, peer: Peer | int, message: str, level: Level = Level.NOTICE, **fields: object
    ) -> None:
        """Log a notice about one client (its connection dropped, its user unknown to
        a silent NSS) within its uid's budget, like a refusal."""
        uid = peer if isinstance(peer, int) else peer.uid
        if self.limiter.allow(uid):
            self.audit.log(level, message, PEER_UID=uid, **fields)

    def warning(self, uid: int, message: str) -> None:
        """`notice` at the warning level (what the user database reports)."""
        self.notice(uid, message, Level.WARNING)

    def busy(self) -> None:
        """Count a connection refused for a limit (not logged: it costs nothing)."""
        self.refusals[Code.BUSY] += 1

    def failure(self, message: str, detail: str) -> None:
        """Count and log a failure of the broker's own outside any request."""
        self.refusals[Code.INTERNAL] += 1
        self.audit.log(Level.ERROR, message, EXCEPTION=detail)

    def sockets(self, held: Mapping[str, tuple[Held, ...]]) -> list[SocketStatus]:
        """The status report's `sockets`: each held socket with its name's counts."""
        return [
            {
                "name": name,
                "family": info.family,
                "type": info.type,
                "address": info.address,
                "grants": self.grants[name],
                "denials": self.denials[name],
            }
            for name, group in held.items()
            for _, info in group
        ]

    def _remember(self, allowed: bool, peer: Peer, name: str, reason: str) -> None:
        self.recent.append(
            {
                "time": time.time(),
                "decision": "grant" if allowed else "deny",
                "socket": name,
                "uid": peer.uid,
                "user": peer.user,
                "pid": peer.pid,
                "unit": peer.unit,
                "reason": reason,
            }
        )

    def _summarize(self, uid: int | None, dropped: int, uids: int) -> None:
        window = f"in {REFUSAL_LOG_WINDOW:g} s were not logged"
        if uid is not None:
            self.audit.log(Level.NOTICE, f"{dropped} more notices of uid {uid} {window}",
                           PEER_UID=uid, SUPPRESSED=dropped)  # fmt: skip
        else:
            self.audit.log(Level.NOTICE, f"{dropped} more notices of {uids} other uids {window}",
                           SUPPRESSED=dropped, PEER_UIDS=uids)  # fmt: skip
