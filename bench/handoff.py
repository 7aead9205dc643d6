"""The control path: grants under concurrent load, `port-broker exec` as a whole
process, and a cold start by socket activation.

- Load: bench/handoff_client.py (trio, one process, as nobody) runs 1, 64 and 512
  concurrent acquire loops against the main broker, alternating levels round by round,
  while the broker's VmRSS and CPU time are sampled from /proc; with a baseline
  (`bench/run --baseline COMMIT`), against that commit's broker too, right after each,
  so that each pair of runs meets the same machine.
- exec: `setpriv … port-broker exec http -- true` timed as a whole process, beside a
  `setpriv … true` baseline (setpriv's own cost) and `setpriv … python3 -I -c pass`
  (the interpreter's floor), alternating.
- Cold start: a fresh `systemd-socket-activate` per run; the time from the first
  client connect (which starts the broker) to the fd in hand.
- Idle exit: a broker started as systemd starts one (NOTIFY_SOCKET set), with
  `idle_exit = 1`: the seconds from its last client to its exit, after which an idle
  broker has no memory at all.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from bench.stage import POLICY, Stage, cpu_seconds, rss_kib
from broker.client import acquire
from broker.daemon.lifecycle import IDLE_FLOOR
from tests.harness.processes import NOBODY, START_TIMEOUT, as_user, fd_count, settled_fd_count
from tests.harness.runtime import SYSTEM_PYTHON, make_public_dir

CONCURRENCY: Final = (1, 64, 512)
"""Clients acquiring at once: alone, a busy host, and half the broker's default
max_connections (1024) against its default fd limit (1024)."""

SAMPLE_INTERVAL: Final = 0.02
"""Seconds between /proc samples of the broker: catches the RSS peak of a 1 s load."""

IDLE_EXIT_SLACK: Final = 5.0
"""Seconds past the idle floor within which a broker idle that long must have exited."""

COLD_PORT: Final = 8090
"""The TCP socket each cold-start broker holds (port 80 stays with the main broker)."""

CLIENT_TIMEOUT: Final = 120.0
"""Seconds a load client may take beyond its load time before the run gives up on it."""


@dataclass
class LoadRun:
    """One load client's run, with the broker's figures during it."""

    clients: int
    build: str
    """"current", or "baseline" (the commit `--baseline` names)."""
    grants: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: dict[str, int]
    broker_cpu: float
    """Broker CPU time over the load's wall time (1.0 = one core busy)."""
    peak_rss_kib: int
    fds_peak: int

    @property
    def rate(self) -> float:
        return self.grants / self.seconds

    @property
    def cpu_per_grant_us(self) -> float:
        """The broker's CPU time per grant, in microseconds."""
        return self.broker_cpu * self.seconds / max(self.grants, 1) * 1e6


