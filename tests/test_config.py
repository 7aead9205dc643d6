"""Tests for `broker.config` and `port-broker check-config`.

Real TOML files in tmp_path, the real user and group databases, and environments passed
as `environ=` (the real process environment only where the default is what is tested).
Every error must name the file (or the environment variable) and the key.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest

from broker import cli, names
from broker.daemon import config, loader
from broker.daemon.config import Config
from broker.daemon.policy import Rule
from broker.daemon.settings import MAX_ID
from broker.errors import ConfigError
from tests.harness.runtime import ROOT

WWW_DATA = pwd.getpwnam("www-data").pw_uid
NOBODY = pwd.getpwnam("nobody").pw_uid
ADM = grp.getgrnam("adm").gr_gid
CONTAINER_ID = 61234
"""An id with no user or group entry here: as a uid inside a container or DynamicUser=."""
NO_SUCH_USER = "pbtest-no-such-user"
NO_SUCH_GROUP = "pbtest-no-such-group"
CLI_TIMEOUT = 60.0
"""Seconds for `port-broker check-config` to run: it takes well under one; a hang should
fail the test, not stall the run."""

TOP_KEYS = (
    "known keys: sockets, status, max_connections, max_connections_per_user, client_timeout, "
    "idle_exit"
)
RULE_KEYS = "known keys: users, groups, units"


def setup_module() -> None:
    with pytest.raises(KeyError):
        pwd.getpwuid(CONTAINER_ID)
    with pytest.raises(KeyError):
        grp.getgrgid(CONTAINER_ID)
    with pytest.raises(KeyError):
        pwd.getpwnam(NO_SUCH_USER)
    with pytest.raises(KeyError):
        grp.getgrnam(NO_SUCH_GROUP)


def write(tmp_path: Path, text: str | bytes, name: str = "broker.toml") -> Path:
    path = tmp_path / name
    if isinstance(text, str):
        path.write_text(text)
    else:
        path.write_bytes(text)
    return path


@contextlib.contextmanager
def environment(environ: dict[str, str]) -> Iterator[None]:
    """This process's environment is `environ` alone meanwhile: what a loader reads its
    PORT_BROKER_* overrides from (pydantic-settings reads os.environ)."""
    with mock.patch.dict(os.environ, environ, clear=True):
        yield


def load(path: Path | None, environ: dict[str, str] | None = None) -> Config:
    with environment(environ or {}):
        return loader.load(None if path is None else str(path))


def error(path: Path | None, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load(path, environ)
    return caught.value.message


# --- a good file ---------------------------------------------------------------------


def test_the_documented_example_loads_with_names_resolved_to_ids(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
max_connections = 256
client_timeout = 2.5

[sockets.http]
users = ["www-data", 1000, "65534"]
groups = ["adm", 4242]
units = ["node-app.service", "machine-*.scope"]

[sockets.https]
units = ["node-app.service"]

[status]
users = ["root"]
groups = ["adm"]
""",
    )
    loaded = load(path)
    assert loaded.path == str(path)
    assert loaded.exists
    assert loaded.max_connections == 256
    assert loaded.client_timeout == 2.5
    assert loaded.policy.source == str(path)
    assert dict(loaded.policy.sockets) == {
        "http": Rule(
            uids=frozenset({WWW_DATA, 1000, NOBODY}),
            gids=frozenset({ADM, 4242}),
            units=("node-app.service", "machine-*.scope"),
        ),
        "https": Rule(units=("node-app.service",)),
    }
    assert loaded.policy.status == Rule(uids=frozenset({0}), gids=frozenset({ADM}))


def test_an_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    loaded = load(write(tmp_path, ""))
    assert loaded.exists
    assert dict(loaded.policy.sockets) == {}
    assert loaded.policy.status == Rule(uids=frozenset({0}))  # root may read the status
    assert (loaded.max_connections, loaded.client_timeout) == (1024, 5.0)


def test_a_status_table_replaces_the_root_default(tmp_path: Path) -> None:
    loaded = load(write(tmp_path, '[status]\ngroups = ["adm"]\n'))
    assert loaded.policy.status == Rule(gids=frozenset({ADM}))


