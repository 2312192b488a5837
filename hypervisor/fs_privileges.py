"""Keeping what a guest writes through virtiofsd powerless on the host.

virtiofsd runs as host root and does what the guest's root asks, so by default a guest can
leave on the host a device node of a host disk, a setuid-root binary or a file with
capabilities -- files a host user can use from their own path (a ``nodev``/``nosuid`` mount
of the share would not protect that path). Measured with the C virtiofsd of QEMU 7.2
(docs/security.md):

* ``-o modcaps=-mknod`` takes CAP_MKNOD from it: ``mknod`` of a block or character device
  fails with EPERM (FIFOs and sockets need no capability and still work).
* ``-fsetid``: its writes clear the setuid/setgid bits of the file written (the kernel does
  so for a writer without CAP_FSETID), and a chmod cannot set setgid for a group it is not
  in. Not enough alone: ``chmod 4755`` of a root-owned file only needs ownership.
* ``-setfcap``: ``security.capability`` cannot be written (matters once xattrs are on).
* So a seccomp filter (stacked under virtiofsd's own) refuses with EPERM every ``chmod``
  family call and every file creation (``open``/``openat``/``creat``/``mknod``/``mknodat``)
  whose mode carries S_ISUID or S_ISGID; ``openat2``, whose mode it cannot see, answers
  ENOSYS (virtiofsd does not use it). ``mkdir`` needs no rule: the kernel drops both bits
  from its mode (a directory inherits setgid from its parent, which is harmless).

The cost: in such a share a guest cannot create device nodes or set setuid/setgid bits,
also on directories (EPERM), and every file it writes loses them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

#: virtiofsd ``-o`` values dropping the capabilities that let guest files carry privileges.
CAPABILITY_OPTIONS = ("modcaps=-mknod:-fsetid:-setfcap",)

_S_ISUID, _S_ISGID = 0o4000, 0o2000

# Classic BPF over struct seccomp_data: nr at 0, arch at 4, args[i] at 16 + 8*i.
_LD_W_ABS, _JEQ_K, _JSET_K, _JGE_K, _RET_K = 0x20, 0x15, 0x45, 0x35, 0x06
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
_X32_SYSCALL_BIT = 0x40000000

#: Per machine: (AUDIT_ARCH, {syscall number: index of its mode argument}, openat2).
_ARCHES: dict[str, tuple[int, dict[int, int], int]] = {
    "x86_64": (
        0xC000003E,
        {
            2: 2,  # open(path, flags, mode)
            85: 1,  # creat(path, mode)
            90: 1,  # chmod(path, mode)
            91: 1,  # fchmod(fd, mode)
            133: 1,  # mknod(path, mode, dev)
            257: 3,  # openat(dirfd, path, flags, mode)
            259: 2,  # mknodat(dirfd, path, mode, dev)
            268: 2,  # fchmodat(dirfd, path, mode)
            452: 2,  # fchmodat2(dirfd, path, mode, flags)
        },
        437,
    ),
    "aarch64": (
        0xC00000B7,
        {33: 2, 52: 1, 53: 2, 56: 3, 452: 2},  # mknodat, fchmod, fchmodat, openat, fchmodat2
        437,
    ),
}


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def seccomp_program(machine: str | None = None) -> bytes:
    """The filter (classic BPF, ``struct sock_filter`` array) for ``machine``
    (default: this one). ValueError for a machine without a syscall table here."""
    machine = machine or platform.machine()
    if machine not in _ARCHES:
        raise ValueError(f"no seccomp syscall table for {machine}")
    arch, mode_arg, openat2 = _ARCHES[machine]
    deny = _RET_ERRNO | errno.EPERM
    head = [
        _insn(_LD_W_ABS, 4),
        _insn(_JEQ_K, arch, 1, 0),
        _insn(_RET_K, deny),  # another ABI (int 0x80): virtiofsd never uses one
        _insn(_LD_W_ABS, 0),
    ]
    if machine == "x86_64":
        head += [_insn(_JGE_K, _X32_SYSCALL_BIT, 0, 1), _insn(_RET_K, deny)]
    # Per syscall, 3 instructions: not this number -> next block; else load the low half of
    # the mode argument and jump to deny if it has either bit, to allow if not.
    body: list[bytes] = []
    allow_at = 3 * len(mode_arg) + 2  # after the blocks and the two openat2 instructions
    for nr, arg in mode_arg.items():
        to_allow = allow_at - (len(body) + 2) - 1
        body += [
            _insn(_JEQ_K, nr, 0, 2),
            _insn(_LD_W_ABS, 16 + 8 * arg),
            _insn(_JSET_K, _S_ISUID | _S_ISGID, to_allow + 1, to_allow),
        ]
    body += [_insn(_JEQ_K, openat2, 0, 1), _insn(_RET_K, _RET_ERRNO | errno.ENOSYS)]
    tail = [_insn(_RET_K, _RET_ALLOW), _insn(_RET_K, deny)]
    return b"".join(head + body + tail)


class Filter:
    """A seccomp filter ready to be installed in a child between fork and exec.

    Built in the parent (no allocation or import is needed after the fork); pass
    :meth:`install` as ``preexec_fn``. Installing needs CAP_SYS_ADMIN (virtiofsd runs as
    root) or no_new_privs.
    """

    def __init__(self, machine: str | None = None) -> None:
        program = seccomp_program(machine)
        self._buffer = ctypes.create_string_buffer(program, len(program))
        self._fprog = _SockFprog(len(program) // 8, ctypes.addressof(self._buffer))
        self._prctl = ctypes.CDLL(None, use_errno=True).prctl

    def install(self) -> None:
        """Apply the filter to the calling process (and so to what it execs and forks)."""
        if (
            self._prctl(
                ctypes.c_int(_PR_SET_SECCOMP),
                ctypes.c_ulong(_SECCOMP_MODE_FILTER),
                ctypes.byref(self._fprog),
                ctypes.c_ulong(0),
                ctypes.c_ulong(0),
            )
            != 0
        ):
            err = ctypes.get_errno()
            raise OSError(err, f"seccomp filter for virtiofsd: {os.strerror(err)}")
