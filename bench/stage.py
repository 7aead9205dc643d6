"""The stage every benchmark runs on: a world-readable runtime, brokers started by the
real `systemd-socket-activate` as an unprivileged uid, and workers running as nobody.

`open_stage()` builds it in a temporary directory under /var/tmp and takes it all down
afterwards. The runner has already moved itself into a network namespace of its own
(`support.enter_private_network`), so every port here is the runner's alone.

Must never: signal a process it did not start (everything is stopped by the process
group it was started in), or leave a process or a directory behind.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final

from tests.harness.processes import (
    BROKER_UID,
    NOBODY,
    START_TIMEOUT,
    BrokerProcess,
    Processes,
    as_user,
    http_get,
    proc_status,
    stop_process,
    wait_for,
)
from tests.harness.runtime import SYSTEM_PYTHON, build_runtime, make_public_dir

BENCH: Final = Path(__file__).resolve().parent
ROOT: Final = BENCH.parent
HELLO: Final = ROOT / "docs" / "examples" / "hello.js"
"""The one Node server every contender runs (LISTEN_FDS, else listen(PORT))."""
CLIENT: Final = BENCH / "handoff_client.py"
ATTACK_CLIENT: Final = BENCH / "attack_client.py"

BASELINE_PORT: Final = 8081
"""The TCP port the baseline's broker holds (port 80 is the main broker's)."""

BROKER_NOFILE: Final = 1024
"""The broker's soft fd limit: systemd's default for services (DefaultLimitNOFILE=
1024:524288), so the 512-client load meets the limit production would."""

POLICY: Final = 'max_connections_per_user = 1024\n[sockets.http]\nusers = ["nobody", "root"]\n'
"""nobody runs the workers and the load client; root is the runner's own cold-start
probe (an in-process client, so no process start-up is timed). The 512 concurrent load
clients are all one uid: the per-user connection cap (64 by default) is lifted."""

WORKER_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""PATH for unprivileged processes: never the runner's (pyenv shims under /root)."""


