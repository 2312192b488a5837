"""The container's cgroup: create it, write its limits, move a process into it, show it.

Two layouts, chosen for the whole guest by the agent (docs/cgroups.md):

- **v2** (the default): the container's cgroup is ``DIR`` on cgroup2
  (``/sys/fs/cgroup/pysandbox/<id>``), where the agent has enabled every controller; limits
  are written in v2 terms (:attr:`Resources.files <ocispec.spec.Resources>`).
- **v1**: ``DIR`` on cgroup2 still tracks the processes (``cgroup.procs``, ``cgroup.kill``,
  ``cgroup.freeze``) but holds no controller. Each v1 hierarchy is mounted in its own
  directory of a *v1 root* (named by its controllers, as its mount options: ``cpu,cpuacct``,
  ``memory``...), and the container has a cgroup at the same path below every hierarchy as
  ``DIR`` has below ``/sys/fs/cgroup``. Limits are written there in v1 terms
  (:attr:`Resources.v1_files <ocispec.spec.Resources>`).

Either way the container's processes live in a cgroup namespace rooted at its own cgroup, and a
``cgroup`` mount in its spec shows that cgroup at the mount point
(:func:`agent.oci.rootfs.cgroup_view`).

When ``DIR`` is not on a cgroup2 file system (a cgroup v1 or hybrid host running the runtime
directly, as the development machines do), :func:`locate` returns None and the runtime leaves
cgroups alone: no limits are applied.
"""

from __future__ import annotations

import errno
import os

from agent.oci import syscalls as sc
from agent.oci.errors import SetupError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from agent.oci.syscalls import Syscalls
    from ocispec.spec import Resources

#: Where the guest's cgroup2 hierarchy is mounted; ``DIR`` lies below it.
V2_ROOT = "/sys/fs/cgroup"


class Cgroup:
    """One container's cgroup: ``path`` on cgroup2, and ``v1`` (hierarchy name, directory)
    pairs when the guest uses the v1 layout (empty for v2)."""

    __slots__ = ("path", "v1")

    def __init__(self, path: str, v1: list[tuple[str, str]] | None = None) -> None:
        self.path = path
        self.v1 = v1 or []

    def v1_dir(self, controller: str) -> str | None:
        """The container's directory in the v1 hierarchy that holds ``controller``."""
        for name, directory in self.v1:
            if controller in name.split(","):
                return directory
        return None


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


def locate(sys: Syscalls, path: str, v1_root: str | None) -> Cgroup | None:
    """The container's cgroup for ``--cgroup path [--cgroup-v1 v1_root]``; None if unusable.

    Every directory of ``v1_root`` is taken as one mounted v1 hierarchy. SetupError when
    ``path`` is not below :data:`V2_ROOT` in the v1 layout (there is no relative path then).
    """
    if not usable(sys, path):
        return None
    if v1_root is None:
        return Cgroup(path)
    if not path.startswith(V2_ROOT + "/"):
        raise SetupError(f"cgroup: {path} is not below {V2_ROOT}")
    relative = path[len(V2_ROOT) :]
    names = sorted(n for n in sys.listdir(v1_root) if sys.kind(f"{v1_root}/{n}") == "dir")
    return Cgroup(path, [(name, f"{v1_root}/{name}{relative}") for name in names])


def _mkdir_p(sys: Syscalls, path: str) -> None:
    missing = []
    current = path
    while current not in ("", "/") and sys.kind(current, follow=True) is None:
        missing.append(current)
        current = os.path.dirname(current)
    for directory in reversed(missing):
        sys.mkdir(directory, 0o755)


def create(sys: Syscalls, cgroup: Cgroup) -> None:
    """mkdir -p the cgroup in every hierarchy (an existing one is reused).

    A v1 cpuset cgroup starts with no CPUs and cannot take a process: the agent sets
    ``cgroup.clone_children`` on the cpuset parent, so new ones copy their parent's.
    """
    for path in [cgroup.path, *(directory for _name, directory in cgroup.v1)]:
        try:
            _mkdir_p(sys, path)
        except OSError as exc:
            raise SetupError.from_os(f"cgroup: creating {path}", exc) from exc


def set_limits(sys: Syscalls, cgroup: Cgroup, resources: Resources) -> None:
    """Write every limit, in the layout's terms. SetupError names the file and the reason:
    a controller that is not enabled (v2) or mounted (v1), a value the kernel refuses."""
    if not cgroup.v1:
        for name, value in resources.files:
            _write_limit(sys, cgroup.path, name, value)
        return
    if resources.unified:
        raise SetupError(
            "cgroup: linux.resources.unified needs cgroup v2, but this guest's containers "
            "use cgroup v1"
        )
    files = list(resources.v1_files)
    names = [name for name, _value in files]
    if "memory.limit_in_bytes" in names and "memory.memsw.limit_in_bytes" in names:
        # The kernel keeps memsw >= limit at every step: raising both needs memsw first,
        # lowering both needs the limit first. Try the limit first, as runc does.
        limit = files[names.index("memory.limit_in_bytes")]
        memsw = files[names.index("memory.memsw.limit_in_bytes")]
        directory = cgroup.v1_dir("memory")
        if directory is not None:
            try:
                sys.write_file(f"{directory}/{limit[0]}", limit[1])
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise SetupError.from_os(f"cgroup: setting {limit[0]}", exc) from exc
                files.remove(memsw)
                files.insert(files.index(limit), memsw)
            else:
                files.remove(limit)
    for name, value in files:
        controller = name.partition(".")[0]
        directory = cgroup.v1_dir(controller)
        if directory is None:
            raise SetupError(
                f'cgroup: cannot set {name}: controller "{controller}" is not mounted in the '
                "guest's cgroup v1 layout"
            )
        if name == "blkio.weight" and sys.kind(f"{directory}/{name}") is None:
            name = "blkio.bfq.weight"  # the only weight file once CFQ is gone (runc does this)
        _write_limit(sys, directory, name, value)


def _write_limit(sys: Syscalls, directory: str, name: str, value: str) -> None:
    try:
        sys.write_file(f"{directory}/{name}", value)
    except FileNotFoundError as exc:
        controller = name.partition(".")[0]
        raise SetupError(
            f'cgroup: cannot set {name}: controller "{controller}" is not enabled for '
            f"{directory} (see cgroup.subtree_control of its parent)"
        ) from exc
    except OSError as exc:
        if exc.errno == errno.EINVAL and name == "cpuset.cpus":
            raise SetupError(
                f'cgroup: cpuset.cpus "{value}" is not available: the VM has CPUs '
                f'"{_parent_cpus(sys, directory)}" (cpuset.cpus must be a subset of them)'
            ) from exc
        if exc.errno == errno.EINVAL:
            raise SetupError(f'cgroup: invalid value "{value}" for {name}') from exc
        raise SetupError.from_os(f"cgroup: setting {name}", exc) from exc


def _parent_cpus(sys: Syscalls, directory: str) -> str:
    parent = os.path.dirname(directory)
    for name in ("cpuset.cpus.effective", "cpuset.effective_cpus", "cpuset.cpus"):
        try:
            return sys.read_text(f"{parent}/{name}").strip()
        except OSError:
            continue
    return "?"


def join(sys: Syscalls, cgroup: Cgroup) -> None:
    """Move the calling process into the cgroup, in every hierarchy (children follow)."""
    for path in [cgroup.path, *(directory for _name, directory in cgroup.v1)]:
        try:
            sys.write_file(f"{path}/cgroup.procs", "0")
        except OSError as exc:
            raise SetupError.from_os(f"cgroup: joining {path}", exc) from exc
