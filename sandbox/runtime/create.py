"""``create``: a container in its pod VM (booted or joined), left ``created`` (runc create).

On any failure everything the call started is undone and the id is free again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from sandbox import store as state
from sandbox.errors import ConfigError, NotFoundError, StateError
from sandbox.runtime.bundle import load_bundle, pod_of, privileged_files
from sandbox.runtime.delete import teardown
from sandbox.runtime.hooks import run_hooks
from sandbox.runtime.pods import guest_pid_lookup, pod_lock
from sandbox.runtime.record import ContainerRecord, Status

if TYPE_CHECKING:
    from sandbox.pod.lifecycle import Pod


def create(
    root: Path,
    container_id: str,
    bundle: Path,
    pid_file: Path | None = None,
    console_socket: Path | None = None,
) -> ContainerRecord:
    """Create a container (booting or joining its pod VM); leave it ``created``.

    On any failure everything this call started is undone and the id is free again.
    """
    from sandbox.pod.lifecycle import Pod
    from sandbox.pod.network import netns_path_of
    from sandbox.pod.record import PodStatus
    from sandbox.pod.sharing import share_container_files
    from sandbox.runtime import shim

    state.validate_id(container_id)
    bundle = bundle.resolve()
    spec = load_bundle(bundle)
    terminal = bool(spec["process"].get("terminal"))
    if terminal and console_socket is None:
        raise ConfigError("process.terminal is true: --console-socket is required")
    pod_id, owns_pod = pod_of(container_id, spec)
    privileged = privileged_files(spec)
    record = ContainerRecord.new(
        root,
        container_id,
        {
            "bundle": str(bundle),
            "pod_id": pod_id,
            "owns_pod": owns_pod,
            "terminal": terminal,
            "annotations": spec.get("annotations") or {},
            "rootfs": str((bundle / spec.get("root", {}).get("path", "rootfs")).resolve()),
        },
    )
    pod: Pod | None = None
    try:
        with pod_lock(root, pod_id):
            if owns_pod:
                # The pod's network namespace (CNI, podman) is carried into the VM.
                pod = Pod.boot(root, pod_id, netns=netns_path_of(spec), privileged_files=privileged)
            else:
                try:
                    pod = Pod.load(root, pod_id)
                except NotFoundError:
                    raise NotFoundError(
                        f"pod sandbox {pod_id} of container {container_id} does not exist"
                    ) from None
                if pod.status is not PodStatus.RUNNING:
                    raise StateError(
                        f"pod sandbox {pod_id} of container {container_id} is {pod.status}"
                    )
            pod.record.containers.append(container_id)
            pod.save()
        rootfs, guest_spec = share_container_files(
            pod, container_id, spec, bundle, guest_pids=guest_pid_lookup(root, pod)
        )
        with pod.client() as client:
            # A read-only rootfs is read-only on the host too: the mountpoints the spec needs
            # are made in an overlay whose upper layer is guest memory, then the agent makes
            # the root read-only (runc makes them in the rootfs before its remount).
            record.data["guest_pid"] = client.create_container(
                container_id,
                json.dumps(guest_spec).encode(),
                rootfs,
                overlay=bool((spec.get("root") or {}).get("readonly")),
            )
        handle = shim.spawn(
            root, container_id, pod.agent_address, terminal=terminal, console_socket=console_socket
        )
        record.data["shim"] = handle.to_json()
        record.set_status(Status.CREATED)
        run_hooks(spec, "createRuntime", record)
        if pid_file is not None:
            write_pid_file(pid_file, handle.pid)
    except BaseException:
        teardown(root, record, pod)
        raise
    return record


def write_pid_file(path: Path, pid: int) -> None:
    import secrets

    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    tmp.write_text(str(pid))
    os.replace(tmp, path)
