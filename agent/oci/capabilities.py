"""Capability names and the two halves of applying the five OCI capability sets.

The sets must be applied around the uid change, in this order (see
:func:`agent.oci.process.finalize`):

1. :func:`drop_bounding` -- PR_CAPBSET_DROP needs CAP_SETPCAP, which only root still has;
2. keepcaps + setuid -- so the permitted set survives leaving uid 0;
3. :func:`set_process_caps` -- capset(effective, permitted, inheritable), then the ambient set,
   which the kernel only accepts for caps already permitted *and* inheritable.
"""

from __future__ import annotations

from agent.oci.errors import SpecError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from agent.oci.syscalls import Syscalls

#: capability(7) names in kernel order: the index is the capability number.
NAMES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)


class Capabilities:
    """The five capability sets as bitmasks."""

    __slots__ = ("ambient", "bounding", "effective", "inheritable", "permitted")

    def __init__(
        self, bounding: int, effective: int, inheritable: int, permitted: int, ambient: int
    ) -> None:
        self.bounding = bounding
        self.effective = effective
        self.inheritable = inheritable
        self.permitted = permitted
        self.ambient = ambient


_NUMBERS = {name: number for number, name in enumerate(NAMES)}

#: Used when /proc/sys/kernel/cap_last_cap cannot be read.
DEFAULT_LAST_CAP = len(NAMES) - 1


def number(name: str) -> int:
    """``"CAP_KILL"`` -> 5. Raises SpecError for a name this table does not know."""
    found = _NUMBERS.get(name.upper())
    if found is None:
        raise SpecError(f'unknown capability "{name}"')
    return found


def mask(names: list[str]) -> int:
    """A set of names as a bitmask."""
    result = 0
    for name in names:
        result |= 1 << number(name)
    return result


def names(bits: int) -> list[str]:
    """A bitmask as names (for messages and tests)."""
    return [name for i, name in enumerate(NAMES) if bits >> i & 1]


def drop_bounding(sys: Syscalls, caps: Capabilities, last_cap: int) -> None:
    """Drop from the bounding set every capability the kernel has and the spec does not keep."""
    for cap in range(last_cap + 1):
        if not caps.bounding >> cap & 1:
            sys.capbset_drop(cap)


def set_process_caps(sys: Syscalls, caps: Capabilities, last_cap: int) -> None:
    """capset the effective, permitted and inheritable sets, then raise the ambient set."""
    known = (1 << (last_cap + 1)) - 1
    sys.capset(caps.effective & known, caps.permitted & known, caps.inheritable & known)
    sys.ambient_clear()
    # The kernel refuses an ambient cap that is not both permitted and inheritable; runc
    # warns and goes on, so skip those.
    raisable = caps.ambient & caps.permitted & caps.inheritable & known
    for cap in range(last_cap + 1):
        if raisable >> cap & 1:
            sys.ambient_raise(cap)