def test_an_empty_socket_table_is_a_rule_for_nobody(tmp_path: Path) -> None:
    loaded = load(write(tmp_path, "[sockets.http]\n"))
    assert loaded.policy.sockets["http"].empty


@pytest.mark.parametrize(
    "entry", [CONTAINER_ID, f'"{CONTAINER_ID}"', 0, MAX_ID], ids=["int", "str", "zero", "max"]
)
def test_numeric_ids_need_no_database_entry(tmp_path: Path, entry: object) -> None:
    loaded = load(write(tmp_path, f"[sockets.http]\nusers = [{entry}]\ngroups = [{entry}]\n"))
    number = int(str(entry).strip('"'))
    assert loaded.policy.sockets["http"] == Rule(uids=frozenset({number}), gids=frozenset({number}))


@pytest.mark.parametrize(
    "name", ["http", "web-1", "a.b_c@d", "H" * 64], ids=["plain", "dash", "punct", "longest"]
)
def test_valid_socket_names_are_accepted(tmp_path: Path, name: str) -> None:
    assert name in load(write(tmp_path, f'[sockets."{name}"]\n')).policy.sockets


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_connections", "1"),
        ("max_connections", "65536"),
        ("client_timeout", "0.001"),
        ("client_timeout", "300"),
        ("client_timeout", "1"),
    ],
)
def test_limits_at_their_bounds_are_accepted(tmp_path: Path, key: str, value: str) -> None:
    loaded = load(write(tmp_path, f"{key} = {value}\n"))
    assert getattr(loaded, key) == float(value)


# --- errors, each naming the file and the key ------------------------------------------


def test_a_toml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[sockets.http]\nusers = ["www-data"]\ngroups = [adm]\n')
    message = error(path)
    assert message.startswith(f"{path}: not valid TOML: ")
    assert "line 3" in message


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, b'[sockets.http]\nusers = ["www-\xff"]\n')
    assert error(path) == f"{path}: not valid TOML: not UTF-8 at byte 29"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("max_conections = 5\n", f"max_conections: unknown key; {TOP_KEYS}"),
        ("[socket.http]\n", f"socket: unknown key; {TOP_KEYS}"),
        ('[sockets.http]\nuser = ["www-data"]\n', f"sockets.http.user: unknown key; {RULE_KEYS}"),
        ("[sockets.http]\nport = 80\n", f"sockets.http.port: unknown key; {RULE_KEYS}"),
        ('[status]\nuser = ["root"]\n', f"status.user: unknown key; {RULE_KEYS}"),
    ],
    ids=["top-level", "top-level-table", "socket", "socket-port", "status"],
)
def test_unknown_keys_are_refused_with_the_known_ones(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = write(tmp_path, text)
    assert error(path) == f"{path}: {expected}"


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ('max_connections = "many"\n', "max_connections", "valid integer"),
        ("max_connections = 1.5\n", "max_connections", "valid integer"),
        ("max_connections = [1]\n", "max_connections", "valid integer"),
        ('client_timeout = "soon"\n', "client_timeout", "valid number"),
        ("max_connections = true\n", "max_connections", "not true or false"),
        ("max_connections_per_user = true\n", "max_connections_per_user", "not true or false"),
        ("client_timeout = false\n", "client_timeout", "not true or false"),
        ("sockets = 5\n", "sockets", "valid dictionary"),
        ("[sockets]\nhttp = 5\n", "sockets.http", "valid dictionary"),
        ('status = "root"\n', "status", "valid dictionary"),
        ('[sockets.http]\nusers = "www-data"\n', "sockets.http.users", "valid list"),
        ("[sockets.http]\nusers = [true]\n", "sockets.http.users[0]", "valid integer"),
        ("[sockets.http]\nusers = [33.0]\n", "sockets.http.users[0]", "valid integer"),
        ("[sockets.http]\ngroups = [false]\n", "sockets.http.groups[0]", "valid integer"),
        ("[sockets.http]\ngroups = [[4]]\n", "sockets.http.groups[0]", "valid integer"),
        ("[sockets.http]\nunits = [5]\n", "sockets.http.units[0]", "valid string"),
        ('[sockets.http]\nunits = "web.service"\n', "sockets.http.units", "valid list"),
    ],
)
def test_values_of_the_wrong_type_are_refused(
    tmp_path: Path, text: str, key: str, words: str
) -> None:
    path = write(tmp_path, text)
    message = error(path)
    assert message.startswith(f"{path}: {key}")
    assert words in message


