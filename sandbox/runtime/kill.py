"""``kill``: signal a container's init or all its processes (runc kill)."""

from __future__ import annotations

import contextlib
import signal as signals
from pathlib import Path
from typing import TYPE_CHECKING

from sandbox.errors import ConfigError, StateError
from sandbox.runtime.pods import load_pod
from sandbox.runtime.record import ContainerRecord

if TYPE_CHECKING:
    pass


def parse_signal(text: str) -> int:
    """A signal number from '9', 'KILL' or 'SIGKILL'; ConfigError otherwise."""
    if text.isdigit():
        number = int(text)
        if 0 < number < 65:
            return number
    else:
        name = text.upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        with contextlib.suppress(AttributeError):
            return int(getattr(signals, name))
    raise ConfigError(f"invalid signal {text!r}")


def kill(root: Path, container_id: str, signum: int, all_processes: bool = False) -> None:
    """Send ``signum`` to the container's init (or, with ``all_processes``, to all of it).

    ``--all`` after the init exited still reaches what is left of the container (children
    of an init that shared a pid namespace, e.g. ``sh -c 'sleep 1000 & exec sleep 2000'``
    in a pod's namespace): runc signals what its cgroup still holds, and containerd's shim
    relies on that (``kill --all`` once such an init exits). It never fails then.
    """
    record = ContainerRecord.load(root, container_id)
    if not record.status.can_kill():
        if all_processes:
            _signal_leftovers(root, record, signum)
            return
        raise StateError(f"{container_id}: {record.status.refusal('kill')}")
    with load_pod(root, record.pod_id).client() as client:
        client.signal(container_id, "", signum, all_processes)


def _signal_leftovers(root: Path, record: ContainerRecord, signum: int) -> None:
    """Signal whatever remains of a stopped container in its pod's VM, if there is one (a
    quick check first: this is containerd's shutdown path, and most pods are gone by then)."""
    from sandbox import store as state
    from sandbox.errors import SandboxError

    if not (root / "p" / state.pod_dir_name(record.pod_id) / "pod.json").is_file():
        return
    with contextlib.suppress(SandboxError):
        pod = load_pod(root, record.pod_id)
        qemu = pod.process("qemu")
        if qemu is None or not qemu.alive():
            return
        with pod.client(timeout=10.0) as client:
            client.signal(record.id, "", signum, True)
