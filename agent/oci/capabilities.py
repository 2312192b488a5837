"""The two halves of applying the five OCI capability sets (parsed by
:mod:`ocispec.capabilities`).

The sets must be applied around the uid change, in this order (see
:func:`agent.oci.process.finalize`):

1. :func:`drop_bounding` -- PR_CAPBSET_DROP needs CAP_SETPCAP, which only root still has;
2. keepcaps + setuid -- so the permitted set survives leaving uid 0;
3. :func:`set_process_caps` -- capset(effective, permitted, inheritable), then the ambient set,
   which the kernel only accepts for caps already permitted *and* inheritable.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from agent.oci.syscalls import Syscalls
    from ocispec.capabilities import Capabilities


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