@pytest.mark.parametrize("table", ["sockets.http", "status"])
def test_an_unknown_user_is_refused(tmp_path: Path, table: str) -> None:
    path = write(tmp_path, f'[{table}]\nusers = ["www-data", "{NO_SUCH_USER}"]\n')
    assert error(path) == (
        f"{path}: {table}.users[1]: unknown user '{NO_SUCH_USER}': not in the user database; "
        "create it, fix the spelling, or give a numeric id (for ids that exist only in "
        "containers)"
    )


def test_an_unknown_group_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, f'[sockets.http]\ngroups = ["{NO_SUCH_GROUP}"]\n')
    message = error(path)
    assert message.startswith(
        f"{path}: sockets.http.groups[0]: unknown group '{NO_SUCH_GROUP}': "
        "not in the group database"
    )


@pytest.mark.parametrize("name", ["\uff11\uff12", "\u00b2"], ids=["fullwidth", "superscript"])
def test_non_ascii_digits_are_names_not_ids(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, f'[sockets.http]\nusers = ["{name}"]\n')
    assert f"sockets.http.users[0]: unknown user '{name}'" in error(path)


@pytest.mark.parametrize(
    ("entry", "kind"),
    [(MAX_ID + 1, "user"), (2**32, "user"), (-1, "user"), (MAX_ID + 1, "group"), (-5, "group")],
)
def test_ids_out_of_range_are_refused(tmp_path: Path, entry: int, kind: str) -> None:
    path = write(tmp_path, f"[sockets.http]\n{kind}s = [{entry}]\n")
    assert error(path) == (
        f"{path}: sockets.http.{kind}s[0]: {kind} id {entry} is out of range 0..{MAX_ID}"
    )


@pytest.mark.parametrize(
    "unit", ["web", "web.socket", "web.slice", "web service.service", "", ".service/x"]
)
def test_invalid_unit_patterns_are_refused(tmp_path: Path, unit: str) -> None:
    path = write(tmp_path, f'[sockets.http]\nunits = ["web.service", "{unit}"]\n')
    assert error(path) == (
        f"{path}: sockets.http.units: {unit!r} is not a service or scope name or pattern "
        "(examples: 'web.service', 'machine-*.scope')"
    )


@pytest.mark.parametrize(
    ("pattern", "example"),
    [
        ("*.service", "user@1000.service"),
        ("*@*.service", "user@1000.service"),
        ("u*.service", "user@1000.service"),
        ("*.scope", "session-1.scope"),
        ("s*-[0-9].scope", "session-1.scope"),
        ("*1.service", "user@1001.service"),
        ("*@?.service", "user@0.service"),
        ("*-c*.scope", "session-c1.scope"),
    ],
)
def test_a_pattern_that_matches_every_users_own_units_is_refused(
    tmp_path: Path, pattern: str, example: str
) -> None:
    path = write(tmp_path, f'[sockets.http]\nunits = ["{pattern}"]\n')
    said = error(path)
    assert said.startswith(f"{path}: sockets.http.units: {pattern!r} also matches {example} (")
    assert "and so whatever any logged-in user runs; name the units meant" in said


@pytest.mark.parametrize(
    "pattern", ["user@1000.service", "user@*.service", "session-*.scope", "web-*.service",
                "machine-*.scope", "*-web.service"],
)  # fmt: skip
def test_patterns_that_name_users_units_or_none_of_them_are_taken(
    tmp_path: Path, pattern: str
) -> None:
    path = write(tmp_path, f'[sockets.http]\nunits = ["{pattern}"]\n')
    assert load(path).policy.sockets["http"].units == (pattern,)


