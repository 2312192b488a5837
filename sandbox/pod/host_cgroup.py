"""The host cgroup of a pod: where the client put it, with limits that cover the VM.

runc puts a container's processes into the cgroup named by ``linux.cgroupsPath`` and writes
``linux.resources`` there. For a pod the host processes are QEMU (with its threads),
virtiofsd, the agent proxy, the shims and (``pysandbox run -d``) the shim's watcher: they all
go into the cgroup of the pod's sandbox container, and its limits are the sum of the pod's container
limits plus the VM's measured overhead (:data:`MEMORY_OVERHEAD`, :data:`CPU_OVERHEAD_MILLI`;
docs/cgroups.md "Host cgroups").

Paths, as runc 1.1 reads them (libcontainer/specconv, cgroups/fs, fs2, systemd):

- cgroupfs form: an absolute ``cgroupsPath`` is below the root of each hierarchy
  (``/kubepods/pod1/abc`` -> ``/sys/fs/cgroup/memory/kubepods/pod1/abc``); a relative one is
  below this process's own cgroup (on cgroup v2: below its parent); none at all means the
  container id, relative. Paths are cleaned as runc does (``..`` cannot climb above the root).
- systemd form (``--systemd-cgroup``): ``slice:prefix:name``; the unit is
  ``prefix-name.scope`` (``name`` when it ends in ``.slice``) in the slice, which systemd
  nests by its dashes: ``kubepods-burstable-pod1.slice`` is
  ``/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice``. An empty slice
  is ``system.slice``. When systemd runs (``/run/systemd/system`` exists) the scope is made
  through its D-Bus ``StartTransientUnit`` (``busctl``) and stopped with ``StopUnit``; without
  systemd the same path is made on the cgroup file system directly.

Layouts: cgroup v1 (and hybrid, whose v2 hierarchy holds no controllers): the cgroup is made
in every mounted v1 hierarchy, as runc does, so that ``/proc/PID/cgroup`` names it on every
line; cgroup v2: one directory, with ``memory``, ``cpu`` and ``pids`` enabled in the
``cgroup.subtree_control`` of every ancestor. ``memory`` and ``cpu`` are required
(:data:`REQUIRED`).

Placing processes: :func:`inside` moves the calling process into the pod's cgroup for the
duration of a ``with`` block and back to where it was after it; the processes it spawns in
between start there (a child inherits its parent's cgroups at fork), whatever way they are
launched. The caller spawns nothing else concurrently.

Errors are :class:`~sandbox.errors.ConfigError` with one line naming the path or controller
and the fix; nothing this module made is left behind when one is raised.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hypervisor.process import signals_held
from sandbox.errors import ConfigError

#: Controllers a pod needs on the host: its memory limit and its CPU quota.
REQUIRED = ("memory", "cpu")
#: Enabled along the path on cgroup v2 (``pids`` when the host has it).
V2_CONTROLLERS = ("memory", "cpu", "pids")
#: Host memory of an idle pod beyond its containers' limits, bytes: QEMU (guest kernel, agent,
#: TCG translation buffer), virtiofsd, the agent proxy and the shims, measured as the peak of
#: the pod's host cgroup (docs/cgroups.md "The overhead"), rounded up with headroom.
MEMORY_OVERHEAD = 448 * 2**20
#: Host CPU of the VM beyond its containers' quota, thousandths of a CPU (docs/cgroups.md).
CPU_OVERHEAD_MILLI = 250
#: CFS period written with a quota, microseconds (runc's default).
CPU_PERIOD_US = 100_000
#: How long :func:`remove` waits for the processes of a cgroup to exit before killing them:
#: by then the VM is gone, and what remains are shims (they exit as their VM goes) and a
#: ``run -d`` watcher waiting for the lock of the ``rm`` that removes the pod.
EMPTY_WAIT = 1.0
SYSTEMD_RUNNING = Path("/run/systemd/system")
MOUNTINFO = Path("/proc/self/mountinfo")
SELF_CGROUP = Path("/proc/self/cgroup")


# -- the host's hierarchies ----------------------------------------------------------------


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy: its mount point, its controllers (v1: as in
    ``/proc/self/cgroup``, e.g. ``("cpu", "cpuacct")`` or ``("name=systemd",)``; v2: those in
    the root's ``cgroup.controllers``) and this process's cgroup in it, relative to the mount
    (``/`` or ``/a/b``)."""

    mount: Path
    controllers: tuple[str, ...]
    own: str


