"""The benchmark runner: `bench/run [--quick] [options]` (as root).

Moves itself into a network namespace of its own (loopback only: ports 80 and 443 are
free there and no packet leaves it), builds a world-readable port-broker runtime under
/var/tmp, starts the broker under `systemd-socket-activate` as an unprivileged uid, and
runs the sections in order: data path, hand-off (with the exec CLI and cold start),
worker restart, under attack (with a live fuzz run). Then it checks the budgets,
profiles what missed, and writes results.md, results.json and chart.png to
bench/results/.

Must never: run as anything but root in a private network namespace, or leave a
process or a temporary directory behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from bench import attack, datapath, handoff, profiling, report, restart
from bench.budgets import check_budgets
from bench.stage import BENCH, Stage, open_stage, rss_kib
from broker.errors import InterceptError
from broker.intercept.seccomp import check_supported
from tests.harness.processes import enter_private_network

RESULTS: Final = BENCH / "results"
SECTIONS: Final = ("datapath", "handoff", "restart", "attack")

RUNNER_NOFILE: Final = 65536
"""Soft fd limit for the runner and the clients it starts: 512 concurrent clients
(two fds each at a grant) and wrk need more than a 1024 default. The broker gets its
own production limit (bench.stage.BROKER_NOFILE)."""


@dataclass(frozen=True)
class Settings:
    """How much to measure. The defaults take about 10 minutes on 2 cores."""

    rounds: int = 10
    """Data-path rounds: each runs every contender once. Single rounds scatter by ±5 % on a
    shared 2-core machine; the median of ten settles to about ±1.5 %."""
    seconds: int = 5
    """wrk's measuring time per contender and round (wrk takes whole seconds)."""
    warmup: int = 1
    """wrk's warm-up time before each measurement, not counted (0: none)."""
    handoff_rounds: int = 5
    """Hand-off rounds: each runs every concurrency level once."""
    handoff_seconds: float = 2.0
    """Load time per concurrency level and round."""
    exec_runs: int = 30
    """Timed runs of each exec command."""
    cold_runs: int = 10
    """Cold starts (a fresh systemd-socket-activate each)."""
    restart_rounds: int = 2
    """Worker-restart rounds: each runs both setups once."""
    restarts: int = 5
    """Worker restarts per run."""
    attack_seconds: float = 10.0
    """The named worker's time under each attack (and with none)."""
    fuzz_cases: int = 100_000
    """Hostile requests of the live fuzz run."""
    sections: tuple[str, ...] = SECTIONS
    contenders: tuple[str, ...] = tuple(c.key for c in datapath.CONTENDERS)
    """Data-path contenders; the first is the reference the others are divided by."""
    profile: bool = True
    """Profile what dominates a missed budget (py-spy, RSS by import, -X importtime)."""
    baseline: str | None = None
    """A commit whose broker the hand-off load also runs against, run by run."""


QUICK: Final = Settings(
    rounds=2,
    seconds=2,
    warmup=1,
    handoff_rounds=2,
    handoff_seconds=1.0,
    exec_runs=10,
    cold_runs=5,
    restart_rounds=1,
    restarts=3,
    attack_seconds=3.0,
    fuzz_cases=10_000,
)
"""`--quick`: 1-2 minutes; enough to see that everything works and roughly where."""


KNOBS: Final = ("rounds", "seconds", "warmup", "handoff_rounds", "handoff_seconds",
                 "exec_runs", "cold_runs", "restart_rounds", "restarts", "attack_seconds",
                 "fuzz_cases")  # fmt: skip
"""The numeric settings, each an option (--handoff-rounds N, …)."""


