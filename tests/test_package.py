"""The Debian package (debian/, built by .ci/package) and the sdist and wheel.

The package is built once per session by the documented command, twice: version N, as
the tree says, and N+1, the same tree built with `.ci/package --version N+1`. Each
install, upgrade, removal and purge is `apt-get` in a test box (tests/harness/box.py),
whose real systemd runs the maintainer scripts; workers are Debian's Node as `nobody`,
requests are curl and http.client on the box's loopback.

- What the package holds: the files, the conffile, the units (units/ but for the path
  of port-broker), nothing naming the build directory, no start-up hook or bytecode in
  the virtualenv, the locked dependencies and only Debian packages to depend on; and
  lintian's verdict.
- Installed, with only a policy written: a socket-activated broker hands port 80 to a
  Node worker; `man port-broker` and `man port-broker.toml` say every subcommand,
  option, exit status and setting; `journalctl -x` explains a grant; bash completes.
- Upgraded under load: no request refused or failed, the broker restarted, the worker
  and the sockets untouched, and a new worker gets the very same socket.
- Removed: the broker stops, the worker serves on; purged: /etc/port-broker is gone.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path
from typing import Final

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from broker import __version__, manual, names
from broker.daemon import audit, config
from broker.usage import parser
from tests.harness.box import Box
from tests.harness.debian import APT_TIMEOUT, apt, build_package, in_box, package_box
from tests.harness.processes import NOBODY, REQUEST_TIMEOUT
from tests.harness.runtime import ROOT

NEXT_VERSION: Final = f"{__version__}+1"
"""The version the upgrade goes to: the same tree, built as the next version."""

UNITS: Final = sorted(path.name for path in (ROOT / "units").iterdir())
CHECKOUT_COMMAND: Final = "/usr/local/bin/port-broker"
"""Where units/ run port-broker from: a checkout's install (.ci/install, .ci/demo)."""
PACKAGED_COMMAND: Final = "/usr/bin/port-broker"
ENABLED_SOCKETS: Final = ("port-broker.socket", "port-broker-http.socket",
                          "port-broker-https.socket")  # fmt: skip
POLICY: Final = '[sockets.http]\nusers = ["nobody"]\n'

WORKER_UNIT: Final = """\
[Unit]
Description=A Node worker on port 80, as nobody, through the packaged port-broker

[Service]
User=nobody
ExecStart=/usr/bin/port-broker exec http -- /usr/bin/node /srv/hello.js
CapabilityBoundingSet=
NoNewPrivileges=yes
"""

LOAD: Final = """\
# Requests to 127.0.0.1:80, one connection each, until /run/load.stop appears (or 300 s
# pass): the answered count goes to /run/load.ok after each, the counts and the worker
# pids that answered to stdout at the end.
import http.client, json, os, re, time
counts = {"ok": 0, "refused": 0, "failed": 0}
errors, pids = [], []
deadline = time.monotonic() + 300
while not os.path.exists("/run/load.stop") and time.monotonic() < deadline:
    connection = http.client.HTTPConnection("127.0.0.1", 80, timeout=10)
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        body = response.read().decode()
        counts["ok" if response.status == 200 else "failed"] += 1
        pid = int(re.search(r"pid (\\d+),", body).group(1))
        if pid not in pids:
            pids.append(pid)
    except ConnectionRefusedError:
        counts["refused"] += 1
    except Exception as e:
        counts["failed"] += 1
        errors.append(repr(e))
    finally:
        connection.close()
    with open("/run/load.ok.new", "w") as f:
        f.write(str(counts["ok"]))
    os.replace("/run/load.ok.new", "/run/load.ok")
print(json.dumps({**counts, "pids": pids, "errors": errors[:5]}))
"""

BOX_FILES: Final = {
    "/srv/hello.js": (ROOT / "docs" / "examples" / "hello.js").read_text(),
    "/srv/load.py": LOAD,
}