@dataclass(frozen=True)
class Layout:
    """The host's cgroup layout: ``version`` ``v1`` (v1 or hybrid) or ``v2``, and its
    hierarchies (v2: exactly one)."""

    version: Literal["v1", "v2"]
    hierarchies: tuple[Hierarchy, ...]

    def controllers(self) -> set[str]:
        return {c for h in self.hierarchies for c in h.controllers}

    def missing(self) -> list[str]:
        """The :data:`REQUIRED` controllers this host lacks, in that order."""
        have = self.controllers()
        return [c for c in REQUIRED if c not in have]


def parse_layout(mountinfo: str, self_cgroup: str, read_controllers: Any = None) -> Layout:
    """The layout from ``/proc/self/mountinfo`` and ``/proc/self/cgroup`` texts.

    v1 hierarchies are the ``cgroup`` mounts whose super options hold the controllers of a
    ``/proc/self/cgroup`` line; the v2 hierarchy counts only when no v1 hierarchy is mounted
    (a hybrid host's ``unified`` mount has no controllers). ``read_controllers(mount)`` gives
    a v2 root's ``cgroup.controllers`` words (default: read the file). A mount whose root is
    not ``/`` (inside a container) has it taken off the own path.
    """
    v1_mounts: list[tuple[set[str], str, Path]] = []
    v2_mounts: list[tuple[str, Path]] = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if len(fields) < sep + 4 or sep < 5:
            continue
        fstype, options = fields[sep + 1], set(fields[sep + 3].split(","))
        mount_root, point = _unescape(fields[3]), Path(_unescape(fields[4]))
        if fstype == "cgroup":
            v1_mounts.append((options, mount_root, point))
        elif fstype == "cgroup2":
            v2_mounts.append((mount_root, point))
    own_v1: dict[tuple[str, ...], str] = {}
    own_v2 = "/"
    for line in self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            own_v2 = parts[2]
        elif parts[1]:
            own_v1[tuple(parts[1].split(","))] = parts[2]
    hierarchies = []
    for controllers, own in own_v1.items():
        for options, mount_root, point in v1_mounts:
            if set(controllers) <= options:
                hierarchies.append(Hierarchy(point, controllers, _below(own, mount_root)))
                break
    if hierarchies:
        return Layout("v1", tuple(hierarchies))
    if v2_mounts:
        mount_root, point = v2_mounts[0]
        read = read_controllers or _read_v2_controllers
        return Layout("v2", (Hierarchy(point, tuple(read(point)), _below(own_v2, mount_root)),))
    return Layout("v1", ())


def _unescape(text: str) -> str:
    """mountinfo's octal escapes (``\\040`` for a space) undone."""
    return text.encode().decode("unicode_escape") if "\\" in text else text


def _below(own: str, mount_root: str) -> str:
    if mount_root != "/" and (own == mount_root or own.startswith(mount_root + "/")):
        own = own[len(mount_root) :] or "/"
    return own


def _read_v2_controllers(mount: Path) -> list[str]:
    try:
        return (mount / "cgroup.controllers").read_text().split()
    except OSError:
        return []


def host_layout() -> Layout:
    """This host's layout, as this process sees it."""
    return parse_layout(MOUNTINFO.read_text(), SELF_CGROUP.read_text())


# -- paths ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """Where a client asked the pod to go: a cgroupfs ``path`` (absolute, or relative to
    this process's cgroup) and, for the systemd form, the ``slice`` and ``unit``."""

    path: str
    relative: bool
    slice: str = ""
    unit: str = ""


