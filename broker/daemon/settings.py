"""Reading and validating the configuration: a TOML file plus `PORT_BROKER_*` overrides.

The pydantic-settings half of `broker.daemon.config`: `load()` here turns a file and the
environment into a `Config` holding a ready `Policy` in which every user and group name
is already resolved to its id. Anything wrong — TOML syntax, an unknown key, a bad
value, a user or group the system does not know — is a `ConfigError` naming the file
(or environment variable) and the key, before any socket is served.

Example (docs/configuration.md has the whole reference)::

    [sockets.http]
    users = ["www-data", 1000]
    groups = ["web"]
    units = ["node-app.service", "machine-*.scope"]

Must never: be imported on the client path, nor by the serving broker, which reads the
configuration through `broker.daemon.loader.Load` (a child interpreter) so that
pydantic's ~15 MB stay out of its memory.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import stat
import tomllib
from collections.abc import Iterator, Mapping
from fnmatch import fnmatchcase
from functools import partial
from typing import Annotated, Any, Final, cast

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    create_model,
    field_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from broker.daemon import config
from broker.daemon.config import Config
from broker.daemon.policy import Policy, Rule
from broker.errors import ConfigError
from broker.names import CONFIG_ENV, ENV_PREFIX, LOCATION_ENV, grantable_name_problem

MAX_CONFIG_BYTES: Final = 1 << 20
"""The largest configuration file (and environment override) read: a policy naming ten
thousand users is about 200 KiB. Bigger is a mistake, and would cost the loader memory
many times its size."""

MAX_ID: Final = 2**32 - 2  # (uid_t)-1 means "no id" to the kernel
_UNIT_PATTERN: Final = re.compile(r"[A-Za-z0-9:_.\\@*?\[\]-]+\.(service|scope)")


def _resolve_id(entry: int | str, kind: str) -> int:
    if isinstance(entry, int) or (entry.isascii() and entry.isdigit()):
        number = int(entry)
        if not 0 <= number <= MAX_ID:
            raise ValueError(f"{kind} id {number} is out of range 0..{MAX_ID}")
        return number
    try:
        if kind == "user":
            return pwd.getpwnam(entry).pw_uid
        return grp.getgrnam(entry).gr_gid
    except KeyError:
        raise ValueError(
            f"unknown {kind} {entry!r}: not in the {kind} database; create it, fix the "
            f"spelling, or give a numeric id (for ids that exist only in containers)"
        ) from None


# StrictInt: a TOML `true` or `1.0` is a mistake, not uid 1.
UserId = Annotated[StrictInt | str, AfterValidator(partial(_resolve_id, kind="user"))]
GroupId = Annotated[StrictInt | str, AfterValidator(partial(_resolve_id, kind="group"))]


_USERS_OWN_UNITS: Final = (
    *(("user@", f"user@{uid}.service", "every process of a user's own service manager")
      for uid in (*range(1000, 1010), 0, 65534, 100000)),
    *(("session-", f"session-{n}.scope", "every process of a login session")
      for n in ("1", "c1", *map(str, range(10, 20)))),
)  # fmt: skip
"""Units whose processes any user starts, each with the prefix a pattern must start
with to mean them: a glob (`*.service`) that matches them by accident would hand the
socket to every logged-in user (docs/security.md)."""


class RuleSettings(BaseModel):
    """Who may have a socket (or read the status): users, groups, units. Default: nobody."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Names are resolved to ids as they are validated (each once: a user database that
    # answers differently the second time cannot make the two disagree).
    users: list[UserId] = Field(default_factory=list, description="user names or uids")
    groups: list[GroupId] = Field(default_factory=list, description="group names or gids")
    units: list[str] = Field(
        default_factory=list, description="systemd services/scopes, glob patterns allowed"
    )

    @field_validator("units")
    @classmethod
    def _unit_names(cls, value: list[str]) -> list[str]:
        for entry in value:
            if not _UNIT_PATTERN.fullmatch(entry):
                raise ValueError(
                    f"{entry!r} is not a service or scope name or pattern "
                    "(examples: 'web.service', 'machine-*.scope')"
                )
            for prefix, example, meaning in _USERS_OWN_UNITS:
                if fnmatchcase(example, entry) and not entry.startswith(prefix):
                    raise ValueError(
                        f"{entry!r} also matches {example} ({meaning}), and so whatever any "
                        f"logged-in user runs; name the units meant (web.service, "
                        f"web-*.service), or write {prefix}... if that is what is meant"
                    )
        return value

    def to_rule(self) -> Rule:
        """Return the policy rule with every name resolved to its id."""
        return Rule(
            uids=frozenset(map(int, self.users)),  # ids by now (see UserId)
            gids=frozenset(map(int, self.groups)),
            units=tuple(self.units),
        )


