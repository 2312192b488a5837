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
    """Send ``signum`` to the container's init (or, with ``all_processes``, to all of it)."""
    record = ContainerRecord.load(root, container_id)
    if not record.status.can_kill():
        if all_processes:
            return
        raise StateError(f"{container_id}: {record.status.refusal('kill')}")
    with load_pod(root, record.pod_id).client() as client:
        client.signal(container_id, "", signum, all_processes)
