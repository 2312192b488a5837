"""The warm pool of ``pysandbox run``: VMs restored ahead, each taken by one run.

Opt-in: with ``PYSANDBOX_POOL=N`` (1..:data:`MAX_READY`) a run that ended (foreground) or
started (``-d``) leaves a filler behind (:mod:`sandbox.run.pool_fill`): a process at the
host's idle CPU priority (``SCHED_IDLE``: it runs only when nothing else wants the CPU)
that restores one more pod like the run's from the template VM, until ``N`` such pods wait,
and marks it waiting (:attr:`sandbox.pod.record.PodRecord.pool`: the :class:`Kind` key).
The next run of that kind takes one instead of restoring its own: it becomes the pod's
owner, puts the pod's processes back at the normal priority, then shares its image and
creates its container as usual. Each pod was restored on its own (its own host entropy for
its CRNG, the time), serves one run and goes with it: nothing is shared between runs that a
guest could write (docs/warm-pool.md).

A waiting pod's owner is its filler, which became its timer (``sleep``), watched by a run's
owner watcher: when the timer ends, after ``PYSANDBOX_POOL_IDLE`` seconds (default
:data:`DEFAULT_IDLE`) or killed, the pod goes unless a run took it first (and ended the
timer after making itself the owner). ``pysandbox pool drain`` removes every
waiting pod of a root, ``pysandbox pool ls`` lists them.

Only runs whose VM a pooled pod can be are served: no ``cgroupsPath`` of the spec's own, no
``--name`` for a foreground run (its pod goes by that name). The key covers the VM's memory,
vCPUs, network (none or user), file privileges and caching, the container's host limits, the
guest image (its manifest's mtime) and the environment that shapes a boot (jail,
accelerator, templates, QEMU, virtiofsd).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypervisor.process import ProcessHandle
from sandbox.errors import ConfigError, SandboxError

if TYPE_CHECKING:
    from sandbox.pod.lifecycle import Pod

POOL_ENV = "PYSANDBOX_POOL"
IDLE_ENV = "PYSANDBOX_POOL_IDLE"
#: Seconds an unclaimed pod waits before its timer removes it.
DEFAULT_IDLE = 600.0
MAX_IDLE = 86400.0
#: At most this many pods of one kind wait (each idle one costs ~150 MiB and a little CPU).
MAX_READY = 8
#: Pod ids of the pool: this prefix and 12 hex digits.
PREFIX = "pool-"
#: ``ROOT/pool-fillers/PID-START-KEY``: the fillers started (and so the timers): counted by
#: ``refill`` while they restore, ended by ``drain``.
FILLERS = "pool-fillers"
#: What shapes a boot besides the arguments of ``Pod.boot``: part of the key.
_BOOT_ENV = (
    "PYSANDBOX_ACCEL",
    "PYSANDBOX_BOOT_TIMEOUT",
    "PYSANDBOX_GUEST_IMAGE",
    "PYSANDBOX_JAIL",
    "PYSANDBOX_JAIL_IDS",
    "PYSANDBOX_JAIL_USER",
    "PYSANDBOX_LOCKS",
    "PYSANDBOX_QEMU",
    "PYSANDBOX_TEMPLATES",
    "PYSANDBOX_TEMPLATE_DIR",
    "PYSANDBOX_TEMPLATE_MAX_MIB",
    "PYSANDBOX_VIRTIOFSD",
)


def wanted() -> int:
    """How many pods of a kind to keep waiting (``PYSANDBOX_POOL``; unset or empty: 0, no
    pool). ConfigError for anything but an integer 0..MAX_READY."""
    raw = os.environ.get(POOL_ENV, "").strip()
    if not raw:
        return 0
    if not raw.isdigit() or int(raw) > MAX_READY:
        raise ConfigError(
            f"{POOL_ENV}={raw[:40]!r}: give how many VMs to keep ready for runs, 0..{MAX_READY}"
        )
    return int(raw)


def idle_seconds() -> float:
    """``PYSANDBOX_POOL_IDLE`` (default :data:`DEFAULT_IDLE`); ConfigError unless a number of
    seconds in (0, MAX_IDLE]."""
    raw = os.environ.get(IDLE_ENV, "").strip()
    if not raw:
        return DEFAULT_IDLE
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= MAX_IDLE:
        raise ConfigError(
            f"{IDLE_ENV}={raw[:40]!r}: give the seconds an unused ready VM is kept, "
            f"up to {MAX_IDLE:.0f}"
        )
    return value


@dataclasses.dataclass(frozen=True)
class Kind:
    """What a pod of the pool must match to serve a run (see the module docstring)."""

    memory_mib: int
    cpus: int
    #: ``--network user``: QEMU's user networking, configured in the guest at its boot as
    #: for every such run (the container shares the guest's network namespace).
    user_network: bool
    privileged_files: bool
    cached_files: bool
    #: :func:`sandbox.pod.host_cgroup.container_limits` of the run's container.
    limits: dict[str, int | None]
    #: The guest image's manifest: path and mtime (a rebuilt image makes a new kind).
    image: str
    environment: dict[str, str]
    #: The containers' cgroup layout (:func:`sandbox.pod.guest_cgroup.layout_for`), set up
    #: in the guest ahead (a VM has one; a container asking for the other is refused).
    cgroup_layout: str = "v2"
    #: What the VM's host processes inherit from the run that spawned the filler
    #: (:func:`caller_context`): only a run in the same context may take it (breaker5: a run
    #: of another job was charged to, and killed with, the filler's job's cgroup; one in an
    #: isolated network namespace reached the host's network through the filler's user-mode
    #: networking; one in another mount namespace saw an empty root; rlimits and CPU
    #: affinity came from the filler's run).
    context: str = ""

    def key(self) -> str:
        """A digest of every field (16 hex digits)."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Kind:
        """ConfigError for a document that is not a :meth:`to_json` of this version."""
        try:
            kind = cls(**data)
        except TypeError as exc:
            raise ConfigError(f"not a pool kind: {exc}") from None
        if not isinstance(kind.limits, dict) or not isinstance(kind.environment, dict):
            raise ConfigError("not a pool kind: limits and environment are objects")
        return kind


