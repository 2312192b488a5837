"""Capability names and numbers (capabilities(7)), and the five OCI sets as bitmasks.

Applying them is the guest's business: :mod:`agent.oci.capabilities`.
"""

from __future__ import annotations

from ocispec.errors import SpecError

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
