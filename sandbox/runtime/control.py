"""Verbs on a live container: ``pause``/``resume``, ``update``, ``ps`` (runc's names)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox.errors import AgentError, NotFoundError, StateError
from sandbox.runtime.pods import load_pod
from sandbox.runtime.record import ContainerRecord, Status

if TYPE_CHECKING:
    pass


def set_paused(root: Path, container_id: str, paused: bool) -> None:
    """pause (freeze) or resume (thaw) a container."""
    record = ContainerRecord.load(root, container_id)
    allowed = record.status.can_pause() if paused else record.status.can_resume()
    if not allowed:
        verb = "pause" if paused else "resume"
        raise StateError(f"{container_id}: {record.status.refusal(verb)}")
    with load_pod(root, record.pod_id).client() as client:
        if paused:
            client.pause_container(container_id)
        else:
            client.resume_container(container_id)
    record.set_status(Status.PAUSED if paused else Status.RUNNING)


def update(root: Path, container_id: str, resources: dict[str, Any]) -> None:
    """Apply OCI linux.resources to a live container."""
    record = ContainerRecord.load(root, container_id)
    if record.status is Status.STOPPED:
        raise StateError(f"{container_id}: {record.status.refusal('update')}")
    with load_pod(root, record.pod_id).client() as client:
        client.update_container(container_id, json.dumps(resources).encode())


def processes(root: Path, container_id: str) -> list[int]:
    """Pids of the container's processes (as the guest numbers them)."""
    record = ContainerRecord.load(root, container_id)
    if record.status is Status.STOPPED:
        return []
    try:
        with load_pod(root, record.pod_id).client() as client:
            return client.list_processes(container_id)
    except (AgentError, NotFoundError):
        return []
