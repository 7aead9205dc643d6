"""The `port-broker` command (broker/cli.py).

`list`, `status`, `check-config` and the usage errors run in this process (`main()`,
in a thread while the in-process broker of test_server serves). Everything that may
exec or serve — `exec` with a command, `serve` — runs as a real child process
(`python -m broker`), since `exec` rearranges the fds of the process it runs in.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import trio

from broker import __version__, client, status
from broker.cli import main
from broker.daemon.policy import Rule
from broker.errors import UnknownSocket
from broker.names import exit_statuses
from broker.status import REQUIRED, format_status, report_from
from tests.harness.inprocess import (
    CONFIG_PATH,
    UID,
    USER,
    me,
    my_unit,
    running_broker,
)
from tests.harness.processes import (
    LISTEN_FDS_PROBE,
    START_TIMEOUT,
    Processes,
    as_user,
    wait_for,
)
from tests.harness.runtime import ROOT

PORT_BROKER: Final = [sys.executable, "-I", "-m", "broker"]


@pytest.fixture
def utc() -> Iterator[None]:
    """Local time is UTC, so that rendered times are known."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()


async def run(*args: str) -> subprocess.CompletedProcess[bytes]:
    """`port-broker ARGS` as a child process, while this trio run serves."""
    with trio.fail_after(START_TIMEOUT):
        return await trio.run_process(
            [*PORT_BROKER, *args], capture_stdout=True, capture_stderr=True, check=False
        )


async def run_main(*args: str) -> int:
    """`main(ARGS)` in a thread, while this trio run serves."""
    status: int = await trio.to_thread.run_sync(main, list(args))
    return status


# --- format_status ----------------------------------------------------------------

REPORT: Final[dict[str, Any]] = {
    "version": "0.1.0",
    "pid": 4242,
    "uptime": 93784.5,
    "config": "/etc/port-broker/broker.toml",
    "configuration": {
        "path": "/etc/port-broker/broker.toml",
        "generation": 3,
        "loaded": 86400.0,
        "refused": {"time": 90000.0, "reason": "/etc/port-broker/broker.toml: bad"},
    },
    "connections": {"active": 2, "total": 1500, "limit": 1024},
    "sockets": [
        {
            "name": "http",
            "family": "inet6",
            "type": "stream",
            "address": "[::]:80",
            "grants": 12,
            "denials": 3,
        },
        {
            "name": "dns",
            "family": "inet",
            "type": "datagram",
            "address": "127.0.0.1:53",
            "grants": 0,
            "denials": 0,
        },
        {
            "name": "admin",
            "family": "unix",
            "type": "stream",
            "address": "/run/admin.sock",
            "grants": 1,
            "denials": 0,
        },
    ],
    "grants": 13,
    "denials": 3,
    "refusals": {"denied": 3},
    "recent": [
        {
            "time": 86400 + 61 * i,
            "decision": "grant" if i % 2 == 0 else "deny",
            "socket": "http",
            "uid": 33 if i % 2 == 0 else 1000,
            "user": "www-data" if i % 2 == 0 else None,
            "pid": 100 + i,
            "unit": "web.service" if i % 2 == 0 else None,
            "reason": "whatever",
        }
        for i in range(12)
    ],
    "log": {"suppressed": 40, "lost": 2},
    "unread": {"fds": 70, "holders": [{"uid": 61300, "fds": 64}, {"uid": 1000, "fds": 6}]},
}


def test_format_status_renders_the_report(utc: None) -> None:
    assert format_status(report_from(REPORT)).splitlines() == [
        "port-broker 0.1.0, pid 4242, up 1d2h3m4s, config /etc/port-broker/broker.toml",
        "clients: 2 connected, 1500 served (limit 1024); 13 grants, 3 denials",
        "configuration: generation 3, loaded 1970-01-02 00:00:00",
        "  last reload refused at 1970-01-02 01:00:00: /etc/port-broker/broker.toml: bad",
        "log: 40 notices about clients summed up, not logged one by one; 2 records the journal "
        "did not take",
        "unread: 70 granted sockets not read yet by their receivers (uid 61300: 64, uid 1000: 6)",
        "",
        "NAME   PROTO        ADDRESS          GRANTS  DENIALS",
        "http   tcp6         [::]:80          12      3",
        "dns    udp          127.0.0.1:53     0       0",
        "admin  unix-stream  /run/admin.sock  1       0",
        "",
        "recent:",
        # The last ten only, oldest first.
        "  1970-01-02 00:02:02 grant http uid 33 (www-data) pid 102 unit web.service",
        "  1970-01-02 00:03:03 deny  http uid 1000 (-) pid 103 unit -",
        "  1970-01-02 00:04:04 grant http uid 33 (www-data) pid 104 unit web.service",
        "  1970-01-02 00:05:05 deny  http uid 1000 (-) pid 105 unit -",
        "  1970-01-02 00:06:06 grant http uid 33 (www-data) pid 106 unit web.service",
        "  1970-01-02 00:07:07 deny  http uid 1000 (-) pid 107 unit -",
        "  1970-01-02 00:08:08 grant http uid 33 (www-data) pid 108 unit web.service",
        "  1970-01-02 00:09:09 deny  http uid 1000 (-) pid 109 unit -",
        "  1970-01-02 00:10:10 grant http uid 33 (www-data) pid 110 unit web.service",
        "  1970-01-02 00:11:11 deny  http uid 1000 (-) pid 111 unit -",
    ]


