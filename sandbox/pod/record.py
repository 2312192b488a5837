"""The persisted record of one pod and its state machine.

``<root>/p/<digest>/pod.json`` (see :mod:`sandbox.store`) holds what every verb needs to
find, use and tear down a pod's VM: its status, the host processes it started (pid + start
time, recorded the moment each exists), its network devices, its member containers.

Transitions (:data:`TRANSITIONS`; anything else raises StateError)::

    booting --> running --> stopping --> stopped   (directory and record removed)
       \\                    ^   |  ^
        `-------------------'    v  |
         (a failed boot is      broken              (teardown could not finish: something
          rolled back)                               still mounted, a tap not removable)

``stopping`` is written before anything is stopped, so that no other process starts a new
agent proxy for a VM going away (``Pod.client``); ``stopping -> stopping`` is a teardown
retried after a crash, ``broken -> stopping`` one retried after a failure (``delete
--force``). ``stopped`` is never on disk: the record goes with the pod's directory.

The JSON keys are those the first version wrote (``id``, ``status``, ``created``,
``accel``, ``memory_mib``, ``image``, ``processes``, ``network``, ``boot``,
``containers``; later ``privileged_files``, ``remote_locks``, ``cached_files``,
``owner``), so a pod.json written by it reads unchanged; a status this version does not know
reads as ``broken`` (only a teardown is allowed), and keys it does not know are kept as read
(:attr:`PodRecord.extra`).
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hypervisor.process import ProcessHandle
from sandbox import store
from sandbox.errors import ConfigError, NotFoundError, StateError

RECORD_FILE = "pod.json"


class PodStatus(enum.StrEnum):
    """Where a pod is in its life (see the module docstring for the transitions)."""

    BOOTING = "booting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    BROKEN = "broken"


#: Every legal transition: status -> the statuses it may go to.
TRANSITIONS: dict[PodStatus, frozenset[PodStatus]] = {
    PodStatus.BOOTING: frozenset({PodStatus.RUNNING, PodStatus.STOPPING}),
    PodStatus.RUNNING: frozenset({PodStatus.STOPPING}),
    PodStatus.STOPPING: frozenset({PodStatus.STOPPING, PodStatus.STOPPED, PodStatus.BROKEN}),
    PodStatus.BROKEN: frozenset({PodStatus.STOPPING}),
    PodStatus.STOPPED: frozenset(),
}


class BootKind(enum.StrEnum):
    """How a running pod's VM started: booted from scratch or restored from a template."""

    COLD = "cold"
    RESTORED = "restored"


