"""cgroup v2: create the container's cgroup, write its limits, move a process into it.

Only cgroup v2 is handled. When the ``--cgroup`` directory is not on a cgroup2 file system
(a cgroup v1 or hybrid host, as the development machines are), :func:`usable` is False and
the runtime leaves cgroups alone: no limits are applied. In the guest /sys/fs/cgroup is
cgroup2 and the agent has delegated cpu, memory and pids to its parent.
"""

from __future__ import annotations

import errno
import os

from agent.oci import syscalls as sc
from agent.oci.errors import SetupError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from agent.oci.spec import Resources
    from agent.oci.syscalls import Syscalls


def usable(sys: Syscalls, path: str) -> bool:
    """Whether ``path`` (or its closest existing ancestor) is on cgroup2."""
    current = path
    while current not in ("", "/"):
        if sys.kind(current, follow=True) is not None:
            try:
                return sys.fs_magic(current) == sc.CGROUP2_SUPER_MAGIC
            except OSError:
                return False
        current = os.path.dirname(current)
    return False


def create(sys: Syscalls, path: str) -> None:
    """mkdir -p the cgroup (an existing one is reused: exec joins the container's)."""
    missing = []
    current = path
    while current not in ("", "/") and sys.kind(current, follow=True) is None:
        missing.append(current)
        current = os.path.dirname(current)
    try:
        for directory in reversed(missing):
            sys.mkdir(directory, 0o755)
    except OSError as exc:
        raise SetupError.from_os(f"cgroup: creating {path}", exc) from exc


def set_limits(sys: Syscalls, path: str, resources: Resources) -> None:
    """Write every limit; a missing file means its controller is not enabled for ``path``."""
    for name, value in resources.files:
        try:
            sys.write_file(f"{path}/{name}", value)
        except FileNotFoundError as exc:
            controller = name.partition(".")[0]
            raise SetupError(
                f'cgroup: cannot set {name}: controller "{controller}" is not enabled for '
                f"{path} (see cgroup.subtree_control of its parent)"
            ) from exc
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise SetupError(f'cgroup: invalid value "{value}" for {name}') from exc
            raise SetupError.from_os(f"cgroup: setting {name}", exc) from exc


def join(sys: Syscalls, path: str) -> None:
    """Move the calling process into ``path`` (its children follow it there)."""
    try:
        sys.write_file(f"{path}/cgroup.procs", "0")
    except OSError as exc:
        raise SetupError.from_os(f"cgroup: joining {path}", exc) from exc