@dataclass
class HandoffResults:
    """Everything this section measured."""

    loads: list[LoadRun] = field(default_factory=list)
    rss_idle_kib: int = 0
    rss_after_kib: int = 0
    fds_before: int = 0
    fds_after: int = 0
    nofile_limit: str = ""
    exec_ms: dict[str, list[float]] = field(default_factory=dict)
    cold_ms: list[float] = field(default_factory=list)
    idle_exit_s: float = 0.0
    """Seconds from the last client to the exit of a broker with idle_exit = 1 (0: it
    did not exit)."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for load, entry in zip(self.loads, data["loads"], strict=True):
            entry["rate"] = load.rate
            entry["cpu_per_grant_us"] = load.cpu_per_grant_us
        return data


def load_once(stage: Stage, clients: int, seconds: float, build: str = "current") -> LoadRun:
    """Run the load client once against the `build`'s broker; sample the broker until
    it is done.

    Raises:
        RuntimeError: if the client fails.
    """
    broker = stage.main_broker if build == "current" else stage.baseline
    if broker is None:
        raise RuntimeError("no baseline broker: run with --baseline COMMIT")
    argv = [*as_user(NOBODY), SYSTEM_PYTHON, "-s", str(stage.client)]
    argv += ["--socket", str(broker.control), "--clients", str(clients)]
    argv += ["--seconds", str(seconds)]
    cpu_before = cpu_seconds(broker.pid)
    client = stage.run_piped(argv, env=stage.env(PYTHONPATH=str(stage.site)))
    peak_rss = fds_peak = 0
    deadline = time.monotonic() + seconds + CLIENT_TIMEOUT
    try:
        while client.poll() is None and time.monotonic() < deadline:
            peak_rss = max(peak_rss, rss_kib(broker.pid))
            fds_peak = max(fds_peak, fd_count(broker.pid))
            time.sleep(SAMPLE_INTERVAL)
        out, err = client.communicate(timeout=1)
    finally:
        stage.stop(client)
    cpu = cpu_seconds(broker.pid) - cpu_before
    if client.returncode != 0 or not out.strip():
        raise RuntimeError(f"the load client failed ({client.returncode}):\n{err}")
    summary = json.loads(out)
    return LoadRun(
        clients=clients,
        build=build,
        grants=summary["grants"],
        seconds=summary["seconds"],
        p50_ms=summary["p50_ms"],
        p99_ms=summary["p99_ms"],
        max_ms=summary["max_ms"],
        errors=summary["errors"],
        broker_cpu=cpu / summary["seconds"],
        peak_rss_kib=peak_rss,
        fds_peak=fds_peak,
    )


def time_exec(stage: Stage, runs: int) -> dict[str, list[float]]:
    """Wall milliseconds of each command, `runs` times, alternating.

    Raises:
        RuntimeError: if a command fails.
    """
    nobody = as_user(NOBODY)
    commands = {
        "setpriv true": [*nobody, "true"],
        "setpriv python3 -I -c pass": [*nobody, SYSTEM_PYTHON, "-I", "-c", "pass"],
        "setpriv port-broker exec http -- true": [
            *nobody, str(stage.launcher), "exec", "http", "--", "true",
        ],
    }  # fmt: skip
    times: dict[str, list[float]] = {key: [] for key in commands}
    for _ in range(runs):
        for key, argv in commands.items():
            started = time.perf_counter()
            done = subprocess.run(argv, env=stage.env(), capture_output=True, check=False)
            times[key].append((time.perf_counter() - started) * 1000)
            if done.returncode != 0:
                raise RuntimeError(f"{key} failed: {done.stderr.decode()}")
    return times


def cold_start(stage: Stage, index: int) -> float:
    """Milliseconds from the first connect to a fresh broker to the fd in hand."""
    broker = stage.spawn_broker(f"cold{index}", [("http", f"127.0.0.1:{COLD_PORT}")])
    try:
        started = time.perf_counter()
        sock = acquire("http", path=str(broker.control), timeout=START_TIMEOUT)
        elapsed = time.perf_counter() - started
        sock.close()
    finally:
        stage.stop(broker.proc)
    return elapsed * 1000


def idle_exit_seconds(stage: Stage) -> float:
    """Seconds from its last client to the exit of a broker started as systemd starts
    one, with `idle_exit = 1` (its floor makes that at least 10 s); 0 if it lives on."""
    where = make_public_dir(stage.root, "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(where / "notify.sock"))
        (where / "notify.sock").chmod(0o666)  # systemd's is the broker's to write to
        broker = stage.spawn_broker(
            "idle", [("http", f"127.0.0.1:{COLD_PORT}")], policy="idle_exit = 1\n" + POLICY,
            environ={"NOTIFY_SOCKET": str(where / "notify.sock")},
        )  # fmt: skip
        try:
            stage.activate(broker)
            last = time.monotonic()
            broker.proc.wait(timeout=IDLE_FLOOR + IDLE_EXIT_SLACK)
            return time.monotonic() - last
        except subprocess.TimeoutExpired:
            return 0.0
        finally:
            stage.stop(broker.proc)


def nofile_limit(pid: int) -> str:
    """The process's 'Max open files' soft and hard limits, from /proc."""
    with open(f"/proc/{pid}/limits", encoding="ascii") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return f"{soft}:{hard}"
    return "?"


def run(
    stage: Stage,
    *,
    rounds: int,
    seconds: float,
    exec_runs: int,
    cold_runs: int,
    progress: Callable[[str], None],
) -> HandoffResults:
    """Measure the control path on the main broker (and fresh ones for cold start)."""
    broker = stage.main_broker
    results = HandoffResults(nofile_limit=nofile_limit(broker.pid))
    results.fds_before = settled_fd_count(broker.pid)
    results.rss_idle_kib = rss_kib(broker.pid)
    builds = ["current", "baseline"] if stage.baseline is not None else ["current"]
    for index in range(rounds):
        for clients in CONCURRENCY:
            for build in builds:
                load = load_once(stage, clients, seconds, build)
                results.loads.append(load)
                progress(
                    f"hand-off round {index + 1}/{rounds} {build:8}: {clients:3} clients "
                    f"{load.rate:8.0f} grants/s  p50 {load.p50_ms:6.2f} ms  "
                    f"p99 {load.p99_ms:7.2f} ms  {load.cpu_per_grant_us:5.0f} µs CPU/grant  "
                    f"{load.peak_rss_kib / 1024:5.1f} MiB"
                    + (f"  errors {load.errors}" if load.errors else "")
                )
    results.exec_ms = time_exec(stage, exec_runs)
    results.fds_after = settled_fd_count(broker.pid)
    results.rss_after_kib = rss_kib(broker.pid)
    progress(
        "exec: "
        + ", ".join(
            f"{key} {sorted(ms)[len(ms) // 2]:.1f} ms" for key, ms in results.exec_ms.items()
        )
    )
    for index in range(cold_runs):
        results.cold_ms.append(cold_start(stage, index))
    progress(f"cold start: {', '.join(f'{ms:.0f}' for ms in results.cold_ms)} ms")
    results.idle_exit_s = idle_exit_seconds(stage)
    progress(f"idle exit: {results.idle_exit_s:.1f} s after the last client (0: none)")
    return results