class Stage:
    """Processes and files of one benchmark run.

    Attributes:
        root: The run's world-readable temporary directory.
        launcher: bin/port-broker of the runtime (Debian's /usr/bin/python3).
        site: The runtime's import path (broker, trio, pydantic, …).
        work: Where logs and the files workers read go.
        hello: hello.js, readable by nobody.
        client: handoff_client.py, readable by nobody.
        attack_client: attack_client.py, readable by anyone.
        processes: Every process started and not yet stopped.
        broker: The main broker (holding `http` on [::]:80), once started.
        baseline_launcher: bin/port-broker of a baseline commit's runtime, if asked for.
        baseline: Its broker (holding `http` on BASELINE_PORT), once started.
    """

    def __init__(self, root: Path, launcher: Path, baseline: Path | None = None) -> None:
        self.root = root
        self.launcher = launcher
        self.baseline_launcher = baseline
        self.site = launcher.parent.parent / "site"
        self.work = make_public_dir(root, "work")
        self.hello = self._public_copy(HELLO)
        self.client = self._public_copy(CLIENT)
        self.attack_client = self._public_copy(ATTACK_CLIENT)
        self.processes = Processes()
        self.broker: BrokerProcess | None = None
        self.baseline: BrokerProcess | None = None
        self._serial = 0

    def _public_copy(self, source: Path) -> Path:
        target = self.work / source.name
        shutil.copyfile(source, target)
        target.chmod(0o644)
        return target

    @property
    def main_broker(self) -> BrokerProcess:
        """The main broker.

        Raises:
            RuntimeError: if it has not been started.
        """
        if self.broker is None:
            raise RuntimeError("the main broker has not been started")
        return self.broker

    def env(self, **extra: str) -> dict[str, str]:
        """A minimal environment for unprivileged processes, pointed at the main broker."""
        env = {"PATH": WORKER_PATH, "LANG": "C.UTF-8", "HOME": "/nonexistent"}
        if self.broker is not None:
            env["PORT_BROKER_SOCKET"] = str(self.broker.control)
        return env | extra

    # --- processes ----------------------------------------------------------------

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        user: int | None = NOBODY,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[str]:
        """Start `argv` (as `user`, with no capabilities; None: as root) in a process
        group of its own, its output in work/NAME.N.log."""
        self._serial += 1
        prefix = [] if user is None else as_user(user)
        with (self.work / f"{name}.{self._serial}.log").open("w") as log:
            return self.processes.start([*prefix, *argv], log=log, env=env or self.env())

    def run_piped(self, argv: Sequence[str], *, env: dict[str, str]) -> subprocess.Popen[str]:
        """Start `argv` with stdout and stderr piped back (tracked like any other)."""
        return self.processes.start(list(argv), env=env)

    def stop(self, proc: subprocess.Popen[str]) -> None:
        """Stop `proc` and its process group (SIGTERM, then SIGKILL) unless it has
        already exited (its group id may then belong to someone else); forget it."""
        if proc.poll() is None:
            stop_process(proc)
        self.forget(proc)

    def forget(self, proc: subprocess.Popen[str]) -> None:
        """Drop a process that has exited from the clean-up list (its pid may be reused)."""
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        self.processes.started.remove(proc)

    # --- brokers ------------------------------------------------------------------

    def spawn_broker(
        self,
        name: str,
        sockets: Sequence[tuple[str, str]],
        *,
        policy: str = POLICY,
        launcher: Path | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> BrokerProcess:
        """Start `systemd-socket-activate` holding `sockets` and a control socket, set to
        start the broker (as an unprivileged uid, under `policy`, with `environ` added)
        on the first connection; return once it listens, before the broker has started."""
        where = make_public_dir(self.root, name)
        config = where / "broker.toml"
        config.write_text(policy)
        config.chmod(0o644)
        control = where / "control.sock"
        log = where / "broker.log"
        names = ":".join([n for n, _ in sockets] + ["control"])
        argv = ["prlimit", f"--nofile={BROKER_NOFILE}:{_hard_nofile()}", "--"]
        argv += ["systemd-socket-activate", *[f"-l{address}" for _, address in sockets]]
        argv += [f"-l{control}", f"--fdname={names}"]
        argv += [f"--setenv={key}={value}" for key, value in (environ or {}).items()]
        argv += [*as_user(BROKER_UID), str(launcher or self.launcher), "serve", "--config",
                 str(config)]  # fmt: skip
        with log.open("w") as output:
            proc = self.processes.start(argv, log=output)
        # s-s-a logs "Listening on PATH" after listen(): only then may a client connect.
        wait_for(lambda: f"Listening on {control}" in log.read_text(), f"{control} to listen")
        control.chmod(0o666)  # as SocketMode=0666 in units/port-broker.socket
        return BrokerProcess(proc, control, log)

    def start_broker(self) -> BrokerProcess:
        """Start the main broker, holding `http` on [::]:80, and activate it; and the
        baseline's, if there is one."""
        self.broker = self.spawn_broker("broker", [("http", "80")])
        self.activate(self.broker)
        if self.baseline_launcher is not None:
            self.baseline = self.spawn_broker(
                "baseline", [("http", str(BASELINE_PORT))], launcher=self.baseline_launcher
            )
            self.activate(self.baseline)
        return self.broker

    @staticmethod
    def answers(broker: BrokerProcess) -> bool:
        """Whether `broker` answers a `list` (the first connection also starts it)."""
        with socket.socket(socket.AF_UNIX) as probe:
            probe.settimeout(START_TIMEOUT)
            try:
                probe.connect(str(broker.control))
                probe.sendall(b'{"v":1,"op":"list"}\n')
                return bool(probe.recv(4096))
            except OSError:
                return False

    def activate(self, broker: BrokerProcess) -> None:
        """Start `broker` by connecting to it, and wait for its first answer.

        Raises:
            RuntimeError: if it does not answer.
        """
        if not self.answers(broker):
            raise RuntimeError(f"the broker did not answer:\n{broker.output()}")


def _package_of(commit: str, root: Path) -> Path:
    """The `broker` package as it is at `commit` of this checkout, unpacked under `root`.

    Raises:
        RuntimeError: git does not know the commit.
    """
    where = root / "baseline-source"
    where.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "broker"],
                             capture_output=True, check=False)  # fmt: skip
    if archive.returncode != 0:
        raise RuntimeError(f"--baseline {commit}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
    return where / "broker"


def _hard_nofile() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def compile_runtime(site: Path) -> None:
    """Byte-compile the runtime as root, as `pip install` does in production.

    build_runtime() copies the dependencies as pip compiled them but the working tree's
    `broker` without bytecode, and neither the broker's uid nor nobody may write
    __pycache__ there: every start would compile what is missing again (for all of it,
    ≈0.32 s of cold start instead of ≈0.13 s here, and ≈4 MiB of the broker's RSS).
    """
    subprocess.run([SYSTEM_PYTHON, "-m", "compileall", "-q", str(site)], check=True)
    for path in site.rglob("__pycache__"):
        path.chmod(0o755)
        for compiled in path.iterdir():
            compiled.chmod(0o644)


@contextlib.contextmanager
def open_stage(baseline: str | None = None) -> Iterator[Stage]:
    """A stage in a fresh /var/tmp directory, with a broker of the `baseline` commit
    beside this tree's if asked for; every process stopped and the directory removed
    afterwards."""
    root = Path(tempfile.mkdtemp(prefix="port-broker-bench.", dir="/var/tmp"))
    root.chmod(0o755)  # workers and the broker (other uids) read the runtime below it
    stage: Stage | None = None
    try:
        launcher = build_runtime(make_public_dir(root, "runtime"))
        compile_runtime(launcher.parent.parent / "site")
        old = None
        if baseline is not None:
            old = build_runtime(
                make_public_dir(root, "runtime-baseline"), _package_of(baseline, root)
            )
            compile_runtime(old.parent.parent / "site")
        stage = Stage(root, launcher, old)
        yield stage
    finally:
        if stage is not None:
            stage.processes.stop_all()
        shutil.rmtree(root)


# --- probes -----------------------------------------------------------------------


def wait_http(port: int, what: str) -> None:
    """Wait until GET http://127.0.0.1:PORT/ answers 200."""

    def answered() -> bool:
        try:
            http_get("127.0.0.1", port)
        except OSError:
            return False
        return True

    wait_for(answered, what)


def rss_kib(pid: int) -> int:
    """Resident set size of `pid` in KiB (VmRSS)."""
    return int(proc_status(pid)["VmRSS"].split()[0])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time `pid` has used so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