def test_the_control_socket_cannot_have_a_rule(tmp_path: Path) -> None:
    path = write(tmp_path, '[sockets.control]\nusers = ["www-data"]\n')
    assert error(path) == (
        f"{path}: sockets: 'control' is the broker's own control socket and cannot be "
        "granted; a socket's name is its .socket unit's FileDescriptorName="
    )


@pytest.mark.parametrize("name", ["a b", "-http", "caf\u00e9", "h" * 65, "a:b", ""])
def test_invalid_socket_names_are_refused(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, f'[sockets."{name}"]\n')
    assert error(path) == (
        f"{path}: sockets: {name!r} is not a valid socket name (letters, digits, '_.@-', "
        "up to 64 characters); a socket's name is its .socket unit's FileDescriptorName="
    )


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("max_connections = 0\n", "max_connections", "greater than or equal to 1"),
        ("max_connections = -1\n", "max_connections", "greater than or equal to 1"),
        ("max_connections = 65537\n", "max_connections", "less than or equal to 65536"),
        ("client_timeout = 0\n", "client_timeout", "greater than 0"),
        ("client_timeout = -0.5\n", "client_timeout", "greater than 0"),
        ("client_timeout = 300.5\n", "client_timeout", "less than or equal to 300"),
        ("client_timeout = inf\n", "client_timeout", "less than or equal to 300"),
    ],
)
def test_limits_out_of_bounds_are_refused(tmp_path: Path, text: str, key: str, words: str) -> None:
    path = write(tmp_path, text)
    message = error(path)
    assert message.startswith(f"{path}: {key}: ")
    assert words in message


def test_several_errors_are_counted(tmp_path: Path) -> None:
    path = write(tmp_path, "max_connections = 0\nclient_timeout = 0\nbogus = 1\n")
    assert error(path).endswith("(and 2 more)")


# --- which file -------------------------------------------------------------------------


def test_a_missing_file_named_explicitly_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    assert error(path) == (f"{path}: no such file (asked for with --config or PORT_BROKER_CONFIG)")


def test_a_missing_file_named_by_the_environment_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    assert "no such file" in error(None, {"PORT_BROKER_CONFIG": str(path)})


def test_the_environment_names_the_file_when_no_path_is_given(tmp_path: Path) -> None:
    path = write(tmp_path, "max_connections = 9\n")
    loaded = load(None, {"PORT_BROKER_CONFIG": str(path)})
    assert (loaded.path, loaded.max_connections) == (str(path), 9)


def test_a_missing_default_file_means_deny_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real default (/etc/port-broker/broker.toml) may exist on a machine running
    # this, so point the default at a path that surely does not.
    default = tmp_path / "etc" / "broker.toml"
    monkeypatch.setattr(names, "DEFAULT_CONFIG", str(default))
    loaded = load(None)
    assert loaded.path == str(default)
    assert not loaded.exists
    assert dict(loaded.policy.sockets) == {}
    assert loaded.policy.source == str(default)
    assert loaded.policy.status == Rule(uids=frozenset({0}))
    default.parent.mkdir()
    write(default.parent, "max_connections = 3\n")
    assert load(None).max_connections == 3  # and is read once it exists


@pytest.mark.parametrize(
    ("path", "environ", "expected"),
    [
        (None, {}, (names.DEFAULT_CONFIG, False)),
        (None, {"PORT_BROKER_CONFIG": ""}, (names.DEFAULT_CONFIG, False)),
        (None, {"PORT_BROKER_CONFIG": "/e.toml"}, ("/e.toml", True)),
        ("/a.toml", {}, ("/a.toml", True)),
        ("/a.toml", {"PORT_BROKER_CONFIG": "/e.toml"}, ("/a.toml", True)),
    ],
)
def test_resolve_path_prefers_argument_then_environment_then_default(
    path: str | None, environ: dict[str, str], expected: tuple[str, bool]
) -> None:
    assert config.resolve_path(path, environ) == expected