class PodRecord:
    """One pod as stored in its ``pod.json``.

    ``processes`` maps ``qemu``, ``virtiofsd`` and ``proxy`` to the process started for
    it. ``network`` is owned by :mod:`sandbox.pod.network` (its ``attach`` fills it in
    before creating anything; ``detach`` reads it); ``None`` when the pod has no network
    but loopback. ``boot`` is set once the pod runs. ``created`` is seconds since the epoch.

    A plain class, not a dataclass: every verb that finds a pod (``exec`` above all) loads
    one, and importing dataclasses (with inspect) cost those processes ~8 ms. Equality
    compares every field, as a dataclass's did.
    """

    __slots__ = _FIELDS = (
        "id",
        "status",
        "created",
        "accel",
        "memory_mib",
        "cpus",
        "image",
        "processes",
        "network",
        "boot",
        "containers",
        "privileged_files",
        "remote_locks",
        "cached_files",
        "host_cgroup",
        "owner",
        "pool",
        "agent_protocol",
        "extra",
    )

    def __init__(
        self,
        id: str,
        status: PodStatus = PodStatus.BOOTING,
        created: float = 0.0,
        accel: str = "",
        memory_mib: int = 0,
        cpus: int = 1,
        image: str = "",
        processes: dict[str, ProcessHandle] | None = None,
        network: dict[str, Any] | None = None,
        boot: BootKind | None = None,
        containers: list[str] | None = None,
        privileged_files: bool = False,
        remote_locks: bool = False,
        cached_files: bool = False,
        host_cgroup: dict[str, Any] | None = None,
        owner: ProcessHandle | None = None,
        pool: str | None = None,
        agent_protocol: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.id = id
        self.status = status
        self.created = created
        self.accel = accel
        self.memory_mib = memory_mib
        #: vCPUs of the VM (``-smp``); a pod.json without it is a 1-vCPU pod.
        self.cpus = cpus
        self.image = image
        self.processes: dict[str, ProcessHandle] = {} if processes is None else processes
        self.network = network
        self.boot = boot
        self.containers: list[str] = [] if containers is None else containers
        #: Whether the guest's files may carry privileges on the host (docs/security.md).
        self.privileged_files = privileged_files
        #: Whether file locks are held on the host files (docs/file-semantics.md).
        self.remote_locks = remote_locks
        #: Whether the guest keeps file data cached across opens (immutable shares only:
        #: :meth:`sandbox.pod.lifecycle.Pod.boot`, docs/file-semantics.md).
        self.cached_files = cached_files
        #: The pod's host cgroup (:meth:`sandbox.pod.host_cgroup.Placement.to_json`), or None.
        self.host_cgroup = host_cgroup
        #: The process whose end ends the pod (a foreground ``run``, a ``run -d`` until it has
        #: handed the run over to its monitor): its watcher tears the pod down once it is gone
        #: (:mod:`sandbox.run.owner_watch`). None: the pod lives until stopped.
        self.owner = owner
        #: While the pod waits in the warm pool of ``run`` (:mod:`sandbox.run.pool`): the key
        #: of the runs it can serve; None once a run took it (or for any other pod).
        self.pool = pool
        #: The agent's protocol version as its ``Restored`` answered (1.14 on; None: not told,
        #: i.e. an older agent or a cold boot): what the pod's calls may use.
        self.agent_protocol = agent_protocol
        #: Keys of the file this version does not know, written back unchanged.
        self.extra: dict[str, Any] = {} if extra is None else extra

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self._FIELDS)

    __hash__ = None  # type: ignore[assignment]  # mutable, as the dataclass was

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._FIELDS)
        return f"PodRecord({fields})"

    def can_go_to(self, status: PodStatus) -> bool:
        return status in TRANSITIONS[self.status]

    def transition(self, status: PodStatus) -> None:
        """Move to ``status``; StateError (nothing changed) if the table does not allow it."""
        if not self.can_go_to(status):
            raise StateError(f"pod {self.id} cannot go from {self.status} to {status}")
        self.status = status

    def guest_files(self) -> dict[str, str]:
        """Guest paths of the network files the agent wrote (``resolv_conf``, ``hosts``),
        as recorded under ``network.guest_files``; empty when there are none."""
        files = (self.network or {}).get("guest_files")
        if not isinstance(files, dict):
            return {}
        return {k: v for k, v in files.items() if isinstance(k, str) and isinstance(v, str)}

    # -- JSON ------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The ``pod.json`` document (keys as in the module docstring)."""
        data: dict[str, Any] = {
            **self.extra,
            "id": self.id,
            "status": self.status.value,
            "created": self.created,
            "accel": self.accel,
            "memory_mib": self.memory_mib,
            "image": self.image,
            "processes": {name: ref.to_json() for name, ref in self.processes.items()},
            "containers": list(self.containers),
        }
        if self.cpus != 1:  # absent means one vCPU: a pod.json of before reads back as is
            data["cpus"] = self.cpus
        if self.privileged_files:  # absent means false: a first-version pod.json reads back as is
            data["privileged_files"] = True
        if self.remote_locks:  # likewise
            data["remote_locks"] = True
        if self.cached_files:  # likewise
            data["cached_files"] = True
        if self.network is not None:
            data["network"] = self.network
        if self.host_cgroup is not None:
            data["host_cgroup"] = self.host_cgroup
        if self.owner is not None:
            data["owner"] = self.owner.to_json()
        if self.boot is not None:
            data["boot"] = self.boot.value
        if self.pool is not None:
            data["pool"] = self.pool
        if self.agent_protocol is not None:
            data["agent_protocol"] = self.agent_protocol
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], source: Path | str = RECORD_FILE) -> PodRecord:
        """Parse a ``pod.json`` document; ConfigError naming ``source`` and the field when a
        field has the wrong type. Malformed process entries are dropped (nothing can be
        signalled through them), an unknown or missing status reads as ``broken``."""

        def corrupt(what: str) -> ConfigError:
            return ConfigError(f"state file {source} is corrupt: {what}")

        data = dict(data)
        pod_id = data.pop("id", None)
        if not isinstance(pod_id, str):
            raise corrupt("no pod id")
        try:
            store.validate_id(pod_id, "pod")
        except ConfigError:
            raise corrupt(f"invalid pod id {pod_id[:80]!r}") from None
        try:
            status = PodStatus(data.pop("status", None))
        except ValueError:
            status = PodStatus.BROKEN
        if status is PodStatus.STOPPED:
            status = PodStatus.BROKEN  # never written: the record goes with its directory
        created = data.pop("created", 0.0)
        if isinstance(created, bool) or not isinstance(created, int | float):
            raise corrupt("created is not a number")
        if not math.isfinite(created):
            raise corrupt("created is not a finite number")
        memory_mib = data.pop("memory_mib", 0)
        if isinstance(memory_mib, bool) or not isinstance(memory_mib, int):
            raise corrupt("memory_mib is not an integer")
        cpus = data.pop("cpus", 1)
        if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
            raise corrupt("cpus is not a positive integer")
        accel, image = data.pop("accel", ""), data.pop("image", "")
        if not isinstance(accel, str) or not isinstance(image, str):
            raise corrupt("accel and image must be strings")
        raw_processes = data.pop("processes", None)
        raw_processes = {} if raw_processes is None else raw_processes
        if not isinstance(raw_processes, dict):
            raise corrupt("processes is not an object")
        processes = {}
        for name, raw in raw_processes.items():
            ref = ProcessHandle.from_json(raw)
            if isinstance(name, str) and ref is not None:
                processes[name] = ref
        network = data.pop("network", None)
        if network is not None and not isinstance(network, dict):
            raise corrupt("network is not an object")
        raw_boot = data.pop("boot", None)
        try:
            boot = None if raw_boot is None else BootKind(raw_boot)
        except ValueError:
            raise corrupt(f"unknown boot kind {str(raw_boot)[:20]!r}") from None
        containers = data.pop("containers", None)
        containers = [] if containers is None else containers
        if not isinstance(containers, list) or not all(isinstance(c, str) for c in containers):
            raise corrupt("containers is not a list of ids")
        privileged_files = data.pop("privileged_files", False)
        if not isinstance(privileged_files, bool):
            raise corrupt("privileged_files is not a boolean")
        remote_locks = data.pop("remote_locks", False)
        if not isinstance(remote_locks, bool):
            raise corrupt("remote_locks is not a boolean")
        cached_files = data.pop("cached_files", False)
        if not isinstance(cached_files, bool):
            raise corrupt("cached_files is not a boolean")
        host_cgroup = data.pop("host_cgroup", None)
        if host_cgroup is not None and not isinstance(host_cgroup, dict):
            raise corrupt("host_cgroup is not an object")
        owner = ProcessHandle.from_json(data.pop("owner", None))
        pool = data.pop("pool", None)
        if pool is not None and not isinstance(pool, str):
            raise corrupt("pool is not a string")
        agent_protocol = data.pop("agent_protocol", None)
        if agent_protocol is not None and not isinstance(agent_protocol, str):
            raise corrupt("agent_protocol is not a string")
        return cls(
            id=pod_id,
            status=status,
            created=float(created),
            accel=accel,
            memory_mib=memory_mib,
            cpus=cpus,
            image=image,
            processes=processes,
            network=network,
            boot=boot,
            containers=list(containers),
            privileged_files=privileged_files,
            remote_locks=remote_locks,
            cached_files=cached_files,
            host_cgroup=host_cgroup,
            owner=owner,
            pool=pool,
            agent_protocol=agent_protocol,
            extra=data,
        )


