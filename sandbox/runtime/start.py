"""``start``: let a created container run its process (runc start).

Order (runtime.md "Lifecycle" steps 6-9): the guest runs the container's startContainer hooks
in the container and then its program; then the poststart hooks run here (docs/hooks.md).
Before that, a pod owner whose network a client set up after ``create`` (in its stand-in's
network namespace) gets it carried into the VM (:mod:`sandbox.pod.late_network`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import termios
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sandbox.errors import AgentError, FailureReason, HookError, StateError
from sandbox.runtime import hooks as oci_hooks
from sandbox.runtime.pods import load_pod
from sandbox.runtime.record import ContainerRecord, Status

if TYPE_CHECKING:
    from sandbox.pod.agent_client import ContainerClient


#: Seconds ``start`` waits for the shim of a container whose startContainer hook failed to
#: report the exit (the guest process exits right after reporting the failure).
STOPPED_WAIT = 5.0


def start(root: Path, container_id: str, warn: Callable[[str], None] | None = None) -> None:
    """Let a created container run its process; then run its poststart hooks.

    A failing startContainer hook fails the call with :class:`HookError` (naming the hook) and
    leaves the container stopped, as runtime.md asks. A failing poststart hook is passed to
    ``warn`` (default: stderr) and the container keeps running.
    """
    record = ContainerRecord.load(root, container_id)
    if not record.status.can_start():
        raise StateError(f"{container_id}: {record.status.refusal('start')}")
    hooks: oci_hooks.Hooks = record.data.get("hooks") or {}
    pod = load_pod(root, record.pod_id)
    if record.data.get("network_after_create"):
        _network_after_create(root, record)
    with pod.client() as client:
        if record.data.get("terminal"):
            _sync_terminal_size(record, client)
        try:
            client.start_container(container_id, extra_seconds=oci_hooks.guest_seconds(hooks))
        except AgentError as exc:
            if exc.reason is not FailureReason.HOOK_FAILED:
                raise
            _stopped(record)
            raise HookError(exc.detail, hook=oci_hooks.GUEST_KIND) from None
    record.set_status(Status.RUNNING)
    shim = record.shim
    oci_hooks.run_hooks(
        hooks,
        "poststart",
        oci_hooks.state(record, "running", shim.pid if shim is not None else None),
        cwd=str(record.data.get("bundle", "/")),
        warn=warn or oci_hooks.warn_stderr,
    )


def _network_after_create(root: Path, record: ContainerRecord) -> None:
    """Carry what a client put in the stand-in's network namespace since ``create`` into
    the pod's VM (once: the pod then has its network)."""
    from sandbox.pod import late_network
    from sandbox.runtime.pods import pod_lock

    standin = record.shim
    if standin is None:
        raise StateError(f"{record.id}: the container has no stand-in process")
    netns, identity = late_network.standin_netns(standin)
    with pod_lock(root, record.pod_id):
        pod = load_pod(root, record.pod_id)
        if not pod.record.network:
            own = record.id if record.data.get("network_in_container") else ""
            late_network.attach_after_create(pod, netns, identity, own)


def _stopped(record: ContainerRecord) -> None:
    """Record a container whose process ended at start as stopped; give its shim a moment to
    record the exit status and exit (it follows the guest process)."""
    record.set_status(Status.STOPPED)
    shim = record.shim
    if shim is not None:
        with contextlib.suppress(Exception):
            shim.wait(STOPPED_WAIT)


def _sync_terminal_size(record: ContainerRecord, client: ContainerClient) -> None:
    """Give the guest terminal the size the caller set on its pty master, before start.

    The shim relays later changes on SIGWINCH, asynchronously; this makes the first size
    certain when the process starts (``stty size`` as the first command sees it). The
    shim's pty slave is its fd :data:`shim.TERMINAL_FD`; a shim that is gone or not this
    one (pid reuse) is left alone.
    """
    from sandbox.runtime import shim

    handle = record.shim
    if handle is None or not handle.alive():
        return
    try:
        fd = os.open(
            f"/proc/{handle.pid}/fd/{shim.TERMINAL_FD}", os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK
        )
    except OSError:
        return
    try:
        if not os.isatty(fd) or not handle.alive():
            return
        rows, cols = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))[:2]
    except OSError:
        return
    finally:
        os.close(fd)
    if rows and cols:
        client.resize(record.id, "", rows, cols)
