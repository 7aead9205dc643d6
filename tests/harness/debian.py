"""The Debian package in tests: built by the documented command (`.ci/package`), then
installed, upgraded and removed with apt in a test box (tests/harness/box.py), whose
real systemd runs the maintainer scripts.

- `build_package()` runs `.ci/package` on the checkout, with the locked files
  .ci/setup downloaded to .venv/wheelhouse (the test session has no network), into a
  directory of the caller's: the build itself happens in a clean copy.
- `package_box()` boots a box with .deb files at /srv/debs and `apt()` runs apt-get
  there. Container images forbid starting services during package installs
  (/usr/sbin/policy-rc.d exits 101, as on this machine) and some leave manual pages out
  (a dpkg `path-exclude` of /usr/share/man), which a Debian server does not: the box
  undoes both in its own overlay, so the maintainer scripts and `man` act as they do
  on a server. A checkout's install of this machine (`.ci/install`, `.ci/demo`:
  /usr/local/bin/port-broker, units in /etc/systemd/system) goes too, so that
  `port-broker` and the units are the package's.

Must never: install anything on the host, or touch the host's policy-rc.d or dpkg
configuration (only the box's overlay changes).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Final

import pytest

from tests.harness.box import Box, box_unavailable_reason
from tests.harness.runtime import ROOT

WHEELHOUSE: Final = ROOT / ".venv" / "wheelhouse"
"""The files of .ci/requirements/build.txt and runtime.txt, downloaded by .ci/setup."""

BUILD_TIMEOUT: Final = 900.0
"""Seconds for one `.ci/package`: about 35 s here (systemd-python is compiled); a
loaded 2-core CI machine may take several times that."""

APT_TIMEOUT: Final = 300.0
"""Seconds for one apt-get in the box: an install takes about 5 s (postinst compiles
the virtualenv's bytecode), and much longer while a load test keeps both cores busy."""

DEB_DIR: Final = "/srv/debs"
"""Where `package_box` puts the .deb files: a directory apt's sandbox user can read."""

POLICY_RC_D: Final = "/usr/sbin/policy-rc.d"

UNEXCLUDE_MANUALS: Final = r"""
for conf in /etc/dpkg/dpkg.cfg.d/*; do
    if [ -f "$conf" ]; then sed -i '\|^path-exclude[= ]*/usr/share/man|d' "$conf"; fi
done
"""
"""Drops dpkg's path-exclude lines for /usr/share/man (minimal container images)."""

CHECKOUT_INSTALL: Final = ("/usr/local/bin/port-broker", "/etc/systemd/system/port-broker*")
"""What a checkout's install puts where it would shadow the package's (a shell glob)."""


def build_package(output: Path, version: str | None = None) -> Path:
    """Build the package with `.ci/package` into `output`; return the .deb.

    Raises:
        RuntimeError: the build failed (its output attached) or wrote no single .deb.
    """
    if not WHEELHOUSE.is_dir():
        raise RuntimeError(f"{WHEELHOUSE} is missing: run .ci/setup, which downloads it")
    command = [str(ROOT / ".ci" / "package"), "--output", str(output)]
    command += ["--wheelhouse", str(WHEELHOUSE)]
    if version is not None:
        command += ["--version", version]
    # As on a fresh machine: no PYTHON* variable of this session's (such as
    # PYTHONDONTWRITEBYTECODE, which would hide bytecode written into the package).
    environ = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    done = subprocess.run(
        command, env=environ, capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} exited with status {done.returncode}\n"
            f"--- stdout (end) ---\n{done.stdout[-6000:]}--- stderr ---\n{done.stderr[-6000:]}"
        )
    built = done.stdout.strip().splitlines()[-1].removeprefix("package: ")
    deb = Path(built)
    if not deb.is_file() or deb.parent != output:
        raise RuntimeError(f".ci/package said it wrote {built!r}, which is not a file in {output}")
    return deb


def in_box(deb: Path) -> str:
    """Where `package_box` put `deb`."""
    return f"{DEB_DIR}/{deb.name}"


@contextlib.contextmanager
def package_box(debs: Iterable[Path], files: Mapping[str, str] = {}) -> Iterator[Box]:
    """Boot a box with `debs` in DEB_DIR and `files` (path → text) written, in which
    package installs may start services (skip the test if boxes cannot run here)."""
    reason = box_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    machine = Box()
    for deb in debs:
        machine.copy_in(deb, in_box(deb))
    for path, text in files.items():
        machine.write_file(path, text)
    machine.start()
    try:
        machine.run(["rm", "-f", POLICY_RC_D])
        machine.run(["sh", "-c", UNEXCLUDE_MANUALS])
        machine.run(["sh", "-c", f"rm -rf {' '.join(CHECKOUT_INSTALL)}"])
        yield machine
    finally:
        machine.stop()


def apt(box: Box, *args: str) -> str:
    """Run `apt-get -y ARGS` in the box, as an administrator would (non-interactive);
    return its output.

    Raises:
        BoxCommandError: apt-get failed.
    """
    done = box.run(
        ["apt-get", "-y", "-q", "-o", "Dpkg::Use-Pty=0", *args],
        env={"DEBIAN_FRONTEND": "noninteractive"},
        timeout=APT_TIMEOUT,
    )
    return done.stdout + done.stderr
