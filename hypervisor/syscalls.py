"""The Linux system calls the host side needs and Python 3.11's ``os`` module lacks.

One ``libc`` handle (ctypes, ``use_errno``) for setns(2), unshare(2), mount(2), umount2(2),
prctl(2) and syscall(2), resolved at import so that a ``preexec_fn`` between fork
and exec (:mod:`hypervisor.jail`) finds it ready. ``os.setns``/``os.unshare`` only arrive with
Python 3.12 (Debian 12 ships 3.11), and no maintained library wraps these calls more simply
than ctypes does.

Errors: :func:`check` (and the wrappers built on it) raise OSError whose ``errno`` is the
call's and whose text is ``"<step>: <strerror>"``.
"""

from __future__ import annotations

import ctypes
import os

#: Namespace flags of clone(2)/unshare(2)/setns(2) (<linux/sched.h>).
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

#: The C library (the process's own, ``dlopen(NULL)``), errno kept per call.
LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
LIBC.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
LIBC.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
LIBC.syscall.restype = ctypes.c_long


def check(result: int, step: str) -> int:
    """``result`` if it is not negative (libc's failure value is -1), else OSError(errno,
    ``"step: strerror"``)."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{step}: {os.strerror(err)}")
    return result


def setns(fd: int, nstype: int, step: str = "setns") -> None:
    """Move the calling thread into the namespace ``fd`` refers to (setns(2)); ``nstype`` is
    a CLONE_NEW* flag (0: any type). A network namespace applies to the calling thread only."""
    check(LIBC.setns(fd, nstype), step)


def unshare(flags: int, step: str = "unshare") -> None:
    """Give the calling process new namespaces of the CLONE_NEW* ``flags`` (unshare(2)).
    CLONE_NEWUSER needs a single-threaded process."""
    check(LIBC.unshare(flags), step)


def mount(
    source: bytes | None,
    target: bytes,
    fstype: bytes | None,
    flags: int,
    data: bytes | None,
    step: str,
) -> None:
    """mount(2) with the same arguments; OSError naming ``step`` on failure."""
    check(LIBC.mount(source, target, fstype, flags, data), step)


def umount2(target: bytes, flags: int, step: str) -> None:
    """umount2(2); OSError naming ``step`` on failure."""
    check(LIBC.umount2(target, flags), step)


def prctl(option: int, arg2: int, step: str) -> None:
    """prctl(2) with one integer argument (the rest 0); OSError naming ``step`` on failure."""
    check(LIBC.prctl(option, arg2, 0, 0, 0), step)
