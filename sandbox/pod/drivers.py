"""The seam between the pod layer and the host processes of a VM.

A pod (:mod:`sandbox.pod.lifecycle`) and a template VM (:mod:`sandbox.pod.template`) start
and stop three kinds of host process — the VMM, virtiofsd and the agent proxy — only through
a :class:`Drivers` object, so that unit tests can put a fake in their place and assert the
order of every start and stop without root or a VM (``tests/unit/fake_drivers.py``).

:func:`current` gives the drivers in use: :class:`HostDrivers` (QEMU, virtiofsd, the agent
proxy daemon) unless a test installed others with :func:`installed`.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import socket

    from hypervisor.base import Hypervisor
    from hypervisor.process import ProcessHandle
    from hypervisor.qemu_args import VMConfig
    from hypervisor.virtiofsd import LockMode

#: Seconds a process gets to exit after SIGTERM before SIGKILL.
TERMINATE_GRACE = 2.0


class FileServer(Protocol):
    """The virtio-fs daemon of one share, as a pod uses it (``hypervisor.virtiofsd``)."""

    @property
    def handle(self) -> ProcessHandle:
        """pid + start time of the running daemon (to record)."""
        ...

    def start(self) -> None:
        """Start serving; return once the VMM can connect. Raises (nothing left running)
        when it cannot."""

    def stop(self, timeout: float = ...) -> None:
        """Stop it and remove its socket; idempotent."""


class PendingProxy(Protocol):
    """An agent proxy started but perhaps not yet ready (:meth:`Drivers.begin_proxy`)."""

    @property
    def handle(self) -> ProcessHandle:
        """pid + start time of its process (to record at once)."""
        ...

    def wait(self) -> ProcessHandle:
        """Return once it serves; AgentError (its process killed and reaped) when it does
        not become ready."""
        ...


class _Started:
    """A proxy that was ready when made (the default :meth:`Drivers.begin_proxy`)."""

    def __init__(self, handle: ProcessHandle) -> None:
        self._handle = handle

    @property
    def handle(self) -> ProcessHandle:
        return self._handle

    def wait(self) -> ProcessHandle:
        return self._handle


class Drivers(abc.ABC):
    """Makes and stops the host processes of a pod's VM."""

    @abc.abstractmethod
    def hypervisor(self, config: VMConfig) -> Hypervisor:
        """An unstarted VM for ``config``."""

    @abc.abstractmethod
    def running(self, config: VMConfig, process: ProcessHandle) -> Hypervisor:
        """The VM of ``config`` that ``process`` (the recorded VMM) runs, started earlier,
        possibly by another process; it reports ``shutdown`` if that process is gone."""

    @abc.abstractmethod
    def file_server(
        self,
        socket_path: Path,
        shared_dir: Path,
        log_path: Path,
        *,
        privileged_files: bool,
        locks: LockMode = "local",
        cached: bool = False,
    ) -> FileServer:
        """An unstarted virtio-fs daemon sharing ``shared_dir`` on ``socket_path``; unless
        ``privileged_files``, what the guest writes cannot carry privileges on the host
        (no device nodes, setuid/setgid bits or file capabilities; docs/security.md).
        ``locks``: where file locks are held (docs/file-semantics.md). ``cached``: the
        guest keeps file data cached across opens — for a share nothing but the guest
        changes (docs/file-semantics.md, "Cached shares")."""

    @abc.abstractmethod
    def start_proxy(
        self, directory: Path, vm_pid: int, forward: socket.socket | None = None
    ) -> ProcessHandle:
        """Start the agent proxy of the VM (VMM pid ``vm_pid``) whose sockets are in
        ``directory``; it serves ``directory/agent.sock``, and port-forwarded connections
        accepted on ``forward`` (a listener in the pod's network namespace; the caller
        closes its copy). Returns once it is ready; AgentError (nothing left running) when it
        does not become ready."""

    def begin_proxy(
        self, directory: Path, vm_pid: int, forward: socket.socket | None = None
    ) -> PendingProxy:
        """:meth:`start_proxy` without waiting for it to be ready: the caller records its
        process, does other work while it starts (e.g. QEMU loading a template's state) and
        calls ``wait()`` before using the agent. By default it is :meth:`start_proxy`."""
        return _Started(self.start_proxy(directory, vm_pid, forward))

    @abc.abstractmethod
    def terminate(self, name: str, process: ProcessHandle) -> None:
        """Stop the recorded process ``name`` (``qemu``, ``virtiofsd``, ``proxy``): SIGTERM,
        then SIGKILL after :data:`TERMINATE_GRACE` s. Never raises for a process that is gone
        (or whose pid now belongs to another process: it is left alone)."""


