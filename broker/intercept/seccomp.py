"""The Linux seccomp ABI that bind() interception speaks, and nothing else.

Numbers, structure layouts and wrappers: seccomp(2) with a user-notification listener,
the BPF filter, and the notification ioctls (seccomp_unotify(2)): receive, respond,
check an id, add an fd. The other system calls Python lacks are in `broker.syscalls`.
`check_supported` refuses any platform these numbers were not written for, rather than
guess; `tracee` and `supervisor` build on it.

Must never: guess a constant for another architecture or structure layout, or hide an
errno (every failure is the OSError the kernel reported).

Standard library only (ctypes): this is on a worker's start-up path.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import struct
from typing import Final, NamedTuple

from broker.errors import InterceptUnsupported
from broker.syscalls import check, libc

# Kernel ABI. Every number below is x86_64's; `check_supported` refuses anything else
# rather than guess. Sources: arch/x86/entry/syscalls/syscall_64.tbl,
# include/uapi/linux/seccomp.h, include/uapi/linux/filter.h, seccomp_unotify(2).

_MIN_KERNEL = (5, 9)
"""5.9 added SECCOMP_IOCTL_NOTIF_ADDFD (with SETFD); CONTINUE is 5.5, pidfd_getfd 5.6."""

_SYS_SECCOMP = 317
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

# --------------------------------------------------------------------------------------
# The kernel, via ctypes.


def _seccomp(op: int, flags: int, arg: ctypes.c_void_p) -> int:
    args = (ctypes.c_long(_SYS_SECCOMP), ctypes.c_uint(op), ctypes.c_uint(flags), arg)
    return check(int(libc.syscall(*args)))


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


# --- the notification ABI: receive, respond, check, add an fd ------------------------
# Small functions that return or raise the kernel's OSError: the supervisor decides
# what an errno means (ENOENT: the task died, or a signal interrupted its syscall).


SOCKADDR_MAX: Final = 128
"""sizeof(struct sockaddr_storage): nothing the supervisor matches on is longer."""


class Notification(NamedTuple):
    """One system call waiting for the supervisor (struct seccomp_notif): its six
    arguments as the kernel hands them over, 64-bit registers."""

    id: int
    pid: int
    nr: int
    """The syscall number, x32's marked bit cleared."""
    args: tuple[int, ...]

    @property
    def fd(self) -> int:
        """The first argument as the fd of bind() and listen() (an `int`)."""
        return _c_int(self.args[0])

    @property
    def sockaddr_length(self) -> int:
        """bind()'s third argument, its `socklen_t` (32 bits, unsigned)."""
        return self.args[2] & _LOW_32


_LOW_32: Final = 0xFFFFFFFF
"""A 32-bit argument is the low half of its register; the high half is anything."""


def _c_int(register: int) -> int:
    low = register & _LOW_32
    return low - (1 << 32) if low >= 1 << 31 else low


def receive(listener: int) -> Notification:
    """SECCOMP_IOCTL_NOTIF_RECV: the next notification (blocks if none is pending)."""
    buf = bytearray(NOTIF.size)
    fcntl.ioctl(listener, IOCTL_NOTIF_RECV, buf, True)
    nid, pid, _flags, nr, _arch, _ip, *args = NOTIF.unpack(buf)
    return Notification(nid, pid, nr & ~X32_SYSCALL_BIT, tuple(args))


def respond(listener: int, nid: int, *, val: int = 0, error: int = 0, flags: int = 0) -> None:
    """SECCOMP_IOCTL_NOTIF_SEND: the syscall returns `val`, or fails with `error`, or
    (SECCOMP_USER_NOTIF_FLAG_CONTINUE) runs in the kernel as if never stopped."""
    fcntl.ioctl(
        listener, IOCTL_NOTIF_SEND, bytearray(NOTIF_RESP.pack(nid, val, -error, flags)), True
    )


def id_valid(listener: int, nid: int) -> bool:
    """SECCOMP_IOCTL_NOTIF_ID_VALID: whether the task still waits in that syscall (so
    that what was read of it by pid was the task's, not a reused pid's). Other errors
    than ENOENT raise."""
    try:
        fcntl.ioctl(listener, IOCTL_NOTIF_ID_VALID, bytearray(struct.pack("=Q", nid)), True)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def add_fd(listener: int, nid: int, source: int, target: int, *, cloexec: bool) -> None:
    """SECCOMP_IOCTL_NOTIF_ADDFD with SETFD: `source` of ours becomes fd `target` of the
    waiting task (replacing what was there), close-on-exec if `cloexec`."""
    addfd = NOTIF_ADDFD.pack(
        nid, SECCOMP_ADDFD_FLAG_SETFD, source, target, os.O_CLOEXEC if cloexec else 0
    )
    fcntl.ioctl(listener, IOCTL_NOTIF_ADDFD, bytearray(addfd), True)
