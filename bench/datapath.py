"""Data path: `wrk` against the same Node server (docs/examples/hello.js) reached five
ways, in alternating rounds.

- direct: node binds :8080 itself. The reference every other contender is divided by.
- broker: `port-broker exec http -- node hello.js` accepts on the broker's [::]:80.
- intercept: `port-broker exec --intercept http -- node hello.js` with PORT=80: node
  calls listen(80) itself and the launcher gives its bind() the held socket.
- proxyd: systemd-socket-proxyd on :8001 (under systemd-socket-activate, as a .socket
  unit starts it) forwarding to a direct node on :8080.
- socat: `socat TCP-LISTEN:8002,fork` forwarding to a direct node on :8080.

Each contender is started for its turn, warmed up, measured and stopped, so only one
server runs at a time and none competes with another for the two cores. A round runs
every contender once; each round starts one contender later than the last, so no
contender always follows the same neighbour. Every process runs as nobody; wrk, the
client, as root.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from bench.stage import Stage, wait_http

WRK_THREADS: Final = 2
"""One wrk thread per core: with one single-threaded node, wrk is never the limit."""
WRK_CONNECTIONS: Final = 64
"""Keep-alive connections: enough to saturate node; the issue's reference figures."""
WRK_TIMEOUT: Final = "10s"
"""A slow reply (socat's tail reaches seconds) is measured as latency, not dropped as
wrk's default 2 s timeout would."""

# Where each contender listens: 80 is the broker's socket, the rest are free high ports
# of the runner's own network namespace.
DIRECT_PORT: Final = 8080
BROKER_PORT: Final = 80
PROXYD_PORT: Final = 8001
SOCAT_PORT: Final = 8002

PROXYD_PATHS: Final = (  # Debian 12 keeps it in /lib, merged-/usr systems in /usr/lib
    "/lib/systemd/systemd-socket-proxyd",
    "/usr/lib/systemd/systemd-socket-proxyd",
)

