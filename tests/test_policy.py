"""Tests for `broker.policy`: credentials and a socket name in, a decision out.

The policy is pure, so peers are built directly. Deny by default — no rule, an empty
rule, a rule the peer misses, root included — and every denial names the peer, the
socket, the rule and the file the policy came from.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.daemon.identity import Peer
from broker.daemon.policy import Decision, Policy, Rule

SOURCE = "/etc/port-broker/broker.toml"
WWW_DATA = 33
ADM = 4
WEB = 2000


def peer(
    uid: int = WWW_DATA,
    gid: int | None = None,
    *,
    groups: tuple[int, ...] = (),
    unit: str | None = None,
    user: str | None = "www-data",
    pid: int = 4242,
) -> Peer:
    """A peer as `identify` builds it: groups hold the gid plus the database groups."""
    gid = uid if gid is None else gid
    return Peer(pid=pid, uid=uid, gid=gid, user=user, groups=frozenset({gid, *groups}), unit=unit)


ROOT = peer(0, user="root", pid=1)


def policy(**sockets: Rule) -> Policy:
    return Policy(sockets=sockets, status=Rule(uids=frozenset({0})), source=SOURCE)


# --- nothing configured ----------------------------------------------------------------


def test_the_empty_policy_denies_everyone_root_included() -> None:
    empty = Policy()
    for who in (ROOT, peer(), peer(unit="web.service")):
        decision = empty.check_acquire("http", who)
        assert decision == Decision(
            False,
            f"{who.describe()} may not acquire socket 'http': (no configuration) has no "
            "[sockets.http] rule, so nobody may; add one with users, groups or units",
        )
        assert not empty.may_acquire("http", who)
        assert not empty.check_status(who).allowed


def test_a_socket_with_no_rule_is_denied_naming_peer_socket_rule_and_file() -> None:
    decision = policy(http=Rule(uids=frozenset({WWW_DATA}))).check_acquire("https", peer())
    assert not decision.allowed
    assert decision.reason == (
        "user www-data (uid 33, pid 4242) may not acquire socket 'https': "
        f"{SOURCE} has no [sockets.https] rule, so nobody may; add one with users, "
        "groups or units"
    )


def test_an_empty_rule_allows_nobody() -> None:
    rules = policy(http=Rule())
    assert Rule().empty
    for who in (ROOT, peer(), peer(groups=(ADM,), unit="web.service")):
        decision = rules.check_acquire("http", who)
        assert not decision.allowed
        assert decision.reason == (
            f"{who.describe()} may not acquire socket 'http': not in users, groups or "
            f"units of [sockets.http] in {SOURCE}"
        )


@pytest.mark.parametrize(
    "rule",
    [Rule(uids=frozenset({1})), Rule(gids=frozenset({1})), Rule(units=("x.service",))],
)
def test_a_rule_with_any_entry_is_not_empty(rule: Rule) -> None:
    assert not rule.empty


# --- users ------------------------------------------------------------------------------


def test_a_listed_user_is_allowed_and_told_why() -> None:
    rules = policy(http=Rule(uids=frozenset({WWW_DATA, 1000})))
    assert rules.check_acquire("http", peer()) == Decision(True, "uid 33 is in users")
    assert rules.may_acquire("http", peer())


def test_an_unlisted_user_is_denied_even_root() -> None:
    rules = policy(http=Rule(uids=frozenset({1000})))
    for who in (peer(), ROOT):
        decision = rules.check_acquire("http", who)
        assert not decision.allowed
        assert who.describe() in decision.reason
        assert f"[sockets.http] in {SOURCE}" in decision.reason
        assert not rules.may_acquire("http", who)


def test_a_rule_for_one_socket_grants_no_other() -> None:
    rules = policy(http=Rule(uids=frozenset({WWW_DATA})), https=Rule(uids=frozenset({1000})))
    assert rules.check_acquire("http", peer()).allowed
    assert not rules.check_acquire("https", peer()).allowed
    assert not rules.check_acquire("HTTP", peer()).allowed  # names are case-sensitive


# --- groups -----------------------------------------------------------------------------


def test_a_member_of_a_listed_group_is_allowed() -> None:
    rules = policy(http=Rule(gids=frozenset({WEB})))
    decision = rules.check_acquire("http", peer(groups=(ADM, WEB)))
    assert decision == Decision(True, f"gid {WEB} is in groups")


def test_the_peers_own_gid_counts_as_a_group() -> None:
    rules = policy(http=Rule(gids=frozenset({WEB})))
    assert rules.check_acquire("http", peer(gid=WEB)).allowed
    # ...even if whoever built the Peer left the gid out of `groups`.
    bare = Peer(pid=7, uid=1000, gid=WEB)
    assert rules.check_acquire("http", bare) == Decision(True, f"gid {WEB} is in groups")


def test_the_reason_names_the_lowest_matching_gid() -> None:
    rules = policy(http=Rule(gids=frozenset({WEB, ADM, 9999})))
    assert rules.check_acquire("http", peer(groups=(WEB, ADM))).reason == "gid 4 is in groups"


def test_a_non_member_is_denied() -> None:
    rules = policy(http=Rule(gids=frozenset({WEB})))
    decision = rules.check_acquire("http", peer(groups=(ADM,)))
    assert not decision.allowed
    assert "not in users, groups or units of [sockets.http]" in decision.reason


def test_a_user_is_preferred_as_the_reason_over_a_group() -> None:
    rules = policy(http=Rule(uids=frozenset({WWW_DATA}), gids=frozenset({WWW_DATA})))
    assert rules.check_acquire("http", peer()).reason == "uid 33 is in users"


# --- units ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patterns", "unit", "allowed"),
    [
        (("web.service",), "web.service", True),
        (("web.service",), "web2.service", False),
        (("web.service",), "Web.service", False),  # case-sensitive, as systemd
        (("web.service",), "web.scope", False),
        (("machine-*.scope",), "machine-abc.scope", True),
        (("machine-*.scope",), "machine-.scope", True),
        (("machine-*.scope",), "xmachine-abc.scope", False),
        (("machine-*.scope",), "machine-abc.service", False),
        (("app-?.service",), "app-1.service", True),
        (("app-?.service",), "app-10.service", False),
        (("app-[12].service",), "app-2.service", True),
        (("app-[12].service",), "app-3.service", False),
        (("a.service", "b-*.scope"), "b-7.scope", True),
        (("*.service",), None, False),  # a peer with no unit matches no pattern
    ],
)
def test_units_match_exactly_or_by_glob(
    patterns: tuple[str, ...], unit: str | None, allowed: bool
) -> None:
    rules = policy(http=Rule(units=patterns))
    decision = rules.check_acquire("http", peer(unit=unit))
    assert decision.allowed is allowed
    assert rules.may_acquire("http", peer(unit=unit)) is allowed
    if allowed:
        matched = next(p for p in patterns if fnmatchcase(str(unit), p))
        assert decision.reason == f"unit {unit} matches {matched!r} in units"
    else:
        assert decision.reason.startswith(peer(unit=unit).describe())


def test_a_denied_peer_in_a_unit_is_named_with_its_unit() -> None:
    rules = policy(http=Rule(units=("web.service",)))
    decision = rules.check_acquire("http", peer(unit="other.service"))
    assert decision.reason == (
        "user www-data (uid 33, pid 4242, unit other.service) may not acquire socket "
        f"'http': not in users, groups or units of [sockets.http] in {SOURCE}"
    )


# --- status -----------------------------------------------------------------------------


def test_status_is_allowed_by_its_own_rule_only() -> None:
    rules = Policy(
        sockets={"http": Rule(uids=frozenset({WWW_DATA}))},
        status=Rule(uids=frozenset({0}), gids=frozenset({ADM})),
        source=SOURCE,
    )
    assert rules.check_status(ROOT) == Decision(True, "uid 0 is in users")
    assert rules.check_status(peer(1000, groups=(ADM,))) == Decision(True, "gid 4 is in groups")
    denied = rules.check_status(peer())  # may have http, but not the status
    assert denied == Decision(
        False,
        "user www-data (uid 33, pid 4242) may not read the broker's status: not in users, "
        f"groups or units of [status] in {SOURCE}",
    )


def test_a_policy_names_groups_when_any_rule_does() -> None:
    by_user = Rule(uids=frozenset({WWW_DATA}), units=("web.service",))
    by_group = Rule(gids=frozenset({ADM}))
    assert not Policy(sockets={"http": by_user}, status=by_user).names_groups
    assert Policy(sockets={"http": by_user, "https": by_group}).names_groups
    assert Policy(sockets={"http": by_user}, status=by_group).names_groups


def test_an_empty_status_rule_denies_root_too() -> None:
    rules = Policy(status=Rule(), source=SOURCE)
    assert not rules.check_status(ROOT).allowed


# --- describing peers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "text"),
    [
        (peer(), "user www-data (uid 33, pid 4242)"),
        (peer(unit="web.service"), "user www-data (uid 33, pid 4242, unit web.service)"),
        (peer(61234, user=None, pid=7), "unnamed user (uid 61234, pid 7)"),
        (peer(0, user="root", pid=0), "user root (uid 0, pid 0)"),
    ],
)
def test_peers_describe_themselves_for_messages(who: Peer, text: str) -> None:
    assert who.describe() == text


# --- the whole rule, as a property ------------------------------------------------------

ids = st.integers(0, 8)
units = st.sampled_from(["a.service", "b.service", "machine-1.scope", "x.scope"])
rules = st.builds(
    Rule,
    uids=st.frozensets(ids, max_size=3),
    gids=st.frozensets(ids, max_size=3),
    units=st.lists(st.sampled_from(["a.service", "machine-*.scope", "?.scope"])).map(tuple),
)
peers = st.builds(
    Peer,
    pid=st.integers(1, 99),
    uid=ids,
    gid=ids,
    user=st.none() | st.just("u"),
    groups=st.frozensets(ids, max_size=3),
    unit=st.none() | units,
)


def make_peer(uid: int = 1000, gid: int = 1000, groups: frozenset[int] = frozenset(),
         unit: str | None = None, mapped: bool = True) -> Peer:  # fmt: skip
    return Peer(pid=7, uid=uid, gid=gid, groups=groups, unit=unit, mapped=mapped)


@pytest.mark.parametrize(
    ("rule", "who", "allowed"),
    [
        (Rule(uids=frozenset({1000})), make_peer(), True),
        (Rule(uids=frozenset({1000})), make_peer(uid=1001), False),
        (Rule(gids=frozenset({50})), make_peer(gid=50), True),
        (Rule(gids=frozenset({50})), make_peer(groups=frozenset({50})), True),
        (Rule(gids=frozenset({50})), make_peer(groups=frozenset({51})), False),
        (Rule(units=("web.service",)), make_peer(unit="web.service"), True),
        (Rule(units=("web.service",)), make_peer(unit="other.service"), False),
        (Rule(units=("web.service",)), make_peer(unit=None), False),
        (Rule(units=("machine-*.scope",)), make_peer(unit="machine-web.scope"), True),
        (Rule(units=("machine-*.scope",)), make_peer(unit="mymachine-web.scope"), False),
        (Rule(units=("?.scope",)), make_peer(unit="a.scope"), True),
        (Rule(units=("?.scope",)), make_peer(unit="ab.scope"), False),
        (Rule(uids=frozenset({65534})), make_peer(uid=65534, gid=65534, mapped=False), False),
        (Rule(gids=frozenset({65534})), make_peer(uid=65534, gid=65534, mapped=False), False),
        (Rule(units=("c.scope",)), make_peer(uid=65534, unit="c.scope", mapped=False), True),
        (Rule(), make_peer(uid=0, gid=0), False),
    ],
)
def test_truth_table(rule: Rule, who: Peer, allowed: bool) -> None:
    rules_ = Policy(sockets={"http": rule}, status=rule, source=SOURCE)
    assert rules_.check_acquire("http", who).allowed is allowed
    assert rules_.may_acquire("http", who) is allowed
    assert rules_.check_status(who).allowed is allowed


@pytest.mark.parametrize(
    "admin",
    [make_peer(uid=2000, groups=frozenset({50})), make_peer(uid=2000, unit="admin.service")],
    ids=["by-group", "by-unit"],
)
def test_a_peer_the_status_rule_alone_names_is_named(admin: Peer) -> None:
    # Whom the broker keeps room for under a flood (broker/daemon/admission.py): an admin named
    # only in [status], through a group or a unit, too.
    status = Rule(gids=frozenset({50}), units=("admin.service",))
    rules_ = Policy(sockets={"http": Rule(uids=frozenset({1000}))}, status=status, source=SOURCE)
    assert not rules_.may_acquire("http", admin)
    assert rules_.names(admin)
    assert not rules_.names(make_peer(uid=2001))


@settings(database=None, deadline=None, max_examples=300)
@given(rules, rules, peers)
def test_a_peer_is_named_when_any_rule_would_allow_it_something(
    socket_rule: Rule, status_rule: Rule, who: Peer
) -> None:
    rules_ = Policy(sockets={"http": socket_rule}, status=status_rule, source=SOURCE)
    allowed = rules_.may_acquire("http", who) or rules_.check_status(who).allowed
    assert rules_.names(who) is allowed


def test_an_unmapped_peer_is_told_why() -> None:
    rules_ = Policy(sockets={"http": Rule(uids=frozenset({65534}))}, source=SOURCE)
    reason = rules_.check_acquire("http", make_peer(uid=65534, gid=65534, mapped=False)).reason
    assert "not mapped into the broker's user namespace" in reason
    assert "only a units rule can name it" in reason


@settings(database=None, deadline=None, max_examples=300)
@given(rules, peers, st.sampled_from(["http", "https"]))
def test_the_three_questions_agree(rule: Rule, who: Peer, name: str) -> None:
    rules_ = Policy(sockets={"http": rule}, status=rule, source=SOURCE)
    decision = rules_.check_acquire(name, who)
    assert rules_.may_acquire(name, who) is decision.allowed
    if name == "http":  # the same rule guards the socket and the status
        assert rules_.check_status(who).allowed is decision.allowed
    else:  # no rule for it: nobody
        assert not decision.allowed
    if not decision.allowed:
        assert decision.reason.startswith(f"{who.describe()} may not acquire socket {name!r}")
        assert f"[sockets.{name}]" in decision.reason
        assert SOURCE in decision.reason
    if rule.empty:
        assert not decision.allowed