def clean_path(path: str) -> str:
    """runc's ``utils.CleanPath``: cleaned, ``..`` never above ``/``; relative stays
    relative (``../a`` -> ``a``)."""
    if not path:
        return ""
    if path.startswith("/"):
        return posixpath.normpath(path).replace("//", "/")
    cleaned = posixpath.normpath("/" + path).lstrip("/")
    return cleaned or "."


def expand_slice(slice_name: str) -> str:
    """systemd's slice nesting as a path: ``a-b-c.slice`` -> ``/a.slice/a-b.slice/a-b-c.slice``,
    ``-.slice`` -> ``/``. ConfigError for a name systemd refuses (no ``.slice`` suffix, a
    ``/``, an empty dash-separated part)."""
    suffix = ".slice"
    if not slice_name.endswith(suffix) or len(slice_name) <= len(suffix) or "/" in slice_name:
        raise ConfigError(_systemd_hint(f'invalid slice name "{slice_name}"'))
    if slice_name == "-.slice":
        return "/"
    stem = slice_name[: -len(suffix)]
    path, prefix = "", ""
    for part in stem.split("-"):
        if not part:
            raise ConfigError(_systemd_hint(f'invalid slice name "{slice_name}"'))
        path += f"/{prefix}{part}{suffix}"
        prefix += part + "-"
    return path


def _systemd_hint(what: str) -> str:
    return (
        f'cgroupsPath: {what}: with --systemd-cgroup it must be "slice:prefix:name" '
        '(e.g. "system.slice:pysandbox:ID"); drop --systemd-cgroup for a cgroupfs path'
    )


def request(cgroups_path: str | None, systemd: bool, container_id: str) -> Request:
    """Parse ``linux.cgroupsPath`` as runc does (see the module docstring).

    ConfigError (one line) for a systemd form that is not ``slice:prefix:name`` or names an
    invalid slice or unit.
    """
    raw = cgroups_path or ""
    if systemd:
        if not raw:
            raw = f"system.slice:pysandbox:{container_id}"
        parts = raw.split(":")
        if len(parts) != 3:
            raise ConfigError(_systemd_hint(f'"{raw[:200]}" is not of the form slice:prefix:name'))
        slice_name, prefix, name = parts
        slice_name = slice_name or "system.slice"
        if not name or "/" in name or "/" in prefix or name in (".", ".."):
            raise ConfigError(_systemd_hint(f'invalid unit name in "{raw[:200]}"'))
        unit = name if name.endswith(".slice") else f"{prefix}-{name}.scope" if prefix else name
        if not unit.endswith((".slice", ".scope")):
            unit += ".scope"
        parent = expand_slice(slice_name)
        path = expand_slice(unit) if unit.endswith(".slice") else posixpath.join(parent, unit)
        return Request(path=path, relative=False, slice=slice_name, unit=unit)
    if "\x00" in raw:
        raise ConfigError("cgroupsPath holds a NUL byte")
    cleaned = clean_path(raw) if raw else container_id
    if cleaned in ("/", "."):
        raise ConfigError(
            f'cgroupsPath "{raw}" names the root cgroup: give the pod a cgroup of its own '
            '(e.g. "/pysandbox/ID")'
        )
    return Request(path=cleaned, relative=not cleaned.startswith("/"))


def directories(req: Request, layout: Layout) -> list[Path]:
    """The directory of ``req`` in every hierarchy of ``layout``. A relative path is below
    this process's own cgroup (v2: below its parent, which may hold subgroups)."""
    dirs = []
    for hierarchy in layout.hierarchies:
        base = hierarchy.own
        if req.relative and layout.version == "v2":
            base = posixpath.dirname(base.rstrip("/")) or "/"
        inner = posixpath.join(base, req.path) if req.relative else req.path
        dirs.append(hierarchy.mount / inner.lstrip("/"))
    return dirs