_LATENCY = re.compile(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_RATE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_REQUESTS = re.compile(r"^\s+(\d+) requests in", re.MULTILINE)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_UNIT_MS: Final = {"us": 0.001, "ms": 1.0, "s": 1000.0}


@dataclass(frozen=True)
class WrkResult:
    """One wrk measurement."""

    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int

    @classmethod
    def parse(cls, output: str) -> WrkResult:
        """Read wrk's `--latency` report.

        Raises:
            ValueError: if the report lacks the request rate or the latency percentiles.
        """
        rate = _RATE.search(output)
        requests = _REQUESTS.search(output)
        latency = {int(q): float(v) * _UNIT_MS[u] for q, v, u in _LATENCY.findall(output)}
        if rate is None or requests is None or 50 not in latency or 99 not in latency:
            raise ValueError(f"cannot read wrk's report:\n{output}")
        errors = sum(int(n) for n in (_SOCKET_ERRORS.findall(output) or [("0",)])[0])
        errors += sum(int(n) for n in _NON_2XX.findall(output))
        return cls(float(rate.group(1)), latency[50], latency[99], errors, int(requests.group(1)))


def wrk(port: int, seconds: int) -> WrkResult:
    """Load http://127.0.0.1:PORT/ for `seconds` and return wrk's figures.

    Raises:
        RuntimeError: if wrk fails.
    """
    argv = ["wrk", f"-t{WRK_THREADS}", f"-c{WRK_CONNECTIONS}", f"-d{seconds}s", "--latency"]
    argv += ["--timeout", WRK_TIMEOUT, f"http://127.0.0.1:{port}/"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr or done.stdout}")
    return WrkResult.parse(done.stdout)


# --- the contenders ---------------------------------------------------------------

Starter = Callable[[Stage], list[subprocess.Popen[str]]]


@dataclass(frozen=True)
class Contender:
    """One way of reaching the Node server.

    Attributes:
        key: Short name used in tables and JSON.
        label: What it is, for the table.
        port: Where wrk sends its requests.
        start: Starts its processes (as nobody); returns them, stopped in reverse.
    """

    key: str
    label: str
    port: int
    start: Starter


def _node(stage: Stage, port: int) -> subprocess.Popen[str]:
    return stage.start("node", ["node", str(stage.hello)], env=stage.env(PORT=str(port)))


def _backend(stage: Stage) -> subprocess.Popen[str]:
    """The direct node a proxy forwards to, answering before the proxy starts."""
    node = _node(stage, DIRECT_PORT)
    try:
        wait_http(DIRECT_PORT, "the backend node to answer")
    except BaseException:
        stage.stop(node)
        raise
    return node


def _direct(stage: Stage) -> list[subprocess.Popen[str]]:
    return [_node(stage, DIRECT_PORT)]


def _broker(stage: Stage) -> list[subprocess.Popen[str]]:
    argv = [str(stage.launcher), "exec", "http", "--", "node", str(stage.hello)]
    return [stage.start("exec", argv)]


def _intercept(stage: Stage) -> list[subprocess.Popen[str]]:
    argv = [str(stage.launcher), "exec", "--intercept", "http", "--", "node", str(stage.hello)]
    return [stage.start("intercept", argv, env=stage.env(PORT=str(BROKER_PORT)))]


def proxyd_path() -> str | None:
    """Where Debian's systemd keeps systemd-socket-proxyd, if installed."""
    return next((p for p in PROXYD_PATHS if Path(p).exists()), None)


def _proxyd(stage: Stage) -> list[subprocess.Popen[str]]:
    backend = _backend(stage)
    argv = ["systemd-socket-activate", f"-l127.0.0.1:{PROXYD_PORT}", str(proxyd_path())]
    argv.append(f"127.0.0.1:{DIRECT_PORT}")
    return [backend, stage.start("proxyd", argv)]


def _socat(stage: Stage) -> list[subprocess.Popen[str]]:
    backend = _backend(stage)
    listen = f"TCP-LISTEN:{SOCAT_PORT},fork,reuseaddr,backlog=4096"
    return [backend, stage.start("socat", ["socat", listen, f"TCP:127.0.0.1:{DIRECT_PORT}"])]


CONTENDERS: Final = (
    Contender("direct", "(a) node binds :8080 itself", DIRECT_PORT, _direct),
    Contender("broker", "(b) port-broker exec (fd 3)", BROKER_PORT, _broker),
    Contender("intercept", "(c) port-broker exec --intercept", BROKER_PORT, _intercept),
    Contender("proxyd", "(d) systemd-socket-proxyd", PROXYD_PORT, _proxyd),
    Contender("socat", "(e) socat fork", SOCAT_PORT, _socat),
)


def missing_tools() -> list[str]:
    """The programs this section needs that are not installed."""
    missing = [tool for tool in ("wrk", "socat", "node") if shutil.which(tool) is None]
    return missing + ([] if proxyd_path() else ["systemd-socket-proxyd"])


# --- the measurement --------------------------------------------------------------


def measure_once(stage: Stage, contender: Contender, seconds: int, warmup: int) -> WrkResult:
    """Start `contender`, wait until it answers, warm it up, measure, stop it."""
    procs = contender.start(stage)
    try:
        wait_http(contender.port, f"{contender.key} to answer on :{contender.port}")
        if warmup > 0:
            wrk(contender.port, warmup)  # node's JIT, proxyd's activation, socat's forks
        return wrk(contender.port, seconds)
    finally:
        for proc in reversed(procs):
            stage.stop(proc)


def run(
    stage: Stage,
    *,
    contenders: tuple[Contender, ...],
    rounds: int,
    seconds: int,
    warmup: int,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Measure every contender `rounds` times, alternating; return per-round figures and
    per-round ratios to the first contender (measured in the same round)."""
    results: dict[str, list[WrkResult]] = {c.key: [] for c in contenders}
    for index in range(rounds):
        shift = index % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            result = measure_once(stage, contender, seconds, warmup)
            results[contender.key].append(result)
            progress(
                f"data path round {index + 1}/{rounds}: {contender.key:9} "
                f"{result.rps:9.0f} req/s  p99 {result.p99_ms:8.2f} ms"
            )
    reference = results[contenders[0].key]
    return {
        "contenders": {c.key: c.label for c in contenders},
        "rounds": {key: [asdict(r) for r in rs] for key, rs in results.items()},
        "ratios": {
            key: [r.rps / ref.rps for r, ref in zip(rs, reference, strict=True)]
            for key, rs in results.items()
        },
    }
