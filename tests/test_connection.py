"""Tests for `broker.daemon.connection`: one connection's rules, without I/O.

Each numbered rule of the module has its own tests, and hypothesis checks the
invariants over arbitrary input, whole and in arbitrary chunks: every `Send` is one
reply line; a refusal that closes is the last thing sent; fds travel only with a grant,
exactly those of the names asked for; a grant is recorded only as a grant; nothing is
answered after the connection closes. No socket is opened: the held sockets are fd
numbers with their descriptions, as the connection sees them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.daemon.config import Config
from broker.daemon.connection import (
    CLOSE,
    FINAL_SEND_TIMEOUT,
    NEED_DATA,
    RELOAD,
    Action,
    Connection,
    Kind,
    Phase,
    Send,
    refuse_busy,
)
from broker.daemon.identity import Peer
from broker.daemon.policy import Policy, Rule
from broker.daemon.standing import Held, Standing
from broker.errors import Code
from broker.messages import (
    Acquire,
    Granted,
    Listing,
    ListSockets,
    Refusal,
    Reload,
    Reloaded,
    SocketInfo,
    Status,
    StatusReport,
)
from broker.protocol import MAX_NAMES, MAX_REQUEST_BYTES, SCM_MAX_FD, encode_request, parse_reply

PEER = Peer(pid=4242, uid=1000, gid=1000, user="alice")
POLICY = Policy(
    sockets={"http": Rule(uids=frozenset({1000})), "https": Rule(uids=frozenset({1000})),
             "secret": Rule(uids=frozenset({0}))},
    status=Rule(uids=frozenset({0})),
    source="/etc/port-broker/test.toml",
)  # fmt: skip
TIMEOUT = 5.0


HeldMap = dict[str, tuple[Held, ...]]


@pytest.fixture(scope="module")
def held() -> HeldMap:
    """http (IPv4 and IPv6), https and secret, as fds and descriptions: the connection
    passes fds on and reads nothing of them, so no socket is needed."""
    made: dict[str, list[Held]] = {}
    for fd, (name, family, address) in enumerate(
        [("http", "inet", "0.0.0.0:80"), ("http", "inet6", "[::]:80"),
         ("https", "inet", "0.0.0.0:443"), ("secret", "inet", "127.0.0.1:9")], start=100,
    ):  # fmt: skip
        made.setdefault(name, []).append((fd, SocketInfo(name, family, "stream", address)))
    return {name: tuple(group) for name, group in made.items()}


def standing(held: HeldMap, policy: Policy = POLICY, owner: int = 0) -> Standing:
    return Standing(Config(policy.source, True, policy), held, owner=owner)


def connection(held: HeldMap, peer: Peer = PEER, **kw: Any) -> Connection:
    current = standing(held)
    report = kw.pop("report", None) or (lambda: {"grants": 0})
    return Connection(peer, lambda: current, report, timeout=TIMEOUT, **kw)


def fds_of(held: HeldMap, names: Sequence[str]) -> tuple[int, ...]:
    return tuple(fd for name in names for fd, _ in held[name])


ACTIONS_PER_STEP: Final = 16
"""Actions `drive` lets a connection ask for per chunk or line it was fed (a request is
answered by a send or two): past that it is looping, and the test fails rather than hang."""


def drive(conn: Connection, chunks: Sequence[bytes], *, eof: bool = True) -> list[Action]:
    """Feed `chunks` (then end of stream), sending each reply at once; return every
    action but NEED_DATA, up to and including CLOSE."""
    actions: list[Action] = []
    pending = list(chunks)
    steps = len(chunks) + sum(chunk.count(b"\n") for chunk in chunks) + 2
    for _ in range(ACTIONS_PER_STEP * steps):
        action = conn.next_action()
        if action is NEED_DATA:
            if pending:
                conn.receive_data(pending.pop(0))
            elif eof:
                conn.receive_data(b"")
                eof = False
            else:
                return actions
            continue
        actions.append(action)
        if action is CLOSE:
            return actions
        conn.sent()
    raise AssertionError(f"no end after {ACTIONS_PER_STEP * steps} actions: {actions[-3:]!r}")


def sends(actions: Sequence[Action]) -> list[Send]:
    return [a for a in actions if isinstance(a, Send)]


def line(request: Any) -> bytes:
    return encode_request(request)


# --- rule 1: framing and the request count ----------------------------------------


def test_a_request_of_exactly_the_size_limit_is_served(
    held: HeldMap,
) -> None:
    assert len(PADDED_LIST) == MAX_REQUEST_BYTES
    [send] = sends(drive(connection(held), [PADDED_LIST]))
    assert isinstance(parse_reply(send.data.rstrip(b"\n")), Listing)


def test_each_request_gets_one_reply_in_order(held: HeldMap) -> None:
    actions = drive(connection(held), [line(ListSockets()) + line(Acquire(("http",)))])
    listing, granted = (parse_reply(s.data.rstrip(b"\n")) for s in sends(actions))
    assert isinstance(listing, Listing)
    assert isinstance(granted, Granted)
    assert actions[-1] is CLOSE


def test_the_connection_closes_after_its_last_request(held: HeldMap) -> None:
    conn = connection(held, max_requests=3)
    actions = drive(conn, [line(ListSockets()) * 5], eof=False)
    assert len(sends(actions)) == 3
    assert actions[-1] is CLOSE
    assert conn.phase is Phase.CLOSED


# --- rule 2: one refusal, then close ----------------------------------------------


PADDED_LIST = b'{"v":1,"op":"list"' + b" " * (MAX_REQUEST_BYTES - 20) + b"}\n"


@pytest.mark.parametrize(
    ("data", "code", "words"),
    [
        (b"not json\n", Code.MALFORMED, "message is not JSON"),
        (b"\xff\xfe\n", Code.MALFORMED, "message is not UTF-8"),
        (b"[1]\n", Code.MALFORMED, "message is not a JSON object"),
        (b'{"v":1,"op":"list","x":1}\n', Code.MALFORMED, "list request has unknown key(s): x"),
        (b'{"v":1,"op":"acquire","names":["http","http"]}\n', Code.MALFORMED,
         "acquire names a socket twice"),
        (b'{"v":1,"op":"acquire","names":["no/slash"]}\n', Code.MALFORMED,
         "'no/slash' is not a valid socket name"),
        (b'{"v":2,"op":"list"}\n', Code.UNSUPPORTED_VERSION, "protocol version 2 is not supported"),
        (b'{"v":1,"op":"steal"}\n', Code.UNKNOWN_OPERATION, "unknown operation 'steal'"),
        (b"x" * MAX_REQUEST_BYTES, Code.TOO_LARGE, f"exceeds {MAX_REQUEST_BYTES} bytes"),
        (b"x" * 5000 + b"\n", Code.TOO_LARGE, f"exceeds {MAX_REQUEST_BYTES} bytes"),
        (PADDED_LIST[:-2] + b" }\n", Code.TOO_LARGE, f"exceeds {MAX_REQUEST_BYTES} bytes"),
    ],
)  # fmt: skip
def test_a_bad_request_gets_one_refusal_and_nothing_after_it(
    held: HeldMap, data: bytes, code: str, words: str
) -> None:
    actions = drive(connection(held), [data + line(Acquire(("http",)))])
    [refusal] = sends(actions)
    assert refusal.final
    assert refusal.fds == ()
    reason = refusal.outcomes[0].reason
    assert parse_reply(refusal.data.rstrip(b"\n")) == Refusal(code, reason)
    assert words in reason
    assert [o.kind for o in refusal.outcomes] == [Kind.PROTOCOL]
    assert actions[-1] is CLOSE


# --- rule 3: all or none ----------------------------------------------------------


@given(names=st.lists(st.sampled_from(["http", "https", "secret", "nope"]), min_size=1,
                      max_size=4, unique=True))  # fmt: skip
@settings(max_examples=60, deadline=None)
def test_an_acquire_is_all_or_none(held: HeldMap, names: list[str]) -> None:
    [send] = sends(drive(connection(held), [line(Acquire(tuple(names)))], eof=False))
    reply = parse_reply(send.data.rstrip(b"\n"))
    if set(names) <= {"http", "https"}:
        assert isinstance(reply, Granted)
        assert send.fds == fds_of(held, names)
        assert [g.socket for g in send.grants] == names
        assert [info.name for info in reply.sockets] == [n for n in names for _ in held[n]]
    else:
        assert isinstance(reply, Refusal)
        first_bad = next(n for n in names if n not in {"http", "https"})
        assert reply.code == (Code.UNKNOWN_SOCKET if first_bad == "nope" else Code.DENIED)
        assert (send.fds, send.grants) == ((), ())
        [denial] = send.outcomes
        assert (denial.kind, denial.socket, denial.code) == (Kind.DENIAL, first_bad, reply.code)


def test_more_fds_than_one_message_carries_is_refused(held: HeldMap) -> None:
    many = {f"s{i}": held["http"] * 4 for i in range(MAX_NAMES)}  # 32 names, 8 fds each
    assert MAX_NAMES * 8 > SCM_MAX_FD
    policy = Policy(sockets={n: Rule(uids=frozenset({1000})) for n in many})
    current = standing(many, policy)
    conn = Connection(PEER, lambda: current, dict, timeout=TIMEOUT)
    [send] = sends(drive(conn, [line(Acquire(tuple(many)))], eof=False))
    assert parse_reply(send.data.rstrip(b"\n")).code == Code.TOO_LARGE  # type: ignore[union-attr]
    assert (send.fds, send.grants) == ((), ())


def test_unknown_names_reveal_only_what_the_peer_may_have(
    held: HeldMap,
) -> None:
    [send] = sends(drive(connection(held), [line(Acquire(("nope",)))], eof=False))
    assert send.outcomes[0].reason == "no socket named 'nope' (you may acquire: http, https)"


# --- rule 4: grants are recorded apart ---------------------------------------------


def test_grants_ride_apart_from_other_outcomes(held: HeldMap) -> None:
    [send] = sends(drive(connection(held), [line(Acquire(("https", "http")))], eof=False))
    assert send.outcomes == ()
    assert [(g.kind, g.socket) for g in send.grants] == [
        (Kind.GRANT, "https"),
        (Kind.GRANT, "http"),
    ]
    assert send.grants[0].reason == "uid 1000 is in users"


# --- rule 5: the deadline's meaning -----------------------------------------------


def test_a_late_request_is_refused_with_timeout(held: HeldMap) -> None:
    conn = connection(held)
    conn.receive_data(b'{"v":1,')
    assert conn.next_action() is NEED_DATA
    conn.timed_out()
    late = conn.next_action()
    assert isinstance(late, Send)
    assert late.final
    assert conn.wait == FINAL_SEND_TIMEOUT  # rule 2: a short try to say it
    assert parse_reply(late.data.rstrip(b"\n")) == Refusal(
        Code.TIMEOUT, "no complete request within 5 seconds"
    )
    conn.sent()
    assert conn.next_action() is CLOSE


def test_a_reply_not_taken_in_time_closes_without_a_word(
    held: HeldMap,
) -> None:
    conn = connection(held)
    conn.receive_data(line(ListSockets()))
    assert isinstance(conn.next_action(), Send)
    assert conn.phase is Phase.SENDING
    conn.timed_out()
    assert conn.next_action() is CLOSE


def test_the_driver_must_finish_a_send_before_the_next(
    held: HeldMap,
) -> None:
    conn = connection(held)
    with pytest.raises(RuntimeError, match="sent"):
        conn.sent()
    conn.receive_data(line(ListSockets()) * 2)
    conn.next_action()
    with pytest.raises(RuntimeError, match="while sending"):
        conn.next_action()


def test_a_new_policy_applies_from_the_next_request(held: HeldMap) -> None:
    current = [standing(held)]
    conn = Connection(PEER, lambda: current[0], dict, timeout=TIMEOUT)
    conn.receive_data(line(Acquire(("http",))) * 2)
    first = conn.next_action()
    assert isinstance(first, Send)
    assert first.fds
    conn.sent()
    current[0] = standing(held, Policy(sockets={"http": Rule(uids=frozenset({0}))}))
    second = conn.next_action()  # the same connection, after a reload
    assert isinstance(second, Send)
    assert (second.fds, [o.code for o in second.outcomes]) == ((), [Code.DENIED])


def test_each_phase_begins_a_wait_of_its_own(held: HeldMap) -> None:
    # The connection says when each deadline starts and how long it lasts; the driver
    # only keeps the time.
    conn = connection(held)
    seen = [(conn.waits, conn.phase, conn.wait)]
    conn.receive_data(line(ListSockets()))
    assert isinstance(conn.next_action(), Send)
    seen.append((conn.waits, conn.phase, conn.wait))
    conn.sent()
    seen.append((conn.waits, conn.phase, conn.wait))
    assert conn.next_action() is NEED_DATA  # waiting for data is no new wait
    assert conn.waits == seen[-1][0]
    assert seen == [
        (1, Phase.READING, TIMEOUT),
        (2, Phase.SENDING, TIMEOUT),
        (3, Phase.READING, TIMEOUT),
    ]


# --- rule 6: end of stream --------------------------------------------------------


def test_a_partial_request_at_end_of_stream_is_dropped(held: HeldMap) -> None:
    assert drive(connection(held), [line(ListSockets())[:-3]]) == [CLOSE]


# --- rule 7: our own failures -----------------------------------------------------


def test_a_failure_of_ours_is_refused_and_the_connection_goes_on(
    held: HeldMap,
) -> None:
    def broken() -> dict[str, Any]:
        raise KeyError("a bug")

    root = Peer(pid=1, uid=0, gid=0, user="root")
    actions = drive(connection(held, root, report=broken), [line(Status()) + line(Status())])
    first, second = sends(actions)
    assert parse_reply(first.data.rstrip(b"\n")).code == Code.INTERNAL  # type: ignore[union-attr]
    [failure] = first.outcomes
    assert failure.kind is Kind.INTERNAL
    assert "KeyError('a bug')" in failure.reason
    assert failure.detail is not None
    assert "Traceback" in failure.detail
    assert not first.final
    assert parse_reply(second.data.rstrip(b"\n")).code == Code.INTERNAL  # type: ignore[union-attr]


def test_status_is_for_the_status_rule_only(held: HeldMap) -> None:
    [denied] = sends(drive(connection(held), [line(Status())]))
    assert [o.kind for o in denied.outcomes] == [Kind.STATUS_DENIAL]
    root = Peer(pid=1, uid=0, gid=0, user="root")
    report = {"grants": 7}
    [shown] = sends(drive(connection(held, root, report=lambda: report), [line(Status())]))
    assert parse_reply(shown.data.rstrip(b"\n")) == StatusReport(report)


# --- rule 8: reloads -------------------------------------------------------------


def phase(conn: Connection) -> Phase:
    return conn.phase


@pytest.mark.parametrize("uid", [0, 4321])
def test_root_and_the_broker_uid_get_the_reload_done_then_its_outcome(
    held: HeldMap, uid: int
) -> None:
    owned_by = standing(held, owner=4321)
    conn = Connection(Peer(pid=1, uid=uid, gid=uid), lambda: owned_by, dict, timeout=TIMEOUT)
    conn.receive_data(line(Reload()) * 2)
    assert conn.next_action() is RELOAD
    assert phase(conn) is Phase.WORKING
    assert conn.wait is None  # rule 8: the reload's own bound
    with pytest.raises(RuntimeError, match="while working"):
        conn.next_action()
    conn.reloaded({"generation": 2}, None)
    done = conn.next_action()
    assert isinstance(done, Send)
    assert parse_reply(done.data.rstrip(b"\n")) == Reloaded({"generation": 2})
    assert (done.outcomes, done.final) == ((), False)  # the reload logs its own outcome
    conn.sent()
    assert conn.next_action() is RELOAD
    conn.reloaded({"generation": 2}, "x.toml: bad; generation 2 stays in force")
    refused = conn.next_action()
    assert isinstance(refused, Send)
    reply = parse_reply(refused.data.rstrip(b"\n"))
    assert reply == Refusal(Code.INVALID_CONFIG, "x.toml: bad; generation 2 stays in force")
    assert not refused.final  # the connection goes on
    conn.sent()
    assert phase(conn) is Phase.READING


def test_a_reload_from_anyone_else_is_denied(held: HeldMap) -> None:
    owned_by = standing(held, owner=4321)
    conn = Connection(PEER, lambda: owned_by, dict, timeout=TIMEOUT)
    [denied] = sends(drive(conn, [line(Reload())]))
    [outcome] = denied.outcomes
    assert (outcome.kind, outcome.code) == (Kind.RELOAD_DENIAL, Code.DENIED)
    assert outcome.reason == (
        "user alice (uid 1000, pid 4242) may not reload the broker: only root and uid "
        "4321, the broker's own, may (as they could send it SIGHUP)"
    )
    assert parse_reply(denied.data.rstrip(b"\n")) == Refusal(Code.DENIED, outcome.reason)


def test_reloaded_is_only_for_a_reload(held: HeldMap) -> None:
    with pytest.raises(RuntimeError, match="while reading"):
        connection(held).reloaded({}, None)


# --- invariants over arbitrary input ----------------------------------------------

valid = st.sampled_from(
    [line(ListSockets()), line(Status()), line(Acquire(("http",))), line(Acquire(("secret",))),
     line(Acquire(("http", "https"))), line(Acquire(("nope",)))]
)  # fmt: skip
garbage = st.binary(max_size=80)
streams = st.lists(valid | garbage, max_size=8).map(b"".join)


@st.composite
def chunked(draw: st.DrawFn) -> list[bytes]:
    data = draw(streams)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=10)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True) if b > a]


@given(chunks=chunked())
@settings(max_examples=300, deadline=None)
def test_any_input_gives_replies_then_at_most_one_refusal_then_close(
    held: HeldMap, chunks: list[bytes]
) -> None:
    actions = drive(connection(held), chunks)
    assert actions[-1] is CLOSE
    assert all(isinstance(a, Send) for a in actions[:-1])
    replies = sends(actions)
    finals = [i for i, s in enumerate(replies) if s.final]
    assert finals in ([], [len(replies) - 1])  # a refusal that closes is the last word
    for send in replies:
        assert send.data.endswith(b"\n")
        assert send.data.count(b"\n") == 1
        reply = parse_reply(send.data[:-1])
        if send.fds:
            assert isinstance(reply, Granted)
            names = [g.socket for g in send.grants]
            assert send.fds == fds_of(held, [n for n in names if n])
            assert reply.sockets == tuple(info for n in names if n for _, info in held[n])
            assert set(names) <= {"http", "https"}
        else:
            assert send.grants == ()
        assert all(o.kind is not Kind.GRANT for o in send.outcomes)
    # The same input in one piece gives the same replies.
    assert [s.data for s in sends(drive(connection(held), [b"".join(chunks)]))] == [
        s.data for s in replies
    ]


# --- rule 9: a grant the kernel would not pass ---------------------------------------


def test_an_undeliverable_grant_is_answered_busy_and_the_connection_goes_on(
    held: HeldMap,
) -> None:
    conn = connection(held)
    conn.receive_data(line(Acquire(("http",))) * 2)
    grant = conn.next_action()
    assert isinstance(grant, Send)
    assert grant.fds
    conn.undeliverable("uid 61300 holds 64")
    busy = conn.next_action()
    assert isinstance(busy, Send)
    assert (busy.fds, busy.grants, busy.final) == ((), (), False)
    assert parse_reply(busy.data.rstrip(b"\n")) == Refusal(Code.BUSY, "uid 61300 holds 64")
    assert [(o.kind, o.code) for o in busy.outcomes] == [(Kind.BUSY, Code.BUSY)]
    conn.sent()
    again = conn.next_action()  # the peer may ask again
    assert isinstance(again, Send)
    assert again.fds == fds_of(held, ["http"])
    conn.sent()
    with pytest.raises(RuntimeError, match="while reading"):
        conn.undeliverable("nothing is being sent")


# --- rule 10: busy before anything is read ----------------------------------------


def test_a_connection_not_taken_is_told_busy_and_closed() -> None:
    refusal = refuse_busy("uid 7 already has 64 connections")
    assert refusal.final
    assert (refusal.fds, refusal.grants, refusal.outcomes) == ((), (), ())  # counted apart
    reply = parse_reply(refusal.data.rstrip(b"\n"))
    assert reply == Refusal(Code.BUSY, "uid 7 already has 64 connections")
    assert refuse_busy("uid 7 already has 64 connections") is refusal  # made once
