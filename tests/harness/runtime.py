"""The world-readable runtime that brokers and workers of other uids run.

`build_runtime()` lays out a copy of the working tree's `broker` package and its
runtime dependencies (as locked: .ci/setup installs .ci/requirements/runtime.txt into
.venv/runtime) with a `bin/port-broker` that runs on Debian's /usr/bin/python3:
unprivileged workers and brokers cannot read a checkout or venv under /root, and the
interpreter first on PATH may be private too.

`build_servers()` does the same for the servers the docs' recipes start as workers
(gunicorn, uvicorn: .venv/servers, from .ci/requirements/servers.txt), with a
`bin/NAME` for each of their commands.

Must never: write anywhere but the directory it is given.
"""

from __future__ import annotations

import configparser
import shutil
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON: Final = "/usr/bin/python3"
"""The interpreter every unprivileged process uses: reachable by all users."""


_LAUNCHER: Final = """\
#!/usr/bin/python3 -I
import os, sys
sys.path[:0] = [os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))),
                             "site")]
from broker.cli import main
sys.exit(main())
"""


RUNTIME_DEPENDENCIES: Final = ROOT / ".venv" / "runtime"
"""port-broker's runtime dependencies and nothing else, installed from the lock
(.ci/requirements/runtime.txt) by .ci/setup with `pip install --target`."""


def build_runtime(dest: Path, broker: Path = ROOT / "broker") -> Path:
    """Lay out a runnable, world-readable port-broker in `dest`; return bin/port-broker.

    The dependencies are copied whole from RUNTIME_DEPENDENCIES, whatever their metadata
    says; `broker` comes from the working tree (or another copy of the package: bench/
    sets a baseline commit's beside it).

    Raises:
        RuntimeError: if .ci/setup has not installed RUNTIME_DEPENDENCIES.
    """
    if not (RUNTIME_DEPENDENCIES / "trio").is_dir():
        raise RuntimeError(
            f"{RUNTIME_DEPENDENCIES} holds no runtime dependencies: run .ci/setup, which "
            "installs .ci/requirements/runtime.txt there"
        )
    site = dest / "site"
    shutil.copytree(RUNTIME_DEPENDENCIES, site, symlinks=True)  # byte-compiled by pip
    shutil.copytree(broker, site / "broker", ignore=shutil.ignore_patterns("__pycache__"))
    launcher = dest / "bin" / "port-broker"
    launcher.parent.mkdir(parents=True)
    launcher.write_text(_LAUNCHER)
    for path in [dest, *dest.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() or path == launcher else 0o644)
    return launcher


def make_public_dir(parent: Path, name: str) -> Path:
    """Create a directory every user can enter and read."""
    path = parent / name
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    return path


SERVERS: Final = ROOT / ".venv" / "servers"
"""The servers the docs' recipes start (.ci/requirements/servers.txt), installed by
.ci/setup with `pip install --target`."""

VITE: Final = ROOT / ".venv" / "vite"
"""docs/examples/vite's package.json and lock, with the node_modules `npm ci` installed
from them (.ci/setup)."""

_COMMAND: Final = """\
#!/usr/bin/python3 -I
import os, sys
sys.path[:0] = [os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))),
                             "site")]
from {module} import {function}
sys.exit({function}())
"""


def build_servers(dest: Path) -> Path:
    """Lay out the recipes' servers, world-readable, in `dest`; return its bin/, which
    holds a command per console script they declare (gunicorn, uvicorn), run on
    /usr/bin/python3 as `pip install` would have made it.

    Raises:
        RuntimeError: if .ci/setup has not installed SERVERS.
    """
    if not SERVERS.is_dir():
        raise RuntimeError(f"{SERVERS} is missing: run .ci/setup (servers.txt)")
    site = dest / "site"
    shutil.copytree(SERVERS, site, symlinks=True, ignore=shutil.ignore_patterns("bin"))
    commands = dest / "bin"
    commands.mkdir(parents=True)
    for entry_points in site.glob("*.dist-info/entry_points.txt"):
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(entry_points)
        if parser.has_section("console_scripts"):
            for name, target in parser.items("console_scripts"):
                module, _, function = target.partition(":")
                (commands / name).write_text(_COMMAND.format(module=module, function=function))
    for path in [dest, *dest.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() or path.parent == commands else 0o644)
    return commands
