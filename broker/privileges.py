"""Leaving root for good, after binding as root (`serve --bind ... --user NAME`): the
user's uid, gid and groups, no capabilities, no_new_privs, and no way back, each
verified rather than assumed.

Must never: return with any capability left or with root within reach (it raises
instead), or change anything before it knows the change can be made.
"""

from __future__ import annotations

import os
import pwd
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


def drop_privileges(user: str) -> pwd.struct_passwd:
    """Become `user` for good: its uid, gid and groups, no capabilities, no new privileges.

    Raises:
        PrivilegeError: if `user` is unknown, we are not root, or any capability or the
            way back to root is left afterwards.
    """
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, ValueError):  # ValueError: int("²"), or a NUL in the name
        raise PrivilegeError(f"--user {user}: no such user") from None
    if entry.pw_uid == 0:
        raise PrivilegeError(f"--user {user}: is root; give an unprivileged user")
    if os.geteuid() != 0:
        raise PrivilegeError(f"--user {user}: only root can change user; run serve as root")
    try:
        os.setgroups(os.getgrouplist(entry.pw_name, entry.pw_gid))
        os.setresgid(entry.pw_gid, entry.pw_gid, entry.pw_gid)
        os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)
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
        return entry
    raise PrivilegeError(f"could become root again after changing to {user}")
