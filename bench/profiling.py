"""What dominates a missed budget: measured, so the closing note need not guess.

- data path: the server's CPU time per request (node's, read from /proc around each
  wrk run: less noisy than throughput on a shared machine), alternating the reference
  and the missed contender; for --intercept also the seccomp filter's cost per system
  call (getppid in a loop, with and without the filter).
- hand-off latency or rate: py-spy samples the broker during a 64-client load (pausing
  it for each sample, so that every stack is whole); busy samples are summed by the
  innermost Python frame, by module, and inclusively for the broker's own functions.
- broker RSS: the broker's imports one by one in a fresh interpreter (as the broker's
  uid would run them), with VmRSS after each, and the live broker's anonymous versus
  file-backed resident memory.
- exec or cold start: `python3 -X importtime` of what that path imports.

Each returns plain text for results.md.
"""

from __future__ import annotations

import ast
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final

from bench.budgets import Budget
from bench.datapath import CONTENDERS, Contender, wrk
from bench.handoff import load_once
from bench.stage import Stage, cpu_seconds, wait_http
from tests.harness.processes import NOBODY, as_user, proc_status
from tests.harness.runtime import SYSTEM_PYTHON

PROFILE_SECONDS: Final = 5.0
"""Load time under py-spy: ~1000 samples at PROFILE_RATE, plenty for a top-15."""
PROFILE_RATE: Final = 200
"""py-spy samples per second (twice its default); pausing the broker that often costs it
a few percent of its grant rate, which the profile's header shows."""
PROFILE_CLIENTS: Final = 64
"""The load of the hand-off budgets."""
TOP: Final = 15
"""Rows per profile table: beyond them each row is under ~1 %."""

CPU_ROUNDS: Final = 6
"""Alternating runs of the CPU-per-request comparison: single runs scatter by a few
percent on a shared machine; the median of six settles to within about two."""
CPU_SECONDS: Final = 3
"""wrk's time per CPU-per-request run (after a 1 s warm-up)."""
SYSCALL_RUNS: Final = 5
"""Runs of the system-call loop each way: one run takes ~0.5 s and scatters by ~3 %."""
SYSCALL_LOOP: Final = (
    "const n = 2e6, t = process.hrtime.bigint(); for (let i = 0; i < n; i++) process.ppid;"
    " console.log(Number(process.hrtime.bigint() - t) / n);"
)
"""Node calling getppid() two million times; prints nanoseconds per system call."""

_RSS_SCRIPT: Final = """
import sys
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
print(f"{rss()}\tpython3 (interpreter, site)")
for statement in sys.argv[1:]:
    exec(statement)
    print(f"{rss()}\t{statement}")
"""
"""Runs import statements one by one; prints VmRSS (KiB) after each."""

NOISE_CPU: Final = 0.01
"""A CPU-per-request difference below this is within what the comparison can resolve
(its medians move by about this much between runs of the same contender)."""


_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _where(path: str) -> str:
    """The module a py-spy frame's file belongs to: py-spy names files relative to
    their sys.path entry ('trio/_core/_run.py', 'broker/daemon/driver.py', 'socket.py')."""
    if path.startswith("<"):
        return path  # <string> (generated code, e.g. dataclass methods), <frozen …>
    parts = Path(path).with_suffix("").parts
    parts = parts[parts.index("site") + 1 :] if "site" in parts else parts
    return ".".join(parts[:2]) if parts[0] == "broker" else parts[0]


_IDLE_WORKER: Final = ("trio", "_work")
"""The innermost Python frame of a trio thread-pool worker waiting for a job (a user
database lookup runs deeper: `broker.users.query`)."""


def summarize_collapsed(lines: Iterable[str]) -> str:
    """Summarise py-spy's collapsed stacks ('frame;frame;… count' per line)."""
    leaf: Counter[str] = Counter()
    module: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = idle = 0
    for line in lines:
        stack, _, count_text = line.rstrip("\n").rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        names = []
        for frame in stack.split(";"):
            found = _FRAME.match(frame)
            if found:
                names.append((found["function"], _where(found["file"])))
        if not names:
            continue
        function, where = names[-1]
        if (where, function.rpartition(".")[2]) == _IDLE_WORKER:
            idle += count
            continue
        total += count
        leaf[f"{where}.{function}"] += count
        module[where] += count
        for function, where in set(names):
            if where.startswith("broker.") and where != "broker.cli":  # cli: every root
                inclusive[f"{where}.{function}"] += count
    if not total:
        return "py-spy recorded no busy samples"

    def top(counter: Counter[str]) -> list[str]:
        rows = [f"  {n / total:6.1%}  {name}" for name, n in counter.most_common(TOP)]
        return rows or ["  (none)"]

    return "\n".join(
        [
            f"{total} busy samples of the broker ({idle} of idle trio worker threads left "
            "out: py-spy cannot tell a paused process's idle threads from busy ones)",
            "",
            "by module (innermost Python frame):",
            *top(module),
            "",
            "by function (innermost Python frame, i.e. self time incl. its C calls):",
            *top(leaf),
            "",
            "broker functions, inclusive:",
            *top(inclusive),
        ]
    )


