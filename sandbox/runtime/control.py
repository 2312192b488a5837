"""Verbs on a live container: ``pause``/``resume``, ``update``, ``ps`` (runc's names)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox.errors import AgentError, ConfigError, NotFoundError, StateError
from sandbox.runtime.pods import load_pod
from sandbox.runtime.record import ContainerRecord, Status

if TYPE_CHECKING:
    from sandbox.pod.agent_client import GuestProcess


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
    """Apply OCI linux.resources to a live container (validated here first, as at create)."""
    from ocispec.errors import SpecError
    from ocispec.spec import parse_resources
    from sandbox.runtime import bundle as bundles

    record = ContainerRecord.load(root, container_id)
    if record.status is Status.STOPPED:
        raise StateError(f"{container_id}: {record.status.refusal('update')}")
    try:
        parsed = parse_resources(resources, "resources")
    except SpecError as exc:
        raise ConfigError(f"update: {exc.message}") from None
    bundles.check_guest_resources(parsed, "resources", lambda text: ConfigError(f"update: {text}"))
    pod = load_pod(root, record.pod_id)
    with pod.client() as client:
        client.update_container(container_id, json.dumps(resources).encode())
    _update_host_cgroup(root, record.pod_id, container_id, resources)


def _update_host_cgroup(
    root: Path, pod_id: str, container_id: str, resources: dict[str, Any]
) -> None:
    """Carry an update's memory limit and CPU quota into the pod's host cgroup (the pod's
    totals: docs/cgroups.md "Host cgroups"); fields the update leaves out keep their value."""
    from sandbox.pod import host_cgroup
    from sandbox.runtime.pods import pod_lock

    with pod_lock(root, pod_id):
        pod = load_pod(root, pod_id)
        placement = pod.host_cgroup()
        if placement is None or container_id not in placement.containers:
            return  # no host cgroup, or a CRI sandbox container (it counts for nothing)
        given = host_cgroup.container_limits(resources)
        merged = dict(placement.containers[container_id])
        if isinstance(resources.get("memory"), dict) and "limit" in resources["memory"]:
            merged["memory"] = given["memory"]
        if isinstance(resources.get("cpu"), dict) and "quota" in resources["cpu"]:
            merged["cpu_milli"] = given["cpu_milli"]
        host_cgroup.set_container(placement, container_id, merged)
        pod.save_host_cgroup(placement)


def processes(root: Path, container_id: str) -> list[int]:
    """Host pids standing for the container's processes (``ps --format json``, runc's
    callers signal them and read their /proc): the ``--pid-file`` process of the init while
    it runs, then those of its live execs (detached shims, attached ``exec`` calls). The
    guest's own pids are not host processes; :func:`process_table` shows them to people."""
    record = ContainerRecord.load(root, container_id)
    if record.status is Status.STOPPED:
        return []
    shim = record.shim
    pids = [shim.pid] if shim is not None and shim.alive() else []
    return pids + [handle.pid for handle in record.exec_standins().values()]


@dataclass(frozen=True)
class ProcessRow:
    """A row of ``pysandbox ps ID``: a guest process and its host stand-in, if it has one."""

    process: GuestProcess
    host_pid: int | None


def process_table(root: Path, container_id: str) -> list[ProcessRow]:
    """The container's processes as it sees them (guest pids, commands), each with the host
    pid that stands for it (the init's and the execs'; None for the others). Empty for a
    stopped container or when the agent cannot be asked."""
    record = ContainerRecord.load(root, container_id)
    if record.status is Status.STOPPED:
        return []
    try:
        with load_pod(root, record.pod_id).client() as client:
            table = client.process_table(container_id)
    except (AgentError, NotFoundError):
        return []
    shim = record.shim
    init_pid = shim.pid if shim is not None and shim.alive() else None
    standins = record.exec_standins()
    rows = []
    for process in table:
        host_pid = init_pid if process.init else None
        if process.exec_id in standins:
            host_pid = standins[process.exec_id].pid
        rows.append(ProcessRow(process, host_pid))
    return rows


def render_table(rows: list[ProcessRow]) -> str:
    """``ps ID``'s text: PID (as the container sees it), PPID, UID, HOST-PID ("-" for a
    process without a host stand-in) and the command, one process a line."""
    lines = [f"{'PID':>7} {'PPID':>7} {'UID':>7} {'HOST-PID':>8}  CMD"]
    for row in rows:
        proc = row.process
        host = "-" if row.host_pid is None else str(row.host_pid)
        lines.append(f"{proc.pid:>7} {proc.ppid:>7} {proc.uid:>7} {host:>8}  {proc.command}")
    return "\n".join(lines)
