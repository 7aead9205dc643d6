"""The `port-broker` command: serve, exec, list, status, check-config.

Each subcommand imports only what it needs, so `port-broker exec` (on every worker's
start-up path) loads the standard library and the small client, never trio or pydantic.

Exit status: 0 success; 1 other failure; 2 usage; 66 unknown socket; 69 broker
unavailable; 77 access denied; 78 invalid configuration or sockets (serve, check-config;
systemd does not restart on it); 126/127 the command cannot be run (exec).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from broker import __version__
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
from broker.names import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    DEFAULT_SOCKET,
    SOCKET_ENV,
    Exit,
    exit_statuses,
    grantable_name_problem,
    transport,
    valid_name,
)

if TYPE_CHECKING:
    import socket

    from broker.exchange import Grant


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


# --- exec -------------------------------------------------------------------------


EXEC_USAGE: Final = (
    "usage: port-broker exec [--intercept [--map PORT=NAME]] NAME[,NAME...] -- COMMAND [ARGS...]"
)


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
    names = list(dict.fromkeys(_split_names([args.names or ""]) + list(mapping.values())))
    if not command or not names:
        raise ValueError(EXEC_USAGE)
    for name in names:
        problem = grantable_name_problem(name)
        if problem is not None:
            raise ValueError(f"{problem}; `port-broker list` shows the ones you may acquire")
    return names, mapping, command


def cmd_exec(args: argparse.Namespace) -> int:
    from broker.client import acquire_many

    try:
        names, mapping, command = _exec_arguments(args)
    except ValueError as e:
        return _fail("exec", str(e), 2)
    if args.intercept:
        from broker.intercept.seccomp import check_supported

        try:
            check_supported()  # before asking the broker for anything
        except InterceptError as e:
            return _fail("exec", e.message, Exit.FAILURE)
    try:
        grants = acquire_many(names, path=args.socket, timeout=args.timeout)
    except ClientError as e:
        return _client_failure("exec", e)
    if args.intercept:
        return _run_intercepted(grants, mapping, command)
    return _exec_in_place(grants, command)


def _cannot_run(command: list[str], error: OSError) -> int:
    if isinstance(error, FileNotFoundError):
        return _fail("exec", f"{command[0]}: command not found", Exit.NOT_FOUND)
    return _fail("exec", f"{command[0]}: cannot execute: {error.strerror}", Exit.CANNOT_EXECUTE)


def _exec_in_place(grants: Sequence[Grant], command: list[str]) -> int:
    """Replace this process with `command`, the sockets at fd 3..; return only on error."""
    from broker.launcher import exec_with

    try:
        exec_with(grants, command)
    except OSError as e:
        return _cannot_run(command, e)


def _run_intercepted(grants: Sequence[Grant], mapping: dict[int, str], command: list[str]) -> int:
    """Supervise `command`, giving its bind() to a held port the held socket."""
    import os

    from broker.intercept.idmap import Relay
    from broker.intercept.supervisor import run_intercepted

    held = [sock for _, sock in grants]
    port_map: dict[int, list[socket.socket]] | None = None
    relay = Relay(os.environ)  # newuidmap/newgidmap, which no_new_privs disarms
    try:
        if mapping:  # each socket on its own port, plus the ports --map sends elsewhere
            port_map = {}
            for sock in held:
                port_map.setdefault(sock.getsockname()[1], []).append(sock)
            for port, name in mapping.items():
                port_map[port] = [sock for granted, sock in grants if granted == name]
        return run_intercepted(
            command, held, port_map, env=relay.environment(), services=relay.services()
        )
    except OSError as e:
        return _cannot_run(command, e)
    except InterceptError as e:
        return _fail("exec", e.message, Exit.FAILURE)
    finally:
        relay.close()
        for sock in held:
            sock.close()


# --- list / status ----------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
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
    from broker.client import status
    from broker.status import format_status

    try:
        report = status(path=args.socket, timeout=args.timeout)
    except ClientError as e:
        return _client_failure("status", e)
    print(json.dumps(report, indent=2) if args.json else format_status(report))
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


def _positive_seconds(text: str) -> float:
    """argparse type: a number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above 0")
    return value


