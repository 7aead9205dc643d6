"""The `port-broker` command: serve, exec, list, status, check-config, reload.

Each subcommand imports only what it needs. `port-broker exec NAMES -- COMMAND`, on
every worker's start and restart, is read here without argparse (`plain_exec`) and
imports nothing but the client's core (broker/exchange.py) and the launcher: no trio,
no pydantic, no supervisor, and none of the standard modules that cost a start-up its
milliseconds (argparse, enum, typing, re, json, socket). Anything else, --help and
every mistake included, goes to argparse (broker/usage.py), which reads it, and says
what is wrong, the way it always did.

Exit status: 0 success; 1 other failure; 2 usage; 66 unknown socket; 69 broker
unavailable; 77 access denied; 78 invalid configuration or sockets (serve, check-config,
reload; systemd does not restart on it); 126/127 the command cannot be run (exec).

Must never: import at module level anything but the worker path's own modules.
"""

from __future__ import annotations

import os
import sys

from broker.errors import (
    AccessDenied,
    BrokerError,
    BrokerUnavailable,
    ClientError,
    ConfigError,
    IntakeError,
    InterceptError,
    PrivilegeError,
    ReloadRefused,
    UnknownSocket,
)
from broker.exchange import DEFAULT_TIMEOUT, ask, granted
from broker.messages import Acquire
from broker.names import (
    Exit,
    grantable_name_problem,
    positive_seconds,
    socket_path,
    transport,
    valid_name,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    import socket
    from collections.abc import Sequence
    from typing import Final


def _fail(command: str, message: str, status: int) -> int:
    sys.stderr.write(f"port-broker {command}: {message}\n")
    return status


def _client_failure(command: str, error: Exception) -> int:
    status = Exit.FAILURE
    if isinstance(error, AccessDenied):
        status = Exit.DENIED
    elif isinstance(error, UnknownSocket):
        status = Exit.UNKNOWN_SOCKET
    elif isinstance(error, BrokerUnavailable):
        status = Exit.UNAVAILABLE
    message = error.message if isinstance(error, BrokerError) else str(error)
    return _fail(command, message, status)


def _split_names(values: Sequence[str]) -> list[str]:
    return [name for value in values for name in value.split(",") if name]


def _grantable(values: Sequence[str]) -> tuple[list[str], str | None]:
    """The socket names in `values` (comma-separated; each once, in order) and what is
    wrong with the first that no broker could grant, if one is."""
    names = list(dict.fromkeys(_split_names(values)))
    problems = (grantable_name_problem(name) for name in names)
    return names, next((problem for problem in problems if problem is not None), None)


# --- exec -------------------------------------------------------------------------

EXEC_USAGE: Final = (
    "usage: port-broker exec [--intercept [--map PORT=NAME]] NAME[,NAME...] -- COMMAND [ARGS...]"
)


def plain_exec(words: Sequence[str]) -> tuple[list[str], str | None, float, list[str]] | None:
    """`exec [--socket PATH] [--timeout SECONDS] NAME[,NAME...] -- COMMAND [ARGS...]`,
    the options as `--option VALUE` or `--option=VALUE`, before or after the names, read
    without argparse: (names, socket, timeout, command), or None for any other form or
    any mistake, which argparse then reads (and explains) as ever."""
    if words[:1] != ["exec"] or "--" not in words:
        return None
    split = words.index("--")
    ours, command = list(words[1:split]), list(words[split + 1 :])
    path: str | None = None
    timeout = DEFAULT_TIMEOUT
    given: str | None = None
    while ours:
        word = ours.pop(0)
        option, equals, value = word.partition("=")
        if option in ("--socket", "--timeout"):
            if not equals:
                if not ours or ours[0].startswith("-"):
                    return None
                value = ours.pop(0)
            if option == "--socket":
                path = value
            else:
                seconds = positive_seconds(value)
                if seconds is None:
                    return None
                timeout = seconds
        elif word.startswith("-") or given is not None:
            return None
        else:
            given = word
    names, problem = _grantable([given or ""])
    if not command or not names or problem:
        return None
    return names, path, timeout, command


def exec_plain(names: list[str], path: str | None, timeout: float, command: list[str]) -> int:
    """Acquire `names` and replace this process with `command`, the sockets at fd 3..;
    return only on failure."""
    try:
        grants = granted(ask(Acquire(tuple(names)), path, timeout), socket_path(path))
    except ClientError as e:
        return _client_failure("exec", e)
    from broker.launcher import CannotPlace, exec_with  # (once the sockets are there)

    try:
        exec_with(grants, command)
    except CannotPlace as e:
        return _fail(
            "exec",
            f"cannot move the {len(grants)} granted socket(s) to fd 3..{2 + len(grants)}: "
            f"{e.strerror}; {command[0]} was not run (see the open-file limit, ulimit -n)",
            Exit.FAILURE,
        )
    except OSError as e:
        return _cannot_run(command, e)


def _port_map(values: Sequence[str]) -> dict[int, str]:
    """Parse --map values: "80=http", "80=http,443=https"; raise ValueError if malformed."""
    mapping: dict[int, str] = {}
    for entry in _split_names(values):
        port, sep, name = entry.partition("=")
        if not (sep and port.isascii() and port.isdigit() and 0 < int(port) < 65536) or (
            not valid_name(name)
        ):
            raise ValueError(f"--map {entry!r}: expected PORT=NAME, e.g. 80=http")
        mapping[int(port)] = name
    return mapping


def _exec_arguments(args: argparse.Namespace) -> tuple[list[str], dict[int, str], list[str]]:
    """Return the socket names, the --map and the command; ValueError says what is wrong."""
    command = list(args.command)  # main() took the "--" off
    mapping = _port_map(args.map)
    if mapping and not args.intercept:
        raise ValueError("--map only applies with --intercept")
    names, problem = _grantable([args.names or "", *mapping.values()])
    if not command or not names:
        raise ValueError(EXEC_USAGE)
    if problem is not None:
        raise ValueError(f"{problem}; `port-broker list` shows the ones you may acquire")
    return names, mapping, command


def cmd_exec(args: argparse.Namespace) -> int:
    try:
        names, mapping, command = _exec_arguments(args)
    except ValueError as e:
        return _fail("exec", str(e), Exit.USAGE)
    if not args.intercept:
        return exec_plain(names, args.socket, args.timeout, command)
    from broker.intercept.seccomp import check_supported

    try:
        check_supported()  # before asking the broker for anything
        grants = granted(ask(Acquire(tuple(names)), args.socket, args.timeout),
                         socket_path(args.socket))  # fmt: skip
    except InterceptError as e:
        return _fail("exec", e.message, Exit.FAILURE)
    except ClientError as e:
        return _client_failure("exec", e)
    return _run_intercepted(grants, mapping, command)


def _cannot_run(command: list[str], error: OSError) -> int:
    if isinstance(error, FileNotFoundError):
        return _fail("exec", f"{command[0]}: command not found", Exit.NOT_FOUND)
    return _fail("exec", f"{command[0]}: cannot execute: {error.strerror}", Exit.CANNOT_EXECUTE)


def _run_intercepted(
    grants: list[tuple[str, int]], mapping: dict[int, str], command: list[str]
) -> int:
    """Supervise `command`, giving its bind() to a held port the held socket."""
    import socket  # (the supervisor's path)

    from broker.intercept.idmap import Relay
    from broker.intercept.supervisor import run_intercepted

    held: list[tuple[str, socket.socket]] = []
    relay = None
    try:
        for name, fd in grants:
            held.append((name, socket.socket(fileno=fd)))
        relay = Relay(os.environ)  # newuidmap/newgidmap, which no_new_privs disarms
        return run_intercepted(
            command, held, mapping, env=relay.environment(), services=relay.services()
        )
    except OSError as e:
        return _cannot_run(command, e)
    except InterceptError as e:
        return _fail("exec", e.message, Exit.FAILURE)
    finally:
        if relay is not None:
            relay.close()
        for _, sock in held:
            sock.close()
        for _, fd in grants[len(held) :]:
            os.close(fd)


# --- list / status / reload -------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    import json

    from broker.client import list_sockets
    from broker.status import table

    try:
        sockets = list_sockets(path=args.socket, timeout=args.timeout)
    except ClientError as e:
        return _client_failure("list", e)
    if args.json:
        print(json.dumps([s.to_json() for s in sockets], indent=2))
    elif not sockets:
        print("no socket may be acquired by this user")
    else:
        rows = [["NAME", "PROTO", "ADDRESS"]]
        rows += [[s.name, transport(s.family, s.type), s.address] for s in sockets]
        print(table(rows))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from broker.client import status
    from broker.status import format_status, report_from

    try:
        report = status(path=args.socket, timeout=args.timeout)
        shown = json.dumps(report, indent=2) if args.json else format_status(report_from(report))
    except ClientError as e:
        return _client_failure("status", e)
    except (ValueError, KeyError, TypeError) as e:  # a report of another shape
        return _fail(
            "status",
            f"{socket_path(args.socket)}: cannot read the broker's status report ({e!r}): "
            "is the broker of another version? `port-broker status --json` shows it whole",
            Exit.UNAVAILABLE,
        )
    print(shown)
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    from broker.client import reload

    try:
        configuration = reload(path=args.socket, timeout=args.timeout)
    except ReloadRefused as e:
        return _fail("reload", e.message, Exit.CONFIG)
    except ClientError as e:
        return _client_failure("reload", e)
    print(f"reloaded {configuration.get('path')}: generation {configuration.get('generation')} "
          "in force")  # fmt: skip
    return 0


# --- serve / check-config ---------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    from broker.daemon import loader

    try:
        loaded = loader.load(args.file)
    except ConfigError as e:
        return _fail("check-config", e.message, Exit.CONFIG)
    if not loaded.exists:
        return _fail("check-config", f"{loaded.path}: no such file", Exit.CONFIG)
    print(f"{loaded.path}: OK")
    for name, rule in loaded.policy.sockets.items():
        who = [
            f"uids {sorted(rule.uids)}" if rule.uids else "",
            f"gids {sorted(rule.gids)}" if rule.gids else "",
            f"units {list(rule.units)}" if rule.units else "",
        ]
        print(f"  {name}: " + ("; ".join(w for w in who if w) or "nobody (empty rule)"))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from broker.daemon import start

    try:
        start.serve(config=args.config, binds=args.bind, control=args.control, user=args.user)
    except (ConfigError, IntakeError, PrivilegeError) as e:
        return _fail("serve", e.message, Exit.CONFIG)
    except BrokerError as e:
        return _fail("serve", e.message, Exit.FAILURE)
    return 0


COMMANDS: Final = {
    "exec": cmd_exec,
    "list": cmd_list,
    "status": cmd_status,
    "reload": cmd_reload,
    "check-config": cmd_check_config,
    "serve": cmd_serve,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    plain = plain_exec(words)
    if plain is not None:
        return exec_plain(*plain)
    from broker.usage import parser  # (everything but a plain exec)

    command = None
    if words[:1] == ["exec"] and "--" in words:
        # Everything before "--" is ours (options may follow the names), the rest the
        # command's, even if it looks like our options.
        split = words.index("--")
        words, command = words[:split], words[split + 1 :]
    args = parser().parse_args(words)
    if command is not None:
        args.command = command
    return COMMANDS[args.command_name](args)


if __name__ == "__main__":
    sys.exit(main())
