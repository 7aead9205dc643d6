"""The Linux seccomp ABI that bind() interception speaks, and nothing else.

Numbers, structure layouts and ctypes wrappers for the system calls Python lacks:
seccomp(2) with a user-notification listener, its ioctls (seccomp_unotify(2)),
pidfd_getfd(2), signalfd(2) and prctl(2). `check_supported` refuses any platform these
numbers were not written for, rather than guess; `broker.intercept` builds on it.

Must never: guess a constant for another architecture or structure layout, or hide an
errno (every failure is the OSError the kernel reported).

Standard library only (ctypes): this is on a worker's start-up path.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import struct
from collections.abc import Iterable

from broker.errors import InterceptUnsupported

# Kernel ABI. Every number below is x86_64's; `check_supported` refuses anything else
# rather than guess. Sources: arch/x86/entry/syscalls/syscall_64.tbl,
# include/uapi/linux/seccomp.h, include/uapi/linux/filter.h, seccomp_unotify(2).

_MIN_KERNEL = (5, 9)
"""5.9 added SECCOMP_IOCTL_NOTIF_ADDFD (with SETFD); CONTINUE is 5.5, pidfd_getfd 5.6."""

_SYS_SECCOMP = 317
_SYS_SIGNALFD4 = 289
_SYS_PIDFD_GETFD = 438
NR_BIND = 49
NR_LISTEN = 50
X32_SYSCALL_BIT = 0x40000000
"""x32 ABI syscalls carry this bit in seccomp_data.nr; bind/listen keep their numbers."""
_AUDIT_ARCH_X86_64 = 0xC000003E
"""EM_X86_64 (62) | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE: seccomp_data.arch of x86_64."""

_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_GET_ACTION_AVAIL = 2
_SECCOMP_GET_NOTIF_SIZES = 3
_SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
"""seccomp() returns a listener fd that receives the filter's user notifications."""
_SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5
"""5.19+: once we have received a notification, only a fatal signal interrupts the wait,
so an ordinary signal cannot restart a bind() whose fd we have already replaced."""
_SECCOMP_RET_USER_NOTIF = 0x7FC00000
_SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
"""Response flag: run the syscall in the kernel as if there were no filter."""
SECCOMP_ADDFD_FLAG_SETFD = 1
"""ADDFD flag: install at exactly `newfd` (replacing what is there), like dup2()."""

NOTIF = struct.Struct("=QII iIQ6Q")
"""struct seccomp_notif: id, pid, flags, then struct seccomp_data: nr, arch, ip, args."""
NOTIF_RESP = struct.Struct("=QqiI")
"""struct seccomp_notif_resp: id, val, error (negative errno), flags."""
NOTIF_ADDFD = struct.Struct("=QIIII")
"""struct seccomp_notif_addfd: id, flags, srcfd, newfd, newfd_flags (O_CLOEXEC only)."""
_SECCOMP_DATA_SIZE = 64
"""sizeof(struct seccomp_data). `check_supported` compares all three sizes with the
kernel's (_SECCOMP_GET_NOTIF_SIZES): a kernel with other layouts is refused, not misread."""


def _ioc(direction: int, nr: int, size: int) -> int:
    """Compute an ioctl request number as the kernel's _IOC() macro does (type '!')."""
    return (direction << 30) | (size << 16) | (ord("!") << 8) | nr


_IOC_WRITE, _IOC_READ = 1, 2
IOCTL_NOTIF_RECV = _ioc(_IOC_READ | _IOC_WRITE, 0, NOTIF.size)  # 0xC0502100
IOCTL_NOTIF_SEND = _ioc(_IOC_READ | _IOC_WRITE, 1, NOTIF_RESP.size)  # 0xC0182101
IOCTL_NOTIF_ID_VALID = _ioc(_IOC_WRITE, 2, 8)  # 0x40082102
IOCTL_NOTIF_ADDFD = _ioc(_IOC_WRITE, 3, NOTIF_ADDFD.size)  # 0x40182103

# Classic BPF over struct seccomp_data (nr at offset 0, arch at offset 4).
_BPF_LD_W_ABS = 0x20
_BPF_ALU_AND_K = 0x54
_BPF_JMP_JEQ_K = 0x15
_BPF_RET_K = 0x06
_SOCK_FILTER = struct.Struct("=HBBI")

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

# --------------------------------------------------------------------------------------
# The kernel, via ctypes.

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int