# -- limits --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Host limits of a pod: ``memory`` bytes and ``cpu_milli`` (thousandths of a CPU) or
    None for none."""

    memory: int | None = None
    cpu_milli: int | None = None


def container_limits(resources: Mapping[str, Any] | None) -> dict[str, int | None]:
    """One container's ``linux.resources`` as ``{"memory": bytes, "cpu_milli": n}`` (None:
    unlimited; a quota of -1 or 0, a limit ≤ 0 mean none)."""
    resources = resources or {}
    memory = resources.get("memory") or {}
    cpu = resources.get("cpu") or {}
    limit = memory.get("limit") if isinstance(memory, dict) else None
    quota = cpu.get("quota") if isinstance(cpu, dict) else None
    period = cpu.get("period") if isinstance(cpu, dict) else None
    mem = limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None
    milli = None
    if isinstance(quota, int) and not isinstance(quota, bool) and quota > 0:
        per = period if isinstance(period, int) and period > 0 else CPU_PERIOD_US
        milli = -(-quota * 1000 // per)
    return {"memory": mem, "cpu_milli": milli}


def pod_limits(containers: Mapping[str, Mapping[str, int | None]]) -> Limits:
    """The pod's host limits from its containers' (:func:`container_limits`), CRI's sandbox
    (pause) container left out by the caller: a resource gets a limit only when every
    container has one (as a Kubernetes pod gets a pod-level limit only then): their sum plus
    the overhead. No container at all: no limits."""

    def total(key: str, overhead: int) -> int | None:
        values = [c.get(key) for c in containers.values()]
        if not values or any(v is None for v in values):
            return None
        return sum(v for v in values if v is not None) + overhead

    return Limits(total("memory", MEMORY_OVERHEAD), total("cpu_milli", CPU_OVERHEAD_MILLI))


def limit_files(version: str, limits: Limits) -> list[tuple[str, str]]:
    """The files (name, value) that set ``limits``, in write order; unlimited values are
    written as such, so that a lowered demand (a container without a limit) lifts them."""
    quota = -1 if limits.cpu_milli is None else limits.cpu_milli * CPU_PERIOD_US // 1000
    if version == "v2":
        return [
            ("memory.max", "max" if limits.memory is None else str(limits.memory)),
            ("cpu.max", f"{'max' if quota < 0 else quota} {CPU_PERIOD_US}"),
        ]
    return [
        ("memory.limit_in_bytes", "-1" if limits.memory is None else str(limits.memory)),
        ("cpu.cfs_period_us", str(CPU_PERIOD_US)),
        ("cpu.cfs_quota_us", str(quota)),
    ]


# -- the placement: made, limited, entered, removed -----------------------------------------


@dataclass
class Placement:
    """A pod's host cgroup as recorded in its pod.json: ``dirs`` (one per hierarchy),
    ``created`` (the directories this pod made, parents first: removed in reverse),
    ``version``, the systemd ``unit`` when systemd made it, and each container's limits
    (``containers``: id -> :func:`container_limits`)."""

    dirs: list[str]
    version: str
    created: list[str] = field(default_factory=list)
    unit: str = ""
    containers: dict[str, dict[str, int | None]] = field(default_factory=dict)
    #: Where this process was before systemd's scope took it in (not persisted): the next
    #: :func:`inside` returns it there.
    return_to: list[Path] = field(default_factory=list, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "dirs": list(self.dirs),
            "version": self.version,
            "created": list(self.created),
            "unit": self.unit,
            "containers": {k: dict(v) for k, v in self.containers.items()},
        }

    @classmethod
    def from_json(cls, data: Any) -> Placement | None:
        """Parse :meth:`to_json`; None for anything malformed."""
        if not isinstance(data, dict):
            return None
        dirs, created = data.get("dirs"), data.get("created", [])
        version, unit = data.get("version"), data.get("unit", "")
        containers = data.get("containers", {})
        if not (
            isinstance(dirs, list)
            and all(isinstance(d, str) for d in dirs)
            and isinstance(created, list)
            and all(isinstance(d, str) for d in created)
            and version in ("v1", "v2")
            and isinstance(unit, str)
            and isinstance(containers, dict)
        ):
            return None
        return cls(list(dirs), str(version), list(created), unit, _containers(containers))

    def memory_dir(self) -> Path | None:
        """The directory whose files hold the memory limit and usage."""
        for d in self.dirs:
            if self.version == "v2" or "/memory/" in d + "/":
                return Path(d)
        return None


def _containers(raw: dict[Any, Any]) -> dict[str, dict[str, int | None]]:
    out: dict[str, dict[str, int | None]] = {}
    for key, value in raw.items():
        if isinstance(key, str) and isinstance(value, dict):
            out[key] = {
                k: v if isinstance(v, int) and not isinstance(v, bool) else None
                for k, v in value.items()
                if k in ("memory", "cpu_milli")
            }
    return out


def plan(req: Request, layout: Layout | None = None) -> Placement:
    """Judge ``req`` on this host before anything is made: ConfigError when a required
    controller is missing. Returns the (not yet made) placement."""
    layout = layout or host_layout()
    missing = layout.missing()
    if missing:
        names = ", ".join(missing)
        fix = (
            "mount it under /sys/fs/cgroup"
            if layout.version == "v1"
            else "enable it in the root cgroup.subtree_control"
        )
        raise ConfigError(
            f"host cgroups: the {names} controller{'s are' if len(missing) > 1 else ' is'} "
            f"not available ({fix}); "
            "pysandbox needs them to hold a pod's VM to its limits (see `pysandbox check`)"
        )
    return Placement([str(d) for d in directories(req, layout)], layout.version, unit=req.unit)


def make(placement: Placement, req: Request, *, systemd_running: bool | None = None) -> None:
    """Create the placement's directories (recording each in ``created`` as it is made) or,
    with ``req.unit`` and systemd running, the transient scope. ConfigError naming the path
    and the reason when a directory cannot be made; what was made is removed again."""
    if systemd_running is None:
        systemd_running = SYSTEMD_RUNNING.is_dir()
    try:
        if req.unit and systemd_running:
            # The scope needs a live process: this one; :func:`inside` moves it out after
            # the pod's processes have joined (an empty scope is stopped by systemd).
            placement.return_to = _own_dirs(placement)
            _start_scope(req)
            placement.unit = req.unit
        for d in placement.dirs:
            _make_dir(Path(d), placement)
    except ConfigError:
        remove(placement)
        raise


def _make_dir(target: Path, placement: Placement) -> None:
    """mkdir -p, recording what it made; retried when a parent vanishes meanwhile (another
    pod removing the parent it had made)."""
    for attempt in range(3):
        try:
            _make_dirs(target, placement)
            return
        except FileNotFoundError:
            if attempt == 2:
                raise ConfigError(
                    f"cgroupsPath: cannot create cgroup {target}: its parent keeps vanishing"
                ) from None


def _make_dirs(target: Path, placement: Placement) -> None:
    missing: list[Path] = []
    probe = target
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for d in reversed(missing):
        if placement.version == "v2":
            _enable_controllers(d.parent)
        try:
            with signals_held():  # made and recorded: a SIGTERM lands after both
                d.mkdir()
                placement.created.append(str(d))
        except (FileExistsError, FileNotFoundError):
            if not d.is_dir() and not d.parent.exists():
                raise FileNotFoundError(d) from None
            if not d.is_dir():
                raise ConfigError(
                    f"cgroupsPath: cannot create cgroup {d}: a file of that name exists; give "
                    "a cgroupsPath below a cgroup directory"
                ) from None
            continue
        except OSError as exc:
            raise ConfigError(
                f"cgroupsPath: cannot create cgroup {d}: {exc.strerror or exc}; give a "
                "cgroupsPath below a cgroup this runtime may create in (check the mount and "
                "its permissions)"
            ) from None
        if placement.version == "v1" and d.parent.joinpath("cpuset.cpus").exists():
            _copy_cpuset(d)
    if placement.version == "v2":
        _enable_controllers(target.parent)


def _copy_cpuset(d: Path) -> None:
    """A new v1 cpuset is empty (no task can join it) unless the parent clones: copy."""
    for name in ("cpuset.cpus", "cpuset.mems"):
        with contextlib.suppress(OSError):
            if not (d / name).read_text().strip():
                (d / name).write_text((d.parent / name).read_text())


def _enable_controllers(parent: Path) -> None:
    """Enable :data:`V2_CONTROLLERS` (those ``parent`` has) for its children."""
    try:
        available = (parent / "cgroup.controllers").read_text().split()
        enabled = (parent / "cgroup.subtree_control").read_text().split()
    except OSError:
        return
    for name in V2_CONTROLLERS:
        if name in available and name not in enabled:
            try:
                (parent / "cgroup.subtree_control").write_text(f"+{name}")
            except OSError as exc:
                raise ConfigError(
                    f"cgroupsPath: cannot enable the {name} controller in {parent}: "
                    f"{exc.strerror or exc}; a cgroup v2 parent must not hold processes itself"
                ) from None


def apply(placement: Placement, limits: Limits) -> None:
    """Write ``limits`` into the placement (each file into the hierarchy that has it).
    ConfigError naming the file when the kernel refuses a value (e.g. a memory limit below
    what the pod already uses)."""
    for name, value in limit_files(placement.version, limits):
        for d in placement.dirs:
            path = Path(d) / name
            if not path.exists():
                continue
            try:
                path.write_text(value)
            except OSError as exc:
                raise ConfigError(
                    f"host cgroup: cannot write {value} to {path}: {exc.strerror or exc}"
                ) from None


def set_container(placement: Placement, container_id: str, limits: dict[str, int | None]) -> None:
    """Record one container's limits (or forget them: ``limits`` None-valued and the id
    removed by the caller) and write the pod's new totals."""
    placement.containers[container_id] = dict(limits)
    apply(placement, pod_limits(placement.containers))