# --- the environment ------------------------------------------------------------------


def test_scalars_come_from_the_environment_and_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "max_connections = 10\nclient_timeout = 1.0\n")
    loaded = load(path, {"PORT_BROKER_MAX_CONNECTIONS": "256", "PORT_BROKER_CLIENT_TIMEOUT": "2.5"})
    assert (loaded.max_connections, loaded.client_timeout) == (256, 2.5)
    assert load(write(tmp_path, ""), {"PORT_BROKER_MAX_CONNECTIONS": "7"}).max_connections == 7


def test_a_nested_list_from_the_environment_overrides_only_that_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[sockets.http]\nusers = ["www-data"]\ngroups = ["adm"]\n')
    loaded = load(path, {"PORT_BROKER_SOCKETS__HTTP__USERS": '["nobody", 1000]'})
    assert loaded.policy.sockets["http"] == Rule(
        uids=frozenset({NOBODY, 1000}), gids=frozenset({ADM})
    )


def test_the_environment_can_add_sockets_and_set_the_status_rule(tmp_path: Path) -> None:
    path = write(tmp_path, '[sockets.http]\nusers = ["www-data"]\n')
    loaded = load(
        path,
        {
            "PORT_BROKER_SOCKETS__HTTPS__UNITS": '["web.service"]',
            "PORT_BROKER_STATUS": '{"users": ["www-data"]}',
        },
    )
    assert dict(loaded.policy.sockets) == {
        "http": Rule(uids=frozenset({WWW_DATA})),
        "https": Rule(units=("web.service",)),
    }
    assert loaded.policy.status == Rule(uids=frozenset({WWW_DATA}))


def test_load_reads_overrides_from_this_processs_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "")
    monkeypatch.setenv("PORT_BROKER_MAX_CONNECTIONS", "77")
    assert loader.load(str(path)).max_connections == 77
    monkeypatch.delenv("PORT_BROKER_MAX_CONNECTIONS")
    assert loader.load(str(path)).max_connections == 1024


@pytest.mark.parametrize(
    ("environ", "key", "words"),
    [
        ({"PORT_BROKER_MAX_CONNECTIONS": "0"}, "max_connections", "greater than or equal"),
        ({"PORT_BROKER_MAX_CONNECTIONS": "lots"}, "max_connections", "valid integer"),
        ({"PORT_BROKER_CLIENT_TIMEOUT": "-1"}, "client_timeout", "greater than 0"),
        (
            {"PORT_BROKER_SOCKETS__HTTP__USERS": f'["{NO_SUCH_USER}"]'},
            "sockets.http.users",
            f"unknown user '{NO_SUCH_USER}'",
        ),
        (
            {"PORT_BROKER_SOCKETS__HTTP__UNITS": '["web"]'},
            "sockets.http.units",
            "not a service or scope",
        ),
        ({"PORT_BROKER_SOCKETS__HTTP__USER": '["nobody"]'}, "sockets.http.user", "unknown key"),
        (
            {"PORT_BROKER_SOCKETS__CONTROL__USERS": '["nobody"]'},
            "sockets",
            "'control' is the broker's own control socket",
        ),
        ({"PORT_BROKER_STATUS__USERS": '"root"'}, "status.users", "valid list"),
    ],
)
def test_a_bad_value_from_the_environment_names_the_variable(
    tmp_path: Path, environ: dict[str, str], key: str, words: str
) -> None:
    path = write(tmp_path, 'max_connections = 10\n[sockets.http]\nusers = ["www-data"]\n')
    [variable] = environ
    message = error(path, environ)
    assert message.startswith(f"{path} (overridden by environment variable {variable}): {key}")
    assert words in message


def test_a_bad_value_from_the_file_is_not_blamed_on_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, f'[sockets.http]\nusers = ["{NO_SUCH_USER}"]\n')
    environ = {
        "PORT_BROKER_SOCKETS__HTTPS__USERS": '["nobody"]',
        "PORT_BROKER_MAX_CONNECTIONS": "5",
    }
    assert error(path, environ).startswith(f"{path}: sockets.http.users[0]: unknown user")