def _check(result: int) -> int:
    """Return a libc result, or raise the OSError that errno describes."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _seccomp(op: int, flags: int, arg: ctypes.c_void_p) -> int:
    args = (ctypes.c_long(_SYS_SECCOMP), ctypes.c_uint(op), ctypes.c_uint(flags), arg)
    return _check(int(_libc.syscall(*args)))


def prctl(option: int, arg: int | ctypes.c_void_p = 0) -> int:
    # Variadic unsigned longs: pass full-width zeros, PR_SET_NO_NEW_PRIVS insists on them.
    value = ctypes.c_ulong(arg) if isinstance(arg, int) else arg
    zero = ctypes.c_ulong(0)
    return _check(int(_libc.prctl(ctypes.c_int(option), value, zero, zero, zero)))


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """Duplicate fd number `fd` of the task behind `pidfd` into our process (CLOEXEC)."""
    args = (
        ctypes.c_long(_SYS_PIDFD_GETFD),
        ctypes.c_int(pidfd),
        ctypes.c_int(fd),
        ctypes.c_uint(0),
    )
    return _check(int(_libc.syscall(*args)))


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
    return _check(int(_libc.syscall(*args)))


def _kernel_version(release: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", release)
    return (int(match[1]), int(match[2])) if match else None


def check_platform(release: str, machine: str, pointer_size: int) -> None:
    """Refuse platforms whose constants we do not know (pure: tested directly)."""
    if machine != "x86_64" or pointer_size != 8:
        raise InterceptUnsupported(
            f"bind() interception knows only x86_64 system calls, and this is {machine} "
            f"({pointer_size * 8}-bit Python); pass sockets with LISTEN_FDS instead "
            "(port-broker exec without interception)"
        )
    version = _kernel_version(release)
    if version is None or version < _MIN_KERNEL:
        need = ".".join(map(str, _MIN_KERNEL))
        raise InterceptUnsupported(
            f"bind() interception needs Linux {need} or later "
            f"(seccomp SECCOMP_IOCTL_NOTIF_ADDFD), and this kernel is {release}; "
            "upgrade the kernel or pass sockets with LISTEN_FDS instead"
        )


def check_supported() -> None:
    """Check that this machine can run `run_intercepted`, without starting anything.

    Checks the architecture and kernel version, that the kernel offers seccomp user
    notifications, and that its notification structures have the layout this module
    was written for.

    Raises:
        InterceptUnsupported: The kernel, architecture or seccomp support is missing or
            different; the message says which and what to do.
    """
    uname = os.uname()
    check_platform(uname.release, uname.machine, ctypes.sizeof(ctypes.c_void_p))
    action = ctypes.c_uint32(_SECCOMP_RET_USER_NOTIF)
    sizes = (ctypes.c_uint16 * 3)()
    try:
        _seccomp(_SECCOMP_GET_ACTION_AVAIL, 0, ctypes.cast(ctypes.byref(action), ctypes.c_void_p))
        _seccomp(_SECCOMP_GET_NOTIF_SIZES, 0, ctypes.cast(sizes, ctypes.c_void_p))
    except OSError as exc:
        raise InterceptUnsupported(
            f"this kernel offers no seccomp user notifications ({exc.strerror}); "
            "it needs CONFIG_SECCOMP_FILTER, or pass sockets with LISTEN_FDS instead"
        ) from exc
    expected = (NOTIF.size, NOTIF_RESP.size, _SECCOMP_DATA_SIZE)
    if tuple(sizes) != expected:
        raise InterceptUnsupported(
            f"this kernel's seccomp notification layout {tuple(sizes)} differs from the "
            f"one this module speaks {expected}; pass sockets with LISTEN_FDS instead"
        )


def filter_program() -> bytes:
    """The BPF program: bind/listen of x86_64 and x32 tasks notify us, all else runs."""
    ins = _SOCK_FILTER.pack
    return b"".join(
        (
            ins(_BPF_LD_W_ABS, 0, 0, 4),  # 0: A = arch
            ins(_BPF_JMP_JEQ_K, 0, 5, _AUDIT_ARCH_X86_64),  # 1: not x86_64 -> 7 (allow)
            ins(_BPF_LD_W_ABS, 0, 0, 0),  # 2: A = nr
            ins(_BPF_ALU_AND_K, 0, 0, ~X32_SYSCALL_BIT & 0xFFFFFFFF),  # 3: x32 -> native
            ins(_BPF_JMP_JEQ_K, 3, 0, NR_BIND),  # 4: bind -> 8 (notify)
            ins(_BPF_JMP_JEQ_K, 2, 0, NR_LISTEN),  # 5: listen -> 8 (notify)
            ins(_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW),  # 6
            ins(_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW),  # 7
            ins(_BPF_RET_K, 0, 0, _SECCOMP_RET_USER_NOTIF),  # 8
        )
    )


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def install_filter(program: ctypes.Array[ctypes.c_char]) -> int:
    """Install the filter on the calling task; return the listener fd (CLOEXEC)."""
    prog = _SockFprog(len(program) // _SOCK_FILTER.size, ctypes.addressof(program))
    arg = ctypes.cast(ctypes.byref(prog), ctypes.c_void_p)
    flags = _SECCOMP_FILTER_FLAG_NEW_LISTENER | _SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    try:
        return _seccomp(_SECCOMP_SET_MODE_FILTER, flags, arg)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: a 5.9-5.18 kernel without WAIT_KILLABLE_RECV
            raise
    return _seccomp(_SECCOMP_SET_MODE_FILTER, _SECCOMP_FILTER_FLAG_NEW_LISTENER, arg)