def _descendants(pid: int) -> list[int]:
    """`pid` and every process below it, from /proc/PID/task/*/children."""
    found = [pid]
    for tid in Path(f"/proc/{pid}/task").iterdir():
        for child in (tid / "children").read_text().split():
            found += _descendants(int(child))
    return found


def _node_cpu_per_request(stage: Stage, contender: Contender) -> float:
    """Microseconds of node's CPU time per request under wrk, for `contender`."""
    procs = contender.start(stage)
    try:
        wait_http(contender.port, f"{contender.key} to answer")
        nodes = [
            pid
            for proc in procs
            for pid in _descendants(proc.pid)
            if Path(f"/proc/{pid}/comm").read_text().strip() == "node"
        ]
        wrk(contender.port, 1)  # warm-up
        before = sum(cpu_seconds(pid) for pid in nodes)
        result = wrk(contender.port, CPU_SECONDS)
        return (sum(cpu_seconds(pid) for pid in nodes) - before) / result.requests * 1e6
    finally:
        for proc in reversed(procs):
            stage.stop(proc)


def _syscall_cost(stage: Stage) -> str:
    """Nanoseconds per getppid() in node under `exec` and under `exec --intercept`."""
    times: dict[str, list[float]] = {"exec": [], "exec --intercept": []}
    for _ in range(SYSCALL_RUNS):
        for label, samples in times.items():
            argv = [*as_user(NOBODY), str(stage.launcher), *label.split(), "http", "--"]
            done = subprocess.run(
                [*argv, "node", "-e", SYSCALL_LOOP], env=stage.env(), capture_output=True,
                text=True, check=True, timeout=60,
            )  # fmt: skip
            samples.append(float(done.stdout))
    plain, filtered = (statistics.median(samples) for samples in times.values())
    return (
        f"seccomp filter (median of {SYSCALL_RUNS}): getppid() takes {plain:.0f} ns under "
        f"exec, {filtered:.0f} ns under exec --intercept: +{filtered - plain:.0f} ns per "
        "system call the program makes"
    )


def datapath_profile(stage: Stage, missed: list[str]) -> str:
    """node's CPU per request for the reference and each missed contender."""
    by_key = {contender.key: contender for contender in CONTENDERS}
    keys = [CONTENDERS[0].key, *missed]
    cpu: dict[str, list[float]] = {key: [] for key in keys}
    for _ in range(CPU_ROUNDS):
        for key in keys:
            cpu[key].append(_node_cpu_per_request(stage, by_key[key]))
    reference = statistics.median(cpu[keys[0]])
    lines = [f"node's CPU time per request (median, min–max of {CPU_ROUNDS} alternating runs):"]
    verdicts = []
    for key in keys:
        extra = statistics.median(cpu[key]) / reference - 1
        lines.append(
            f"  {key:10} {statistics.median(cpu[key]):6.2f} µs ({extra:+.1%})  "
            f"{min(cpu[key]):.2f}–{max(cpu[key]):.2f}"
        )
        if key == keys[0]:
            continue
        if extra < NOISE_CPU:
            verdicts.append(
                f"{key}: node spends no measurably more CPU per request than on the direct "
                f"socket (under {NOISE_CPU:.0%}): the throughput shortfall is this machine's "
                "round-to-round noise, not a cost of the path; rerun or raise --rounds"
            )
        else:
            verdicts.append(f"{key}: node spends {extra:.1%} more CPU per request")
    lines += ["", *verdicts]
    if "intercept" in missed:
        lines += ["", _syscall_cost(stage)]
    return "\n".join(lines)


