"""The control-socket wire protocol, sans-IO: bytes in, messages out.

Nothing here touches a socket, a file descriptor or the clock; the broker and the
clients do the I/O and call in here to frame, encode and parse. The format is documented
in docs/protocol.md. In short: each message is one line of compact UTF-8 JSON ending in
"\\n", always carrying `"v": 1`. The fds of an `acquire` reply travel as one SCM_RIGHTS
message attached to the reply's first byte, one fd per entry of its `sockets` list, in
that order. The messages themselves are broker/messages.py's.

Invariant (tested with hypothesis, whole and byte by byte): every input either parses
or raises `ProtocolError`, nothing else.

Must never: import anything a bare interpreter has not already loaded but C modules
(`_json`): a worker's `exec` parses its reply here, and `json`, `dataclasses`, `enum` or
`typing` would each cost it milliseconds. JSON is therefore read with the C scanner that
`json` itself uses, and written with `json` only on the broker's side (`encode_reply`),
which has it loaded anyway.
"""

from __future__ import annotations

from _json import encode_basestring_ascii as _quoted  # what json itself uses, in C
from _json import make_scanner as _make_scanner

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
from broker.names import FAMILIES, TYPES, printable, valid_name

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any, Final

PROTOCOL_VERSION: Final = 1

MAX_REQUEST_BYTES: Final = 4096
"""Largest request line, newline included. The biggest legitimate request (MAX_NAMES
names of names.NAME_MAX_LENGTH characters) is about 2.2 KiB; for comparison h11 allows 16 KiB
of HTTP headers and s6-fdholderd 4 KiB per request."""

MAX_REPLY_BYTES: Final = 1 << 20
"""Largest reply line a client accepts: a status report of a thousand sockets fits."""

MAX_NAMES: Final = 32
"""Most socket names in one acquire; one worker rarely needs more than http+https."""

SCM_MAX_FD: Final = 253
"""The kernel's limit on fds in one SCM_RIGHTS message (include/net/scm.h)."""

_OPS: Final = {Acquire: "acquire", ListSockets: "list", Status: "status", Reload: "reload"}


# --- framing ----------------------------------------------------------------------


class LineBuffer:
    """Collect bytes from a stream and cut them into newline-terminated messages.

    Raises `ProtocolError(TOO_LARGE)` as soon as more than `limit` bytes are pending
    without a newline, so a peer can never make us buffer more than `limit` bytes.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        """Append bytes received from the peer."""
        self._buffer += data

    def next_line(self) -> bytes | None:
        """Return the next complete message without its newline, or None if incomplete.

        Raises:
            ProtocolError: TOO_LARGE if the pending message exceeds the limit.
        """
        end = self._buffer.find(b"\n", 0, self._limit)
        if end < 0:
            if len(self._buffer) >= self._limit:
                raise ProtocolError(
                    Code.TOO_LARGE, f"message exceeds {self._limit} bytes without ending"
                )
            return None
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        return line

    @property
    def pending(self) -> int:
        """Bytes received but not yet returned as a message."""
        return len(self._buffer)


# --- encoding ---------------------------------------------------------------------


def encode_request(request: Request) -> bytes:
    """Return the wire form of a request, newline included (written here, not by
    `json`: a request is a version, an operation and names, each a JSON string)."""
    text = f'{{"v":{PROTOCOL_VERSION},"op":"{_OPS[type(request)]}"'
    if isinstance(request, Acquire):
        text += ',"names":[' + ",".join(map(_quoted, request.names)) + "]"
    return text.encode() + b"}\n"


_DUMPS: list[Callable[[object], str]] = []
"""json's encoder, made once, when the broker first writes a reply."""


def _dump(obj: Mapping[str, Any]) -> bytes:
    if not _DUMPS:
        import json  # noqa: PLC0415 (the broker's side only: see the module's docstring)

        _DUMPS.append(json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode)
    return _DUMPS[0](obj).encode() + b"\n"