def parse_settings(argv: list[str] | None) -> tuple[Settings, Path]:
    parser = argparse.ArgumentParser(
        prog="bench/run",
        description="Benchmark port-broker side by side with a direct bind and with "
        "proxies; check the performance budgets. Run as root.",
    )
    parser.add_argument("--quick", action="store_true", help="a 1-2 minute run")
    types = {field.name: field.type for field in dataclasses.fields(Settings)}
    for name in KNOBS:
        kind = int if types[name] == "int" else float
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            metavar="N" if kind is int else "SECONDS",
            help=f"default {getattr(Settings(), name)}, quick {getattr(QUICK, name)}",
        )
    parser.add_argument(
        "--only", action="append", choices=SECTIONS, help="run only this section (repeatable)"
    )
    parser.add_argument(
        "--contenders",
        metavar="KEY,...",
        help="data-path contenders, direct first (default: "
        + ",".join(c.key for c in datapath.CONTENDERS)
        + ")",
    )
    parser.add_argument("--no-profile", action="store_true", help="do not profile missed budgets")
    parser.add_argument(
        "--baseline",
        metavar="COMMIT",
        help="also load a broker of COMMIT (git), right after this tree's in every hand-off "
        "run, and hold grants/s and CPU per grant to it",
    )
    parser.add_argument(
        "--results", type=Path, default=RESULTS, metavar="DIR", help=f"default {RESULTS}"
    )
    args = parser.parse_args(argv)
    base = QUICK if args.quick else Settings()
    chosen: dict[str, Any] = {
        name: getattr(args, name) for name in KNOBS if getattr(args, name) is not None
    }
    if args.only:
        chosen["sections"] = tuple(s for s in SECTIONS if s in args.only)
    if args.contenders:
        known = {c.key for c in datapath.CONTENDERS}
        chosen["contenders"] = tuple(args.contenders.split(","))
        if not set(chosen["contenders"]) <= known or chosen["contenders"][0] != "direct":
            parser.error(f"--contenders: direct first, then any of {', '.join(sorted(known))}")
    if args.no_profile:
        chosen["profile"] = False
    if args.baseline:
        chosen["baseline"] = args.baseline
    return dataclasses.replace(base, **chosen), args.results


def _progress(line: str) -> None:
    print(f"  {line}", flush=True)


def _intercept_problem() -> str | None:
    try:
        check_supported()
    except InterceptError as e:
        return e.message
    return None


def measure(stage: Stage, settings: Settings) -> dict[str, Any]:
    """Run the chosen sections on `stage`; return everything measured."""
    broker = stage.start_broker()
    results: dict[str, Any] = {"broker": {"pid": broker.pid, "rss_start_kib": rss_kib(broker.pid)}}
    if "datapath" in settings.sections:
        print("data path (wrk):", flush=True)
        by_key = {c.key: c for c in datapath.CONTENDERS}
        contenders = tuple(by_key[key] for key in settings.contenders)
        problem = _intercept_problem() if "intercept" in settings.contenders else None
        if problem:
            contenders = tuple(c for c in contenders if c.key != "intercept")
            results["intercept_skipped"] = problem
        results["datapath"] = datapath.run(
            stage,
            contenders=contenders,
            rounds=settings.rounds,
            seconds=settings.seconds,
            warmup=settings.warmup,
            progress=_progress,
        )
    if "handoff" in settings.sections:
        print("hand-off, exec CLI, cold start:", flush=True)
        results["handoff"] = handoff.run(
            stage,
            rounds=settings.handoff_rounds,
            seconds=settings.handoff_seconds,
            exec_runs=settings.exec_runs,
            cold_runs=settings.cold_runs,
            progress=_progress,
        ).to_json()
        if settings.baseline:
            results["handoff"]["baseline"] = settings.baseline
    if "restart" in settings.sections:
        print("worker restart under load:", flush=True)
        results["restart"] = restart.run(
            stage, settings.restart_rounds, settings.restarts, _progress
        )
    if "attack" in settings.sections:
        print("under attack, and a live fuzz run:", flush=True)
        results["attack"] = attack.run(
            stage, settings.attack_seconds, settings.fuzz_cases, _progress
        )
    return results


def main(argv: list[str] | None = None) -> int:
    settings, results_dir = parse_settings(argv)
    if os.geteuid() != 0:
        print("bench: run as root (it binds :80 in a private network namespace and "
              "runs workers as other uids)", file=sys.stderr)  # fmt: skip
        return 2
    missing = datapath.missing_tools() if "datapath" in settings.sections else []
    missing += [] if importlib.util.find_spec("matplotlib") else ["matplotlib"]
    if missing:
        print(f"bench: missing {', '.join(missing)}: run bench/run, which installs them",
              file=sys.stderr)  # fmt: skip
        return 2
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(RUNNER_NOFILE, hard), hard))
    enter_private_network()
    began = time.monotonic()
    with open_stage(settings.baseline) as stage:
        results = measure(stage, settings)
        budgets = check_budgets(results)
        if settings.profile:
            results["profiles"] = profiling.profile_misses(stage, budgets, _progress)
    results["meta"] = report.machine() | {
        "settings": dataclasses.asdict(settings),
        "wall_seconds": round(time.monotonic() - began, 1),
    }
    results["budgets"] = [dataclasses.asdict(b) for b in budgets]
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    markdown = report.markdown(results, budgets)
    (results_dir / "results.md").write_text(markdown)
    from bench import chart  # noqa: PLC0415 (matplotlib: only once there is something to draw)

    chart.draw(results, results_dir / "chart.png")
    print()
    print(markdown)
    print(f"written: {results_dir}/results.md, results.json, chart.png")
    return 0
