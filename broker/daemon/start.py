"""`port-broker serve`: the daemon's start-up, one step after another, as
s6-fdholder-daemon's exec chain (bind → drop privileges → serve):

1. start the configuration loader child, before importing trio: the two overlap, and
   pydantic never enters the broker (broker/daemon/loader.py);
2. import everything the server needs, before any privilege change (after it, the
   interpreter may no longer read its own modules);
3. take the sockets: systemd's (LISTEN_FDS), or bind them here as root, once `--user`
   is known to exist (broker/daemon/activation.py);
4. check the configuration against the sockets, then drop to `--user`
   (broker/daemon/privileges.py), fit RLIMIT_NOFILE to the limits, and log what is served;
5. serve until SIGTERM (broker/daemon/driver.py).

A start refused after binding removes the control socket file it bound (it is still
root then); one refused before binds nothing.

Must never: serve a socket before the configuration is checked against it, keep root
past step 4's checks, or serve as root without saying so.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from broker.daemon.audit import Level
from broker.daemon.config import unheld_rules
from broker.daemon.loader import Load
from broker.errors import ConfigError, IntakeError

if TYPE_CHECKING:
    from broker.daemon.activation import Intake
    from broker.daemon.audit import Audit
    from broker.daemon.config import Config

FD_HEADROOM: Final = 64
"""Open files the broker needs besides its clients: stdio, the held and control sockets'
slack, trio's epoll and wakeup fds, the journal socket, pidfds being checked."""


def serve(
    *, config: str | None, binds: Sequence[str], control: str | None, user: str | None
) -> None:
    """Start up (steps 1-4) and serve until SIGTERM or SIGINT.

    Raises:
        ConfigError, IntakeError, PrivilegeError: the configuration or the sockets
            cannot be served (the message says what to change).
        BrokerError: anything else that keeps the broker from starting.
    """
    # Until the server takes SIGHUP (a reload), and after it stops, a `port-broker reload`
    # must not kill the broker: SIGHUP's default action would.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    loader = Load(config)
    import trio  # noqa: PLC0415 (step 2: while the loader child works)

    from broker.daemon import activation, driver, privileges  # noqa: PLC0415
    from broker.daemon.audit import Audit  # noqa: PLC0415

    audit = Audit()
    loaded = loader.result()
    if binds or control:
        intake = _bind(binds, control, user)
    elif user:
        raise IntakeError(
            "--user only applies with --bind/--control; under systemd set DynamicUser= "
            "or User= in port-broker.service"
        )
    else:
        intake = activation.from_systemd()
    try:
        _check(loaded, intake, audit)
        if user:  # after the checks: a refused start can still remove what it bound
            privileges.drop_privileges(user)
        if os.geteuid() == 0:
            audit.log(
                Level.WARNING,
                "serving as root: run the broker under DynamicUser= or --user instead; it "
                "needs no privilege at all",
            )
        else:
            _check_own_uid(audit)
        fit_open_files(loaded.max_connections, intake, audit)
        summary = "; ".join(
            f"{s.info.name} {s.info.address}" for group in intake.held.values() for s in group
        )
        audit.log(Level.INFO, f"serving {summary or 'no sockets'} under {loaded.path}")
        # Only a broker systemd started from its sockets is started again by them.
        restartable = not (binds or control) and bool(os.environ.get("NOTIFY_SOCKET"))
        trio.run(driver.Broker(intake, loaded, audit, restartable=restartable).serve)
    except BaseException:
        if control:  # bound here as root: a refused start leaves no socket file behind
            with contextlib.suppress(OSError):
                os.unlink(control)
        raise
    finally:
        intake.close()
        audit.close()  # what waits for journald: a moment to go


def _bind(binds: Sequence[str], control: str | None, user: str | None) -> Intake:
    """Step 3 without systemd: bind as root (`user` is dropped to after the checks)."""
    from broker.daemon import activation, privileges  # noqa: PLC0415 (imported in step 2)

    if not control:
        raise IntakeError("--bind needs --control PATH for the broker's own socket")
    if os.geteuid() == 0 and not user:
        raise IntakeError(
            "refusing to serve as root: pass --user NAME to drop to after binding "
            "(e.g. --user port-broker)"
        )
    if user:
        privileges.resolve_user(user)  # an unknown user is refused before anything is bound
    specs = [activation.BindSpec.parse(spec) for spec in binds]
    return activation.bind_all(specs, control)


def _check(loaded: Config, intake: Intake, audit: Audit) -> None:
    """Step 4: every rule names a socket the broker holds; say what looks wrong."""
    problem = unheld_rules(loaded, intake.held)
    if problem is not None:
        raise ConfigError(problem)
    if not loaded.exists:
        audit.log(Level.WARNING, f"{loaded.path} does not exist: every request will be denied")
    for name in sorted(set(intake.held) - set(loaded.policy.sockets)):
        audit.log(
            Level.WARNING, f"socket {name!r} has no rule in {loaded.path}: nobody may acquire it"
        )


def _check_own_uid(audit: Audit) -> None:
    """Say loudly if other processes run as our uid (docs/security.md, V7)."""
    from broker.daemon import privileges  # noqa: PLC0415 (imported in step 2)

    uid = os.geteuid()
    others = privileges.sharing_uid(uid)
    if others:
        shown = ", ".join(f"pid {pid} ({name})" for pid, name in others[: privileges.SHARERS_SHOWN])
        more = f" and {len(others) - privileges.SHARERS_SHOWN} more" if len(others) > 5 else ""
        audit.log(
            Level.WARNING,
            f"other processes run as uid {uid}, the broker's: {shown}{more}. Any of them "
            "can make the kernel refuse every grant (fds in flight count per uid), signal "
            "the broker or trace it: give the broker a uid of its own (DynamicUser=yes, "
            "or --user with a user nothing else runs as)",
        )


def fit_open_files(max_connections: int, intake: Intake, audit: Audit) -> None:
    """Raise RLIMIT_NOFILE's soft limit so that `max_connections` clients fit, and the fds
    they may hold unread (broker/daemon/inflight.py: the kernel refuses to pass more once those
    pass this limit), or say why not."""
    held = sum(map(len, intake.held.values()))
    connections = max_connections + held + FD_HEADROOM
    in_flight = max_connections * max(held, 1) + FD_HEADROOM
    needed = max(connections, in_flight)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(OSError, ValueError):  # a seccomp filter may forbid it
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < needed:
        audit.log(
            Level.WARNING,
            f"max_connections = {max_connections} needs about {connections} open files, and "
            f"as many clients may hold {in_flight - FD_HEADROOM} granted sockets unread "
            f"({held} sockets held), but RLIMIT_NOFILE allows {soft}: past that, clients "
            "wait for a slot, and grants are refused busy while that many are unread; "
            f"raise LimitNOFILE= to {needed} or lower max_connections",
        )