@pytest.fixture(scope="session")
def package(public_root: Path) -> Path:
    """The package of the tree as it is (version N)."""
    return build_package(public_root)


@pytest.fixture(scope="session")
def next_package(public_root: Path) -> Path:
    """The same tree built as version N+1."""
    return build_package(public_root, NEXT_VERSION)


# --- helpers ----------------------------------------------------------------------


def show(box: Box, unit: str, prop: str) -> str:
    return box.run(["systemctl", "show", "--value", "-p", prop, unit]).stdout.strip()


def curl(box: Box) -> str:
    """GET http://127.0.0.1/ in the box, once: a refused connection fails the test."""
    return box.run(
        ["curl", "-sS", "--fail", "--max-time", str(REQUEST_TIMEOUT), "http://127.0.0.1/"]
    ).stdout


def install(box: Box, deb: Path) -> str:
    """`apt install ./DEB`, as README says; return apt's output."""
    return apt(box, "install", in_box(deb))


def readme_install() -> list[str]:
    """The commands of README's "Install on a systemd host", comments left out."""
    readme = (ROOT / "README.md").read_text().split("\n## Install on a systemd host\n", 1)[1]
    block = readme.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines()]


def test_readme_installs_as_the_tests_do() -> None:
    assert readme_install() == [
        ".ci/package",  # what build_package runs
        "apt install ./dist/port-broker_*.deb",  # install()
        "$EDITOR /etc/port-broker/broker.toml",  # write_policy() writes it, then runs:
        *POLICY_COMMANDS,
    ]


POLICY_COMMANDS: Final = ("port-broker check-config", "systemctl try-reload-or-restart port-broker")


def write_policy(box: Box) -> None:
    """What README asks of the administrator after the install: the policy, checked,
    then put in force (a broker not running yet reads it when first asked)."""
    box.write_file("/etc/port-broker/broker.toml", POLICY)
    for command in POLICY_COMMANDS:
        box.run(command.split())


def start_worker(box: Box, unit: str = "web.service") -> int:
    """Start the Node worker as a service of nobody; return its pid once it serves."""
    box.install_unit(unit, WORKER_UNIT)
    box.run(["systemctl", "start", unit])
    box.run(["sh", "-c", f"until journalctl -u {unit} | grep -q 'listening on fd 3'; do "
             "sleep 0.05; done"], timeout=REQUEST_TIMEOUT)  # fmt: skip
    return int(show(box, unit, "MainPID"))


def served_by(box: Box, pid: int) -> None:
    """Three requests on :80, each answered by worker `pid` as nobody."""
    for _ in range(3):
        assert f"hello from node: pid {pid}, uid {NOBODY}," in curl(box)


def socket_of(box: Box, pid: int) -> str:
    """The socket at fd 3 of `pid` ("socket:[INODE]")."""
    return box.run(["readlink", f"/proc/{pid}/fd/3"]).stdout.strip()


def rendered(box: Box, page: str) -> str:
    """`man PAGE` as a terminal would show it, wide, without formatting."""
    done = box.run(["man", page], env={"MANWIDTH": "200", "MANPAGER": "cat"})
    assert done.stderr == "", done.stderr  # no groff warning either
    assert "\u2010" not in done.stdout  # no word hyphenated: options and paths stay whole
    return done.stdout


def journal_records(box: Box, unit: str) -> list[dict[str, str]]:
    out = box.run(["journalctl", "-u", unit, "-o", "json", "--no-pager"]).stdout
    return [json.loads(line) for line in out.splitlines()]


# --- the version, the catalog, the sdist and wheel --------------------------------


def test_the_changelog_pyproject_and_the_program_say_one_version() -> None:
    changelog = (ROOT / "debian" / "changelog").read_text().splitlines()[0]
    with (ROOT / "pyproject.toml").open("rb") as f:
        pyproject = tomllib.load(f)["project"]["version"]
    assert changelog.startswith(f"port-broker ({__version__}) ")
    assert pyproject == __version__  # (nix/package.nix's: tests/test_nix.py)


