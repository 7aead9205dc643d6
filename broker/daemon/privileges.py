"""Leaving root for good, after binding as root (`serve --bind ... --user NAME`, or a
UID, or UID:GID): the user's uid, gid and groups, no capabilities, no_new_privs, and no
way back, each verified rather than assumed.

Must never: return with any capability left or with root within reach (it raises
instead), or change anything before it knows the change can be made.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from typing import Final

from broker import syscalls
from broker.errors import PrivilegeError

_CAPABILITY_FIELDS: Final = ("CapInh", "CapPrm", "CapEff", "CapAmb")


def capabilities() -> dict[str, int]:
    """Return this process's capability sets from /proc/self/status (name → bitmask)."""
    result: dict[str, int] = {}
    with open("/proc/self/status", "rb") as f:  # bytes: lines end at b"\n" only
        for line in f:
            key, _, value = line.decode("ascii", "replace").partition(":")
            if key in _CAPABILITY_FIELDS:
                result[key] = int(value, 16)
    return result


MAX_ID: Final = 2**32 - 2
"""The largest uid or gid: (uid_t)-1 means "none"."""


@dataclass(frozen=True)
class Account:
    """Whom to become.

    Attributes:
        name: The user name, or the uid as given when it has no user-database entry.
        uid: Its uid.
        gid: Its primary gid.
        groups: Its supplementary groups (none for a uid without an entry).
    """

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


def resolve_user(user: str) -> Account:
    """NAME, UID or UID:GID as `--user` takes it. A name, or a uid the user database
    knows, brings its gid and groups; a uid it does not know (a container's 65532) is
    taken as it is, with GID (default: the uid) and no other groups.

    Raises:
        PrivilegeError: if the name is unknown, an id is out of range, or it is root.
    """
    uid_text, colon, gid_text = user.partition(":")
    numeric = uid_text.isascii() and uid_text.isdigit()
    if colon and not (numeric and gid_text.isascii() and gid_text.isdigit()):
        raise PrivilegeError(f"--user {user}: give NAME, UID or UID:GID")
    try:
        entry = pwd.getpwuid(int(uid_text)) if numeric else pwd.getpwnam(user)
    except KeyError:
        if not numeric:
            raise PrivilegeError(f"--user {user}: no such user") from None
        entry = None
    except (ValueError, OverflowError):  # a NUL in the name; an id past the C type
        raise PrivilegeError(f"--user {user}: no such user") from None
    if entry is not None and not colon:
        account = Account(entry.pw_name, entry.pw_uid, entry.pw_gid,
                          tuple(os.getgrouplist(entry.pw_name, entry.pw_gid)))  # fmt: skip
    else:
        uid = int(uid_text)
        gid = int(gid_text) if colon else uid
        if not (0 <= uid <= MAX_ID and 0 <= gid <= MAX_ID):
            raise PrivilegeError(f"--user {user}: ids go from 0 to {MAX_ID}")
        groups = tuple(os.getgrouplist(entry.pw_name, gid)) if entry is not None else ()
        account = Account(entry.pw_name if entry else uid_text, uid, gid, groups)
    if account.uid == 0:
        raise PrivilegeError(f"--user {user}: is root; give an unprivileged user")
    return account


def drop_privileges(user: str) -> Account:
    """Become `user` (see `resolve_user`) for good: its uid, gid and groups, no
    capabilities, no new privileges.

    Raises:
        PrivilegeError: if `user` is unknown, we are not root, or any capability or the
            way back to root is left afterwards.
    """
    account = resolve_user(user)
    if os.geteuid() != 0:
        raise PrivilegeError(f"--user {user}: only root can change user; run serve as root")
    try:
        os.setgroups(list(account.groups))
        os.setresgid(account.gid, account.gid, account.gid)
        os.setresuid(account.uid, account.uid, account.uid)
    except OSError as e:
        raise PrivilegeError(f"--user {user}: cannot change to it: {e.strerror}") from None
    try:
        syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)  # full-width arguments, as it insists
    except OSError as e:
        raise PrivilegeError(f"cannot set no_new_privs: {e.strerror}") from None
    left = {k: v for k, v in capabilities().items() if v}
    if left:
        raise PrivilegeError(f"capabilities remain after changing to {user}: {left}")
    try:
        os.setuid(0)
    except PermissionError:
        return account
    raise PrivilegeError(f"could become root again after changing to {user}")


SHARERS_SHOWN: Final = 5
"""Processes named when others run as the broker's uid."""


def sharing_uid(uid: int) -> list[tuple[int, str]]:
    """Other processes whose real or effective uid is `uid`, as (pid, name): each could
    hold the broker's in-flight fds (the kernel counts them per uid), signal it or trace
    it. Processes /proc does not show, and ours, are left out."""
    found = []
    mine = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == mine:
            continue
        try:
            with open(f"/proc/{entry}/status", "rb") as f:  # lines end at b"\n" only
                fields = dict(line.split(b":", 1) for line in f.read().split(b"\n") if b":" in line)
        except OSError:  # gone, or hidden
            continue
        uids = fields.get(b"Uid", b"").split()
        if str(uid).encode() in uids[:2]:
            name = fields.get(b"Name", b"?").strip().decode("utf-8", "backslashreplace")
            found.append((int(entry), name))
    return sorted(found)
