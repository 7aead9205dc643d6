"""The command line's words: every subcommand, option and help text of `port-broker`,
as argparse reads and prints them. `--help`, usage errors and the manual pages
(broker/manual.py) all come from `parser()`; broker/cli.py runs what it reads.

Must never: run anything (it only describes), or be imported on the path of a plain
`port-broker exec` that needs no help (argparse costs a worker's start-up a third of an
interpreter's start: broker/cli.py reads that form itself, and comes here for
everything else).
"""

from __future__ import annotations

import argparse
import textwrap

from broker import __version__, names
from broker.exchange import DEFAULT_TIMEOUT, RELOAD_WAIT
from broker.names import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    DEFAULT_SOCKET,
    SOCKET_ENV,
    Exit,
    exit_statuses,
)


def positive_seconds(text: str) -> float:
    """argparse type: a timeout a client takes (`names.positive_seconds`, which a
    plain `exec` reads with)."""
    value = names.positive_seconds(text)
    if value is None:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a number of seconds above 0 and at most {names.MOST_SECONDS:g}"
        )
    return value


def parser() -> argparse.ArgumentParser:
    """The whole command line: every subcommand, option and help text."""
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
            type=positive_seconds,
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

    lister = commands.add_parser(
        "list",
        help="show the sockets you may acquire",
        description="Show the sockets the broker would give you (your uid, groups and "
        "unit, as the kernel reports them): name, protocol and address.",
    )
    client_options(lister)
    lister.add_argument("--json", action="store_true", help="print JSON")

    stat = commands.add_parser(
        "status",
        help="show what the broker holds and has granted",
        description="Show the broker's state: its sockets, grants and denials per socket, "
        "connections, and recent decisions. Allowed by [status] in the configuration "
        "(default: root only).",
    )
    client_options(stat)
    stat.add_argument("--json", action="store_true", help="print the full report as JSON")

    check = commands.add_parser(
        "check-config",
        help="validate a configuration file",
        description=f"Validate FILE (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG}) as "
        "`serve` would, PORT_BROKER_* overrides included, without serving; users and "
        f"groups must exist here. Exit status {Exit.CONFIG} if it is invalid.",
    )
    check.add_argument("file", nargs="?", metavar="FILE", help="the TOML policy file")

    reload = commands.add_parser(
        "reload",
        help="make the broker read its configuration again, and wait until it has",
        description="Make the broker read its configuration again, and wait until it "
        "has: what `systemctl reload port-broker.service` runs (ExecReload=). A valid "
        "new configuration applies to every request from then on, connected clients "
        "included, and this prints its generation; an invalid one is refused, this "
        f"says why and exits {Exit.CONFIG}, and the configuration in force stays. "
        "Only root and the broker's own user may (as with SIGHUP, which reloads too, "
        "without waiting). Sockets are not reloaded: a new one needs a restart.",
    )
    client_options(reload, timeout=RELOAD_WAIT)  # (a reload may be running)

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
    return parser
