"""``start``: let a created container run its process (runc start)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import termios
from pathlib import Path
from typing import TYPE_CHECKING

from sandbox.errors import SandboxError, StateError
from sandbox.runtime.bundle import load_bundle
from sandbox.runtime.hooks import run_hooks
from sandbox.runtime.pods import load_pod
from sandbox.runtime.record import ContainerRecord, Status

if TYPE_CHECKING:
    from sandbox.pod.agent_client import ContainerClient


def start(root: Path, container_id: str) -> None:
    """Let a created container run its process."""
    record = ContainerRecord.load(root, container_id)
    if not record.status.can_start():
        raise StateError(f"{container_id}: {record.status.refusal('start')}")
    pod = load_pod(root, record.pod_id)
    with pod.client() as client:
        if record.data.get("terminal"):
            _sync_terminal_size(record, client)
        client.start_container(container_id)
    record.set_status(Status.RUNNING)
    with contextlib.suppress(SandboxError):
        run_hooks(load_bundle(Path(record.data["bundle"])), "poststart", record)


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