def _settings_variables(environ: Mapping[str, str]) -> Iterator[tuple[str, list[str]]]:
    """Each `PORT_BROKER_*` variable that sets a setting, with the key path it names in
    lower case (`PORT_BROKER_SOCKETS__HTTP__USERS` → sockets, http, users), read as
    pydantic-settings reads them (`Settings.model_config`: the name in any case): for
    the checks and error messages that name a variable."""
    for variable in environ:
        folded = variable.upper()
        if folded.startswith(ENV_PREFIX) and folded not in LOCATION_ENV:
            yield variable, variable[len(ENV_PREFIX) :].lower().split("__")


class Settings(BaseSettings):
    """Everything the broker reads at start. The TOML file's top level maps onto this."""

    # The environment's PORT_BROKER_* variables, read by pydantic-settings' own source:
    # `__` descends into a table, and tables and lists are JSON (what
    # `_check_environment` has vetted first, naming the variable at fault).
    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
    )

    sockets: dict[str, RuleSettings] = Field(
        default_factory=dict, description="socket name (FileDescriptorName=) → who may have it"
    )
    status: RuleSettings = Field(
        default_factory=lambda: RuleSettings(users=[0]),
        description="who may read `port-broker status` (default: root only)",
    )
    # The scalar settings (max_connections, ...) come from config.SETTINGS: see
    # `_with_scalars` below.

    @field_validator(*(f.name for f in config.SETTINGS), mode="before", check_fields=False)
    @classmethod
    def _not_boolean(cls, value: object) -> object:
        if isinstance(value, bool):  # else pydantic takes `true` for 1
            raise ValueError("expected a number, not true or false")  # noqa: TRY004 (pydantic reports ValueError)
        return value

    @field_validator("sockets")
    @classmethod
    def _socket_names(cls, value: dict[str, RuleSettings]) -> dict[str, RuleSettings]:
        for name in value:
            problem = grantable_name_problem(name)
            if problem is not None:
                raise ValueError(
                    f"{problem}; a socket's name is its .socket unit's FileDescriptorName="
                )
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's contents arrive as init arguments; the environment overrides them,
        # key by key (a variable for one rule's list leaves the rest of the file's rules).
        return env_settings, init_settings


def _with_scalars(base: type[Settings]) -> type[Settings]:
    """`base` plus a field per scalar setting, as `config` declares them."""
    scalars: dict[str, Any] = {
        f.name: (
            f.metadata["kind"],
            Field(f.default, description=f.metadata["description"], **f.metadata["bounds"]),
        )
        for f in config.SETTINGS
    }
    return cast("type[Settings]", create_model(base.__name__, __base__=base, **scalars))


_Settings: Final = _with_scalars(Settings)
"""The model a file and its overrides are validated against."""


