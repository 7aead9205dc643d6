"""The manual pages and shell completion, made from what the program itself says.

- port-broker(1): every subcommand, option and exit status, from the argument parser
  that `--help` prints (`usage.parser`) and the exit statuses of `names.EXIT_MEANINGS`;
- port-broker.toml(5): docs/configuration.md turned into roff, once its table of
  settings has been checked against the settings `config.py` declares (default and
  bounds): a page that disagrees with the code is not written;
- bash completion: the subcommands, their options and what each option takes, from the
  same parser.

`python -m broker.manual DOCS_DIR OUT_DIR` writes port-broker.1, port-broker.toml.5 and
the completion script `port-broker` (the Debian package's build does, debian/rules).

Must never: be imported by anything that serves or runs a worker (it is for building
the documentation), or write anywhere but the directory it is given.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from broker import __version__, names, roff
from broker.daemon import config
from broker.usage import parser as command_line

TITLE: Final = "Hand privileged listening sockets held by systemd to unprivileged workers"
"""The NAME line of port-broker(1): what `apropos` shows."""

CONFIG_TITLE: Final = "the policy and limits of port-broker"
"""The NAME line of port-broker.toml(5)."""

UNIT_DIR: Final = "/usr/lib/systemd/system"
"""Where the Debian package puts the shipped units (FILES of port-broker(1))."""

DOC_DIR: Final = "/usr/share/doc/port-broker"
"""Where the Debian package puts README.md and docs/ (SEE ALSO)."""

VALUE_COMPLETION: Final = {"FILE": "file", "PATH": "file", "NAME|UID[:GID]": "user"}
"""What bash completes after an option, by the option's metavar (anything else: nothing,
the value is the user's to write)."""


def header(name: str, section: int, date: str, manual: str) -> list[str]:
    """.TH, then no hyphenation (HY: also after .SY/.YS) and a ragged right margin, so
    that paths and options stay whole."""
    return [f'.TH {roff.escape(name.upper())} {section} "{date}" "port\\-broker {__version__}" '
            f'"{manual}"', ".nr HY 0", ".nh", ".ad l"]  # fmt: skip


def build_date(environ: Mapping[str, str] = os.environ) -> str:
    """The date on the pages: SOURCE_DATE_EPOCH's (the changelog's, in a Debian build,
    so that the same source makes the same pages), else today."""
    epoch = environ.get("SOURCE_DATE_EPOCH")
    when = (
        datetime.datetime.fromtimestamp(int(epoch), datetime.UTC)
        if epoch
        else datetime.datetime.now(datetime.UTC)
    )
    return when.strftime("%Y-%m-%d")


# --- the settings, held against docs/configuration.md -----------------------------

_BOUND_WORDS: Final = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤"}
_EN_DASH: Final = "\u2013"
"""Between the bounds of a range, as the docs write it (1 to 65536)."""


def bounds_text(setting: Any) -> str:
    """How docs/configuration.md writes a setting's bounds: "1", an en dash, "65536" for
    an integer between two inclusive bounds, else "> 0, ≤ 300"."""
    bounds: dict[str, float] = setting.metadata["bounds"]
    if setting.metadata["kind"] is int and set(bounds) == {"ge", "le"}:
        return f"{bounds['ge']}{_EN_DASH}{bounds['le']}"
    return ", ".join(f"{_BOUND_WORDS[key]} {value:g}" for key, value in bounds.items())


def settings_problems(document: str) -> list[str]:
    """What the table of keys in docs/configuration.md says differently from the
    settings `config.SETTINGS` declares: a missing row, a default, a bound. Empty if
    they agree."""
    table = document.split("## Keys", 1)[-1]
    rows = {
        cells[0].strip("`"): cells
        for cells in (roff.cells(row) for row in table.splitlines() if row.startswith("| `"))
    }
    problems: list[str] = []
    for setting in config.SETTINGS:
        cells = rows.get(setting.name)
        if cells is None:
            problems.append(f"{setting.name}: no row in the table of keys")
            continue
        _, kind, default, _meaning = cells
        if default != str(setting.default):
            problems.append(f"{setting.name}: default {default}, but the code says "
                            f"{setting.default}")  # fmt: skip
        if bounds_text(setting) not in kind:
            problems.append(f"{setting.name}: type {kind!r} does not say the bounds "
                            f"{bounds_text(setting)!r}")  # fmt: skip
    return problems


