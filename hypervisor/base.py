"""The interface every VMM driver implements, so the sandbox layer can use a fake.

Lifecycle (one object per VM)::

    start(paused=True) -> "prelaunch" --resume()--> "running" --stop()/kill()--> "shutdown"

``status()`` returns QEMU's run state names (``prelaunch``, ``running``, ``paused``, ...)
while the VMM process lives, and ``shutdown`` once it has exited (whatever the reason).
A driver re-attached from another process (see ``QemuVM.attach``) supports every method
except :meth:`start`.
"""

from __future__ import annotations

import abc
from pathlib import Path
from types import TracebackType

#: Status reported once the VMM process has exited.
SHUTDOWN = "shutdown"


class Hypervisor(abc.ABC):
    """One VM managed by a VMM process."""

    @abc.abstractmethod
    def start(self, *, paused: bool = True) -> None:
        """Spawn the VMM and return once it answers (QMP ready); the guest has not run yet
        when ``paused``. Raises LaunchError (nothing left running) on failure."""

    @abc.abstractmethod
    def resume(self) -> None:
        """Let a paused (``prelaunch``/``paused``) guest run. Raises QMPError on failure."""

    @abc.abstractmethod
    def status(self) -> str:
        """The run state (``prelaunch``, ``running``, ``paused``...) or ``shutdown``."""

    @abc.abstractmethod
    def stop(self, timeout: float = 10.0) -> None:
        """Soft stop (ask the VMM to quit), wait up to ``timeout``, then SIGTERM, then
        SIGKILL; always clean up sockets and files. Idempotent; never raises for a VM that
        is already gone."""

    @abc.abstractmethod
    def kill(self) -> None:
        """Hard stop (SIGKILL) and clean up. Idempotent."""

    @abc.abstractmethod
    def pids(self) -> list[int]:
        """Host pids of the VMM processes (empty once stopped)."""

    @property
    @abc.abstractmethod
    def console_log(self) -> Path:
        """File receiving the guest's serial console."""

    def is_running(self) -> bool:
        """True while the VMM process lives."""
        return self.status() != SHUTDOWN

    def __enter__(self) -> Hypervisor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
