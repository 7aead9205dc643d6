"""The attack section's processes: a named worker that measures, and the attackers.

Run by bench/attack.py on /usr/bin/python3 with PYTHONPATH set to the runtime's site
directory, each as the uid it stands for, as a standalone script:

    attack_client.py worker --socket PATH --seconds 5 --interval 0.02
    attack_client.py flood --socket PATH --seconds 5
    attack_client.py slow --socket PATH --seconds 5 --connections 64
    attack_client.py hoard --socket PATH --seconds 5 --connections 4000
    attack_client.py fuzz --socket PATH --cases 100000 --seed 1

`worker` acquires `http` every INTERVAL seconds with the synchronous client (what
`port-broker exec` uses) and prints a JSON summary: attempts, successes, failures by kind,
latency percentiles. `flood` connects, asks for the list and closes, as fast as it can,
without waiting for room in a full queue. `slow` keeps CONNECTIONS connections open,
each sending one byte of a request a second, opening a new one for each the broker
closes. `hoard`, a uid the policy allows, opens up to CONNECTIONS connections, one every
millisecond, alternately pipelining 100 acquires and asking once then half-closing, and
never reads a reply: the sockets granted stay in flight, charged to the broker. `fuzz`
sends CASES malformed, mutated and split requests, one connection each, and counts what
came back; each prints a JSON summary at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import random
import resource
import select
import socket
import sys
import time
from collections import Counter
from typing import Any

from broker.client import acquire
from broker.errors import ClientError

LIST = b'{"v":1,"op":"list"}\n'
ACQUIRE = b'{"v":1,"op":"acquire","names":["http"]}\n'


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return math.nan
    return ordered[max(math.ceil(q / 100 * len(ordered)), 1) - 1]


def worker(path: str, seconds: float, interval: float) -> dict[str, Any]:
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    next_at = time.monotonic()
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            acquire("http", path=path, timeout=5.0).close()
            latencies.append(time.monotonic() - started)
        except ClientError as e:
            failures[f"{type(e).__name__}: {e}"[:120]] += 1
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))
    ordered = sorted(latencies)
    attempts = len(latencies) + sum(failures.values())
    return {
        "attempts": attempts,
        "granted": len(latencies),
        "failures": dict(failures),
        "p50_ms": _percentile(ordered, 50) * 1000,
        "p99_ms": _percentile(ordered, 99) * 1000,
        "max_ms": (ordered[-1] if ordered else math.nan) * 1000,
    }


def flood(path: str, seconds: float) -> dict[str, Any]:
    connected = full = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
            connected += 1
            with contextlib.suppress(OSError):
                sock.send(LIST)
        except BlockingIOError:
            full += 1  # the queue is full: do not wait, try again (the attack)
        finally:
            sock.close()
    return {"connected": connected, "queue_full": full}


def slow(path: str, seconds: float, connections: int) -> dict[str, Any]:
    opened = 0
    open_socks: dict[socket.socket, int] = {}  # socket -> bytes of ACQUIRE sent
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        while len(open_socks) < connections:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(path)
            except OSError:
                sock.close()
                break
            open_socks[sock] = 0
            opened += 1
        for sock, sent in list(open_socks.items()):
            try:
                sock.send(ACQUIRE[sent : sent + 1])  # a byte a second; never the newline
                open_socks[sock] = (sent + 1) % (len(ACQUIRE) - 1)
            except OSError:
                sock.close()
                del open_socks[sock]
        # Whatever the broker closed (a timeout, busy) is replaced on the next round.
        readable, _, _ = select.select(list(open_socks), [], [], 1.0)
        for sock in readable:
            try:
                data = sock.recv(4096)
            except OSError:
                data = b""
            if not data or b"\n" in data:
                sock.close()
                del open_socks[sock]
    for sock in open_socks:
        sock.close()
    return {"opened": opened}


def hoard(path: str, seconds: float, connections: int) -> dict[str, Any]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    held: list[socket.socket] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if len(held) < min(connections, hard - 64):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                if len(held) % 2:
                    sock.sendall(ACQUIRE * 100)  # pipelined, none read
                else:
                    sock.sendall(ACQUIRE)
                    sock.shutdown(socket.SHUT_WR)  # nothing more, nothing read
            except OSError:
                pass
            held.append(sock)  # kept open: the replies stay unread in its queue
        time.sleep(0.001)
    opened = len(held)
    for sock in held:
        sock.close()
    return {"opened": opened}


def fuzz_cases(rng: random.Random) -> bytes:
    """One hostile request: random bytes, a mutated request, or a JSON edge case."""
    valid = [LIST, ACQUIRE, b'{"v":1,"op":"status"}\n', b'{"v":1,"op":"reload"}\n',
             b'{"v":1,"op":"acquire","names":["http","https","secret"]}\n']  # fmt: skip
    kind = rng.randrange(6)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    base = bytearray(rng.choice(valid))
    if kind == 1:
        for _ in range(rng.randrange(1, 6)):
            base[rng.randrange(len(base))] = rng.randrange(256)
        return bytes(base)
    if kind == 2:
        return bytes(base[: rng.randrange(len(base))])
    if kind == 3:
        depth = rng.choice([10, 100, 1000, 2000])
        return b'{"v":1,"op":"list","x":' + b"[" * depth + b"]" * depth + b"}\n"
    if kind == 4:
        odd = rng.choice([b"NaN", b"1e999", b"-0", b'"\\ud800"', b"18446744073709551617",
                          b'"\\u2028port-broker: info: granted"', b"null", b"true"])  # fmt: skip
        key = rng.choice([b"v", b"op", b"names", b"x\\n"])
        return b'{"v":1,"op":"acquire",' + b'"' + key + b'":' + odd + b"}\n"
    return bytes(base) * rng.randrange(2, 120)  # many requests at once, past the limits


def fuzz(path: str, cases: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)  # noqa: S311 (reproducible cases, not secrets)
    outcomes: Counter[str] = Counter()
    for _ in range(cases):
        case = fuzz_cases(rng)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10.0)
        try:
            sock.connect(path)
            cuts = (
                sorted(rng.sample(range(1, len(case)), min(2, len(case) - 1)))
                if (len(case) > 1 and rng.random() < 0.3)
                else []
            )
            for a, b in zip([0, *cuts], [*cuts, len(case)], strict=True):
                sock.sendall(case[a:b])
            sock.shutdown(socket.SHUT_WR)  # end of stream: the broker answers and closes
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
            outcomes["answered" if reply else "closed"] += 1
            for line in reply.splitlines():
                json.loads(line)  # every reply line is JSON, whatever came in
        except (BrokenPipeError, ConnectionResetError):
            outcomes["reset"] += 1
        except OSError as e:
            outcomes[errno.errorcode.get(e.errno or 0, str(e))] += 1
        except ValueError:
            outcomes["bad reply"] += 1
        finally:
            sock.close()
    return {"cases": cases, "outcomes": dict(outcomes)}


def main() -> int:
    parser = argparse.ArgumentParser(description="attack section processes (bench/attack.py)")
    parser.add_argument("mode", choices=["worker", "flood", "slow", "hoard", "fuzz"])
    parser.add_argument("--socket", required=True, help="the broker's control socket")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.mode == "worker":
        summary = worker(args.socket, args.seconds, args.interval)
    elif args.mode == "flood":
        summary = flood(args.socket, args.seconds)
    elif args.mode == "slow":
        summary = slow(args.socket, args.seconds, args.connections)
    elif args.mode == "hoard":
        summary = hoard(args.socket, args.seconds, args.connections)
    else:
        summary = fuzz(args.socket, args.cases, args.seed)
    json.dump(summary, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
