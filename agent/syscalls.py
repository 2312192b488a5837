"""Thin ctypes wrappers for the Linux syscalls the agent needs and Python lacks.

Every wrapper raises :class:`OSError` with errno and the arguments in the message, so a
failure names what was attempted.
"""

from __future__ import annotations

import ctypes
import os

# The soname directly: ctypes.util.find_library costs a subprocess or two at boot and finds
# nothing in the guest (no ldconfig cache, no compiler).
_libc = ctypes.CDLL("libc.so.6", use_errno=True)

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MNT_DETACH = 0x2
RB_POWER_OFF = 0x4321FEDC


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2)."""
    result = _libc.mount(
        source.encode(),
        target.encode(),
        fstype.encode(),
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    _check(result, f"mount {source} on {target} ({fstype}, flags={flags:#x}, {data!r})")


def umount(target: str, flags: int = 0) -> None:
    """umount2(2)."""
    _check(_libc.umount2(target.encode(), flags), f"umount {target}")


def power_off() -> None:
    """reboot(RB_POWER_OFF): only returns on failure (raises)."""
    _check(_libc.reboot(RB_POWER_OFF), "reboot(RB_POWER_OFF)")
