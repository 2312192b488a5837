"""The runtime's access to pods: load (lazily imported), lock, stop, guest pid lookup."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox import store as state
from sandbox.errors import SandboxError
from sandbox.runtime.record import ContainerRecord

if TYPE_CHECKING:
    from sandbox.pod.lifecycle import Pod


def load_pod(root: Path, pod_id: str) -> Pod:
    """The recorded pod (imported here: verbs that never reach a pod, e.g. for an unknown
    id, do not pay for the gRPC client, QEMU and network modules)."""
    from sandbox.pod.lifecycle import Pod

    return Pod.load(root, pod_id)


def pod_lock(root: Path, pod_id: str) -> contextlib.AbstractContextManager[state.Lock]:
    """The pod's lock (:func:`sandbox.pod.record.lock`); its holder discards it
    (``Lock.discard``) when it removed the pod."""
    from sandbox.pod import record as pod_record

    return pod_record.lock(root, pod_id)


def guest_pid_lookup(root: Path, pod: Pod) -> Any:
    def lookup(path: str) -> int | None:
        parts = path.split("/")  # /proc/<pid>/ns/<type>
        if len(parts) != 5 or parts[1] != "proc" or not parts[2].isdigit():
            return None
        for cid in pod.record.containers:
            with contextlib.suppress(SandboxError):
                record = ContainerRecord.load(root, cid)
                shim_ref = record.shim
                if shim_ref is not None and shim_ref.pid == int(parts[2]):
                    return int(record.data["guest_pid"])
        return None

    return lookup


def stop_pod(pod: Pod) -> None:
    """Stop a pod's VM: cleanly through its agent, or at once when its virtiofsd or agent
    proxy is gone. Without virtiofsd the guest hangs on the share until the deadline; without
    the proxy the agent cannot be asked (and ``stop`` runs under the pod lock, which a new
    proxy needs). Nothing is lost either way: the share is not write-back cached, so what the
    guest wrote is on the host already."""
    processes = [pod.process(name) for name in ("virtiofsd", "proxy")]
    if any(ref is not None and not ref.alive() for ref in processes):
        pod.destroy()
    else:
        pod.stop()
