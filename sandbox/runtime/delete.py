"""``delete``: remove a container and everything it started (runc delete [--force]).

The VM goes away with the pod's sandbox container, or with the last container of the pod.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sandbox.errors import NotFoundError, SandboxError, StateError
from sandbox.runtime import hooks as oci_hooks
from sandbox.runtime.pods import load_pod, pod_lock, stop_pod
from sandbox.runtime.record import ContainerRecord

if TYPE_CHECKING:
    from sandbox.pod.lifecycle import Pod


def delete(
    root: Path, container_id: str, force: bool = False, warn: Callable[[str], None] | None = None
) -> None:
    """Remove a stopped (or, with ``force``, any) container and everything it started; then
    run its poststop hooks (status ``stopped``, no pid), each failure passed to ``warn``
    (default: stderr) as runtime.md asks: the container is gone all the same."""
    try:
        record = ContainerRecord.load(root, container_id)
    except NotFoundError:
        if force:
            return
        raise
    status = record.status
    if not force and not status.can_delete():
        raise StateError(
            f"cannot delete container {container_id}: it is {status}; stop it first or use --force"
        )
    pod: Pod | None = None
    with contextlib.suppress(NotFoundError):
        pod = load_pod(root, record.pod_id)
    teardown(root, record, pod)
    hooks: oci_hooks.Hooks = record.data.get("hooks") or {}
    if hooks.get("poststop"):
        oci_hooks.run_hooks(
            hooks,
            "poststop",
            oci_hooks.state(record, "stopped", None),
            cwd=str(record.data.get("bundle", "/")),
            warn=warn or oci_hooks.warn_stderr,
        )


def teardown(root: Path, record: ContainerRecord, pod: Pod | None) -> None:
    """Undo everything a container has: guest state, mounts, shim, pod membership, record.

    The container that owns its pod takes the VM with it, and with the VM everything of the
    container in the guest: no guest call is made first (in a broken pod, e.g. virtiofsd
    killed, it would only wait out its deadline). A member of a pod that lives on is
    removed from the guest and the pod share.
    """
    from sandbox.pod.sharing import unshare_container_files

    owner = bool(record.data.get("owns_pod"))
    if pod is not None and not owner:
        qemu = pod.process("qemu")
        if qemu is not None and qemu.alive():
            with contextlib.suppress(SandboxError), pod.client(timeout=10.0) as client:
                client.remove_container(record.id)
        unshare_container_files(pod, record.id)
    if pod is not None:
        with pod_lock(root, pod.id) as lock:
            with contextlib.suppress(SandboxError, OSError):
                pod = load_pod(root, pod.id)
            members = [c for c in pod.record.containers if c != record.id]
            pod.record.containers = members
            if owner or not members:
                stop_pod(pod)
                lock.discard()
            else:
                pod.save()
    shim_ref = record.shim
    if shim_ref is not None:
        shim_ref.terminate(timeout=2.0)  # after its VM is gone it has exited already
    import shutil

    shutil.rmtree(record.dir, ignore_errors=True)