def py_spy() -> str | None:
    """The py-spy beside this interpreter (.ci/requirements/bench.txt), or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def handoff_profile(stage: Stage) -> str:
    """py-spy on the broker under a 64-client load."""
    spy = py_spy()
    if spy is None:
        return "py-spy is not installed (bench/run installs .ci/requirements/bench.txt): no profile"
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as output:
        argv = [spy, "record", "--pid", str(stage.main_broker.pid)]
        argv += ["--duration", f"{PROFILE_SECONDS:g}", "--rate", str(PROFILE_RATE)]
        argv += ["--format", "raw", "--output", output.name]
        recorder = stage.run_piped(argv, env={"PATH": "/usr/bin:/bin"})
        try:
            load = load_once(stage, PROFILE_CLIENTS, PROFILE_SECONDS)
            recorder.wait(timeout=PROFILE_SECONDS + 30)
        finally:
            stage.stop(recorder)
        head = (
            f"{PROFILE_CLIENTS} clients under py-spy: {load.rate:,.0f} grants/s, p99 "
            f"{load.p99_ms:.2f} ms, broker CPU {load.broker_cpu:.0%} of one core"
        )
        return head + "\n" + summarize_collapsed(output)


def serve_imports(cli: Path) -> list[str]:
    """The import statements `port-broker serve` runs, in order: `import broker.cli`,
    then those inside `cmd_serve` of `cli` (read from the code, so that the breakdown
    follows it as it changes), with ssl on its own before trio (which imports it)."""
    tree = ast.parse(cli.read_text())
    serve = next(
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.name == "cmd_serve"
    )
    nodes = sorted(
        (node for node in ast.walk(serve) if isinstance(node, ast.Import | ast.ImportFrom)),
        key=lambda node: node.lineno,
    )
    statements = ["import broker.cli"]
    for node in nodes:
        if isinstance(node, ast.Import) and any(a.name == "trio" for a in node.names):
            statements.append("import ssl")
        statements.append(ast.unparse(node))
    return statements


def rss_breakdown(stage: Stage) -> str:
    """VmRSS after each import `port-broker serve` makes, and the live broker's split."""
    statements = serve_imports(stage.site / "broker" / "cli.py")
    argv = [*as_user(NOBODY), SYSTEM_PYTHON, "-s", "-c", _RSS_SCRIPT, *statements]
    done = subprocess.run(
        argv, env=stage.env(PYTHONPATH=str(stage.site)), capture_output=True, text=True,
        check=False, timeout=60,
    )  # fmt: skip
    if done.returncode != 0:
        return f"import breakdown failed: {done.stderr}"
    lines = ["VmRSS after each import `port-broker serve` makes (a fresh /usr/bin/python3):"]
    previous = 0
    for line in done.stdout.splitlines():
        kib_text, what = line.split("\t", 1)
        kib = int(kib_text)
        lines.append(f"  {kib / 1024:6.1f} MiB  (+{(kib - previous) / 1024:5.1f})  {what}")
        previous = kib
    status = proc_status(stage.main_broker.pid)
    split = ", ".join(f"{key} {status[key].strip()}" for key in ("VmRSS", "RssAnon", "RssFile"))
    return "\n".join([*lines, "", f"the running broker: {split}"])


def import_times(stage: Stage, argv: list[str]) -> str:
    """The slowest imports (cumulative) of `argv` run under -X importtime as nobody."""
    command = [*as_user(NOBODY), SYSTEM_PYTHON, "-X", "importtime", *argv]
    done = subprocess.run(
        command, env=stage.env(PYTHONPATH=str(stage.site)), capture_output=True, text=True,
        check=False, timeout=60,
    )  # fmt: skip
    rows = []
    for line in done.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            name = parts[2].rstrip()
            rows.append((int(parts[1]), len(name) - len(name.lstrip()), name.strip()))
    top_level = sorted((r for r in rows if r[1] <= 1), reverse=True)[:TOP]
    total = sum(us for us, depth, _ in rows if depth <= 1)
    lines = [f"imports: {total / 1000:.1f} ms in all; top-level imports by cumulative time:"]
    return "\n".join(lines + [f"  {us / 1000:6.1f} ms  {name}" for us, _, name in top_level])


def profile_misses(
    stage: Stage, budgets: list[Budget], progress: Callable[[str], None]
) -> dict[str, str]:
    """Profile each kind of missed budget once; return title → text."""
    missed = {b.key for b in budgets if not b.passed}
    profiles = {}
    contenders = [key.split(":", 1)[1] for key in sorted(missed) if key.startswith("datapath:")]
    if contenders:
        progress(f"profiling the data path ({', '.join(contenders)}): CPU per request")
        profiles["Profile: the data path"] = datapath_profile(stage, contenders)
    if "handoff" in missed:
        progress("profiling the broker under load (py-spy)")
        profiles["Profile: the broker under hand-off load (py-spy)"] = handoff_profile(stage)
    if "rss" in missed:
        progress("profiling the broker's memory (imports)")
        profiles["Profile: broker memory by import"] = rss_breakdown(stage)
    if "exec" in missed:
        progress("profiling exec's imports")
        argv = [str(stage.launcher), "exec", "http", "--", "true"]
        profiles["Profile: `port-broker exec` imports"] = import_times(stage, argv)
    if "cold" in missed:
        progress("profiling the broker's start-up imports")
        serve = "; ".join(serve_imports(stage.site / "broker" / "cli.py"))
        profiles["Profile: broker start-up imports"] = import_times(stage, ["-s", "-c", serve])
    return profiles