def kind_for(
    memory_mib: int,
    cpus: int,
    user_network: bool,
    privileged_files: bool,
    cached_files: bool,
    limits: dict[str, int | None],
    cgroup_layout: str = "v2",
) -> Kind | None:
    """The kind of a run's VM as ``boot_pod`` would boot it; None when the guest image
    cannot be found (the boot reports it)."""
    from hypervisor.errors import GuestImageError
    from hypervisor.guest_image import find_image

    try:
        manifest = find_image().dir / "manifest.json"
        image = f"{manifest}:{manifest.stat().st_mtime_ns}"
    except (GuestImageError, OSError):
        return None
    environment = {name: os.environ[name] for name in _BOOT_ENV if name in os.environ}
    try:
        context = caller_context()
    except OSError:
        return None
    return Kind(
        memory_mib,
        cpus,
        user_network,
        privileged_files,
        cached_files,
        dict(limits),
        image,
        environment,
        cgroup_layout,
        context,
    )


def caller_context() -> str:
    """A digest (16 hex digits) of what a process this one spawns inherits and a pod's host
    processes keep: its host cgroups (the pod's is made below them), its network, mount,
    user, pid, ipc and uts namespaces (virtiofsd's view of the files a run shares, QEMU's
    user-mode network), its credentials, resource limits and CPU affinity. OSError if
    /proc cannot be read."""
    import resource

    with open("/proc/self/cgroup", encoding="utf-8") as own:
        parts = [own.read()]
    parts += [
        os.readlink(f"/proc/self/ns/{ns}") for ns in ("net", "mnt", "user", "pid", "ipc", "uts")
    ]
    parts.append(repr((os.geteuid(), os.getegid(), sorted(os.getgroups()))))
    limits = [name for name in dir(resource) if name.startswith("RLIMIT_")]
    parts += [f"{name}={resource.getrlimit(getattr(resource, name))}" for name in sorted(limits)]
    parts.append(repr(sorted(os.sched_getaffinity(0))))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def claim(root: Path, kind: Kind, owner: ProcessHandle) -> Pod | None:
    """Take a waiting pod of ``kind``, or None when there is none (or the pool is off). The
    pod is ``owner``'s from now on (its record says so before anything else happens), its
    timer is ended, its processes run at the normal priority again. A waiting pod found
    dead is removed on the way."""
    from sandbox.pod import record as pod_record
    from sandbox.pod.lifecycle import Pod
    from sandbox.pod.record import PodStatus

    key = kind.key()
    for found in pod_record.all_records(root):
        if found.pool != key or found.status is not PodStatus.RUNNING:
            continue
        with pod_record.lock(root, found.id):
            try:
                pod = Pod.load(root, found.id)
            except SandboxError:
                continue
            if pod.record.pool != key:
                continue  # another run's now
            timer = pod.record.owner
            pod.record.pool = None
            pod.record.owner = owner
            pod.save()
        _end_timer(timer)
        if pod.observed_status() is not PodStatus.RUNNING:
            with contextlib.suppress(SandboxError), pod_record.lock(root, pod.id) as lock:
                pod.destroy()
                lock.discard()
            continue
        _normal_priority(pod)
        return pod
    return None


def _normal_priority(pod: Pod) -> None:
    """Every thread of the pod's host processes back to SCHED_OTHER (the filler started them
    at SCHED_IDLE)."""
    from sandbox.pod import host_cgroup

    placement = pod.host_cgroup()
    pids = host_cgroup.pids(placement) if placement is not None else set()
    pids |= {ref.pid for ref in pod.record.processes.values() if ref.alive()}
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setscheduler(int(tid), os.SCHED_OTHER, os.sched_param(0))