def _key(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _describe(error: Mapping[str, Any]) -> str:
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
        parent = _model_at(tuple(error["loc"][:-1]))
        if parent is not None:
            message += f"; known keys: {', '.join(parent.model_fields)}"
    return message


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    if not loc:
        return _Settings
    if loc[0] == "status" or (loc[0] == "sockets" and len(loc) == 2):
        return RuleSettings
    return None


_JSON_SETTINGS: Final = frozenset({ENV_PREFIX + "SOCKETS", ENV_PREFIX + "STATUS"})
"""Variables (and their `__` children) whose values are tables or lists, so JSON."""


def _check_environment(environ: Mapping[str, str]) -> None:
    known = {ENV_PREFIX + name.upper() for name in _Settings.model_fields}
    seen: dict[str, str] = {}
    for variable, path in _settings_variables(environ):
        if len(environ[variable]) > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"environment variable {variable}: longer than {MAX_CONFIG_BYTES // 1024} "
                "KiB, the most the broker reads"
            )
        twin = seen.setdefault("__".join(path), variable)
        if twin != variable:
            raise ConfigError(
                f"environment variables {twin} and {variable} set the same key (names are "
                "read in any case); keep one"
            )
        head, nested, _ = variable.upper().partition("__")
        if head not in known:
            raise ConfigError(
                f"environment variable {variable}: unknown setting; known: "
                f"{', '.join(sorted(known | LOCATION_ENV))}"
            )
        if nested and head not in _JSON_SETTINGS:
            raise ConfigError(
                f"environment variable {variable}: {head} is a single value, not a table; "
                f"set {head} itself"
            )
        if head in _JSON_SETTINGS:  # else pydantic-settings raises, naming no variable
            try:
                json.loads(environ[variable])
            except ValueError:
                raise ConfigError(
                    f"environment variable {variable}: not JSON; tables and lists are "
                    f"given as JSON, e.g. {ENV_PREFIX}SOCKETS__HTTP__USERS='[\"nobody\"]'"
                ) from None


def _source_variable(loc: tuple[int | str, ...], environ: Mapping[str, str]) -> str | None:
    """Return the `PORT_BROKER_*` variable in `environ` that set the key at `loc`, if any."""
    key = [str(part).lower() for part in loc]
    for variable, parts in _settings_variables(environ):
        shorter = min(len(parts), len(key))  # one names the other's table, or the same key
        if key and parts[:shorter] == key[:shorter]:
            return variable
    return None


def _read(path: str) -> bytes:
    """The file's bytes: a regular file of at most MAX_CONFIG_BYTES, opened without
    blocking (a FIFO must not hang the broker's start).

    Raises:
        ConfigError: for anything but such a file.
        OSError: if it cannot be opened or read (FileNotFoundError among them).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        mode = os.fstat(fd).st_mode
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise ConfigError(f"{path}: {kind}; the configuration is a TOML file")
    with open(fd, "rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB, the most the broker reads; "
            "is it the right file?"
        )
    return data


def load(path: str | None = None) -> Config:
    """Load, validate and resolve the configuration: the file, and `PORT_BROKER_*`
    overrides from this process's environment.

    Args:
        path: The TOML file; None means $PORT_BROKER_CONFIG, else names.DEFAULT_CONFIG.

    Raises:
        ConfigError: naming the file or variable and the key, for anything invalid, and
            for a missing file that was asked for explicitly.
    """
    environ = os.environ
    path, explicit = config.resolve_path(path, environ)
    data: dict[str, Any] = {}
    exists = True
    try:
        data = tomllib.loads(_read(path).decode())
    except FileNotFoundError:
        if explicit:
            raise ConfigError(
                f"{path}: no such file (asked for with --config or {CONFIG_ENV})"
            ) from None
        exists = False
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:  # TOML is UTF-8
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 at byte {e.start}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    _check_environment(environ)
    try:
        settings = _Settings(**data)
    except ValidationError as e:
        first = e.errors()[0]
        key = _key(tuple(first["loc"]))
        where = path
        variable = _source_variable(tuple(first["loc"]), environ)
        if variable is not None:
            where = f"{path} (overridden by environment variable {variable})"
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise ConfigError(f"{where}: {key}: {_describe(first)}{more}") from None
    policy = Policy(
        sockets={name: rule.to_rule() for name, rule in settings.sockets.items()},
        status=settings.status.to_rule(),
        source=path,
    )
    scalars = {f.name: getattr(settings, f.name) for f in config.SETTINGS}
    return Config(path=path, exists=exists, policy=policy, **scalars)