def test_the_documented_status_keys_are_the_reports() -> None:
    text = (ROOT / "docs" / "protocol.md").read_text()
    table = text.split("### status", 1)[1].split("## Refusals", 1)[0]
    documented = [key for row in re.findall(r"^\| (`.*?) \|", table, re.M)
                  for key in re.findall(r"`(\w+)`", row.split(" | ")[0])]  # fmt: skip
    assert documented == list(status.Report.__annotations__)
    assert set(REPORT) == set(status.Report.__annotations__)  # the sample above too


MINIMAL: Final[dict[str, Any]] = {key: REPORT[key] for key in REQUIRED}
"""What a broker of the protocol's first version reported."""


def test_a_report_of_an_older_broker_renders_without_what_it_lacks(utc: None) -> None:
    assert format_status(report_from(MINIMAL)).splitlines()[:3] == [
        "port-broker 0.1.0, pid 4242, up 1d2h3m4s, config /etc/port-broker/broker.toml",
        "clients: 2 connected, 1500 served (limit 1024); 13 grants, 3 denials",
        "",
    ]


def test_a_report_lacking_what_every_report_has_is_refused() -> None:
    with pytest.raises(ValueError, match="the status report lacks version, pid, uptime"):
        report_from({})


@pytest.mark.parametrize(
    ("uptime", "shown"),
    [
        (0, "0s"),
        (0.9, "0s"),
        (59.9, "59s"),
        (60, "1m"),
        (3601, "1h1s"),
        (86400, "1d"),
        (90061, "1d1h1m1s"),
        (40 * 86400, "40d"),
    ],
)
def test_format_status_uptime(uptime: float, shown: str) -> None:
    report = report_from({**MINIMAL, "uptime": uptime})
    assert format_status(report).startswith(f"port-broker 0.1.0, pid 4242, up {shown}, ")


# --- exec -------------------------------------------------------------------------

USAGE: Final = (
    "port-broker exec: usage: port-broker exec [--intercept [--map PORT=NAME]] "
    "NAME[,NAME...] -- COMMAND [ARGS...]\n"
)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["http"], id="no command"),
        pytest.param(["http", "--"], id="nothing after --"),
        pytest.param([",", "--", "true"], id="no names"),
        pytest.param(["", "true"], id="empty names"),
        # The first "--" ends port-broker's arguments: the names must come before it.
        pytest.param(["--", "http", "true"], id="-- before NAME"),
    ],
)
def test_exec_without_a_command_or_names_is_a_usage_error(
    rundir: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    # --socket names no broker: had the check been skipped, this would be 69, not 2.
    assert main(["exec", "--socket", str(rundir / "none.sock"), *args]) == 2
    assert capsys.readouterr() == ("", USAGE)


def test_exec_without_arguments_prints_the_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["exec"]) == 2
    assert capsys.readouterr() == ("", USAGE)


def test_exec_map_needs_intercept(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["exec", "--map", "80=http", "--", "true"]) == 2
    assert capsys.readouterr().err == "port-broker exec: --map only applies with --intercept\n"


@pytest.mark.parametrize("entry", ["http=80", "80=", "80=a b"])
def test_exec_map_must_name_a_port_and_a_socket(
    capsys: pytest.CaptureFixture[str], entry: str
) -> None:
    assert main(["exec", "--intercept", "--map", entry, "--", "true"]) == 2
    assert capsys.readouterr().err == (
        f"port-broker exec: --map {entry!r}: expected PORT=NAME, e.g. 80=http\n"
    )


