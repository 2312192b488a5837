"""Whether two of this process's fds are one open file description (``2>&1``).

runc hands a foreground container its caller's own stdio, so when the caller's stdout and
stderr are one open file (``cmd >log 2>&1``, ``| less`` with ``2>&1``, a shell's terminal),
the container's two streams reach it in the order they were written. A VM cannot share the
fd; pysandbox gives the container one pipe for both instead (CreateContainer's
``stderr_to_stdout``), and needs to know when: :func:`one_description`.

kcmp(2) with ``KCMP_FILE`` answers exactly (the same inode is not enough: ``>f 2>f`` opens
two descriptions that overwrite each other). Python has no wrapper for it and no maintained
library offers one for a single system call, hence ctypes' ``syscall``. Where kcmp is missing
(a kernel without CONFIG_CHECKPOINT_RESTORE, seccomp) the answer is False: two streams, as
before.
"""

from __future__ import annotations

import ctypes
import os
import platform

#: kcmp(2)'s system call number per machine, and its type KCMP_FILE (linux/kcmp.h).
_KCMP = {"x86_64": 312, "aarch64": 272}
_KCMP_FILE = 0


def one_description(fd_a: int, fd_b: int) -> bool:
    """True when ``fd_a`` and ``fd_b`` of this process refer to the same open file
    description (kcmp(2) ``KCMP_FILE`` returns 0); False when they do not, when either is
    closed, or when kcmp cannot be used."""
    number = _KCMP.get(platform.machine())
    if number is None:
        return False
    pid = os.getpid()
    libc = ctypes.CDLL(None, use_errno=True)
    result: int = libc.syscall(number, pid, pid, _KCMP_FILE, fd_a, fd_b)
    return result == 0