def encode_reply(reply: Reply) -> bytes:
    """Return the wire form of a reply, newline included."""
    if isinstance(reply, Refusal):
        return _dump(
            {"v": PROTOCOL_VERSION, "ok": False, "code": str(reply.code), "message": reply.message}
        )
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "ok": True}
    if isinstance(reply, Granted):
        body["op"] = "acquire"
        body["sockets"] = [s.to_json() for s in reply.sockets]
    elif isinstance(reply, Listing):
        body["op"] = "list"
        body["sockets"] = [s.to_json() for s in reply.sockets]
    elif isinstance(reply, Reloaded):
        body["op"] = "reload"
        body["configuration"] = dict(reply.configuration)
    else:
        body["op"] = "status"
        body["status"] = dict(reply.report)
    return _dump(body)


# --- parsing ----------------------------------------------------------------------


def _malformed(message: str) -> ProtocolError:
    return ProtocolError(Code.MALFORMED, message)


def _reject_constant(token: str) -> None:
    raise _malformed(f"{token} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _malformed(f"key {key[:32]!r} appears twice")
        result[key] = value
    return result


class _Strict:
    """What json's scanner reads its settings from: JSON as RFC 8259 has it (no NaN or
    Infinity), a key at most once in an object."""

    strict = True
    object_hook = None
    object_pairs_hook = staticmethod(_unique_keys)
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_reject_constant)
    memo: dict[str, str]  # (the scanner written in Python keeps its memo here)

    def __init__(self) -> None:
        self.memo = {}


_scan: Final = _make_scanner(_Strict())  # type: ignore[arg-type]  # (typeshed: its own type)
_WHITESPACE: Final = " \t\n\r"


def _decode(text: str) -> object:
    """The one JSON value `text` holds, as json.loads would give it with _Strict's rules.

    Raises:
        ValueError: for anything else (json.JSONDecodeError is one).
        ProtocolError: for a constant or a key twice (raised by _Strict's hooks).
    """
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan(text, start)
    except StopIteration as e:
        raise ValueError(f"Expecting value: char {e.value}") from None
    if text[end:].strip(_WHITESPACE):
        raise ValueError(f"Extra data: char {end}")
    return value


def _load_object(line: bytes) -> dict[str, Any]:
    try:
        obj = _decode(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise _malformed("message is not UTF-8") from None
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise _malformed(f"message is not JSON: {e}") from None
    except RecursionError:
        raise _malformed("message is nested too deeply") from None
    if not isinstance(obj, dict):
        raise _malformed("message is not a JSON object")
    version = obj.get("v")
    if type(version) is not int:
        raise _malformed('message has no integer "v" (protocol version)')
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            Code.UNSUPPORTED_VERSION,
            f"protocol version {version} is not supported; this side speaks "
            f"version {PROTOCOL_VERSION}",
        )
    return obj


SHOWN_KEYS: Final = 4
"""Unknown keys a refusal names (each cut to 32 characters, made printable): enough to
fix a client, too little to carry a forged log line."""


def _expect_keys(obj: Mapping[str, Any], allowed: set[str], what: str) -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        shown = ", ".join(printable(key[:32]) for key in extra[:SHOWN_KEYS])
        more = f" and {len(extra) - SHOWN_KEYS} more" if len(extra) > SHOWN_KEYS else ""
        raise _malformed(f"{what} has unknown key(s): {shown}{more}")


REQUEST_CACHE: Final = 256
"""Request lines remembered with what they parse to (the broker's side): workers ask the
same few things again and again, and parsing is a tenth of what a grant costs. Lines
past CACHED_LINE_MAX are not kept, so the cache holds at most 64 KiB of them."""
CACHED_LINE_MAX: Final = 256

_parsed: dict[bytes, Request] = {}