# --- the command line (port-broker(1), completion) --------------------------------


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommands' parsers, by name, in the order --help lists them (argparse has
    no public way to walk them: this reads its actions, as argparse-manpage does)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def summaries(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each subcommand's one-line help, by name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {choice.dest: choice.help or "" for choice in action._choices_actions}
    return {}


def options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    """The parser's options and positional arguments, without -h/--help."""
    for action in parser._actions:
        if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            yield action


def usage(parser: argparse.ArgumentParser) -> str:
    """The usage line --help prints, on one line."""
    return " ".join(parser.format_usage().removeprefix("usage: ").split())


def _option_tag(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"\\fI{roff.escape(str(action.metavar))}\\fR"
    tag = ", ".join(f"\\fB{roff.escape(flag)}\\fR" for flag in action.option_strings)
    if action.nargs != 0:
        tag += f" \\fI{roff.escape(str(action.metavar))}\\fR"
    return tag


def _epilog(text: str) -> list[str]:
    """An epilog's paragraphs: aligned ones (examples) as they are, others filled."""
    out: list[str] = []
    for paragraph in filter(None, text.split("\n\n")):
        lines = paragraph.splitlines()
        if any(part.startswith(" ") for part in lines[1:]):
            out += [".PP", ".nf", *(roff.line(roff.escape(part)) for part in lines), ".fi"]
        else:
            out += [".PP", roff.inline(" ".join(lines))]
    return out


def command_page(date: str) -> str:
    """port-broker(1)."""
    parser = command_line()
    commands = subcommands(parser)
    helps = summaries(parser)
    out = header("port-broker", 1, date, "User Commands")
    out += [".SH NAME", f"port\\-broker \\- {roff.escape(TITLE[0].lower() + TITLE[1:])}"]
    out += [".SH SYNOPSIS", ".SY port\\-broker", f"[{roff.bold('--version')}]", ".YS"]
    for name, sub in commands.items():
        words = usage(sub).removeprefix(f"port-broker {name}").strip()
        out += [f'.SY "port\\-broker {roff.escape(name)}"', roff.line(roff.escape(words)), ".YS"]
    out += [".SH DESCRIPTION", roff.inline(parser.description or ""), ".PP", "Commands:"]
    out += roff.tagged((roff.bold(name), roff.inline(helps[name])) for name in commands)
    out.append(".SH COMMANDS")
    for name, sub in commands.items():
        out += [f".SS {roff.escape(name)}", roff.inline(sub.description or "")]
        out += roff.tagged(
            (_option_tag(action), roff.inline(action.help or "")) for action in options(sub)
        )
        out += _epilog(sub.epilog or "")
    out += [".SH OPTIONS"]
    out += roff.tagged(
        [
            (roff.bold("--version"), "Print the version and exit."),
            (f"{roff.bold('-h')}, {roff.bold('--help')}", "Print the usage (of the program or of a "
             "command) and exit."),
        ]
    )  # fmt: skip
    out += [".SH EXIT STATUS"]
    out += roff.tagged(
        (str(status), roff.escape(meaning)) for status, meaning in names.EXIT_MEANINGS.items()
    )
    out += [
        ".PP",
        roff.inline(EXIT_NOTE.format(exec=names.exit_statuses(), config=names.Exit.CONFIG)),
    ]
    out += [".SH ENVIRONMENT", *roff.tagged(_environment()), ".SH FILES", *roff.tagged(_files())]
    see_also = ("port-broker.toml(5)", "systemd.socket(5)", "sd_listen_fds(3)", "journalctl(1)")
    out += [".SH SEE ALSO", _see_also(*see_also), ".PP"]
    out.append(roff.inline(f"{DOC_DIR}/README.md and the documents beside it."))
    return "\n".join(out) + "\n"


EXIT_NOTE: Final = (
    "`exec` exits with its command's status once the command runs; before that with "
    "{exec}. `serve`, `check-config` and `reload` exit with {config} on an invalid "
    "configuration; systemd does not restart the broker on it."
)


def _environment() -> list[tuple[str, str]]:
    socket, config_file = names.DEFAULT_SOCKET, names.DEFAULT_CONFIG
    return [
        (roff.bold(names.SOCKET_ENV), roff.inline(f"The broker's control socket, for every client "
                                        f"command (default: `{socket}`).")),
        (roff.bold(names.CONFIG_ENV), roff.inline(f"The configuration file of `serve` and "
                                        f"`check-config` (default: `{config_file}`).")),
        (roff.bold(names.ENV_PREFIX) + "\\fINAME\\fR",
         roff.inline("Overrides a setting of the configuration file: see port-broker.toml(5).")),
        (", ".join(roff.bold(v) for v in ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID")),
         roff.inline("The sockets systemd passes to `serve`, and those `exec` passes to its "
                "command (sd_listen_fds(3)).")),
    ]  # fmt: skip


SHIPPED_UNITS: Final = (
    "port-broker.service",
    "port-broker.socket",
    "port-broker-http.socket",
    "port-broker-https.socket",
    "port-broker-quic.socket",
)
"""The units in units/, as FILES of port-broker(1) lists them."""


def _files() -> list[tuple[str, str]]:
    units = ", ".join(f"`{unit}`" for unit in SHIPPED_UNITS)
    return [
        (roff.escape(names.DEFAULT_CONFIG),
         roff.inline("The policy: who may acquire which socket (port-broker.toml(5)).")),
        (roff.escape(names.DEFAULT_SOCKET),
         roff.inline("The broker's control socket (`port-broker.socket`).")),
        (roff.escape(f"{UNIT_DIR}/port-broker*"), roff.inline(f"The units: {units}.")),
    ]  # fmt: skip


def _see_also(*pages: str) -> str:
    """`.BR page (N),` lines for "page(N)" names."""
    refs = (page.partition("(") for page in pages)
    return ",\n".join(f".BR {roff.escape(name)} ({section}" for name, _, section in refs)


def config_page(document: str, date: str) -> str:
    """port-broker.toml(5), from docs/configuration.md.

    Raises:
        ValueError: if the document's table of keys disagrees with `config.SETTINGS`.
    """
    problems = settings_problems(document)
    if problems:
        raise ValueError(
            "docs/configuration.md disagrees with broker/daemon/config.py: "
            + "; ".join(problems)
            + ". Correct the table of keys (or the setting) so that both say the same."
        )
    out = header("port-broker.toml", 5, date, "File Formats")
    out += [".SH NAME", f"port\\-broker.toml \\- {roff.escape(CONFIG_TITLE)}"]
    out += [
        ".SH SYNOPSIS",
        roff.escape(names.DEFAULT_CONFIG),
        ".SH DESCRIPTION",
        *roff.markdown(document),
    ]
    out += [".SH SEE ALSO", _see_also("port-broker(1)", "systemd.socket(5)")]
    return "\n".join(out) + "\n"


# --- bash completion --------------------------------------------------------------

_BASH: Final = """\
# bash completion for port-broker: made from its argument parser (broker/manual.py).
_port_broker_nothing() {{
    compopt +o default +o bashdefault 2>/dev/null
}}
_port_broker() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}} i
    COMPREPLY=()
    if ((COMP_CWORD == 1)); then
        COMPREPLY=($(compgen -W "{commands} --help --version" -- "$cur"))
        return
    fi
    local command=${{COMP_WORDS[1]}}
    if [[ $command == exec ]]; then    # after --: the command, then its files
        for ((i = 2; i < COMP_CWORD; i++)); do
            if [[ ${{COMP_WORDS[i]}} == -- ]]; then
                ((COMP_CWORD == i + 1)) && COMPREPLY=($(compgen -c -- "$cur"))
                return
            fi
        done
    fi
    case $command:$prev in
{values}
    esac
    case $command in
{options}
    esac
    if [[ $command == exec ]]; then    # the sockets this user may acquire
        _port_broker_nothing
        COMPREPLY=($(compgen -W "$(port-broker list --timeout 1 2>/dev/null \\
            | awk 'NR > 1 {{print $1}}')" -- "$cur"))
    fi
}}
complete -o bashdefault -o default -F _port_broker port-broker
"""


def bash_completion() -> str:
    """The bash completion script for port-broker."""
    commands = subcommands(command_line())
    values: list[str] = []
    flags: list[str] = []
    for name, sub in commands.items():
        for action in options(sub):
            if not action.option_strings or action.nargs == 0:
                continue
            kind = VALUE_COMPLETION.get(str(action.metavar), "")
            pattern = "|".join(f"{name}:{flag}" for flag in action.option_strings)
            values.append(f"        {pattern}) {_BASH_VALUE[kind]} ;;")
        words = [flag for a in options(sub) for flag in a.option_strings] + ["--help"]
        flags.append(
            f"        {name}) [[ $cur == -* ]] && "
            f'COMPREPLY=($(compgen -W "{" ".join(words)}" -- "$cur")) && return ;;'
        )
    return _BASH.format(
        commands=" ".join(commands), values="\n".join(values), options="\n".join(flags)
    )


_BASH_VALUE: Final = {
    "file": "return",  # nothing here: bash's own file name completion (-o default)
    "user": 'COMPREPLY=($(compgen -u -- "$cur")); return',
    "": "_port_broker_nothing; return",  # a number, an address: the user's to write
}


# --- entry ------------------------------------------------------------------------


def write_all(docs: Path, out: Path) -> list[Path]:
    """Write port-broker.1, port-broker.toml.5 and the bash completion `port-broker`
    into `out`; return their paths.

    Raises:
        ValueError: if docs/configuration.md disagrees with the settings.
    """
    date = build_date()
    pages = {
        "port-broker.1": command_page(date),
        "port-broker.toml.5": config_page((docs / "configuration.md").read_text(), date),
        "port-broker": bash_completion(),
    }
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, text in pages.items():
        (out / name).write_text(text)
        written.append(out / name)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        sys.stderr.write("usage: python -m broker.manual DOCS_DIR OUT_DIR\n")
        return names.Exit.USAGE
    try:
        for path in write_all(Path(args[0]), Path(args[1])):
            print(f"wrote {path}")
    except (ValueError, OSError) as e:
        sys.stderr.write(f"broker.manual: {e}\n")
        return names.Exit.FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
