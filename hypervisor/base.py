"""The interface every VMM driver implements, so the sandbox layer can use a fake.

The pod layer gets its VMs from ``sandbox.pod.drivers`` as :class:`Hypervisor` objects and
uses nothing else of them; ``tests/unit/fake_drivers.py`` implements it without a VM.

Lifecycle (one object per VM)::

    start(paused=True) -> "prelaunch" --resume()--> "running" --stop()/kill()--> "shutdown"

    restored from a saved state (``VMConfig.incoming_fd``):
    start() -> wait_incoming() -> "paused" -> [release_zero_pages(), hotplug_share(),
    hotplug_nic()] -> resume() -> "running"

``status()`` returns QEMU's run state names (``prelaunch``, ``running``, ``paused``, ...)
while the VMM process lives, and ``shutdown`` once it has exited (whatever the reason).
A driver re-attached from another process (see ``QemuVM.attach``) supports every method
except :meth:`start`.
"""

from __future__ import annotations

import abc
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hypervisor.process import ProcessHandle
    from hypervisor.qemu_args import NicConfig
    from hypervisor.zeropages import ZeroMap

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

    @property
    @abc.abstractmethod
    def handle(self) -> ProcessHandle:
        """pid + start time of the VMM process (to record, to re-attach); an error before
        :meth:`start`."""

    @property
    def pid(self) -> int:
        """Host pid of the VMM process; an error before :meth:`start`."""
        return self.handle.pid

    @abc.abstractmethod
    def wait_incoming(self, timeout: float) -> None:
        """Wait until a VM started with a saved state to load has loaded it (``paused``).
        LaunchError if it cannot load it, HypervisorTimeout after ``timeout`` seconds."""

    @abc.abstractmethod
    def release_zero_pages(self, known: ZeroMap | None = None) -> int:
        """Give back to the host the guest-RAM pages holding only zeros (paused VM only);
        bytes released. ``known``: where the zero runs of the loaded state are kept
        (:class:`hypervisor.zeropages.ZeroMap`), used and filled."""

    @abc.abstractmethod
    def hotplug_share(self, tag: str, socket: Path, index: int = 0) -> None:
        """Add a virtio-fs share ``tag`` served on vhost-user ``socket``. QMPError on failure."""

    @abc.abstractmethod
    def hotplug_nic(self, nic: NicConfig, index: int) -> None:
        """Add network card ``index``. QMPError on failure."""

    @abc.abstractmethod
    def save_state(self, fd: int, timeout: float) -> None:
        """Pause the guest and write its whole state to ``fd`` (to restore VMs from later);
        the VM stays paused. QMPError on failure, HypervisorTimeout after ``timeout``."""

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