@contextlib.contextmanager
def inside(placement: Placement | None) -> Iterator[None]:
    """Run the block with this process in ``placement`` (no-op for None), so that what it
    spawns starts there; afterwards this process is back in the cgroups it was in.
    ConfigError when it cannot join."""
    if placement is None:
        yield
        return
    back = placement.return_to or _own_dirs(placement)
    placement.return_to = []
    _ENTERED.append((placement, back))
    try:
        for name in placement.dirs:
            _join(Path(name))
        yield
    finally:
        _ENTERED.pop()
        for previous in back:
            with contextlib.suppress(ConfigError):
                _join(previous)


#: The placements :func:`inside` blocks of this process are in, innermost last, with the
#: directories each returns to.
_ENTERED: list[tuple[Placement, list[Path]]] = []


@contextlib.contextmanager
def outside() -> Iterator[None]:
    """Run the block where this process was before the innermost :func:`inside` (no-op
    outside any): for work a pod must not be charged with, such as building the template
    VM that every later pod shares."""
    if not _ENTERED:
        yield
        return
    placement, back = _ENTERED[-1]
    for previous in back:
        with contextlib.suppress(ConfigError):
            _join(previous)
    try:
        yield
    finally:
        for name in placement.dirs:
            with contextlib.suppress(ConfigError):
                _join(Path(name))