async def test_exec_runs_the_command_with_the_sockets_at_3_and_up(rundir: Path) -> None:
    async with running_broker(rundir) as served:
        done = await run(
            "exec",
            "--socket",
            served.path,
            "http,dual",
            "--",
            sys.executable,
            "-I",
            "-c",
            LISTEN_FDS_PROBE,
        )
        assert done.returncode == 0, done.stderr.decode()
        assert done.stderr == b""
        seen = json.loads(done.stdout)
        assert seen["open"] == [0, 1, 2, 3, 4, 5]
        assert [fd["ino"] for fd in seen["fds"]] == served.inos("http", "dual")
        assert seen["env"]["LISTEN_FDS"] == "3"
        assert seen["env"]["LISTEN_FDNAMES"] == "http:dual:dual"
        assert seen["env"]["LISTEN_PID"] == str(seen["pid"])


ECHO_ARGS: Final = "import sys; print(sys.argv[1:])"


@pytest.mark.parametrize(
    ("args", "argv"),
    [
        # Everything after NAME is the command's, options and "--" included.
        (
            ["http", "--", "-c", ECHO_ARGS, "--timeout", "1", "--", "-x"],
            ["--timeout", "1", "--", "-x"],
        ),
        (["http", "-c", ECHO_ARGS, "--version"], ["--version"]),
        # Options may follow the names, up to "--".
        (["http", "--timeout", "3", "--", "-c", ECHO_ARGS, "a"], ["a"]),
    ],
    ids=["after --", "without --", "options after NAME"],
)
async def test_exec_passes_everything_after_the_names_to_the_command(
    rundir: Path, args: list[str], argv: list[str]
) -> None:
    async with running_broker(rundir) as served:
        # sys.executable stands at the place of the command: insert it after NAME (and --).
        split = args.index("-c")
        command = [*args[:split], sys.executable, "-I", *args[split:]]
        done = await run("exec", "--socket", served.path, *command)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode() == f"{argv}\n"


@pytest.mark.parametrize(
    ("command", "status", "message"),
    [
        ("/nonexistent/program", 127, "/nonexistent/program: command not found"),
        ("no-such-command-anywhere", 127, "no-such-command-anywhere: command not found"),
        ("/etc/passwd", 126, "/etc/passwd: cannot execute: Permission denied"),
        ("/", 126, "/: cannot execute: Permission denied"),
    ],
)
async def test_exec_of_a_command_that_cannot_run(
    rundir: Path, command: str, status: int, message: str
) -> None:
    async with running_broker(rundir) as served:
        done = await run("exec", "--socket", served.path, "http", "--", command, "arg")
    assert done.returncode == status
    assert done.stderr.decode() == f"port-broker exec: {message}\n"
    assert done.stdout == b""


async def test_exec_refused_exits_before_running_anything(rundir: Path) -> None:
    marker = rundir / "ran"
    async with running_broker(rundir) as served:
        unknown = await run("exec", "--socket", served.path, "nope", "--", "touch", str(marker))
        denied = await run(
            "exec", "--socket", served.path, "http,secret", "--", "touch", str(marker)
        )
        malformed = await run("exec", "--socket", served.path, "a b", "--", "touch", str(marker))
    missing = await run("exec", "--socket", str(rundir / "none.sock"), "http", "--", "true")
    assert not marker.exists()
    assert unknown.returncode == 66
    assert unknown.stderr.decode() == (
        "port-broker exec: no socket named 'nope' (you may acquire: dns, dual, http)\n"
    )
    assert denied.returncode == 77
    assert "may not acquire socket 'secret'" in denied.stderr.decode()
    assert malformed.returncode == 2  # a usage error, caught before asking the broker
    assert malformed.stderr.decode() == (
        "port-broker exec: 'a b' is not a valid socket name (letters, digits, '_.@-', up to 64 "
        "characters); `port-broker list` shows the ones you may acquire\n"
    )
    assert missing.returncode == 69
    assert missing.stderr.decode().startswith(f"port-broker exec: {rundir / 'none.sock'}: ")


async def test_exec_uses_port_broker_socket_from_the_environment(rundir: Path) -> None:
    async with running_broker(rundir) as served:
        with trio.fail_after(START_TIMEOUT):
            done = await trio.run_process(
                [*PORT_BROKER, "exec", "http", "--", "true"],
                env={**os.environ, "PORT_BROKER_SOCKET": served.path},
                capture_stderr=True,
                check=False,
            )
    assert done.returncode == 0, done.stderr.decode()


