"""The persisted record of one container and its state machine.

``<root>/<id>/state.json`` holds what every verb needs: bundle, pod, shim process, status.
Status is stored, then corrected by what can be observed: a container whose shim is gone
has stopped, whatever the file says (the shim writes the exit status before it exits).

Transitions (runc's)::

    creating -> created -> running <-> paused
        \\          \\         \\
         `----------`---------`--> stopped  (exit, kill, or a failed step)
"""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox import store as state
from sandbox.errors import NotFoundError, SandboxError, StateError
from sandbox.runtime.record_names import EXIT_FILE, STANDIN_SUFFIX, standin_name

if TYPE_CHECKING:
    from hypervisor.process import ProcessHandle

#: The runtime-spec version of the state documents (``state``, hooks' stdin).
OCI_VERSION = "1.0.2"


def standin_file(record_dir: Path, exec_id: str) -> Path:
    """The file naming the host stand-in of exec ``exec_id`` (see :data:`STANDIN_SUFFIX`)."""
    return record_dir / standin_name(exec_id)


class Status(enum.StrEnum):
    """OCI container status (plus the transient ``creating``)."""

    CREATING = "creating"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"

    def can_start(self) -> bool:
        return self is Status.CREATED

    def can_kill(self) -> bool:
        return self in (Status.CREATED, Status.RUNNING, Status.PAUSED)

    def can_pause(self) -> bool:
        return self is Status.RUNNING

    def can_resume(self) -> bool:
        return self is Status.PAUSED

    def can_exec(self) -> bool:
        return self is Status.RUNNING

    def can_delete(self) -> bool:
        return self in (Status.STOPPED, Status.CREATED, Status.CREATING)

    def refusal(self, verb: str) -> str:
        """runc's words for refusing ``verb`` (start, kill, exec, pause, resume, update) in
        this status. Clients parse them: containerd's shim takes "container not running"
        from ``kill`` to mean the process has already finished (runc's libcontainer errors).
        """
        if verb == "start":
            if self is Status.STOPPED:
                return "cannot start a container that has stopped"
            if self is Status.RUNNING:
                return "cannot start an already running container"
            return f"cannot start a container in the {self} state"
        if verb == "exec":
            return f"cannot exec in a {self} container"
        if verb == "resume":
            return "container not paused"
        return "container not running"


class ContainerRecord:
    """A container as stored on disk.

    A plain class, not a dataclass: ``state``, ``kill`` and ``delete`` load records on every
    call, and the dataclasses module costs those short-lived processes more than the record.
    """

    def __init__(self, root: Path, container_id: str, data: dict[str, Any]) -> None:
        self.root = root
        self.id = container_id
        self.data = data

    def __repr__(self) -> str:
        return f"ContainerRecord(root={self.root!r}, id={self.id!r}, data={self.data!r})"

    @property
    def dir(self) -> Path:
        return self.root / self.id

    @property
    def pod_id(self) -> str:
        return str(self.data["pod_id"])

    @property
    def shim(self) -> ProcessHandle | None:
        if self.data.get("shim") is None:
            return None
        from hypervisor.process import ProcessHandle

        return ProcessHandle.from_json(self.data.get("shim"))

    @property
    def status(self) -> Status:
        """The stored status, unless what it implies is gone: a container whose shim is
        gone has stopped, and so has one still ``creating`` whose creator (the ``create``
        or ``run`` process, recorded by :meth:`new`) is gone — it was killed half-way."""
        stored = Status(self.data.get("status", "stopped"))
        if stored in (Status.CREATED, Status.RUNNING, Status.PAUSED):
            shim = self.shim
            if shim is None or not shim.alive():
                return Status.STOPPED
        if stored is Status.CREATING and self.data.get("creator") is not None:
            from hypervisor.process import ProcessHandle

            creator = ProcessHandle.from_json(self.data.get("creator"))
            if creator is None or not creator.alive():
                return Status.STOPPED
        return stored

    def exec_standins(self) -> dict[str, ProcessHandle]:
        """Exec id -> the live host process standing in for that exec (its detached shim,
        or the attached ``exec`` call), oldest first."""
        from hypervisor.process import ProcessHandle

        found: list[tuple[int, str, ProcessHandle]] = []
        for path in self.dir.glob(f"*{STANDIN_SUFFIX}"):
            try:
                handle = ProcessHandle.from_json(state.read_json(path))
            except (OSError, ValueError, SandboxError):
                continue
            if handle is not None and handle.alive():
                found.append((handle.start, path.name.removesuffix(STANDIN_SUFFIX), handle))
        return {exec_id: handle for _, exec_id, handle in sorted(found, key=lambda f: f[:2])}

    def exit_status(self) -> int | None:
        """The exit status the shim recorded (its ``exit`` file), or None if there is none
        yet (still running, never started) or it is unreadable."""
        try:
            status = state.read_json(self.dir / EXIT_FILE).get("status")
        except (OSError, ValueError, SandboxError):
            return None
        return status if isinstance(status, int) else None

    def set_status(self, status: Status) -> None:
        self.data["status"] = status.value
        self.save()

    def save(self) -> None:
        state.write_json_atomic(self.dir / "state.json", self.data)

    def oci_state(self) -> dict[str, Any]:
        """The OCI state document ``pysandbox state`` prints."""
        status = self.status
        shim = self.shim
        return {
            "ociVersion": OCI_VERSION,
            "id": self.id,
            "status": "created" if status is Status.CREATING else status.value,
            "pid": shim.pid if shim is not None and status is not Status.STOPPED else 0,
            "bundle": self.data.get("bundle", ""),
            "rootfs": self.data.get("rootfs", ""),
            "created": self.data.get("created", ""),
            "annotations": self.data.get("annotations", {}),
            "owner": "",
        }

    @classmethod
    def new(cls, root: Path, container_id: str, data: dict[str, Any]) -> ContainerRecord:
        """Reserve ``<root>/<id>``, ``creating`` by this process (its ``creator``); StateError
        if the id is taken."""
        import datetime

        from hypervisor.process import ProcessHandle

        state.validate_id(container_id)
        record = cls(
            root,
            container_id,
            {
                "id": container_id,
                "status": Status.CREATING.value,
                "created": datetime.datetime.now(datetime.UTC).isoformat(),
                "creator": ProcessHandle.of(os.getpid()).to_json(),
                **data,
            },
        )
        try:
            record.dir.mkdir(mode=0o700)
        except FileExistsError:
            raise StateError(f"container {container_id} already exists") from None
        try:
            record.save()
        except BaseException:  # a signal turned into SystemExit, a full disk: ours, undone
            import shutil  # here: it imports bz2 and lzma, ~3 ms of every verb's start

            shutil.rmtree(record.dir, ignore_errors=True)
            raise
        return record

    @classmethod
    def load(cls, root: Path, container_id: str) -> ContainerRecord:
        """The record of ``container_id``; NotFoundError when there is none."""
        state.validate_id(container_id)
        path = root / container_id / "state.json"
        try:
            data = state.read_json(path)
        except FileNotFoundError:
            raise NotFoundError(f"{container_id}: container does not exist") from None
        return cls(root, container_id, data)

    @classmethod
    def all(cls, root: Path) -> list[ContainerRecord]:
        records = []
        for entry in sorted(root.iterdir()) if root.is_dir() else []:
            if (entry / "state.json").is_file():
                try:
                    records.append(cls.load(root, entry.name))
                except Exception:
                    continue
        return records