def _own_dirs(placement: Placement) -> list[Path]:
    """This process's cgroup directory in each hierarchy of the placement."""
    layout = host_layout()
    out = []
    for d in placement.dirs:
        for h in layout.hierarchies:
            if d == str(h.mount) or d.startswith(str(h.mount) + "/"):
                out.append(h.mount / h.own.lstrip("/"))
                break
    return out


def _join(d: Path) -> None:
    try:
        (d / "cgroup.procs").write_text(str(os.getpid()))
    except OSError as exc:
        raise ConfigError(f"host cgroup: cannot join {d}: {exc.strerror or exc}") from None


def _leave(placement: Placement) -> None:
    """Move this process to the root cgroup of each hierarchy of the placement."""
    for h in host_layout().hierarchies:
        if any(d == str(h.mount) or d.startswith(str(h.mount) + "/") for d in placement.dirs):
            with contextlib.suppress(ConfigError):
                _join(h.mount)


def pids(placement: Placement) -> set[int]:
    """The pids in any directory of the placement (and below it). Directories that vanish
    while they are read (another process removing the same pod: a run's teardown and a
    ``delete --force``) count as empty."""
    found: set[int] = set()
    for d in placement.dirs:
        for where, _subdirs, files in os.walk(d):  # skips what it cannot list
            if "cgroup.procs" in files:
                with contextlib.suppress(OSError, ValueError):
                    procs = Path(where, "cgroup.procs").read_text()
                    found.update(int(p) for p in procs.split())
    return found


