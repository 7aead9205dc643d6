"""System calls Python's standard library lacks, as small functions that return or raise
the kernel's OSError (sd-daemon style: the caller decides what to say): prctl(2),
pidfd_getfd(2), signalfd(2). Numbers are x86_64's (`broker.seccomp.check_supported`
refuses other platforms for `--intercept`, their only user beside no_new_privs).

Must never: hide an errno, or guess a constant for another architecture.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterable

_SYS_SIGNALFD4 = 289
_SYS_PIDFD_GETFD = 438

PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37
PR_SET_NO_NEW_PRIVS = 38
PIDFD_THREAD = os.O_EXCL
"""6.9+: pidfd_open() flag for a pidfd naming one thread (notifications name threads)."""
SIGNALFD_SIGINFO = struct.Struct("=IiiI")
"""The first fields of struct signalfd_siginfo: signo, errno, code, pid (128 bytes)."""
SIGNALFD_SIGINFO_SIZE = 128
SI_KERNEL = 0x80
"""si_code of signals the kernel sends to a whole process group (tty ^C, hangup)."""

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.prctl.restype = ctypes.c_int


def check(result: int) -> int:
    """Return a libc result, or raise the OSError that errno describes."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def prctl(option: int, arg: int | ctypes.c_void_p = 0) -> int:
    # Variadic unsigned longs: pass full-width zeros, PR_SET_NO_NEW_PRIVS insists on them.
    value = ctypes.c_ulong(arg) if isinstance(arg, int) else arg
    zero = ctypes.c_ulong(0)
    return check(int(libc.prctl(ctypes.c_int(option), value, zero, zero, zero)))


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """Duplicate fd number `fd` of the task behind `pidfd` into our process (CLOEXEC)."""
    args = (
        ctypes.c_long(_SYS_PIDFD_GETFD),
        ctypes.c_int(pidfd),
        ctypes.c_int(fd),
        ctypes.c_uint(0),
    )
    return check(int(libc.syscall(*args)))


def signalfd(signals: Iterable[int]) -> int:
    mask = ctypes.c_uint64(sum(1 << (int(sig) - 1) for sig in signals))
    flags = os.O_CLOEXEC | os.O_NONBLOCK  # SFD_CLOEXEC, SFD_NONBLOCK
    size = ctypes.c_size_t(ctypes.sizeof(mask))
    args = (
        ctypes.c_long(_SYS_SIGNALFD4),
        ctypes.c_int(-1),
        ctypes.byref(mask),
        size,
        ctypes.c_int(flags),
    )
    return check(int(libc.syscall(*args)))