def _parser() -> argparse.ArgumentParser:
    from broker.client import DEFAULT_TIMEOUT
    from broker.protocol import RELOAD_TIMEOUT

    parser = argparse.ArgumentParser(
        prog="port-broker",
        description="Hand privileged listening sockets held by systemd to unprivileged "
        "workers: no capabilities, no setuid, no proxy.",
    )
    parser.add_argument("--version", action="version", version=f"port-broker {__version__}")
    commands = parser.add_subparsers(dest="command_name", metavar="COMMAND", required=True)

    def client_options(sub: argparse.ArgumentParser, timeout: float = DEFAULT_TIMEOUT) -> None:
        sub.add_argument(
            "--socket",
            metavar="PATH",
            help=f"the broker's control socket (default: ${SOCKET_ENV}, else {DEFAULT_SOCKET})",
        )
        sub.add_argument(
            "--timeout",
            type=_positive_seconds,
            default=timeout,
            metavar="SECONDS",
            help=f"give up on the broker after this long (default: {timeout:g})",
        )

    run = commands.add_parser(
        "exec",
        help="acquire sockets, then run a command with them at fd 3..",
        description="Acquire the named sockets, place them at fd 3, 4, … and replace this "
        "process with COMMAND, setting LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID "
        "as systemd does. Node: server.listen({fd: 3}). With --intercept, COMMAND "
        "needs to know nothing: it calls bind() as usual and gets the held socket.",
        epilog="examples: port-broker exec http,https -- node server.js\n"
        "          port-broker exec --intercept https -- npx vite --host --port 443\n\n"
        + textwrap.fill(
            f"exit status: COMMAND's own once it runs; before that {exit_statuses()}", 79
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    client_options(run)
    run.add_argument(
        "--intercept",
        action="store_true",
        help="for programs that bind() the port themselves: supervise COMMAND and give its "
        "bind() to a held port the held socket instead (Linux 5.9+, x86_64). COMMAND runs "
        "under no_new_privs: setuid programs lose their privilege, but newuidmap and "
        "newgidmap, which rootless podman needs, are run for it (docs/intercept.md)",
    )
    run.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="PORT=NAME",
        help="with --intercept: a bind() to PORT gets socket NAME (default: each socket "
        "its own port), e.g. --map 3000=http",
    )
    run.add_argument(
        "names",
        nargs="?",
        metavar="NAME[,NAME...]",
        help="socket names, e.g. http,https (optional with --map)",
    )
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]")
    run.set_defaults(func=cmd_exec)

    lister = commands.add_parser(
        "list",
        help="show the sockets you may acquire",
        description="Show the sockets the broker would give you (your uid, groups and "
        "unit, as the kernel reports them): name, protocol and address.",
    )
    client_options(lister)
    lister.add_argument("--json", action="store_true", help="print JSON")
    lister.set_defaults(func=cmd_list)

    stat = commands.add_parser(
        "status",
        help="show what the broker holds and has granted",
        description="Show the broker's state: its sockets, grants and denials per socket, "
        "connections, and recent decisions. Allowed by [status] in the configuration "
        "(default: root only).",
    )
    client_options(stat)
    stat.add_argument("--json", action="store_true", help="print the full report as JSON")
    stat.set_defaults(func=cmd_status)

    check = commands.add_parser(
        "check-config",
        help="validate a configuration file",
        description=f"Validate FILE (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG}) as "
        "`serve` would, PORT_BROKER_* overrides included, without serving; users and "
        f"groups must exist here. Exit status {int(Exit.CONFIG)} if it is invalid.",
    )
    check.add_argument("file", nargs="?", metavar="FILE", help="the TOML policy file")
    check.set_defaults(func=cmd_check_config)

    reload = commands.add_parser(
        "reload",
        help="make the broker read its configuration again, and wait until it has",
        description="Make the broker read its configuration again, and wait until it "
        "has: what `systemctl reload port-broker.service` runs (ExecReload=). A valid "
        "new configuration applies to every request from then on, connected clients "
        "included, and this prints its generation; an invalid one is refused, this "
        f"says why and exits {int(Exit.CONFIG)}, and the configuration in force stays. "
        "Only root and the broker's own user may (as with SIGHUP, which reloads too, "
        "without waiting). Sockets are not reloaded: a new one needs a restart.",
    )
    client_options(reload, timeout=2 * RELOAD_TIMEOUT + 5)  # (a reload may be running)
    reload.set_defaults(func=cmd_reload)

    serve = commands.add_parser(
        "serve",
        help="run the broker",
        description="Serve the sockets systemd passed (LISTEN_FDS, named by "
        "FileDescriptorName=; 'control' is the broker's own). Without systemd, "
        "--bind and --control bind them here as root, then --user drops to an "
        "unprivileged user before any client is served.",
    )
    serve.add_argument(
        "--config",
        metavar="FILE",
        help=f"policy file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG})",
    )
    serve.add_argument(
        "--bind",
        action="append",
        default=[],
        metavar="NAME=ADDRESS",
        help="bind a socket here: http=[::]:80, http=0.0.0.0:80, http=80, "
        "quic=udp:[::]:443, api=/run/api.sock, api=@abstract-name (repeatable)",
    )
    serve.add_argument(
        "--control", metavar="PATH", help="bind the control socket here (with --bind)"
    )
    serve.add_argument(
        "--user",
        metavar="NAME|UID[:GID]",
        help="after binding as root, become this user (with --bind); a uid the user "
        "database does not know is taken as it is",
    )
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    command = None
    if words[:1] == ["exec"] and "--" in words:
        # Everything before "--" is ours (options may follow the names), the rest the
        # command's, even if it looks like our options.
        split = words.index("--")
        words, command = words[:split], words[split + 1 :]
    args = _parser().parse_args(words)
    if command is not None:
        args.command = command
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
