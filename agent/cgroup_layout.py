"""The guest's cgroup layout for containers: cgroup v2 (default) or v1, chosen once per VM.

The host may name the layout in a container's spec, annotation :data:`ANNOTATION` ("v1" or
"v2"). The first container sets it up (:meth:`Layout.choose`; v2 when it names none); later
ones get the same, and one naming the other layout is refused, since a controller lives on
one hierarchy only: once used on cgroup2 it can no longer be mounted as cgroup v1 (EBUSY),
and the reverse. docs/cgroups.md.

Reading a container's usage for StatsContainer and OOM attribution also depends on the
layout (:func:`read_counters`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from agent import pid1
from agent.oci import syscalls
from ocispec import linux

#: Spec annotation naming the layout the host wants for the VM's containers.
ANNOTATION = "org.pysandbox.cgroup"
#: Where the v1 layout mounts its hierarchies, one directory each (see agent.oci.cgroups).
V1_ROOT = "/run/cgroup-v1"
#: Controllers the v2 layout enables for containers (those the kernel has).
V2_CONTROLLERS = ("cpu", "cpuset", "io", "memory", "hugetlb", "pids")
#: The v1 layout's hierarchies, named by their controllers as systemd and runc mount them.
V1_HIERARCHIES = (
    "blkio",
    "cpu,cpuacct",
    "cpuset",
    "devices",
    "freezer",
    "hugetlb",
    "memory",
    "net_cls,net_prio",
    "perf_event",
    "pids",
)
VERSIONS = ("v1", "v2")


def requested(spec: dict[str, object]) -> str | None:
    """The layout a spec's annotation asks for (None: no preference); ValueError naming the
    annotation if it is not "v1" or "v2"."""
    annotations = spec.get("annotations")
    value = annotations.get(ANNOTATION) if isinstance(annotations, dict) else None
    if value is None:
        return None
    if value not in VERSIONS:
        raise ValueError(f'annotation {ANNOTATION}: "{value}" is not "v1" or "v2"')
    return str(value)


def set_up(version: str, parent: str = pid1.CGROUP_PARENT) -> None:
    """Lay out the guest's cgroups for containers under ``parent``: "v2" or "v1".

    v2: every controller of :data:`V2_CONTROLLERS` the kernel has is enabled for ``parent``
    and its children. v1: each hierarchy of :data:`V1_HIERARCHIES` whose controllers the
    kernel has is mounted under :data:`V1_ROOT` with a cgroup named like ``parent`` in it
    (cpuset ones copy their parent's CPUs and memory nodes: ``cgroup.clone_children``);
    ``parent`` on cgroup2 has no controller and serves to track, freeze and kill processes.
    Nothing when ``parent`` is not below a cgroup2 hierarchy. OSError if the kernel refuses.
    """
    if not os.path.exists(f"{os.path.dirname(parent)}/cgroup.controllers"):
        return  # not on cgroup2 (a test's directory): the runtime leaves cgroups alone too
    os.makedirs(parent, exist_ok=True)
    if version == "v2":
        for directory in (os.path.dirname(parent), parent):
            with open(f"{directory}/cgroup.controllers", encoding="ascii") as handle:
                available = set(handle.read().split())
            wanted = [c for c in V2_CONTROLLERS if c in available]
            with open(f"{directory}/cgroup.subtree_control", "w", encoding="ascii") as handle:
                handle.write(" ".join(f"+{c}" for c in wanted))
        return
    with open("/proc/cgroups", encoding="ascii") as handle:
        known = {f[0] for f in (line.split() for line in handle) if len(f) == 4 and f[3] == "1"}
    os.makedirs(V1_ROOT, mode=0o755, exist_ok=True)
    for name in V1_HIERARCHIES:
        if not set(name.split(",")) <= known:
            continue
        target = f"{V1_ROOT}/{name}"
        os.makedirs(target, exist_ok=True)
        if not pid1._is_mountpoint(target):
            flags = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
            syscalls.mount("cgroup", target, "cgroup", flags, name)
        if name == "cpuset":
            with open(f"{target}/cgroup.clone_children", "w", encoding="ascii") as handle:
                handle.write("1")
        os.makedirs(f"{target}/{os.path.basename(parent)}", exist_ok=True)


class Layout:
    """The VM's layout: None until the first container chooses it. Thread-safe."""

    def __init__(
        self,
        parent: str = pid1.CGROUP_PARENT,
        setup: Callable[[str, str], None] | None = None,
    ) -> None:
        self.version: str | None = None
        self._parent = parent
        self._set_up = setup or set_up
        self._lock = threading.Lock()

    def choose(self, version: str | None) -> None:
        """Set the layout up for ``version`` (None: v2) on first use; afterwards None takes
        the one in use and another version is a ValueError.

        OSError from the kernel leaves the layout unchosen (the next container retries).
        """
        with self._lock:
            if self.version is None:
                self._set_up(version or "v2", self._parent)
                self.version = version or "v2"
            elif version is not None and self.version != version:
                raise ValueError(
                    f"the spec asks for cgroup {version} ({ANNOTATION}), but this VM's "
                    f"containers use cgroup {self.version}: a VM has one layout, chosen by its "
                    "first container"
                )

    def runtime_args(self) -> list[str]:
        """Extra arguments for agent.oci.init/exec: the v1 root in the v1 layout."""
        return ["--cgroup-v1", V1_ROOT] if self.version == "v1" else []

    def v1_dirs(self, cgroup: str) -> list[tuple[str, str]]:
        """(hierarchy, directory) of a container's cgroup in every v1 hierarchy, as
        agent.oci.cgroups.locate finds them ([] in the v2 layout)."""
        if self.version != "v1" or not os.path.isdir(V1_ROOT):
            return []
        relative = cgroup[len(os.path.dirname(self._parent)) :]
        names = sorted(n for n in os.listdir(V1_ROOT) if os.path.isdir(f"{V1_ROOT}/{n}"))
        return [(name, f"{V1_ROOT}/{name}{relative}") for name in names]


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read()
    except OSError:
        return ""


def _keyed(text: str, key: str) -> int:
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def _number(text: str) -> int:
    text = text.strip()
    return int(text) if text.isdigit() else 0


#: v1 reports "no memory limit" as the largest page-aligned counter value.
_V1_UNLIMITED = 1 << 62


def read_oom_kills(cgroup: str, v1_dirs: list[tuple[str, str]]) -> int:
    """The ``oom_kills`` of :func:`read_counters` alone: one file read, not five (every
    ``exec`` reads it before it starts the process)."""
    if not v1_dirs:
        return _keyed(_read(f"{cgroup}/memory.events"), "oom_kill")
    for hierarchy, directory in v1_dirs:
        if "memory" in hierarchy.split(","):
            return _keyed(_read(f"{directory}/memory.oom_control"), "oom_kill")
    return 0


def read_counters(cgroup: str, v1_dirs: list[tuple[str, str]]) -> dict[str, int]:
    """cpu_usage_usec, memory_usage_bytes, memory_limit_bytes (0: none), pids_current and
    oom_kills of a container, from its v2 cgroup or, when ``v1_dirs`` (hierarchy, directory)
    is not empty, its v1 ones. A counter that cannot be read is 0."""
    if not v1_dirs:
        return {
            "cpu_usage_usec": _keyed(_read(f"{cgroup}/cpu.stat"), "usage_usec"),
            "memory_usage_bytes": _number(_read(f"{cgroup}/memory.current")),
            "memory_limit_bytes": _number(_read(f"{cgroup}/memory.max")),  # "max": 0
            "pids_current": _number(_read(f"{cgroup}/pids.current")),
            "oom_kills": _keyed(_read(f"{cgroup}/memory.events"), "oom_kill"),
        }

    def v1_at(controller: str, name: str) -> str:
        for hierarchy, directory in v1_dirs:
            if controller in hierarchy.split(","):
                return _read(f"{directory}/{name}")
        return ""

    v1_limit = _number(v1_at("memory", "memory.limit_in_bytes"))
    return {
        "cpu_usage_usec": _number(v1_at("cpuacct", "cpuacct.usage")) // 1000,
        "memory_usage_bytes": _number(v1_at("memory", "memory.usage_in_bytes")),
        "memory_limit_bytes": 0 if v1_limit >= _V1_UNLIMITED else v1_limit,
        "pids_current": _number(v1_at("pids", "pids.current")),
        "oom_kills": _keyed(v1_at("memory", "memory.oom_control"), "oom_kill"),
    }
