"""Tests for `broker.admission`: who gets a connection slot, without I/O.

The limits (global, per uid) and the room kept for the peers the policy names; the
server's use of them against real connections is in tests/test_server.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.daemon.admission import (
    KNOWN_NAMED_SECONDS,
    NAMED_RESERVE,
    UNNAMED_BURST,
    UNNAMED_RATE,
    UNNAMED_TOTAL_BURST,
    UNNAMED_TOTAL_RATE,
    Admission,
    Limits,
)
from broker.daemon.identity import Marks

SOURCE = "/etc/port-broker/broker.toml"
NAMED = 33
"""A uid a users entry names: its connection rate is not limited."""


class Clock:
    """Seconds, moved by the test (the broker passes trio's clock)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limits(max_connections: int, max_per_user: int) -> Limits:
    return Limits(max_connections, max_per_user, SOURCE, frozenset({NAMED}))


def admission(max_connections: int, max_per_user: int, clock: Clock | None = None) -> Admission:
    return Admission(lambda: limits(max_connections, max_per_user), clock or Clock())


def admitted_in_a_row(slots: Admission, uid: int | None, marks: Marks | None = None) -> int:
    """How many connections of `uid` (showing `marks`) are admitted (each left at once)
    before one is refused: never more than twice a burst are tried, so that a limit that
    no longer holds fails the test instead of looping for ever."""
    for admitted in range(2 * int(UNNAMED_BURST)):
        if slots.admit(uid, (lambda: marks) if marks else None) is not None:
            return admitted
        slots.leave()
    raise AssertionError(f"uid {uid}: {2 * int(UNNAMED_BURST)} connections in a row admitted")


def held_to_no_rate(slots: Admission, uid: int, marks: Marks) -> bool:
    """Whether twice a burst of connections of `uid` showing `marks` are all admitted."""
    for _ in range(2 * int(UNNAMED_BURST)):
        if slots.admit(uid, lambda: marks) is not None:
            return False
        slots.leave()
    return True


def test_unnamed_peers_share_all_but_the_reserved_slots() -> None:
    slots = admission(16, 64)
    assert limits(16, 64).reserved == 16 // NAMED_RESERVE == 4
    for uid in range(12):  # 12 attacking uids, one connection each
        assert slots.admit(NAMED) is None
        assert slots.admit_peer(70000 + uid, named=False) is None
    assert slots.admit(NAMED) is None
    refusal = slots.admit_peer(70012, named=False)
    assert refusal == (
        f"the broker is serving 12 connections of peers no rule in {SOURCE} names, all it "
        "keeps for them; retry shortly"
    )
    slots.leave()
    for _ in range(4):  # the named ones still get in, up to the global limit
        assert slots.admit(NAMED) is None
        assert slots.admit_peer(33, named=True) is None
    assert slots.admit(NAMED) is not None  # full now, for everyone


def test_one_uid_is_held_to_its_own_limit_named_or_not() -> None:
    slots = admission(1024, 2)
    assert slots.admit_peer(33, named=True) is None
    assert slots.admit_peer(33, named=True) is None
    assert slots.admit_peer(33, named=True) == (
        f"uid 33 already has 2 connections to the broker, its limit "
        f"(max_connections_per_user in {SOURCE}); retry shortly"
    )
    slots.leave_peer(33, named=True)
    assert slots.admit_peer(33, named=True) is None


def test_a_reload_moves_the_limits_and_the_reserve_with_them() -> None:
    # Admission asks for the limits in force at each decision: a reload's apply to the
    # next connection, and those over a new limit are not cut.
    current = [limits(16, 64)]
    slots = Admission(lambda: current[0], Clock())
    for uid in range(4):
        assert slots.admit(NAMED) is None
        assert slots.admit_peer(70000 + uid, named=False) is None
    current[0] = limits(4, 64)
    assert current[0].reserved == 1
    assert slots.admit(NAMED) is not None  # 4 of 4 taken
    assert slots.report() == {"active": 4, "total": 5, "limit": 4}
    assert limits(1, 64).reserved == 1  # at least one, always


events = st.lists(
    st.tuples(st.booleans(), st.integers(0, 5), st.booleans()), max_size=200
)  # (connect or leave, uid, named)


@given(events)
@settings(max_examples=200, deadline=None)
def test_counts_never_drift_and_the_reserve_holds(steps: list[tuple[bool, int, bool]]) -> None:
    slots = admission(8, 3)
    held: list[tuple[int, bool]] = []
    for connect, uid, named in steps:
        if connect:
            if slots.admit(NAMED) is not None:
                continue
            if slots.admit_peer(uid, named=named) is not None:
                slots.leave()
                continue
            held.append((uid, named))
        elif held:
            gone, was_named = held.pop(uid % len(held))
            slots.leave_peer(gone, named=was_named)
            slots.leave()
        assert slots.active == len(held) <= 8
        assert slots.unnamed == sum(not n for _, n in held) <= 8 - limits(8, 3).reserved
        assert all(count <= 3 for count in slots.per_uid.values())
        assert sum(slots.per_uid.values()) == len(held)


@pytest.mark.parametrize("limit", [1, 3, 4, 1024])
def test_the_reserve_is_a_quarter_and_never_everything(limit: int) -> None:
    assert limits(limit, 64).reserved == max(1, limit // 4)
    assert limit - limits(limit, 64).reserved >= 0


def test_a_uid_no_users_entry_names_is_held_to_its_connection_rate() -> None:
    clock = Clock()
    slots = admission(1024, 64, clock)
    for _ in range(int(UNNAMED_BURST)):  # a burst passes
        assert slots.admit(61000) is None
        slots.leave()
    refusal = slots.admit(61000)
    assert refusal == (
        f"uid 61000 opens connections faster than {UNNAMED_RATE:g} a second, the most for a "
        f"uid no rule in {SOURCE} names; retry shortly"
    )
    assert slots.active == 0  # a refusal holds no slot
    for _ in range(1000):  # the named uid is never held back, flood or not
        assert slots.admit(NAMED) is None
        slots.leave()
    clock.now += 1.0  # a second later: a second's worth again
    for _ in range(int(UNNAMED_RATE)):
        assert slots.admit(61000) is None
        slots.leave()
    assert slots.admit(61000) is not None


def test_many_uids_together_are_held_to_the_total_rate() -> None:
    clock = Clock()
    slots = admission(100_000, 64, clock)
    admitted = 0
    for uid in range(70000, 70000 + 4000):  # each within its own rate
        if slots.admit(uid) is None:
            admitted += 1
            slots.leave()
    assert admitted == UNNAMED_TOTAL_BURST
    refusal = slots.admit(80000)
    assert refusal is not None
    assert refusal.endswith(f"faster than {UNNAMED_TOTAL_RATE:g} a second together; retry shortly")
    assert slots.admit(NAMED) is None


@pytest.mark.parametrize(
    ("named_by", "other"),
    [(Marks(unit="web.service"), Marks(unit="session-3.scope")),
     (Marks(groups=frozenset({33})), Marks(groups=frozenset({1000})))],
    ids=["unit", "group"],
)  # fmt: skip
def test_a_uid_found_named_by_a_group_or_unit_passes_the_rate_only_showing_it(
    named_by: Marks, other: Marks
) -> None:
    clock = Clock()
    slots = admission(100_000, 1000, clock)
    worker = 4242  # named by a unit or group: admission learns it once it is identified
    assert slots.admit(worker) is None
    assert slots.admit_peer(worker, named=True, by=named_by) is None
    for uid in range(70000, 70000 + 3000):  # a flood from many uids empties the total
        if slots.admit(uid) is None:
            slots.leave()
    assert slots.admit(70000 + 3001) is not None
    # The worker is not held back; the same uid showing something else (a shared
    # account's other process) is, like anyone no rule names.
    assert held_to_no_rate(slots, worker, named_by)
    assert admitted_in_a_row(slots, worker, other) == 0
    assert admitted_in_a_row(slots, worker) == 0
    clock.now += KNOWN_NAMED_SECONDS  # not seen named for a while: its own rate again
    assert admitted_in_a_row(slots, worker, named_by) == UNNAMED_BURST


def test_a_refusal_by_the_total_rate_spends_no_token_of_the_uid() -> None:
    clock = Clock()
    slots = admission(100_000, 1000, clock)
    for uid in range(70000, 70000 + int(UNNAMED_TOTAL_BURST)):
        assert slots.admit(uid) is None
        slots.leave()
    for _ in range(50):  # refused by the total, again and again
        assert slots.admit(61000) is not None
    clock.now += 1.0  # the total refills: the uid still has its whole burst
    assert admitted_in_a_row(slots, 61000) == UNNAMED_BURST


def test_a_refusal_because_the_broker_is_full_spends_no_token() -> None:
    clock = Clock()
    slots = admission(1, 1000, clock)
    assert slots.admit(NAMED) is None  # the one slot, taken
    for _ in range(50):  # refused for the slots, again and again, at one instant
        assert "serving its limit of 1 connections" in (slots.admit(61000) or "")
    slots.leave()
    assert admitted_in_a_row(slots, 61000) == UNNAMED_BURST  # its whole burst still


def test_an_unmapped_peer_named_by_its_unit_is_not_remembered() -> None:
    clock = Clock()
    slots = admission(100_000, 1000, clock)
    overflow = 65534  # what every unmapped uid shows as
    assert slots.admit_peer(overflow, named=True, mapped=False) is None
    assert admitted_in_a_row(slots, overflow) == UNNAMED_BURST  # it names nobody


def test_a_connection_the_kernel_gives_no_uid_is_held_to_the_connection_rate() -> None:
    # admit(None): SO_PEERCRED named no uid. That is no reason to be let in faster.
    clock = Clock()
    slots = admission(100_000, 1000, clock)
    assert admitted_in_a_row(slots, None) == UNNAMED_BURST
    refusal = slots.admit(None)
    assert refusal is not None
    assert refusal.startswith("a peer with no credentials opens connections faster than")
    assert slots.active == 0
    assert slots.admit(NAMED) is None  # the named are not held back by it