@pytest.mark.parametrize(
    "variable",
    ["PORT_BROKER_SOCKETS__HTTP__USERS", "PORT_BROKER_SOCKETS", "PORT_BROKER_STATUS__GROUPS"],
)
def test_a_list_or_table_that_is_not_json_names_the_variable(tmp_path: Path, variable: str) -> None:
    message = error(write(tmp_path, ""), {variable: "nobody"})
    assert message.startswith(f"environment variable {variable}: not JSON")


@pytest.mark.parametrize(
    "variable",
    ["PORT_BROKER_MAX_CONNECTION", "PORT_BROKER_SOCKETZ__HTTP__USERS", "PORT_BROKER_"],
)
def test_an_unknown_port_broker_variable_is_refused(tmp_path: Path, variable: str) -> None:
    message = error(write(tmp_path, ""), {variable: "1"})
    assert message == (
        f"environment variable {variable}: unknown setting; known: PORT_BROKER_CLIENT_TIMEOUT, "
        "PORT_BROKER_CONFIG, PORT_BROKER_IDLE_EXIT, PORT_BROKER_MAX_CONNECTIONS, "
        "PORT_BROKER_MAX_CONNECTIONS_PER_USER, PORT_BROKER_SOCKET, PORT_BROKER_SOCKETS, "
        "PORT_BROKER_STATUS"
    )


@pytest.mark.parametrize(
    "variable", ["PORT_BROKER_MAX_CONNECTIONS__X", "PORT_BROKER_CLIENT_TIMEOUT__SECONDS"]
)
def test_a_scalar_setting_has_no_nested_variables(tmp_path: Path, variable: str) -> None:
    head = variable.partition("__")[0]
    assert error(write(tmp_path, ""), {variable: "3"}) == (
        f"environment variable {variable}: {head} is a single value, not a table; set {head} itself"
    )


def test_each_name_is_looked_up_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A user database that answers only once (a flapping directory service, say) must
    # not make validation and the policy disagree, nor crash the load.
    asked: list[str] = []
    real = pwd.getpwnam
    nobody = real("nobody").pw_uid

    def once(name: str) -> pwd.struct_passwd:
        if name in asked:
            raise KeyError(name)
        asked.append(name)
        return real(name)

    monkeypatch.setattr(pwd, "getpwnam", once)
    path = write(tmp_path, '[sockets.http]\nusers = ["www-data"]\n[status]\nusers = ["nobody"]\n')
    loaded = load(path)
    assert loaded.policy.sockets["http"] == Rule(uids=frozenset({WWW_DATA}))
    assert loaded.policy.status == Rule(uids=frozenset({nobody}))
    assert sorted(asked) == ["nobody", "www-data"]


def test_client_variables_and_other_prefixes_are_allowed(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    environ = {
        "PORT_BROKER_SOCKET": "/run/elsewhere.sock",
        "PORT_BROKER_CONFIG": str(tmp_path / "not-this-one.toml"),  # the argument wins
        "PORT_BROKERS": "unrelated",
        "HOME": "/root",
    }
    assert load(path, environ).max_connections == 1024


# --- port-broker check-config ---------------------------------------------------------


def test_check_config_prints_ok_and_the_rules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        '[sockets.http]\nusers = ["www-data"]\ngroups = ["adm"]\nunits = ["web.service"]\n'
        "[sockets.https]\n",
    )
    assert cli.main(["check-config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out == (
        f"{path}: OK\n"
        f"  http: uids [{WWW_DATA}]; gids [{ADM}]; units ['web.service']\n"
        "  https: nobody (empty rule)\n"
    )
    assert err == ""


def test_check_config_reports_an_error_with_status_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, f'[sockets.http]\nusers = ["{NO_SUCH_USER}"]\n')
    assert cli.main(["check-config", str(path)]) == 78
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(
        f"port-broker check-config: {path}: sockets.http.users[0]: unknown user '{NO_SUCH_USER}'"
    )