# --- list / status ----------------------------------------------------------------


async def test_list_prints_a_table_of_what_may_be_acquired(
    rundir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_broker(rundir) as served:
        assert await run_main("list", "--socket", served.path) == 0
        lines = capsys.readouterr().out.splitlines()
        ports = {name: [s.getsockname()[1] for s in socks] for name, socks in served.held.items()}
    assert [line.split() for line in lines] == [
        ["NAME", "PROTO", "ADDRESS"],
        ["http", "tcp", f"127.0.0.1:{ports['http'][0]}"],
        ["dual", "tcp", f"127.0.0.1:{ports['dual'][0]}"],
        ["dual", "tcp6", f"[::1]:{ports['dual'][1]}"],
        ["dns", "udp", f"127.0.0.1:{ports['dns'][0]}"],
    ]
    for column in ("PROTO", "ADDRESS"):  # aligned
        start = lines[0].index(column)
        assert all(line[start - 2 : start] == "  " and line[start] != " " for line in lines)


async def test_list_json(rundir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with running_broker(rundir) as served:
        assert await run_main("list", "--json", "--socket", served.path) == 0
        port = served.held["dns"][0].getsockname()[1]
    listed = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in listed] == ["http", "dual", "dual", "dns"]
    assert listed[-1] == {
        "name": "dns",
        "family": "inet",
        "type": "datagram",
        "address": f"127.0.0.1:{port}",
    }


async def test_list_when_nothing_may_be_acquired(
    rundir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_broker(rundir, rules={}) as served:
        assert await run_main("list", "--socket", served.path) == 0
        assert capsys.readouterr().out == "no socket may be acquired by this user\n"
        assert await run_main("list", "--json", "--socket", served.path) == 0
        assert json.loads(capsys.readouterr().out) == []


async def test_reload_waits_for_the_outcome_and_exits_78_on_a_refusal(
    rundir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = rundir / "broker.toml"
    path.write_text(f"[sockets.http]\nusers = [{os.getuid()}]\n")
    async with running_broker(rundir, config_path=str(path)) as served:
        assert await run_main("reload", "--socket", served.path) == 0
        assert capsys.readouterr().out == f"reloaded {path}: generation 2 in force\n"
        path.write_text('[sockets.http]\nusers = ["no-such-user-here"]\n')
        assert await run_main("reload", "--socket", served.path) == 78
        # (The broker runs in this process: its own log is on stderr too.)
        (said,) = [line for line in capsys.readouterr().err.splitlines()
                   if line.startswith("port-broker reload:")]  # fmt: skip
        assert said.startswith(f"port-broker reload: {path}: sockets.http.users[0]: unknown user")
        assert said.endswith(f"; generation 2 of {path} stays in force")


async def test_list_and_status_without_a_broker_exit_69(
    rundir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = rundir / "none.sock"
    for command in ("list", "status", "reload"):
        assert await run_main(command, "--socket", str(missing)) == 69
        assert capsys.readouterr().err.startswith(
            f"port-broker {command}: {missing}: no such socket"
        )


async def test_status_table_and_json(
    rundir: Path, capsys: pytest.CaptureFixture[str], utc: None
) -> None:
    async with running_broker(rundir) as served:
        with pytest.raises(UnknownSocket):
            await client.acquire_trio("nope", path=served.path)
        assert await run_main("status", "--socket", served.path) == 0
        table = capsys.readouterr().out
        assert await run_main("status", "--json", "--socket", served.path) == 0
        report = json.loads(capsys.readouterr().out)
    pid = os.getpid()
    assert report["pid"] == pid
    assert report["refusals"] == {"unknown-socket": 1}
    assert report["connections"] == {"active": 1, "total": 3, "limit": 64}

    lines = table.splitlines()
    assert re.fullmatch(
        rf"port-broker {__version__}, pid {pid}, up \d+s, config {re.escape(CONFIG_PATH)}",
        lines[0],
    )
    assert lines[1] == "clients: 1 connected, 2 served (limit 64); 0 grants, 0 denials"
    assert lines[2].startswith("configuration: generation 1, loaded ")
    assert report["configuration"]["path"] == CONFIG_PATH
    assert report["configuration"]["refused"] is None
    proto = {("inet", "stream"): "tcp", ("inet6", "stream"): "tcp6", ("inet", "datagram"): "udp"}
    assert [line.split() for line in lines[4:11]] == [
        ["NAME", "PROTO", "ADDRESS", "GRANTS", "DENIALS"],
        *(
            [s["name"], proto[s["family"], s["type"]], s["address"], "0", "0"]
            for s in report["sockets"]
        ),
    ]
    assert [row[0] for row in (line.split() for line in lines[5:11])] == [
        "http",
        "dual",
        "dual",
        "dns",
        "secret",
        "norule",
    ]
    assert lines[-2] == "recent:"
    event = f"deny  nope uid {UID} ({USER}) pid {pid} unit {my_unit() or '-'}"
    assert re.fullmatch(rf"  \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d {re.escape(event)}", lines[-1])


async def test_status_denied_exits_77(rundir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with running_broker(rundir, status=Rule(uids=frozenset({65534}))) as served:
        assert await run_main("status", "--socket", served.path) == 77
    lines = capsys.readouterr().err.splitlines()
    # The in-process broker audits the denial; the command prints the refusal.
    assert any(line.startswith("port-broker: notice: denied the status report to") and
               "decision=deny operation=status" in line for line in lines)  # fmt: skip
    assert lines[-1].startswith(f"port-broker status: {me()} may not read the broker's status")


# --- version, help ----------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"port-broker {__version__}\n"


@pytest.mark.parametrize(
    ("command", "mentions"),
    [
        ([], ["exec", "list", "status", "check-config", "serve", "--version"]),
        (["exec"], ["--socket", "--timeout", "NAME[,NAME...]", "COMMAND", "LISTEN_FDS"]),
        (["list"], ["--socket", "--timeout", "--json"]),
        (["status"], ["--socket", "--timeout", "--json"]),
        (["check-config"], ["FILE", "PORT_BROKER_CONFIG"]),
        (["serve"], ["--config", "--bind", "--control", "--user", "FileDescriptorName="]),
    ],
)
def test_help_mentions_the_key_options(
    capsys: pytest.CaptureFixture[str], command: list[str], mentions: list[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: port-broker {' '.join(command)}".rstrip())
    for word in mentions:
        assert word in out, word


def test_exit_statuses_are_the_same_in_help_and_readme(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["exec", "--help"])
    said = exit_statuses()
    assert said.startswith("2 usage error, 66 unknown socket")
    assert said in " ".join(capsys.readouterr().out.split())
    assert said in " ".join((ROOT / "README.md").read_text().split())


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2
    assert "the following arguments are required: COMMAND" in capsys.readouterr().err


# --- check-config, serve ----------------------------------------------------------


def test_check_config(
    rundir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [v for v in os.environ if v.startswith("PORT_BROKER_")]:
        monkeypatch.delenv(name)
    good = rundir / "good.toml"
    good.write_text(
        '[sockets.http]\nusers = ["root", 1000]\ngroups = [0]\nunits = ["web.service"]\n'
        "[sockets.dns]\n"
    )
    assert main(["check-config", str(good)]) == 0
    assert capsys.readouterr().out == (
        f"{good}: OK\n"
        "  http: uids [0, 1000]; gids [0]; units ['web.service']\n"
        "  dns: nobody (empty rule)\n"
    )
    monkeypatch.setenv("PORT_BROKER_CONFIG", str(good))
    assert main(["check-config"]) == 0
    assert capsys.readouterr().out.startswith(f"{good}: OK\n")

    bad = rundir / "bad.toml"
    bad.write_text("[sockets.http]\nuser = ['root']\n")
    assert main(["check-config", str(bad)]) == 78
    err = capsys.readouterr().err
    assert err.startswith(f"port-broker check-config: {bad}: sockets.http.user: unknown key")
    assert main(["check-config", str(rundir / "missing.toml")]) == 78
    assert str(rundir / "missing.toml") in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "systemd passed no sockets (LISTEN_FDS is unset or 0)"),
        (["--user", "nobody"], "--user only applies with --bind/--control"),
        (["--bind", "http=127.0.0.1:8080"], "--bind needs --control PATH"),
        pytest.param(
            ["--bind", "http=127.0.0.1:8080", "--control", "control.sock"],
            "refusing to serve as root: pass --user NAME",
            marks=pytest.mark.needs_root,
        ),
        pytest.param(
            [
                "--bind",
                "http=127.0.0.1:8080",
                "--control",
                "control.sock",
                "--user",
                "pbtest-nobody",
            ],
            "--user pbtest-nobody: no such user",
            marks=pytest.mark.needs_root,
        ),
    ],
    ids=[
        "no sockets",
        "--user without --bind",
        "--bind without --control",
        "as root",
        "unknown --user",
    ],
)
def test_serve_refuses_to_start_wrongly(rundir: Path, args: list[str], message: str) -> None:
    config = rundir / "broker.toml"
    config.write_text("[sockets.http]\nusers = ['nobody']\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "PORT_BROKER_"))}
    done = subprocess.run(
        [*PORT_BROKER, "serve", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
        env=env,
        cwd=rundir,  # --control control.sock: never a file in the checkout
    )
    assert done.returncode == 78
    assert done.stderr.startswith("port-broker serve: ")
    assert message in done.stderr
    assert not (rundir / "control.sock").exists()  # a refused start leaves nothing behind


@pytest.mark.needs_root
def test_serve_refused_after_binding_removes_its_control_socket(rundir: Path) -> None:
    config = rundir / "broker.toml"
    config.write_text("[sockets.https]\nusers = [65532]\n")  # https is not bound below
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "PORT_BROKER_"))}
    done = subprocess.run(
        [*PORT_BROKER, "serve", "--config", str(config), "--bind", "http=127.0.0.1:8081",
         "--control", "control.sock", "--user", "65532"],
        capture_output=True, text=True, timeout=START_TIMEOUT, check=False, env=env,
        cwd=rundir,
    )  # fmt: skip
    assert done.returncode == 78, done.stderr
    assert "rules for https but the broker holds no such socket" in done.stderr
    assert not (rundir / "control.sock").exists()


@pytest.mark.needs_root
def test_serve_says_loudly_that_others_run_as_its_uid(
    rundir: Path, launcher: Path, processes: Processes
) -> None:
    # fds in flight are counted per uid: any process of the broker's uid could make the
    # kernel refuse every grant (docs/security.md, V7).
    sharer = processes.start([*as_user(61500), "sleep", "60"])
    config = rundir / "broker.toml"
    config.write_text("[sockets.http]\nusers = ['nobody']\n")
    control = rundir / "control.sock"
    log = rundir / "broker.log"
    with log.open("w") as out:
        processes.start(
            [str(launcher), "serve", "--config", str(config), "--bind",
             "http=127.0.0.1:8082", "--control", str(control), "--user", "61500"],
            log=out,
        )  # fmt: skip
    wait_for(lambda: "serving http" in log.read_text(), "the broker to serve")
    warning = next(line for line in log.read_text().splitlines() if "other processes" in line)
    assert warning.startswith(
        f"port-broker: warning: other processes run as uid 61500, the broker's: pid "
        f"{sharer.pid} (sleep). Any of them can make the kernel refuse every grant"
    )
    assert "DynamicUser=yes" in warning


# --- open-file limit --------------------------------------------------------------

FIT_OPEN_FILES: Final = """
import resource, sys
from broker.daemon.audit import Audit
from broker.daemon.start import fit_open_files
class Held:
    held = {"http": [object(), object()]}
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2])))
fit_open_files(1024, Held(), Audit(journal=False))
print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


@pytest.mark.parametrize(
    ("soft", "hard", "after", "warned"),
    [(256, 4096, 2112, False), (256, 512, 512, True), (2048, 2048, 2048, True),
     (4096, 4096, 4096, False)],
)  # fmt: skip
def test_serve_fits_the_open_file_limit_to_max_connections(
    soft: int, hard: int, after: int, warned: bool
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", FIT_OPEN_FILES, str(soft), str(hard)],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    assert int(done.stdout) == after
    # 1024 connections, 2 held sockets and 64 of its own; and as many connections may
    # each hold a reply of both sockets unread (broker/daemon/inflight.py).
    warning = (
        "port-broker: warning: max_connections = 1024 needs about 1090 open files, and as "
        "many clients may hold 2048 granted sockets unread (2 sockets held), but "
        f"RLIMIT_NOFILE allows {after}: past that, clients wait for a slot, and grants are "
        "refused busy while that many are unread; raise LimitNOFILE= to 2112 or lower "
        "max_connections\n"
    )
    assert done.stderr == (warning if warned else "")


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "1e19", "soon"])
@pytest.mark.parametrize("command", [["list"], ["exec", "http", "--", "true"]])
def test_timeout_must_be_a_positive_number_of_seconds(
    value: str, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command[0], "--timeout", value, *command[1:]])
    assert exited.value.code == 2
    assert f"--timeout: '{value}': give a number of seconds above 0 and at most 1e+09" in (
        capsys.readouterr().err
    )