# -- storage ---------------------------------------------------------------------------------


def directory(root: Path, pod_id: str) -> Path:
    """``<root>/p/<digest>``: the pod's directory (the id is validated first)."""
    return root / "p" / store.pod_dir_name(store.validate_id(pod_id, "pod"))


def lock(root: Path, pod_id: str) -> contextlib.AbstractContextManager[store.Lock]:
    """The pod's lock: hold it to read, change and save a record other processes may
    change too (container membership, the agent proxy). Not reentrant. Its holder discards
    it (``Lock.discard``) when it removed the pod."""
    return store.locked(root, f"pod-{store.pod_dir_name(pod_id)}")


def load(root: Path, pod_id: str) -> PodRecord:
    """The record of ``pod_id``: NotFoundError when there is none, StateError when the
    directory holds another pod's record, ConfigError when the file is corrupt."""
    path = directory(root, pod_id) / RECORD_FILE
    try:
        data = store.read_json(path)
    except FileNotFoundError:
        raise NotFoundError(f"pod {pod_id} does not exist") from None
    record = PodRecord.from_json(data, path)
    if record.id != pod_id:
        raise StateError(f"pod directory {path.parent} belongs to another pod")
    return record


def save(root: Path, record: PodRecord) -> None:
    """Write ``record`` atomically (0600) into its pod's existing directory; FileNotFoundError
    when that directory is gone (a record never recreates a removed pod)."""
    store.write_json_atomic(directory(root, record.id) / RECORD_FILE, record.to_json())


def all_records(root: Path) -> Iterator[PodRecord]:
    """Every readable pod record under ``root``; unreadable or corrupt ones, and those in
    a directory that is not their pod's, are skipped."""
    base = root / "p"
    for entry in sorted(base.iterdir()) if base.is_dir() else []:
        record = None
        with contextlib.suppress(OSError, ConfigError):
            path = entry / RECORD_FILE
            record = PodRecord.from_json(store.read_json(path), path)
        if record is not None and entry.name == store.pod_dir_name(record.id):
            yield record
