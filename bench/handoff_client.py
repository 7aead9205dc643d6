"""The hand-off load client: CLIENTS concurrent trio tasks in one process, each
acquiring a socket from the broker and closing it, over and over, for SECONDS.

Run by bench/handoff.py as nobody on /usr/bin/python3 with PYTHONPATH set to the
runtime's site directory (broker, trio), as a standalone script:

    handoff_client.py --socket PATH --name http --clients 64 --seconds 2

Prints one JSON object: grants, errors by type, the load's wall time, and latency
percentiles in milliseconds. A latency runs from the start of `acquire_trio` (connect)
to the socket in hand; with many tasks it includes the wait for this process's own
event loop, as any single-process client would see it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from typing import Any

import trio

from broker.client import acquire_trio
from broker.errors import ClientError

PERCENTILES = (50, 90, 99, 99.9)


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return math.nan
    return ordered[max(math.ceil(q / 100 * len(ordered)), 1) - 1]


async def load(path: str, name: str, clients: int, seconds: float) -> dict[str, Any]:
    """Run the load; return its summary."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    deadline = time.perf_counter() + seconds

    async def one_client() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                sock = await acquire_trio(name, path=path)
            except ClientError as e:
                errors[f"{type(e).__name__}: {e}"[:160]] += 1
                await trio.sleep(0)  # a refusing broker must not starve the others
                continue
            latencies.append(time.perf_counter() - started)
            sock.close()

    began = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(one_client)
    elapsed = time.perf_counter() - began
    ordered = sorted(latencies)
    return {
        "clients": clients,
        "seconds": elapsed,
        "grants": len(latencies),
        "errors": dict(errors),
        **{f"p{q:g}_ms": _percentile(ordered, q) * 1000 for q in PERCENTILES},
        "max_ms": (ordered[-1] if ordered else math.nan) * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description="hand-off load client (bench/handoff.py)")
    parser.add_argument("--socket", required=True, help="the broker's control socket")
    parser.add_argument("--name", default="http", help="the socket to acquire")
    parser.add_argument("--clients", type=int, required=True, help="concurrent tasks")
    parser.add_argument("--seconds", type=float, required=True, help="how long to load")
    args = parser.parse_args()
    summary = trio.run(load, args.socket, args.name, args.clients, args.seconds)
    json.dump(summary, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
