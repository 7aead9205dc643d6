"""Tests for `broker.ledger`: every outcome counted and logged in one place.

The ledger is fed the outcomes a connection produces (broker/daemon/connection.py) and writes
real audit lines to stderr; the refusal-log windows run on a clock the test moves.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.daemon.audit import Audit
from broker.daemon.connection import Kind, Outcome
from broker.daemon.identity import Peer
from broker.daemon.ledger import (
    NOTICE_LOG_TOTAL,
    RECENT_EVENTS,
    REFUSAL_LOG_BURST,
    REFUSAL_LOG_UIDS,
    REFUSAL_LOG_WINDOW,
    SUMMARY_LINES,
    Ledger,
    RefusalLimiter,
)
from broker.errors import Code
from tests.harness.inprocess import audit_fields, audit_lines

ALICE = Peer(pid=10, uid=1000, gid=1000, user="alice")
GRANT = Outcome(Kind.GRANT, "uid 1000 is in users", "http")
DENIAL = Outcome(Kind.DENIAL, "not in users", "secret", Code.DENIED)
STATUS_DENIAL = Outcome(Kind.STATUS_DENIAL, "not in [status]", code=Code.DENIED)


class Clock:
    """Seconds, moved by the test (the broker passes trio's clock)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def ledger(clock: Clock | None = None) -> Ledger:
    return Ledger(Audit(journal=False), clock or Clock())


def test_a_status_denial_is_a_refusal_not_a_socket_denial(
    capsys: pytest.CaptureFixture[str],
) -> None:
    books = ledger()
    books.record(STATUS_DENIAL, ALICE)
    assert books.refusals == {"denied": 1}
    assert books.denials.total() == 0
    assert list(books.recent) == []
    (line,) = audit_lines(capsys.readouterr().err, "denied the status report")
    assert audit_fields(line)["operation"] == "status"


def test_recent_keeps_the_last_decisions_only() -> None:
    books = ledger()
    for _ in range(RECENT_EVENTS + 5):
        books.record(GRANT, ALICE)
    books.record(DENIAL, ALICE)
    assert len(books.recent) == RECENT_EVENTS
    assert books.recent[-1]["decision"] == "deny"
    assert (books.grants.total(), books.denials.total()) == (RECENT_EVENTS + 5, 1)


def test_refusals_are_logged_within_a_budget_per_uid_and_grants_always(
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock = Clock()
    books = ledger(clock)
    bob = Peer(pid=11, uid=1001, gid=1001, user="bob")
    for _ in range(REFUSAL_LOG_BURST + 30):
        books.record(DENIAL, ALICE)
    books.record(DENIAL, bob)  # another uid's budget is its own
    books.record(GRANT, ALICE)
    err = capsys.readouterr().err
    assert len(audit_lines(err, "denied socket 'secret' to user alice")) == REFUSAL_LOG_BURST
    assert len(audit_lines(err, "denied socket 'secret' to user bob")) == 1
    assert len(audit_lines(err, "granted socket 'http'")) == 1
    assert books.denials["secret"] == REFUSAL_LOG_BURST + 31  # all counted
    books.limiter.flush()  # the window is not over: nothing summed up yet
    assert capsys.readouterr().err == ""
    assert books.limiter.suppressed == 30
    clock.now = REFUSAL_LOG_WINDOW
    books.limiter.flush()
    (summary,) = audit_lines(capsys.readouterr().err, "were not logged")
    assert summary.startswith(
        f"port-broker: notice: 30 more notices of uid 1000 in {REFUSAL_LOG_WINDOW:g} s"
    )
    assert audit_fields(summary)["suppressed"] == "30"
    books.record(DENIAL, ALICE)  # a new window: logged again
    assert len(audit_lines(capsys.readouterr().err, "denied socket")) == 1


def test_tracking_too_many_uids_ends_every_window_early(
    capsys: pytest.CaptureFixture[str],
) -> None:
    books = ledger()
    for _ in range(REFUSAL_LOG_BURST + 1):
        books.record(DENIAL, ALICE)  # one dropped
    for uid in range(2000, 2000 + REFUSAL_LOG_UIDS):  # a flood of uids
        books.record(DENIAL, Peer(pid=1, uid=uid, gid=uid))
    books.limiter.flush()
    (summary, *_) = audit_lines(capsys.readouterr().err, "were not logged")
    assert "1 more notices of uid 1000" in summary
    assert len(books.limiter._windows) <= REFUSAL_LOG_UIDS


def test_an_internal_failure_is_always_logged(capsys: pytest.CaptureFixture[str]) -> None:
    books = ledger()
    for _ in range(REFUSAL_LOG_BURST + 5):
        books.record(Outcome(Kind.INTERNAL, "a bug", code=Code.INTERNAL, detail="tb"), ALICE)
    assert books.refusals == {"internal": REFUSAL_LOG_BURST + 5}
    err = capsys.readouterr().err
    assert len(audit_lines(err, "port-broker: error: a bug")) == REFUSAL_LOG_BURST + 5


def test_many_uids_together_log_no_more_than_the_overall_budget(
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock = Clock()
    books = ledger(clock)
    uids = range(3000, 3000 + 2 * NOTICE_LOG_TOTAL)  # each within its own budget
    for uid in uids:
        books.record(DENIAL, Peer(pid=1, uid=uid, gid=uid))
        books.record(GRANT, Peer(pid=1, uid=uid, gid=uid))  # grants: never held back
    err = capsys.readouterr().err
    assert len(audit_lines(err, "denied socket")) == NOTICE_LOG_TOTAL
    assert len(audit_lines(err, "granted socket")) == len(uids)
    clock.now = REFUSAL_LOG_WINDOW
    books.limiter.flush()
    summaries = audit_lines(capsys.readouterr().err, "were not logged")
    # SUMMARY_LINES uids one by one, the rest in one line: bounded, whoever floods.
    assert len(summaries) == SUMMARY_LINES + 1
    rest = len(uids) - NOTICE_LOG_TOTAL - SUMMARY_LINES
    assert f"{rest} more notices of {rest} other uids" in summaries[-1]
    assert books.limiter.suppressed == len(uids) - NOTICE_LOG_TOTAL
    books.record(DENIAL, ALICE)  # a new overall window
    assert len(audit_lines(capsys.readouterr().err, "denied socket")) == 1


def test_notices_share_the_refusals_budget(capsys: pytest.CaptureFixture[str]) -> None:
    books = ledger()
    for _ in range(REFUSAL_LOG_BURST):
        books.notice(ALICE, "dropped user alice: Broken pipe")
    books.warning(ALICE.uid, "the user database did not answer for uid 1000")
    books.record(DENIAL, ALICE)
    err = capsys.readouterr().err
    lines = audit_lines(err, "port-broker: ")
    assert len(lines) == REFUSAL_LOG_BURST
    assert all(audit_fields(line)["peer_uid"] == "1000" for line in lines)
    assert books.limiter.suppressed == 2


def test_a_window_that_ended_before_the_next_notice_is_still_summed_up(
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock = Clock()
    books = ledger(clock)
    for _ in range(REFUSAL_LOG_BURST + 30):
        books.record(DENIAL, ALICE)
    clock.now = REFUSAL_LOG_WINDOW  # over, and not yet flushed: the next notice comes first
    books.record(DENIAL, ALICE)
    books.limiter.flush()
    err = capsys.readouterr().err
    assert len(audit_lines(err, "denied socket 'secret'")) == REFUSAL_LOG_BURST + 1
    summaries = audit_lines(err, "were not logged")
    assert len(summaries) == 1, "the 30 left out of the ended window were never summed up"
    assert "30 more notices of uid 1000 in" in summaries[0]


bursts = st.lists(
    st.tuples(
        st.integers(0, 3),  # which uid
        st.integers(1, 2 * REFUSAL_LOG_BURST),  # how many notices at once
        st.floats(0, REFUSAL_LOG_WINDOW * 1.5),  # seconds after the one before
        st.booleans(),  # flush after it (the broker does every STATUS_INTERVAL)
    ),
    max_size=40,
)


@settings(database=None, deadline=None)
@given(bursts)
def test_every_notice_is_logged_or_summed_up(steps: list[tuple[int, int, float, bool]]) -> None:
    """Invariant: whatever the timing, each notice is logged or counted in exactly one
    summary, once every window has ended."""
    clock = Clock()
    summed: list[int] = []
    limiter = RefusalLimiter(clock, lambda uid, dropped, uids: summed.append(dropped))
    logged = notices = 0
    for uid, count, after, flush in steps:
        clock.now += after
        for _ in range(count):
            logged += limiter.allow(1000 + uid)
        notices += count
        if flush:
            limiter.flush()
    limiter.flush(everything=True)
    assert sum(summed) == limiter.suppressed == notices - logged