def test_check_config_without_a_file_needs_the_default_to_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    default = tmp_path / "broker.toml"
    monkeypatch.setattr(names, "DEFAULT_CONFIG", str(default))
    monkeypatch.delenv("PORT_BROKER_CONFIG", raising=False)
    assert cli.main(["check-config"]) == 78
    assert capsys.readouterr().err == f"port-broker check-config: {default}: no such file\n"
    write(tmp_path, "")
    assert cli.main(["check-config"]) == 0
    assert capsys.readouterr().out == f"{default}: OK\n"


def run_check_config(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PORT_BROKER_")}
    return subprocess.run(
        [str(Path(sys.executable).parent / "port-broker"), "check-config", *args],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        timeout=CLI_TIMEOUT,
        check=False,
    )


def test_the_installed_command_checks_a_good_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[sockets.http]\nusers = ["nobody"]\n')
    done = run_check_config(str(path))
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == f"{path}: OK\n  http: uids [{NOBODY}]\n"


def test_the_installed_command_fails_a_bad_file_with_78(tmp_path: Path) -> None:
    path = write(tmp_path, "[sockets.http]\nport = 80\n")
    done = run_check_config(str(path))
    assert done.returncode == 78
    assert done.stdout == ""
    assert done.stderr == (
        f"port-broker check-config: {path}: sockets.http.port: unknown key; {RULE_KEYS}\n"
    )


def test_the_installed_command_applies_and_checks_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    done = run_check_config(env={"PORT_BROKER_CONFIG": str(path), "PORT_BROKER_BOGUS": "1"})
    assert done.returncode == 78
    assert done.stderr.startswith(
        "port-broker check-config: environment variable PORT_BROKER_BOGUS: unknown setting"
    )
    done = run_check_config(str(path), env={"PORT_BROKER_SOCKETS__WEB__USERS": '["www-data"]'})
    assert (done.returncode, done.stdout) == (0, f"{path}: OK\n  web: uids [{WWW_DATA}]\n")


# --- loading in a child process ---------------------------------------------------


def test_isolated_load_gives_what_load_gives(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(
        "max_connections = 7\nclient_timeout = 2.5\n"
        '[sockets.http]\nusers = ["nobody", 1234]\ngroups = ["www-data"]\n'
        'units = ["web.service", "machine-*.scope"]\n[status]\nusers = ["root"]\n'
    )
    here = load(path)
    there = loader.Load(str(path), environ={}).result()
    assert there == here
    assert Config.from_json(json.loads(json.dumps(here.to_json()))) == here


def test_isolated_load_reports_the_childs_error(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text('[sockets.http]\nusers = ["no-such-user-here"]\n')
    with pytest.raises(ConfigError) as there:
        loader.Load(str(path), environ={}).result()
    assert there.value.message == error(path)
    assert "no-such-user-here" in there.value.message


def hang(path: str | None) -> list[str]:
    """A loader child's command that hangs, until it is killed."""
    return [sys.executable, "-I", "-c", "import time; time.sleep(3600)"]


def test_a_loader_that_dies_is_a_config_error_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "")
    monkeypatch.setattr(loader, "command", hang)
    child = loader.Load(str(path), {})
    os.kill(child.pid, signal.SIGKILL)
    with pytest.raises(ConfigError) as failed:
        child.result()
    assert failed.value.message == (
        f"{path}: the configuration loader failed (exit status -9); run `port-broker "
        f"check-config {path}` to see why"
    )


def test_a_loader_that_takes_too_long_is_killed_and_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "")
    monkeypatch.setattr(loader, "command", hang)
    monkeypatch.setattr(loader, "LOAD_TIMEOUT", 0.2)
    child = loader.Load(str(path), {})
    with pytest.raises(ConfigError) as failed:
        child.result()
    assert failed.value.message == (
        f"{path}: loading took longer than 0.2s (a user database that does not answer?)"
    )
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(child.pid, 0)


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_only_a_regular_file_is_read(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "broker.toml"
    if kind == "fifo":
        os.mkfifo(path)  # nobody writes: a blocking open would hang here
    elif kind == "device":
        path = Path("/dev/zero")
    else:
        path.mkdir()
    what = "a directory" if kind == "directory" else "not a regular file"
    assert error(path) == f"{path}: {what}; the configuration is a TOML file"


def test_a_file_over_the_size_limit_is_refused_unread(tmp_path: Path) -> None:
    path = write(tmp_path, "# " + "x" * (1 << 20) + "\n")
    assert error(path) == (
        f"{path}: larger than 1024 KiB, the most the broker reads; is it the right file?"
    )
    big = {"PORT_BROKER_MAX_CONNECTIONS": "1" * ((1 << 20) + 1)}
    assert error(write(tmp_path, "", "ok.toml"), big) == (
        "environment variable PORT_BROKER_MAX_CONNECTIONS: longer than 1024 KiB, the most "
        "the broker reads"
    )


def test_isolated_load_leaves_pydantic_out_of_this_process(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text('[sockets.http]\nusers = ["nobody"]\n')
    code = (
        "import sys; from broker.daemon import loader; "
        f"loader.Load({str(path)!r}, environ={{}}).result(); "
        "print(sorted(m for m in sys.modules "
        "if m.startswith(('pydantic', 'broker.daemon.settings'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)  # fmt: skip
    assert done.stdout == "[]\n"


def test_a_variable_for_a_part_of_a_table_wins_over_the_whole_table(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    whole = '{"http": {"users": [0]}, "dns": {"users": [0], "units": ["a.service"]}}'
    for environ in (
        {"PORT_BROKER_SOCKETS": whole, "PORT_BROKER_SOCKETS__HTTP__USERS": "[1000]"},
        {"PORT_BROKER_SOCKETS__HTTP__USERS": "[1000]", "PORT_BROKER_SOCKETS": whole},
    ):
        loaded = load(path, environ)
        assert loaded.policy.sockets["http"] == Rule(uids=frozenset({1000}))
        assert loaded.policy.sockets["dns"] == Rule(uids=frozenset({0}), units=("a.service",))


def test_every_scalar_setting_is_documented_with_its_default() -> None:
    table = (ROOT / "docs" / "configuration.md").read_text().split("## Keys", 1)[1]
    rows = dict(re.findall(r"^\| `(\w+)` \| [^|]+ \| ([^|]+) \|", table, re.M))
    assert [f.name for f in config.SETTINGS] == [
        "max_connections",
        "max_connections_per_user",
        "client_timeout",
        "idle_exit",
    ]
    for setting in config.SETTINGS:
        assert rows[setting.name].strip() == str(setting.default), setting.name


def test_variables_are_read_in_any_case_and_twins_are_refused(tmp_path: Path) -> None:
    # As pydantic-settings reads them; the checks that name a variable read them so too.
    path = write(tmp_path, "max_connections = 10\n")
    environ = {
        "port_broker_max_connections": "99",
        "Port_Broker_Sockets__HTTP__users": '["nobody"]',
    }
    loaded = load(path, environ)
    assert loaded.max_connections == 99
    assert loaded.policy.sockets == {"http": Rule(uids=frozenset({NOBODY}))}
    assert error(path, {"port_broker_max_conections": "9"}).startswith(
        "environment variable port_broker_max_conections: unknown setting; known: "
    )
    twins = {"PORT_BROKER_MAX_CONNECTIONS": "9", "port_broker_max_connections": "8"}
    assert error(path, twins) == (
        "environment variables PORT_BROKER_MAX_CONNECTIONS and port_broker_max_connections "
        "set the same key (names are read in any case); keep one"
    )


def test_max_connections_per_user(tmp_path: Path) -> None:
    assert load(write(tmp_path, "")).max_connections_per_user == 64
    loaded = load(write(tmp_path, "max_connections_per_user = 3\n"))
    assert loaded.max_connections_per_user == 3
    assert loader.Load(str(tmp_path / "broker.toml"), {}).result() == loaded
    message = error(write(tmp_path, "max_connections_per_user = 0\n"))
    assert message.startswith(f"{tmp_path / 'broker.toml'}: max_connections_per_user: ")
