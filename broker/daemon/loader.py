"""Loading the configuration: validation (`broker.settings`, pydantic) run here, or in
a short-lived child process for the serving broker.

`load_isolated` / `IsolatedLoad` fork a child that loads and sends the result back as
JSON, so that pydantic (about 15 MB of memory and 150 ms of imports) never enters the
long-running broker; while the child works, the broker imports its own modules.

Must never: import pydantic or `broker.settings` at module level (only `load` does, when
called), or leave a child behind (every child is waited for).
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
from collections.abc import Mapping
from typing import Any, Final

from broker.daemon.config import Config, resolve_path
from broker.errors import ConfigError

LOAD_TIMEOUT: Final = 60.0
"""Seconds the loader child may take: it imports pydantic (~0.2 s) and asks the user
database for every name in the policy; a database that does not answer must not keep
the broker from ever starting (systemd's start timeout would, without a reason)."""

MAX_RESULT_BYTES: Final = 16 << 20
"""Most a loader child may send back: a policy with a million uids is about 10 MB."""


def load(path: str | None = None, environ: Mapping[str, str] = os.environ) -> Config:
    """Load, validate and resolve the configuration in this process (imports pydantic).

    Raises:
        ConfigError: see `broker.settings.load`.
    """
    from broker.daemon import settings  # noqa: PLC0415 (pydantic only when asked for)

    return settings.load(path, environ)


class IsolatedLoad:
    """`load` run in a forked child; `result()` collects it.

    Start it before importing anything heavy: the child then loads while this process
    imports. The calling process must be single-threaded (it forks).
    """

    def __init__(self, path: str | None = None, environ: Mapping[str, str] = os.environ) -> None:
        self.path = resolve_path(path, environ)[0]
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            self.pid = os.fork()
        except BaseException:
            os.close(read_end)
            os.close(write_end)
            raise
        if self.pid == 0:  # pragma: no cover - the child reports through the pipe
            os.close(read_end)
            _child(write_end, path, environ)
        os.close(write_end)
        self._read_end = read_end

    def result(self) -> Config:
        """Wait for the child and return what it loaded.

        Raises:
            ConfigError: what the child's `load` raised, or that the child failed.
        """
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + LOAD_TIMEOUT
        problem = None
        with open(self._read_end, "rb", buffering=0) as pipe:
            poller = select.poll()
            poller.register(pipe, select.POLLIN)
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not poller.poll(left * 1000):
                    problem = (
                        f"loading took longer than {LOAD_TIMEOUT:g}s (a user database "
                        "that does not answer?)"
                    )
                    break
                chunk = pipe.read(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_RESULT_BYTES:
                    problem = f"the loader's answer is larger than {MAX_RESULT_BYTES >> 20} MiB"
                    break
                chunks.append(chunk)
        if problem is not None:
            os.kill(self.pid, signal.SIGKILL)
        _, status = os.waitpid(self.pid, 0)
        if problem is not None:
            raise ConfigError(f"{self.path}: {problem}")
        return parse_result(b"".join(chunks), os.waitstatus_to_exitcode(status), self.path)


def parse_result(output: bytes, exit_status: int, path: str) -> Config:
    """The `Config` a loader child sent, or the error it reported.

    Raises:
        ConfigError: the child's own error, or that it failed (exit status, and how to
            see why).
    """
    try:
        reply = json.loads(output)
        if "error" in reply:
            raise ConfigError(str(reply["error"]))
        return Config.from_json(reply["config"])
    except (ValueError, KeyError, TypeError):
        raise ConfigError(
            f"{path}: the configuration loader failed (exit status {exit_status}); run "
            f"`port-broker check-config {path}` to see why"
        ) from None


def _result_of(path: str | None, environ: Mapping[str, str]) -> tuple[bytes, int]:
    """Load; return the JSON a loader child sends back, and its exit status."""
    status = 1
    try:
        reply: dict[str, Any] = {"config": load(path, environ).to_json()}
        status = 0
    except ConfigError as e:
        reply = {"error": e.message}
    except Exception as e:
        reply = {"error": f"{resolve_path(path, environ)[0]}: cannot load: {e!r}"}
    return json.dumps(reply).encode(), status


def _child(write_end: int, path: str | None, environ: Mapping[str, str]) -> None:
    """In the forked child: load, write the result as JSON, exit. Never returns."""
    status = 1
    try:
        output, status = _result_of(path, environ)
        with open(write_end, "wb") as pipe:
            pipe.write(output)
    finally:
        os._exit(status)


def subprocess_command(path: str | None) -> list[str]:
    """The command that runs `load(path)` in a new interpreter and prints the result
    for `parse_result`: how a serving broker reloads, since forking a process with
    threads (trio's, NSS lookups') is unsafe. The child gets this interpreter's module
    path whole: a venv, a launcher that adds a directory, or Nix's wrapper that lists
    every dependency all work the same."""
    script = (
        "import json, sys; sys.path[:0] = json.loads(sys.argv[1]); "
        "from broker.daemon.loader import main; sys.exit(main(sys.argv[2] or None))"
    )
    return [sys.executable, "-I", "-c", script, json.dumps(sys.path), path or ""]


def main(path: str | None) -> int:
    """Run by `subprocess_command`'s interpreter: load `path` (None: the environment's
    or the default file), with the environment's PORT_BROKER_* overrides; print the
    result as JSON, return the exit status."""
    output, status = _result_of(path, os.environ)
    sys.stdout.buffer.write(output)
    return status


def load_isolated(path: str | None = None, environ: Mapping[str, str] = os.environ) -> Config:
    """`load` in a child process, so that its imports stay out of this one.

    Raises:
        ConfigError: as `load`.
    """
    return IsolatedLoad(path, environ).result()