def parse_request(line: bytes) -> Request:
    """Parse one request line (without its newline).

    Strict: unknown keys, duplicate keys, bad names and wrong types are all refused, so
    that a request means exactly one thing.

    Raises:
        ProtocolError: for any input that is not a valid request.
    """
    request = _parsed.get(line)
    if request is None:
        request = _parse_request(line)  # raises for anything invalid: never kept
        if len(line) <= CACHED_LINE_MAX:
            if len(_parsed) >= REQUEST_CACHE:
                del _parsed[next(iter(_parsed))]  # the oldest
            _parsed[line] = request
    return request


def _parse_request(line: bytes) -> Request:
    obj = _load_object(line)
    op = obj.get("op")
    if not isinstance(op, str):
        raise _malformed('request has no string "op"')
    if op == "acquire":
        _expect_keys(obj, {"v", "op", "names"}, "acquire request")
        names = obj.get("names")
        if not isinstance(names, list) or not names:
            raise _malformed('acquire needs "names": a non-empty list of socket names')
        if len(names) > MAX_NAMES:
            raise _malformed(f"acquire names {len(names)} sockets; at most {MAX_NAMES}")
        for name in names:
            if not isinstance(name, str) or not valid_name(name):
                raise _malformed(f"{name!r:.80} is not a valid socket name")
        if len(set(names)) != len(names):
            raise _malformed("acquire names a socket twice")
        return Acquire(tuple(names))
    if op == "list":
        _expect_keys(obj, {"v", "op"}, "list request")
        return ListSockets()
    if op == "status":
        _expect_keys(obj, {"v", "op"}, "status request")
        return Status()
    if op == "reload":
        _expect_keys(obj, {"v", "op"}, "reload request")
        return Reload()
    raise ProtocolError(
        Code.UNKNOWN_OPERATION,
        f"unknown operation {op[:64]!r}; known: acquire, list, status, reload",
    )


def _parse_info(item: Any) -> SocketInfo:
    if not isinstance(item, dict):
        raise _malformed("socket entry is not an object")
    name, family, type_, address = (item.get(k) for k in ("name", "family", "type", "address"))
    if not (
        isinstance(name, str)
        and isinstance(family, str)
        and isinstance(type_, str)
        and isinstance(address, str)
    ):
        raise _malformed("socket entry lacks name, family, type or address")
    if not valid_name(name) or family not in FAMILIES or type_ not in TYPES:
        raise _malformed(f"socket entry {item!r:.200} has an invalid value")
    return SocketInfo(name, family, type_, address)


def _parse_infos(obj: Mapping[str, Any]) -> tuple[SocketInfo, ...]:
    items = obj.get("sockets")
    if not isinstance(items, list):
        raise _malformed('reply has no "sockets" list')
    return tuple(_parse_info(item) for item in items)


def parse_reply(line: bytes) -> Reply:
    """Parse one reply line (without its newline).

    Lenient where the protocol allows growth: unknown keys in a reply are ignored, so a
    broker may add fields within a protocol version.

    Raises:
        ProtocolError: for any input that is not a valid reply.
    """
    obj = _load_object(line)
    ok = obj.get("ok")
    if ok is False:
        code, message = obj.get("code"), obj.get("message")
        if not isinstance(code, str) or not isinstance(message, str):
            raise _malformed('refusal lacks string "code" and "message"')
        if code not in CODES:  # a code from a newer broker: keep its words, as internal
            return Refusal(Code.INTERNAL, f"{message} ({code})")
        return Refusal(code, message)
    if ok is not True:
        raise _malformed('reply has no boolean "ok"')
    op = obj.get("op")
    if op == "acquire":
        return Granted(_parse_infos(obj))
    if op == "list":
        return Listing(_parse_infos(obj))
    if op == "status":
        report = obj.get("status")
        if not isinstance(report, dict):
            raise _malformed('status reply has no "status" object')
        return StatusReport(report)
    if op == "reload":
        configuration = obj.get("configuration")
        if not isinstance(configuration, dict):
            raise _malformed('reload reply has no "configuration" object')
        return Reloaded(configuration)
    raise _malformed(f"reply has unknown op {op!r:.64}")
