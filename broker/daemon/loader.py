"""Loading the configuration: validation (`broker.daemon.settings`, pydantic) run here
(`check-config`), or for the serving broker in a child interpreter (`Load`), at start
and on every reload alike: pydantic (about 15 MB of memory and 150 ms of imports) never
enters the long-running broker.

One way, one bound: the child is a fresh interpreter (the serving broker has threads,
and forking them is unsafe), given this interpreter's module path and its environment
(the PORT_BROKER_* overrides); its answer is read within names.LOAD_TIMEOUT and
MAX_RESULT_BYTES, or it is killed. At start the broker imports trio while the child
works; on a reload it waits for it in a thread.

Must never: import pydantic or `broker.daemon.settings` at module level (only `load`
does, when called), or leave a child behind (every child is waited for).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any, Final

from broker.daemon.config import Config, resolve_path
from broker.errors import BrokerError, ConfigError
from broker.names import LOAD_TIMEOUT

MAX_RESULT_BYTES: Final = 16 << 20
"""Most a loader child may send back: a policy with a million uids is about 10 MB."""


def load(path: str | None = None) -> Config:
    """Load, validate and resolve the configuration in this process (imports pydantic),
    with this process's PORT_BROKER_* overrides.

    Raises:
        ConfigError: see `broker.daemon.settings.load`.
    """
    from broker.daemon import settings  # noqa: PLC0415 (pydantic only when asked for)

    return settings.load(path)


class Load:
    """`load(path)` in a child interpreter, started at once; `result()` collects it.

    Args:
        path: As for `load`.
        environ: The child's environment (default: ours, with its overrides).

    Raises:
        BrokerError: the child cannot be started (a resource limit, most likely:
            something to retry, not to fix in the file).
    """

    def __init__(self, path: str | None = None, environ: Mapping[str, str] | None = None) -> None:
        self.path = resolve_path(path, os.environ if environ is None else environ)[0]
        argv = command(path)
        try:
            self._child = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                env=None if environ is None else dict(environ),
            )
        except OSError as e:
            raise BrokerError(
                f"{self.path}: cannot start the configuration loader ({argv[0]}): {e.strerror or e}"
            ) from None

    def kill(self) -> None:
        """Stop the child now (the reload it served was cancelled); `result`, if it is
        waiting, returns at once with the failure."""
        self._child.kill()  # a no-op once it has been waited for

    @property
    def pid(self) -> int:
        """The child's pid."""
        return self._child.pid

    def result(self) -> Config:
        """Wait for the child and return what it loaded (blocking: at start, or in a
        thread of a serving broker).

        Raises:
            ConfigError: what the child's `load` raised, or that it failed, took longer
                than LOAD_TIMEOUT or answered more than MAX_RESULT_BYTES.
        """
        child = self._child
        if child.stdout is None:  # pragma: no cover - made with stdout=PIPE
            raise RuntimeError("the loader's output is not a pipe")
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + LOAD_TIMEOUT
        problem = None
        with child.stdout as pipe:
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
                chunk = os.read(pipe.fileno(), 65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_RESULT_BYTES:
                    problem = f"the loader's answer is larger than {MAX_RESULT_BYTES >> 20} MiB"
                    break
                chunks.append(chunk)
        if problem is not None:
            child.kill()
        status = child.wait()
        if problem is not None:
            raise ConfigError(f"{self.path}: {problem}")
        return parse_result(b"".join(chunks), status, self.path)


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


def command(path: str | None) -> list[str]:
    """The command that runs `load(path)` in a new interpreter and prints the result
    for `parse_result`. The child gets this interpreter's module path whole: a venv, a
    launcher that adds a directory, or Nix's wrapper that lists every dependency all
    work the same."""
    script = (
        "import json, sys; sys.path[:0] = json.loads(sys.argv[1]); "
        "from broker.daemon.loader import main; sys.exit(main(sys.argv[2] or None))"
    )
    return [sys.executable, "-I", "-c", script, json.dumps(sys.path), path or ""]


def main(path: str | None) -> int:
    """Run by `command`'s interpreter: load `path` (None: the environment's or the
    default file), with the environment's PORT_BROKER_* overrides; print the result as
    JSON, return the exit status."""
    status = 1
    try:
        reply: dict[str, Any] = {"config": load(path).to_json()}
        status = 0
    except ConfigError as e:
        reply = {"error": e.message}
    except Exception as e:
        reply = {"error": f"{resolve_path(path)[0]}: cannot load: {e!r}"}
    sys.stdout.buffer.write(json.dumps(reply).encode())
    return status
