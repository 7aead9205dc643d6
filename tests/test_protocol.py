"""Tests for `broker.protocol`: the sans-IO wire format.

Round trips of every request and reply, the exact wire form of the documented examples,
the right `Code` for each kind of bad input, and the h11 invariant, checked with
hypothesis: *every input either parses or raises `ProtocolError`, nothing else* — for
arbitrary bytes, for mutated valid messages, and through `LineBuffer` fed whole, byte by
byte and in random chunks (with the same result each way).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from broker.errors import CODES, Code, ProtocolError
from broker.messages import (
    Acquire,
    Granted,
    Listing,
    ListSockets,
    Refusal,
    Reload,
    Reloaded,
    Reply,
    Request,
    SocketInfo,
    Status,
    StatusReport,
)
from broker.names import FAMILIES, NAME_MAX_LENGTH, NAME_REGEX, TYPES, valid_name
from broker.protocol import (
    MAX_NAMES,
    MAX_REQUEST_BYTES,
    LineBuffer,
    encode_reply,
    encode_request,
    parse_reply,
    parse_request,
)

FUZZ = settings(database=None, deadline=None, max_examples=400)
"""No example database (nothing written into the checkout) and no deadline (a test must
not fail because a shared machine was slow)."""

SMALL_LIMIT = 64
"""A LineBuffer limit small enough that generated inputs often exceed it."""

Parser = Callable[[bytes], object]
PARSERS: list[Parser] = [parse_request, parse_reply]

# --- strategies ----------------------------------------------------------------------

names = st.from_regex(NAME_REGEX, fullmatch=True)
acquires = st.lists(names, min_size=1, max_size=MAX_NAMES, unique=True).map(
    lambda ns: Acquire(tuple(ns))
)
requests: st.SearchStrategy[Request] = st.one_of(
    acquires, st.just(ListSockets()), st.just(Status()), st.just(Reload())
)

infos = st.builds(
    SocketInfo,
    name=names,
    family=st.sampled_from(FAMILIES),
    type=st.sampled_from(TYPES),
    address=st.text(max_size=40),
)
json_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
replies: st.SearchStrategy[Reply] = st.one_of(
    st.lists(infos, max_size=5).map(lambda s: Granted(tuple(s))),
    st.lists(infos, max_size=5).map(lambda s: Listing(tuple(s))),
    st.dictionaries(st.text(max_size=10), json_values, max_size=5).map(StatusReport),
    st.dictionaries(st.text(max_size=10), json_values, max_size=5).map(Reloaded),
    st.builds(Refusal, code=st.sampled_from(sorted(CODES)), message=st.text(max_size=80)),
)
valid_lines = st.one_of(requests.map(encode_request), replies.map(encode_reply))

# Objects shaped like messages, with plausible keys and arbitrary values: these reach
# every type check in the parsers, not just the JSON decoder.
socket_entries = st.fixed_dictionaries(
    {},
    optional={
        "name": names | json_values,
        "family": st.sampled_from(FAMILIES) | json_values,
        "type": st.sampled_from(TYPES) | json_values,
        "address": st.text(max_size=20) | json_values,
        "x": json_values,
    },
)
ops = st.sampled_from(["acquire", "list", "status"])
name_lists = st.lists(names, min_size=1, max_size=3) | st.lists(
    names | json_values, max_size=MAX_NAMES + 2
)
reply_keys = {
    "op": ops | json_values,
    "code": st.sampled_from(sorted(CODES)) | json_values,
    "message": st.text(max_size=20) | json_values,
    "sockets": st.lists(socket_entries | json_values, max_size=3) | json_values,
    "status": st.dictionaries(st.text(max_size=5), json_values, max_size=3) | json_values,
}
message_like: st.SearchStrategy[dict[str, Any]] = st.one_of(
    # Nearly requests, nearly replies, and anything with the right keys.
    st.fixed_dictionaries(
        {"v": st.just(1), "op": ops},
        optional={"names": name_lists | json_values, "x": json_values},
    ),
    st.fixed_dictionaries({"v": st.just(1), "ok": st.booleans()}, optional=reply_keys),
    st.fixed_dictionaries(
        {},
        optional={
            "v": st.just(1) | json_values,
            "names": name_lists | json_values,
            "ok": st.booleans() | json_values,
            "x": json_values,
            **reply_keys,
        },
    ),
)


@st.composite
def mutated(draw: st.DrawFn, lines: st.SearchStrategy[bytes]) -> bytes:
    """A valid message with a few bytes flipped, inserted, deleted or cut off."""
    data = bytearray(draw(lines))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if how == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif how == "delete":
            del data[at : at + draw(st.integers(1, 4))]
        else:
            del data[at:]
    return bytes(data)


fuzz_lines = st.one_of(
    st.binary(max_size=200),
    mutated(valid_lines),
    message_like.map(lambda obj: json.dumps(obj).encode()),
)
streams = st.lists(st.one_of(valid_lines, fuzz_lines), max_size=6).map(b"".join)

# --- helpers -------------------------------------------------------------------------


def outcome(parse: Parser, line: bytes) -> object:
    """Parse `line`: the message, or the code of the `ProtocolError`. Anything else
    raised propagates and fails the test: that is the invariant."""
    try:
        return parse(line)
    except ProtocolError as e:
        error = e
    assert error.code in CODES
    assert error.message
    return error.code


def drain(buffer: LineBuffer, parse: Parser, results: list[object], fed: int) -> bool:
    """Take every complete line from `buffer`, which has been fed `fed` bytes in all;
    return False once framing failed. Each line ends in a byte of its own: a buffer that
    gives more lines than that gives one again and again, which fails the test."""
    for _ in range(fed + 1):
        try:
            line = buffer.next_line()
        except ProtocolError as e:
            results.append(("framing", e.code))
            return False
        if line is None:
            return True
        results.append(outcome(parse, line))
    raise AssertionError(f"{fed} bytes fed, and still another line: {results[-3:]!r}")


def feed_in_chunks(data: bytes, sizes: list[int], parse: Parser, limit: int) -> list[object]:
    buffer = LineBuffer(limit)
    results: list[object] = []
    chunks = []
    at = 0
    for size in sizes:
        chunks.append(data[at : at + size])
        at += size
    chunks.append(data[at:])
    fed = 0
    for chunk in chunks:
        buffer.feed(chunk)
        fed += len(chunk)
        if not drain(buffer, parse, results, fed):
            return results
    results.append(("pending", buffer.pending))
    return results


def feed_whole(data: bytes, parse: Parser, limit: int) -> list[object]:
    return feed_in_chunks(data, [], parse, limit)


def feed_bytewise(data: bytes, parse: Parser, limit: int) -> list[object]:
    return feed_in_chunks(data, [1] * len(data), parse, limit)


def code_of(parse: Parser, line: bytes) -> str:
    with pytest.raises(ProtocolError) as caught:
        parse(line)
    return caught.value.code


def message_of(parse: Parser, line: bytes) -> str:
    with pytest.raises(ProtocolError) as caught:
        parse(line)
    return caught.value.message


# --- round trips ---------------------------------------------------------------------


@FUZZ
@given(requests)
def test_every_request_round_trips(request: Request) -> None:
    line = encode_request(request)
    assert line.endswith(b"\n")
    assert b"\n" not in line[:-1]
    assert line.isascii()
    assert len(line) <= MAX_REQUEST_BYTES
    assert json.loads(line)["v"] == 1
    assert parse_request(line[:-1]) == request


@FUZZ
@given(replies)
def test_every_reply_round_trips(reply: Reply) -> None:
    line = encode_reply(reply)
    assert line.endswith(b"\n")
    assert b"\n" not in line[:-1]
    assert line.isascii()
    assert json.loads(line)["v"] == 1
    assert parse_reply(line[:-1]) == reply


def test_the_largest_legal_request_fits_the_limit() -> None:
    largest = Acquire(tuple(f"{i:02d}".ljust(NAME_MAX_LENGTH, "x") for i in range(MAX_NAMES)))
    line = encode_request(largest)
    assert len(line) < MAX_REQUEST_BYTES
    assert parse_request(line.rstrip(b"\n")) == largest


@pytest.mark.parametrize(
    ("request_", "wire"),
    [
        (Acquire(("http", "https")), b'{"v":1,"op":"acquire","names":["http","https"]}\n'),
        (ListSockets(), b'{"v":1,"op":"list"}\n'),
        (Status(), b'{"v":1,"op":"status"}\n'),
        (Reload(), b'{"v":1,"op":"reload"}\n'),
    ],
)
def test_requests_have_the_documented_wire_form(request_: Request, wire: bytes) -> None:
    assert encode_request(request_) == wire
    assert parse_request(wire[:-1]) == request_


def test_replies_have_the_documented_wire_form() -> None:
    http = SocketInfo("http", "inet6", "stream", "[::]:80")
    https = SocketInfo("https", "inet6", "stream", "[::]:443")
    assert encode_reply(Granted((http, https))) == (
        b'{"v":1,"ok":true,"op":"acquire","sockets":['
        b'{"name":"http","family":"inet6","type":"stream","address":"[::]:80"},'
        b'{"name":"https","family":"inet6","type":"stream","address":"[::]:443"}]}\n'
    )
    assert encode_reply(Listing((http,))) == (
        b'{"v":1,"ok":true,"op":"list","sockets":'
        b'[{"name":"http","family":"inet6","type":"stream","address":"[::]:80"}]}\n'
    )
    assert (
        encode_reply(StatusReport({"pid": 7}))
        == b'{"v":1,"ok":true,"op":"status","status":{"pid":7}}\n'
    )
    assert encode_reply(Reloaded({"generation": 2})) == (
        b'{"v":1,"ok":true,"op":"reload","configuration":{"generation":2}}\n'
    )
    refusal = Refusal(
        Code.UNSUPPORTED_VERSION,
        "protocol version 2 is not supported; this side speaks version 1",
    )
    assert encode_reply(refusal) == (
        b'{"v":1,"ok":false,"code":"unsupported-version","message":"protocol version 2 is '
        b'not supported; this side speaks version 1"}\n'
    )


def test_non_ascii_text_is_escaped_on_the_wire_and_survives() -> None:
    reply = Refusal(Code.DENIED, "utilisateur \u00e9 \U0001f512 \ud800")
    line = encode_reply(reply)
    assert line.isascii()
    assert parse_reply(line[:-1]) == reply


# --- the invariant -------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_parse_or_raise_protocol_error(data: bytes) -> None:
    for parse in PARSERS:
        outcome(parse, data)


@FUZZ
@given(mutated(valid_lines))
def test_mutated_messages_parse_or_raise_protocol_error(data: bytes) -> None:
    for parse in PARSERS:
        outcome(parse, data)


@FUZZ
@given(message_like)
def test_message_shaped_objects_parse_or_raise_protocol_error(obj: dict[str, Any]) -> None:
    data = json.dumps(obj).encode()
    reply = outcome(parse_reply, data)
    if not isinstance(reply, str):
        assert obj["v"] == 1  # anything that parsed carried the version
    request = outcome(parse_request, data)
    if not isinstance(request, str):
        # Strict: a request that parsed had nothing but known keys, and means one thing.
        assert obj["v"] == 1
        assert set(obj) <= {"v", "op", "names"}
        assert isinstance(request, Acquire | ListSockets | Status)
        assert parse_request(encode_request(request)[:-1]) == request


@FUZZ
@given(streams, st.sampled_from([SMALL_LIMIT, MAX_REQUEST_BYTES]))
@example(b'{"v":1,"op":"list"}\n' + b"x" * SMALL_LIMIT, SMALL_LIMIT)
@example(b"x" * (SMALL_LIMIT - 1) + b"\n" + b"y" * (SMALL_LIMIT - 1) + b"\n", SMALL_LIMIT)
def test_line_buffer_whole_and_byte_by_byte_agree(data: bytes, limit: int) -> None:
    for parse in PARSERS:
        whole = feed_whole(data, parse, limit)
        assert feed_bytewise(data, parse, limit) == whole


@FUZZ
@given(streams, st.lists(st.integers(0, 80), max_size=20))
def test_line_buffer_in_random_chunks_agrees_with_whole(data: bytes, sizes: list[int]) -> None:
    for parse in PARSERS:
        whole = feed_whole(data, parse, SMALL_LIMIT)
        assert feed_in_chunks(data, sizes, parse, SMALL_LIMIT) == whole


@FUZZ
@given(st.lists(requests, min_size=1, max_size=5))
def test_line_buffer_yields_each_request_in_order(sent: list[Request]) -> None:
    data = b"".join(encode_request(r) for r in sent)
    assert feed_bytewise(data, parse_request, MAX_REQUEST_BYTES) == [*sent, ("pending", 0)]


def test_deep_nesting_anywhere_is_malformed_or_parses() -> None:
    # Deep enough to exhaust the decoder's recursion limit, and every depth below it,
    # in every place where a parser formats the offending value into its message.
    templates = [
        '{"v":1,"op":"acquire","names":[%s]}',
        '{"v":1,"op":%s}',
        '{"v":%s,"op":"list"}',
        '{"v":1,"op":"list","x":%s}',
        '{"v":1,"ok":true,"op":%s}',
        '{"v":1,"ok":false,"code":%s,"message":"m"}',
        '{"v":1,"ok":true,"op":"list","sockets":[{"name":"a","family":"b","type":"c",'
        '"address":"d","x":%s}]}',
        '{"v":1,"ok":true,"op":"status","status":%s}',
    ]
    for depth in [*range(1, 1200, 9), 5000, 100_000]:
        nested = "[" * depth + "]" * depth
        for template in templates:
            for parse in PARSERS:
                outcome(parse, (template % nested).encode())
    assert code_of(parse_request, b"[" * 100_000) == Code.MALFORMED
    assert "nested too deeply" in message_of(parse_request, b"[" * 100_000)


# --- framing -------------------------------------------------------------------------


def test_line_buffer_returns_lines_without_newline_and_keeps_the_rest() -> None:
    buffer = LineBuffer(MAX_REQUEST_BYTES)
    buffer.feed(b'{"v":1,"op":"list"}\n\n{"v":1,')
    assert buffer.next_line() == b'{"v":1,"op":"list"}'
    assert buffer.next_line() == b""
    assert buffer.next_line() is None
    assert buffer.pending == len(b'{"v":1,')
    buffer.feed(b'"op":"status"}\n')
    assert buffer.next_line() == b'{"v":1,"op":"status"}'
    assert buffer.pending == 0
    assert buffer.next_line() is None


def test_a_request_of_exactly_the_limit_including_newline_is_accepted() -> None:
    buffer = LineBuffer(MAX_REQUEST_BYTES)
    buffer.feed(b"x" * (MAX_REQUEST_BYTES - 1))
    assert buffer.next_line() is None  # one byte short of the limit: still waiting
    buffer.feed(b"\n")
    assert buffer.next_line() == b"x" * (MAX_REQUEST_BYTES - 1)


@pytest.mark.parametrize(
    "data",
    [
        b"x" * MAX_REQUEST_BYTES,
        b"x" * MAX_REQUEST_BYTES + b"\n",
        b"x" * (10 * MAX_REQUEST_BYTES),
        b'{"v":1,"op":"list"}\n' + b"y" * MAX_REQUEST_BYTES,
    ],
    ids=["limit-without-newline", "limit-plus-newline", "ten-times", "after-a-good-line"],
)
def test_oversized_input_raises_too_large(data: bytes) -> None:
    for feed in (feed_whole, feed_bytewise):
        results = feed(data, parse_request, MAX_REQUEST_BYTES)
        assert results[-1] == ("framing", Code.TOO_LARGE)
    buffer = LineBuffer(MAX_REQUEST_BYTES)
    buffer.feed(data.split(b"\n", 1)[-1] if data.startswith(b"{") else data)
    with pytest.raises(ProtocolError, match=f"exceeds {MAX_REQUEST_BYTES} bytes") as caught:
        buffer.next_line()
    assert caught.value.code == Code.TOO_LARGE


def test_too_large_is_raised_as_soon_as_the_limit_is_reached() -> None:
    buffer = LineBuffer(SMALL_LIMIT)
    for _ in range(SMALL_LIMIT - 1):
        buffer.feed(b"z")
        assert buffer.next_line() is None
    buffer.feed(b"z")
    with pytest.raises(ProtocolError) as caught:
        buffer.next_line()
    assert caught.value.code == Code.TOO_LARGE


# --- requests: the right code for each fault ------------------------------------------


def names_request(names: object) -> bytes:
    return json.dumps({"v": 1, "op": "acquire", "names": names}).encode()


@pytest.mark.parametrize(
    ("line", "code", "words"),
    [
        (b"", Code.MALFORMED, "not JSON"),
        (b'{"v":1,"op":"list"', Code.MALFORMED, "not JSON"),
        (b'{"v":1,"op":"list"} {}', Code.MALFORMED, "not JSON"),
        (b'{"v":1,"op":"li\xffst"}', Code.MALFORMED, "not UTF-8"),
        (b'{"v":1,"op":"list"}\xc3', Code.MALFORMED, "not UTF-8"),
        (b'{"v":1,"op":"\xed\xa0\x80"}', Code.MALFORMED, "not UTF-8"),  # a UTF-8 surrogate
        (b'{"v":1,"op":"list","x":NaN}', Code.MALFORMED, "NaN is not valid JSON"),
        (b'{"v":1,"op":"list","x":Infinity}', Code.MALFORMED, "Infinity is not valid JSON"),
        (b'{"v":1,"op":"list","x":-Infinity}', Code.MALFORMED, "-Infinity is not valid JSON"),
        (b'{"v":NaN,"op":"list"}', Code.MALFORMED, "NaN"),
        (b'{"v":1,"op":"list","op":"list"}', Code.MALFORMED, "key 'op' appears twice"),
        (b'{"v":1,"v":1,"op":"list"}', Code.MALFORMED, "key 'v' appears twice"),
        (b'{"v":1,"op":"list","x":{"a":1,"a":2}}', Code.MALFORMED, "key 'a' appears twice"),
        (b"[]", Code.MALFORMED, "not a JSON object"),
        (b'"list"', Code.MALFORMED, "not a JSON object"),
        (b"null", Code.MALFORMED, "not a JSON object"),
        (b'{"op":"list"}', Code.MALFORMED, 'no integer "v"'),
        (b'{"v":"1","op":"list"}', Code.MALFORMED, 'no integer "v"'),
        (b'{"v":1.0,"op":"list"}', Code.MALFORMED, 'no integer "v"'),
        (b'{"v":true,"op":"list"}', Code.MALFORMED, 'no integer "v"'),
        (b'{"v":1}', Code.MALFORMED, 'no string "op"'),
        (b'{"v":1,"op":5}', Code.MALFORMED, 'no string "op"'),
        (b'{"v":1,"op":["list"]}', Code.MALFORMED, 'no string "op"'),
        (b'{"v":1,"op":"list","names":["http"]}', Code.MALFORMED, "unknown key(s): names"),
        (b'{"v":1,"op":"status","z":1,"a":2}', Code.MALFORMED, "unknown key(s): a, z"),
        (b'{"v":1,"op":"acquire","names":["a"],"x":1}', Code.MALFORMED, "unknown key(s): x"),
        (b'{"v":1,"op":"acquire"}', Code.MALFORMED, "non-empty list"),
        (names_request([]), Code.MALFORMED, "non-empty list"),
        (names_request("http"), Code.MALFORMED, "non-empty list"),
        (names_request({"http": 1}), Code.MALFORMED, "non-empty list"),
        (names_request([5]), Code.MALFORMED, "5 is not a valid socket name"),
        (names_request([None]), Code.MALFORMED, "None is not a valid socket name"),
        (names_request(["http", "http"]), Code.MALFORMED, "names a socket twice"),
        (names_request([f"s{i}" for i in range(MAX_NAMES + 1)]), Code.MALFORMED, "at most 32"),
        (b'{"v":2,"op":"list"}', Code.UNSUPPORTED_VERSION, "protocol version 2 is not"),
        (b'{"v":0,"op":"list"}', Code.UNSUPPORTED_VERSION, "protocol version 0 is not"),
        (b'{"v":-1,"op":"list"}', Code.UNSUPPORTED_VERSION, "speaks version 1"),
        (b'{"v":2,"op":"launch"}', Code.UNSUPPORTED_VERSION, "version 2"),
        (b'{"v":2,"op":"list","x":1}', Code.UNSUPPORTED_VERSION, "version 2"),
        (
            b'{"v":1,"op":"launch"}',
            Code.UNKNOWN_OPERATION,
            "'launch'; known: acquire, list, status, reload",
        ),
        (
            b'{"v":1,"op":"reload","force":true}',
            Code.MALFORMED,
            "reload request has unknown key(s): force",
        ),
        (b'{"v":1,"op":"LIST"}', Code.UNKNOWN_OPERATION, "'LIST'"),
        (b'{"v":1,"op":""}', Code.UNKNOWN_OPERATION, "''"),
        (b'{"v":1,"op":"launch","x":1}', Code.UNKNOWN_OPERATION, "launch"),
    ],
)
def test_bad_requests_get_the_right_code(line: bytes, code: str, words: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_request(line)
    assert caught.value.code is code
    assert words in caught.value.message


@pytest.mark.parametrize(
    "name",
    [
        "",
        "-http",
        ".http",
        "_http",
        "a b",
        "a,b",
        "a:b",
        "a/b",
        "ht\ntp",
        "http\n",
        "caf\u00e9",
        "x" * (NAME_MAX_LENGTH + 1),
    ],
)
def test_bad_names_are_malformed(name: str) -> None:
    assert not valid_name(name)
    with pytest.raises(ProtocolError, match="is not a valid socket name") as caught:
        parse_request(names_request(["http", name]))
    assert caught.value.code == Code.MALFORMED


@pytest.mark.parametrize(
    "name", ["h", "0", "http", "web-1", "a.b_c@d-e", "A" + "z" * (NAME_MAX_LENGTH - 1)]
)
def test_good_names_are_accepted(name: str) -> None:
    assert valid_name(name)
    assert parse_request(names_request([name])) == Acquire((name,))


def test_exactly_max_names_distinct_names_are_accepted_in_order() -> None:
    wanted = tuple(f"s{i}" for i in reversed(range(MAX_NAMES)))
    assert parse_request(names_request(list(wanted))) == Acquire(wanted)


def test_an_unknown_operation_is_quoted_only_in_part() -> None:
    message = message_of(parse_request, json.dumps({"v": 1, "op": "o" * 10_000}).encode())
    assert "o" * 64 in message
    assert "o" * 65 not in message


def test_whitespace_and_key_order_do_not_matter() -> None:
    line = b' { "names" : [ "http" ] , "op" : "acquire" , "v" : 1 } '
    assert parse_request(line) == Acquire(("http",))


# --- replies -------------------------------------------------------------------------


def test_replies_ignore_unknown_keys() -> None:
    line = (
        b'{"v":1,"ok":true,"op":"list","new":[1,{"x":2}],"sockets":[{"name":"http",'
        b'"family":"inet","type":"datagram","address":"0.0.0.0:53","extra":true}]}'
    )
    assert parse_reply(line) == Listing((SocketInfo("http", "inet", "datagram", "0.0.0.0:53"),))
    refusal = b'{"v":1,"ok":false,"code":"busy","message":"later","retry":3}'
    assert parse_reply(refusal) == Refusal(Code.BUSY, "later")


def test_a_refusal_code_from_a_newer_broker_is_kept_and_treated_as_internal() -> None:
    line = b'{"v":1,"ok":false,"code":"on-fire","message":"the broker is on fire"}'
    assert parse_reply(line) == Refusal(Code.INTERNAL, "the broker is on fire (on-fire)")


@pytest.mark.parametrize("code", sorted(CODES))
def test_every_documented_code_survives_a_round_trip(code: str) -> None:
    line = json.dumps({"v": 1, "ok": False, "code": str(code), "message": "m"}).encode()
    assert parse_reply(line) == Refusal(code, "m")


def sockets_reply(*entries: object) -> bytes:
    return json.dumps({"v": 1, "ok": True, "op": "acquire", "sockets": list(entries)}).encode()


GOOD_ENTRY = {"name": "http", "family": "inet6", "type": "stream", "address": "[::]:80"}


@pytest.mark.parametrize(
    ("line", "code", "words"),
    [
        (b"\xff", Code.MALFORMED, "not UTF-8"),
        (b'{"v":1,"ok":true,"ok":true}', Code.MALFORMED, "appears twice"),
        (b'{"v":1,"ok":true,"op":"status","status":{"up":NaN}}', Code.MALFORMED, "NaN"),
        (b"[1]", Code.MALFORMED, "not a JSON object"),
        (b'{"ok":true,"op":"list","sockets":[]}', Code.MALFORMED, 'no integer "v"'),
        (b'{"v":2,"ok":true,"op":"list","sockets":[]}', Code.UNSUPPORTED_VERSION, "version 2"),
        (b'{"v":1,"op":"list","sockets":[]}', Code.MALFORMED, 'no boolean "ok"'),
        (b'{"v":1,"ok":1,"op":"list","sockets":[]}', Code.MALFORMED, 'no boolean "ok"'),
        (b'{"v":1,"ok":"true","op":"list","sockets":[]}', Code.MALFORMED, 'no boolean "ok"'),
        (b'{"v":1,"ok":false,"code":"denied"}', Code.MALFORMED, 'string "code" and "message"'),
        (b'{"v":1,"ok":false,"message":"m"}', Code.MALFORMED, 'string "code" and "message"'),
        (b'{"v":1,"ok":false,"code":7,"message":"m"}', Code.MALFORMED, 'string "code"'),
        (b'{"v":1,"ok":true}', Code.MALFORMED, "unknown op None"),
        (b'{"v":1,"ok":true,"op":"launch"}', Code.MALFORMED, "unknown op 'launch'"),
        (b'{"v":1,"ok":true,"op":"list"}', Code.MALFORMED, 'no "sockets" list'),
        (b'{"v":1,"ok":true,"op":"acquire","sockets":{}}', Code.MALFORMED, 'no "sockets" list'),
        (b'{"v":1,"ok":true,"op":"status"}', Code.MALFORMED, 'no "status" object'),
        (b'{"v":1,"ok":true,"op":"status","status":[]}', Code.MALFORMED, 'no "status" object'),
        (b'{"v":1,"ok":true,"op":"reload"}', Code.MALFORMED, 'no "configuration" object'),
        (sockets_reply(GOOD_ENTRY, "http"), Code.MALFORMED, "not an object"),
        (sockets_reply({**GOOD_ENTRY, "address": 80}), Code.MALFORMED, "lacks name, family"),
        (sockets_reply({"name": "http"}), Code.MALFORMED, "lacks name, family"),
        (sockets_reply({**GOOD_ENTRY, "family": "inet7"}), Code.MALFORMED, "invalid value"),
        (sockets_reply({**GOOD_ENTRY, "type": "seqpacket"}), Code.MALFORMED, "invalid value"),
        (sockets_reply({**GOOD_ENTRY, "name": "a b"}), Code.MALFORMED, "invalid value"),
    ],
)
def test_bad_replies_get_the_right_code(line: bytes, code: str, words: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_reply(line)
    assert caught.value.code is code
    assert words in caught.value.message


def test_a_request_is_not_a_reply_and_a_reply_is_not_a_request() -> None:
    assert code_of(parse_reply, b'{"v":1,"op":"list"}') == Code.MALFORMED
    reply = b'{"v":1,"ok":true,"op":"list","sockets":[]}'
    assert code_of(parse_request, reply) == Code.MALFORMED