def test_the_build_dependencies_are_among_the_packages_setup_installs() -> None:
    # So that the tests' .ci/package finds them installed (it has no network for apt).
    control = (ROOT / "debian" / "control").read_text()
    field = re.search(r"^Build-Depends:(.*?)^\S", control, re.MULTILINE | re.DOTALL)
    assert field is not None
    wanted = {re.split(r"[ (]", entry.strip())[0] for entry in field[1].split(",")} - {""}
    wanted = {"debhelper" if name == "debhelper-compat" else name for name in wanted}
    listed = (ROOT / ".ci" / "debian-packages").read_text()
    setup = {line.split("#")[0].strip() for line in listed.splitlines()} - {""}
    assert wanted <= setup, f"add {sorted(wanted - setup)} to .ci/debian-packages"
    assert {"dpkg-dev", "build-essential", "lintian", "man-db"} <= setup  # .ci/package, tests


def catalog_entries() -> dict[str, str]:
    """MESSAGE_ID → the text of its entry in catalog/port-broker.catalog."""
    text = (ROOT / "catalog" / "port-broker.catalog").read_text()
    parts = re.split(r"^-- ([0-9a-f]{32})\n", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_the_catalog_explains_the_message_ids_the_broker_sends() -> None:
    entries = catalog_entries()
    assert sorted(entries) == sorted([audit.GRANT_MESSAGE_ID, audit.DENIAL_MESSAGE_ID])
    for text in entries.values():
        headers = text.split("\n\n", 1)[0].splitlines()
        assert headers[0].startswith("Subject: port-broker ")
        assert "Defined-By: port-broker" in headers
        assert "Documentation: man:port-broker(1)" in headers


def test_sdist_and_wheel_pass_twine_check_and_carry_the_units_and_node_helper(
    tmp_path: Path,
) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(
        ROOT,
        tree,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "dist", "build", "*.egg-info", "__pycache__", ".*_cache", "result*"
        ),
    )
    out = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel",
         "--outdir", str(out), str(tree)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    sdist, wheel = sorted(out.iterdir(), key=lambda p: p.suffix)  # .gz, .whl
    assert (sdist.name, wheel.name) == (
        f"port_broker-{__version__}.tar.gz",
        f"port_broker-{__version__}-py3-none-any.whl",
    )
    checked = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(sdist), str(wheel)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("PASSED") == 2, checked.stdout

    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    assert {f"broker/units/{unit}" for unit in UNITS} <= in_wheel
    assert "broker/node/listen-fds.js" in in_wheel
    for unit in UNITS:
        shipped = zipfile.ZipFile(wheel).read(f"broker/units/{unit}").decode()
        assert shipped == (ROOT / "units" / unit).read_text()
    prefix = f"port_broker-{__version__}/"
    with tarfile.open(sdist) as tar:
        in_sdist = {name.removeprefix(prefix) for name in tar.getnames()}
    assert {f"units/{unit}" for unit in UNITS} <= in_sdist
    assert "broker/node/listen-fds.js" in in_sdist


# --- the package, built -----------------------------------------------------------