class HostDrivers(Drivers):
    """The real thing: QEMU, virtiofsd and the agent proxy daemon."""

    def hypervisor(self, config: VMConfig) -> Hypervisor:
        """A QEMU jailed as the environment says (hypervisor/jail_ids.py: on unless
        ``PYSANDBOX_JAIL=off``); JailError for misconfigured jail settings."""
        from hypervisor import jail_ids
        from hypervisor.qemu import QemuVM

        return QemuVM(config, jail=jail_ids.settings())

    def running(self, config: VMConfig, process: ProcessHandle) -> Hypervisor:
        from hypervisor import jail_ids
        from hypervisor.qemu import QemuVM

        return QemuVM.attach(config, process.pid, process.start, jail=jail_ids.settings())

    def file_server(
        self,
        socket_path: Path,
        shared_dir: Path,
        log_path: Path,
        *,
        privileged_files: bool,
        locks: LockMode = "local",
        cached: bool = False,
    ) -> FileServer:
        from hypervisor.virtiofsd import AUTO_TIMEOUT, CONTAINER_XATTR_MAP, Virtiofsd

        # docs/file-semantics.md: what each option fixes, what it costs.
        return Virtiofsd(
            socket_path=socket_path,
            shared_dir=shared_dir,
            log_path=log_path,
            privileged_files=privileged_files,
            xattr=True,  # user.*, file capabilities, ACLs (one GETXATTR more per write)
            xattr_map=CONTAINER_XATTR_MAP,
            posix_acl=True,
            direct_io=True,  # O_DIRECT reaches the host file, as under runc
            locks=locks,
            # Cached: virtiofsd's cache=always (FOPEN_KEEP_CACHE) with cache=auto's 1 s
            # attribute and entry timeouts, so metadata is revalidated as before.
            cache="always" if cached else "auto",
            attr_timeout=AUTO_TIMEOUT if cached else None,
        )

    def start_proxy(
        self, directory: Path, vm_pid: int, forward: socket.socket | None = None
    ) -> ProcessHandle:
        from hypervisor.process import ProcessHandle
        from sandbox.pod import agent_proxy

        return ProcessHandle.of(agent_proxy.start(directory, vm_pid, forward))

    def begin_proxy(
        self, directory: Path, vm_pid: int, forward: socket.socket | None = None
    ) -> PendingProxy:
        from sandbox.pod import agent_proxy

        return agent_proxy.spawn(directory, vm_pid, forward)

    def terminate(self, name: str, process: ProcessHandle) -> None:
        process.terminate(timeout=TERMINATE_GRACE)
        if name == "qemu" and not process.alive():
            from hypervisor import jail_ids

            jail_ids.release_process(process.pid, process.start)  # its jail id is free


_installed: Drivers | None = None


def current() -> Drivers:
    """The drivers pods use in this process (:class:`HostDrivers` unless replaced)."""
    global _installed
    if _installed is None:
        _installed = HostDrivers()
    return _installed


@contextlib.contextmanager
def installed(drivers: Drivers) -> Iterator[Drivers]:
    """Make ``drivers`` those of every pod in this process for the duration of the block
    (tests); the previous ones come back afterwards."""
    global _installed
    previous, _installed = _installed, drivers
    try:
        yield drivers
    finally:
        _installed = previous