def remove(placement: Placement, wait: float = EMPTY_WAIT) -> None:
    """Remove what :func:`make` made: wait up to ``wait`` s for the pod's processes to exit,
    SIGKILL what is still there (only processes inside the pod's own cgroup), then remove the
    directories it created (the leaf, then parents it made that are empty) and stop the
    systemd scope. Idempotent. ConfigError naming a directory that could not be removed."""
    if os.getpid() in pids(placement):  # e.g. the run's watcher removing its own pod
        _leave(placement)
    deadline = time.monotonic() + wait
    while pids(placement) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pids(placement):
        for pid in pids(placement):
            if pid != os.getpid():
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        end = time.monotonic() + 5.0
        while pids(placement) and time.monotonic() < end:
            time.sleep(0.05)
    if placement.unit:
        _stop_scope(placement.unit)
    failed = []
    for d in reversed(placement.created):
        path = Path(d)
        for _ in range(50):
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno == errno.EBUSY and d in placement.dirs:
                    time.sleep(0.05)  # the last task is still leaving
                    continue
                if d in placement.dirs:
                    failed.append(f"{d}: {exc.strerror}")
                break  # a parent others still use stays
        else:
            failed.append(f"{d}: busy")
    placement.created = [d for d in placement.created if Path(d).exists()]
    if failed:
        raise ConfigError(f"host cgroup: cannot remove {'; '.join(failed)}")


# -- systemd -------------------------------------------------------------------------------


def scope_argv(req: Request, pid: int) -> list[str]:
    """``busctl`` argv of systemd's ``StartTransientUnit`` for ``req``'s scope holding
    ``pid``, delegated (we write its limits ourselves, as runc does)."""
    return [
        "busctl",
        "call",
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        "StartTransientUnit",
        "ssa(sv)a(sa(sv))",
        req.unit,
        "fail",
        "4",
        "Slice",
        "s",
        req.slice,
        "Delegate",
        "b",
        "true",
        "PIDs",
        "au",
        "1",
        str(pid),
        "Description",
        "s",
        f"pysandbox pod {req.unit}",
        "0",
    ]


def _start_scope(req: Request) -> None:
    busctl = shutil.which("busctl")
    if busctl is None:
        raise ConfigError("--systemd-cgroup: systemd runs but busctl is missing; install systemd")
    done = subprocess.run(scope_argv(req, os.getpid()), capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise ConfigError(
            f"--systemd-cgroup: systemd refused scope {req.unit} in {req.slice}: "
            f"{done.stderr.strip()[:300]}"
        )


def _stop_scope(unit: str) -> None:
    busctl = shutil.which("busctl")
    if busctl is None:
        return
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            [
                busctl,
                "call",
                "org.freedesktop.systemd1",
                "/org/freedesktop/systemd1",
                "org.freedesktop.systemd1.Manager",
                "StopUnit",
                "ss",
                unit,
                "fail",
            ],
            capture_output=True,
            timeout=30,
        )


# -- check -----------------------------------------------------------------------------------


def report(layout: Layout | None = None) -> tuple[bool, str]:
    """(ok, one line) for ``pysandbox check``: the layout and the required controllers."""
    try:
        layout = layout or host_layout()
    except OSError as exc:
        return False, f"cannot read the cgroup layout: {exc}"
    missing = layout.missing()
    have = sorted(layout.controllers())
    if missing:
        return (
            False,
            f"cgroup {layout.version}: missing {', '.join(missing)} "
            f"(have {', '.join(have) or 'none'})",
        )
    return (
        True,
        f"cgroup {layout.version}: {', '.join(REQUIRED)} available "
        "(pods' VMs are held to their limits)",
    )