def apt_origins() -> dict[str, str]:
    """Each apt source ("http://deb.debian.org/debian bookworm/main amd64 Packages") →
    the origin its Release file names ("Debian"), from `apt-cache policy`."""
    out = subprocess.run(["apt-cache", "policy"], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    found = re.findall(r"^ *-?\d+ (.+)\n +release .*?\bo=([^,\n]+)", out, re.MULTILINE)
    return dict(found)


def offered_by(package: str) -> set[str]:
    """The apt sources that offer a version of `package`."""
    out = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    table = out.partition("Version table:")[2]
    lines = re.findall(r"^ {8}-?\d+ (.+)$", table, re.MULTILINE)
    return {line for line in lines if line != "/var/lib/dpkg/status"}


@pytest.mark.needs_root
def test_the_package_holds_what_it_should_and_lintian_finds_nothing(
    package: Path, tmp_path: Path
) -> None:
    assert package.name == f"port-broker_{__version__}_{arch()}.deb"
    tree = tmp_path / "tree"
    subprocess.run(["dpkg-deb", "-x", str(package), str(tree)], check=True)
    control = tmp_path / "control"
    subprocess.run(["dpkg-deb", "-e", str(package), str(control)], check=True)

    assert (control / "conffiles").read_text().split() == ["/etc/port-broker/broker.toml"]
    for path in ("usr/bin/port-broker", "usr/share/man/man1/port-broker.1.gz",
                 "usr/share/man/man5/port-broker.toml.5.gz",
                 "usr/share/bash-completion/completions/port-broker",
                 "usr/lib/systemd/catalog/port-broker.catalog",
                 "usr/share/port-broker/listen-fds.js", "usr/share/doc/port-broker/README.md.gz",
                 "usr/share/doc/port-broker/docs/configuration.md.gz",
                 "usr/share/doc/port-broker/copyright"):  # fmt: skip
        assert (tree / path).is_file(), path
    catalog = (tree / "usr/lib/systemd/catalog/port-broker.catalog").read_text()
    assert catalog == (ROOT / "catalog" / "port-broker.catalog").read_text()
    listen_fds = (tree / "usr/share/port-broker/listen-fds.js").read_text()
    assert listen_fds == (ROOT / "broker" / "node" / "listen-fds.js").read_text()

    # The runtime: the locked distributions and port-broker, nothing else; no start-up
    # hook, no bytecode (postinst compiles it), nothing that names where it was built.
    venv = tree / "usr/lib/port-broker"
    [site] = venv.glob("lib/python3.*/site-packages")
    installed = dict(
        info.name.removesuffix(".dist-info").rsplit("-", 1) for info in site.glob("*.dist-info")
    )
    installed = {canonicalize_name(name): version for name, version in installed.items()}
    assert installed == {**runtime_pins(), "port-broker": __version__}
    assert not list(venv.rglob("*.pth")), "a start-up hook in the runtime"
    assert not list(venv.rglob("__pycache__"))
    assert sorted(p.name for p in (venv / "bin").iterdir()) == [
        "python",
        "python3",
        f"python{site.parent.name.removeprefix('python')}",
    ]
    named = subprocess.run(["grep", "-rl", "port-broker-package.", str(tree), str(control)],
                           capture_output=True, text=True, check=False)  # fmt: skip
    assert named.stdout == "", f"these name the build directory:\n{named.stdout}"

    # Dependencies: Debian's own packages, each offered by a source of Debian's.
    depends = subprocess.run(["dpkg-deb", "-f", str(package), "Depends"], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
    names_ = sorted({re.split(r"[ (:]", d.strip())[0] for d in depends.split(",")})
    assert "python3" in names_
    origins = apt_origins()
    for name in names_:
        sources = offered_by(name)
        assert "Debian" in {origins.get(source) for source in sources}, (name, sources)

    verdict = subprocess.run(
        ["lintian", "--pedantic", "--display-info", "--fail-on", "error,warning,info,pedantic",
         str(package)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert (verdict.returncode, verdict.stdout) == (0, ""), verdict.stdout + verdict.stderr


def arch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()  # fmt: skip


def runtime_pins() -> dict[str, str]:
    """name → version of .ci/requirements/runtime.txt's pins for this machine."""
    pins: dict[str, str] = {}
    for line in (ROOT / ".ci" / "requirements" / "runtime.txt").read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            requirement = Requirement(line.removesuffix("\\").strip())
            if requirement.marker is None or requirement.marker.evaluate():
                [spec] = requirement.specifier
                pins[canonicalize_name(requirement.name)] = spec.version
    return pins


# --- the package, installed -------------------------------------------------------


@pytest.mark.needs_root
def test_installed_with_a_policy_it_serves_a_node_worker_and_documents_itself(
    package: Path,
) -> None:
    with package_box([package], BOX_FILES) as box:
        simulated = apt(box, "install", "--simulate", in_box(package))
        pulled = re.findall(r"^Inst (\S+) .*\((.*)\)", simulated, re.MULTILINE)
        assert all(origin.startswith("Debian") for name, origin in pulled
                   if name != "port-broker"), pulled  # fmt: skip
        said = install(box, package)
        assert f"Setting up port-broker ({__version__})" in said

        # The units: units/'s, but for where port-broker is.
        for unit in UNITS:
            packaged = box.read_file(f"/usr/lib/systemd/system/{unit}")
            shipped = (ROOT / "units" / unit).read_text()
            assert packaged == shipped.replace(CHECKOUT_COMMAND, PACKAGED_COMMAND), unit
        service = box.read_file("/usr/lib/systemd/system/port-broker.service")
        assert service.count(f"={PACKAGED_COMMAND} ") == 2  # ExecStart=, ExecReload=
        # Clean, the manual pages of Documentation= included (man is asked for each).
        units = "/usr/lib/systemd/system/port-broker*"
        verified = box.run(["sh", "-c", f"systemd-analyze verify {units}"], check=False)
        assert (verified.returncode, verified.stdout, verified.stderr) == (0, "", "")
        # The sockets are enabled and listening; the broker waits for its first client.
        for unit in ENABLED_SOCKETS:
            assert (show(box, unit, "UnitFileState"), show(box, unit, "ActiveState")) == (
                "enabled",
                "active",
            ), unit
        quic = "port-broker-quic.socket"
        assert (show(box, quic, "UnitFileState"), show(box, quic, "ActiveState")) == (
            "disabled",
            "inactive",
        )
        assert show(box, "port-broker.service", "ActiveState") == "inactive"
        assert box.run(["sh", "-c", "command -v port-broker"]).stdout == f"{PACKAGED_COMMAND}\n"
        version = box.run(["dpkg-query", "-W", "-f", "${Version}", "port-broker"]).stdout
        assert box.run(["port-broker", "--version"]).stdout == f"port-broker {version}\n"
        assert version == __version__

        write_policy(box)
        worker = start_worker(box)
        served_by(box, worker)
        assert show(box, "port-broker.service", "ActiveState") == "active"  # activated
        triggers = show(box, "port-broker.service", "TriggeredBy").split()
        assert sorted(triggers) == sorted(ENABLED_SOCKETS)

        check_manual_pages(box)
        check_catalog(box, worker)
        check_completion(box)


def check_manual_pages(box: Box) -> None:
    """Every subcommand with its options and arguments, every exit status, in
    port-broker(1); every setting with its default and bounds in port-broker.toml(5)."""
    page = rendered(box, "port-broker")
    assert page.startswith("PORT-BROKER(1)")
    commands = section(page, "COMMANDS")
    subcommands = manual.subcommands(parser())
    heads = [re.search(rf"^   {re.escape(name)}$", commands, re.MULTILINE) for name in subcommands]
    assert all(heads), list(zip(subcommands, heads, strict=True))
    starts = [head.start() for head in heads if head]
    for (name, sub), start, end in zip(
        subcommands.items(), starts, [*starts[1:], len(commands)], strict=True
    ):
        assert re.search(rf"^ +port-broker {re.escape(name)} ", section(page, "SYNOPSIS"), re.M)
        own = commands[start:end]
        for action in sub._actions:
            tags = action.option_strings or [str(action.metavar)]
            for tag in tags:
                if tag not in ("-h", "--help"):  # said once, under OPTIONS
                    assert re.search(rf"^ +{re.escape(tag)}(\s|,|$)", own, re.M), (name, tag)
    assert re.search(r"^ +-h, --help$", section(page, "OPTIONS"), re.MULTILINE)
    assert re.search(r"^ +--version$", section(page, "OPTIONS"), re.MULTILINE)
    exits = section(page, "EXIT STATUS")
    for status, meaning in names.EXIT_MEANINGS.items():
        assert re.search(rf"^ +{status} +{re.escape(meaning)}$", exits, re.M), status

    settings = rendered(box, "port-broker.toml")
    assert settings.startswith("PORT-BROKER.TOML(5)")
    lines = section(settings, "KEYS").splitlines()
    for setting in config.SETTINGS:
        [at] = [i for i, text in enumerate(lines) if text.strip() == setting.name]
        entry = " ".join(lines[at + 1 : at + 3])
        assert f"default: {setting.default}." in entry, entry
        for bound in setting.metadata["bounds"].values():
            assert re.search(rf"(?<![\d.]){re.escape(f'{bound:g}')}(?![\d.])", entry), entry


def section(page: str, title: str) -> str:
    """The text of a manual page's section TITLE, up to the next section."""
    found = re.search(rf"^{re.escape(title)}\n(.*?)(?=^\S)", page, re.MULTILINE | re.DOTALL)
    assert found is not None, f"no section {title}"
    return found.group(1)


def check_catalog(box: Box, worker: int) -> None:
    """journalctl -x explains the grant with the catalog's text, its fields filled in."""
    ids = box.run(["journalctl", "--list-catalog", *catalog_entries()]).stdout
    assert len(ids.splitlines()) == 2, ids  # installed, and the catalog database rebuilt
    [grant] = [r for r in journal_records(box, "port-broker.service")
               if r.get("MESSAGE_ID") == audit.GRANT_MESSAGE_ID]  # fmt: skip
    entry = catalog_entries()[audit.GRANT_MESSAGE_ID]
    assert set(re.findall(r"@(\w+)@", entry)) <= set(grant), "a field the grant lacks"
    explained = box.run(["journalctl", "-x", "-u", "port-broker.service", "--no-pager"]).stdout
    assert f"Subject: port-broker granted socket http to uid {NOBODY}" in explained
    assert (
        f"Process {worker} of uid {NOBODY} (unit: web.service) received the listening" in explained
    )
    assert f"because the policy allows it: {grant['REASON']}." in " ".join(
        line.strip("░ ") for line in explained.splitlines()
    )


COMPLETE: Final = """\
source /usr/share/bash-completion/completions/port-broker
COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1))
_port_broker
printf '%s\\n' "${COMPREPLY[@]}"
"""


def completions(box: Box, *words: str, user: str | None = None) -> list[str]:
    """What bash completes for the command line `words` (the last being completed)."""
    out = box.run(["bash", "-c", COMPLETE, "complete", *words], user=user).stdout
    return sorted(filter(None, out.splitlines()))


def check_completion(box: Box) -> None:
    """bash completes the subcommands, and each subcommand's options."""
    whole = parser()
    subcommands = manual.subcommands(whole)
    assert completions(box, "port-broker", "") == sorted([*subcommands, "--help", "--version"])
    for name, sub in subcommands.items():
        flags = [flag for action in sub._actions for flag in action.option_strings]
        assert completions(box, "port-broker", name, "--") == sorted(
            f for f in flags if f.startswith("--")
        ), name
    # The sockets the user may acquire, as the broker says: nobody may have http.
    assert completions(box, "port-broker", "exec", "", user="nobody") == ["http"]
    assert completions(box, "port-broker", "exec", "") == []  # root is not in the policy
    assert completions(box, "port-broker", "serve", "--user", "nob") == ["nobody"]


# --- upgrade, remove, purge -------------------------------------------------------


@pytest.mark.needs_root
def test_upgrade_under_load_restarts_the_broker_and_no_socket(
    package: Path, next_package: Path
) -> None:
    with package_box([package, next_package], BOX_FILES) as box:
        install(box, package)
        write_policy(box)
        worker = start_worker(box)
        served_by(box, worker)
        broker = show(box, "port-broker.service", "MainPID")
        listening = {unit: show(box, unit, "ActiveEnterTimestampMonotonic")
                     for unit in ENABLED_SOCKETS}  # fmt: skip
        held = socket_of(box, worker)

        load = subprocess.Popen(
            box.command(["/usr/bin/python3", "/srv/load.py"]), stdout=subprocess.PIPE, text=True
        )
        try:
            before = answered_once_more(box, 0)
            said = install(box, next_package)
            during = int(box.read_file("/run/load.ok"))  # what apt's minutes saw answered
            answered_once_more(box, during)  # and the stream goes on
            box.run(["touch", "/run/load.stop"])
            out, _ = load.communicate(timeout=REQUEST_TIMEOUT + 5)
        finally:
            if load.poll() is None:
                load.kill()
                load.wait()
        counts = json.loads(out)
        assert (counts["refused"], counts["failed"]) == (0, 0), counts
        assert counts["pids"] == [worker]  # the one worker answered everything
        assert during > before, "no request was answered while apt upgraded"
        assert f"Unpacking port-broker ({NEXT_VERSION}) over ({__version__})" in said

        assert show(box, "web.service", "MainPID") == str(worker)
        assert show(box, "port-broker.service", "ActiveState") == "active"
        assert show(box, "port-broker.service", "MainPID") not in (broker, "0")
        assert box.run(["port-broker", "--version"]).stdout == f"port-broker {NEXT_VERSION}\n"
        for unit, since in listening.items():  # neither stopped nor restarted
            assert show(box, unit, "ActiveEnterTimestampMonotonic") == since, unit
        # A new worker gets port 80 afterwards: the very socket the first one serves on.
        newcomer = box.run(["port-broker", "exec", "http", "--", "readlink", "/proc/self/fd/3"],
                           user="nobody")  # fmt: skip
        assert newcomer.stdout.strip() == held
        served_by(box, worker)


def answered_once_more(box: Box, than: int) -> int:
    """Wait until the load has had more than `than` requests answered; return how many."""
    done = box.run(
        ["sh", "-c", f'until [ "$(cat /run/load.ok 2>/dev/null || echo 0)" -gt {than} ]; do '
         "sleep 0.05; done; cat /run/load.ok"],
        timeout=APT_TIMEOUT,
    )  # fmt: skip
    return int(done.stdout)


@pytest.mark.needs_root
def test_remove_stops_the_broker_while_the_worker_serves_and_purge_removes_the_policy(
    package: Path,
) -> None:
    with package_box([package], BOX_FILES) as box:
        install(box, package)
        # UDP 443, which the package ships but does not enable (before the broker
        # starts, as systemd passes sockets then): remove stops it too.
        box.run(["systemctl", "enable", "--now", "port-broker-quic.socket"])
        write_policy(box)
        worker = start_worker(box)
        served_by(box, worker)
        broker = int(show(box, "port-broker.service", "MainPID"))
        # An administrator's file beside the policy: purge takes the directory whole.
        box.write_file("/etc/port-broker/notes", "where the policy came from\n")

        apt(box, "remove", "port-broker")
        assert show(box, "port-broker.service", "ActiveState") == "inactive"
        assert box.run(["test", "-e", f"/proc/{broker}"], check=False).returncode == 1
        for unit in [*ENABLED_SOCKETS, "port-broker-quic.socket"]:
            assert show(box, unit, "ActiveState") == "inactive", unit
        connect = f"import socket; socket.socket(socket.AF_UNIX).connect({names.DEFAULT_SOCKET!r})"
        assert box.run(["/usr/bin/python3", "-c", connect], check=False).returncode == 1
        served_by(box, worker)  # on its own copy of the listening socket
        assert box.read_file(names.DEFAULT_CONFIG) == POLICY  # a conffile stays on remove

        apt(box, "purge", "port-broker")
        assert box.run(["test", "-e", "/etc/port-broker"], check=False).returncode == 1
        served_by(box, worker)
        box.run(["systemctl", "stop", "web.service"])