def waiting(root: Path, key: str | None = None) -> list[Pod]:
    """The pods waiting in ``root``'s pool (of kind ``key`` only, when given). One whose timer
    is gone while it still waits is removed instead: its owner watcher, which tears it down
    when the timer ends, is gone too (killed: nothing else would ever remove the VM)."""
    from sandbox.pod.lifecycle import Pod

    found = []
    for pod in Pod.list(root):
        pool_key = pod.record.pool
        if pool_key is None or key not in (None, pool_key):
            continue
        timer = pod.record.owner
        if timer is not None and not timer.alive():
            with contextlib.suppress(SandboxError, OSError):
                expire(root, pod.id, pool_key)
            continue
        found.append(pod)
    return found


def refill(root: Path, kind: Kind | None) -> None:
    """Start fillers for ``kind`` when the pool is on, as many as :func:`wanted` VMs of it
    lack (those waiting and those on their way count); quietly nothing otherwise (a run
    never fails for its pool). Each filler runs detached, at SCHED_IDLE, its output in
    ``ROOT/logs/pool.log``."""
    if kind is None:
        return
    try:
        count = wanted()
        idle = idle_seconds()
    except ConfigError:
        return
    if count == 0:
        return
    with contextlib.suppress(SandboxError, OSError):
        from sandbox import store as state

        key = kind.key()
        fillers = state.ensure_dir(root / FILLERS)
        filling = 0
        for entry in os.listdir(fillers):
            handle = _filler(entry)
            if handle is None or not handle.alive():  # a filler or timer gone since
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(fillers / entry)
            elif entry.endswith(f"-{key}") and not _is_timer(handle):
                filling += 1
        for _ in range(count - len(waiting(root, key)) - filling):
            _spawn_filler(root, kind, idle)


def _spawn_filler(root: Path, kind: Kind, idle: float) -> None:
    """Start one filler of ``kind`` (:mod:`sandbox.run.pool_fill`) and record it in
    :data:`FILLERS`; OSError if it cannot be started."""
    from sandbox import IMPORT_ROOT
    from sandbox import store as state

    logs = state.ensure_dir(root / "logs")
    log_fd = os.open(logs / "pool.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    try:
        argv = [sys.executable, "-m", "sandbox.run.pool_fill", "fill", str(root), str(idle)]
        argv.append(json.dumps(kind.to_json()))
        pid = os.posix_spawn(
            sys.executable,
            argv,
            {**os.environ, "PYTHONPATH": IMPORT_ROOT},
            file_actions=[
                (os.POSIX_SPAWN_DUP2, null_fd, 0),
                (os.POSIX_SPAWN_DUP2, log_fd, 1),
                (os.POSIX_SPAWN_DUP2, log_fd, 2),
            ],
            setsid=True,
        )  # (posix_spawn cannot set SCHED_IDLE: the filler sets it first thing)
    finally:
        os.close(log_fd)
        os.close(null_fd)
    with contextlib.suppress(ProcessLookupError):
        filler = ProcessHandle.of(pid)
        (root / FILLERS / f"{filler.pid}-{filler.start}-{kind.key()}").touch()


def expire(root: Path, pod_id: str, key: str) -> bool:
    """Remove pod ``pod_id`` if it still waits as ``key``; whether it did."""
    from sandbox.pod import record as pod_record
    from sandbox.pod.lifecycle import Pod

    with pod_record.lock(root, pod_id) as lock:
        try:
            pod = Pod.load(root, pod_id)
        except SandboxError:
            return False
        if pod.record.pool != key:
            return False
        pod.destroy()
        lock.discard()
        return True


def drain(root: Path) -> list[str]:
    """Remove every waiting pod of ``root`` (and end its timer), then end the fillers still
    restoring one (their owner watchers tear those pods down); the waiting pods' ids."""
    removed = []
    for pod in waiting(root):
        timer = pod.record.owner
        if pod.record.pool is not None and expire(root, pod.id, pod.record.pool):
            removed.append(pod.id)
            _end_timer(timer)
    fillers = root / FILLERS
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(fillers):
            _end_timer(_filler(entry))  # one whose pod a run took: no harm
            with contextlib.suppress(FileNotFoundError):
                os.unlink(fillers / entry)
    return removed


def _filler(entry: str) -> ProcessHandle | None:
    """The process a ``PID-START-KEY`` entry of :data:`FILLERS` names; None for another
    name."""
    pid, _, rest = entry.partition("-")
    start = rest.partition("-")[0]
    return ProcessHandle(int(pid), int(start)) if pid.isdigit() and start.isdigit() else None


def _is_timer(filler: ProcessHandle) -> bool:
    """Whether a filler has become its pod's timer (``sleep``): its pod waits (or was
    taken), so it no longer counts as one on its way."""
    try:
        with open(f"/proc/{filler.pid}/comm", encoding="utf-8") as comm:
            return comm.read().strip() == "sleep"
    except OSError:
        return True


def _end_timer(timer: ProcessHandle | None) -> None:
    """SIGKILL a waiting pod's timer (the filler, become ``sleep``) if it is still that
    process: its owner watcher then finds the pod gone or another's and does nothing."""
    if timer is not None:
        timer.signal(signal.SIGKILL)
