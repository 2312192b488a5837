"""A fake of everything a pod starts on the host, recording every call in order.

:class:`FakeDrivers` implements :class:`sandbox.pod.drivers.Drivers`: a :class:`FakeVM`
(the :class:`hypervisor.base.Hypervisor` interface) instead of QEMU, a :class:`FakeFileServer`
instead of virtiofsd, and an in-process gRPC server with a recording :class:`FakeGuest` agent
instead of the agent proxy. :class:`FakeMounts` replaces the mount syscalls of
:mod:`sandbox.pod.hostfs`. No root, no VM.

Each "process" is a real, harmless ``sleep`` child, so pid + start-time handles, records and
liveness checks work exactly as for the real processes; :meth:`FakeDrivers.close` kills
whatever is left.

Every call lands in :attr:`FakeDrivers.events` as a tuple: ``("virtiofsd", "start")``,
``("qemu", "start", "cold"|"restore"|"template")``, ``("qemu", "resume")``,
``("proxy", "start")``, ``("terminate", name)``, ``("qemu", "kill")``, ``("agent",
method)``, ``("mount", path)``, ``("umount", path, existed)``... A failure is injected by
naming the event in :attr:`FakeDrivers.fail` (e.g. ``fail["qemu.resume"] = QMPError(...)``,
``fail["agent.MountShare"] = "no such tag"``; a ``threading.Event`` makes the agent call
wait until it is set).
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from agentapi.limits import GRPC_OPTIONS
from agentapi.proto import agent_pb2 as pb
from agentapi.proto import agent_pb2_grpc as pb_grpc
from agentapi.version import PROTOCOL_VERSION
from hypervisor.base import SHUTDOWN, Hypervisor
from hypervisor.errors import HypervisorError, LaunchError
from hypervisor.process import ProcessHandle
from hypervisor.qemu_args import NicConfig, VMConfig
from hypervisor.virtiofsd import LockMode
from hypervisor.zeropages import ZeroMap
from sandbox.errors import AgentError
from sandbox.pod import hostfs
from sandbox.pod.drivers import Drivers

Event = tuple[Any, ...]

#: What a fake template VM saves, and a restoring fake QEMU must read back whole.
FAKE_STATE = b"fake saved state\n"


class FakeProcess:
    """A real ``sleep`` child standing in for a host process of a pod."""

    def __init__(self, name: str, own_netns: bool = False) -> None:
        self.name = name
        argv = ["unshare", "--net", "--", "sleep", "600"] if own_netns else ["sleep", "600"]
        self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        self.handle = ProcessHandle.of(self.popen.pid)
        if own_netns:  # as the real shim: ready only once it is in its namespace
            host = os.stat("/proc/self/ns/net").st_ino
            deadline = time.monotonic() + 10
            while os.stat(f"/proc/{self.popen.pid}/ns/net").st_ino == host:
                assert time.monotonic() < deadline, "unshare --net did not happen"
                time.sleep(0.005)

    def alive(self) -> bool:
        return self.handle.alive()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()


class FakeDrivers(Drivers):
    """Fake VMM, virtiofsd and agent proxy; see the module docstring."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.fail: dict[str, BaseException | str | threading.Event] = {}
        self.processes: list[FakeProcess] = []
        self.vms: list[FakeVM] = []
        self.servers: dict[int, grpc.Server] = {}  # proxy pid -> its agent server
        self.mounts = FakeMounts(self)
        self.shims: dict[str, FakeProcess] = {}
        self.privileged_files: bool | None = None  # as the last file server was asked
        self.locks: str | None = None  # likewise
        self.cached: bool | None = None  # likewise
        self.networks: list[pb.ConfigureNetworkRequest] = []  # as the guests were told
        #: The protocol minor the fake agents speak: below 8 they ignore Restored.share and
        #: CreateContainer.start/close_stdin, as agents before protocol 1.8 do.
        self.agent_minor = 8
        #: (tag, path) of every share a fake agent mounted, by MountShare or Restored.
        self.shares: list[tuple[str, str]] = []
        #: What each CreateContainer asked beyond creating: (container id, start, close_stdin).
        self.creates: list[tuple[str, bool, bool]] = []
        self._lock = threading.Lock()

    # -- bookkeeping -------------------------------------------------------------------------

    def record(self, *event: Any) -> None:
        with self._lock:
            self.events.append(tuple(event))

    def check(self, point: str) -> None:
        """Record nothing; raise the failure injected at ``point`` if there is one."""
        failure = self.fail.get(point)
        if isinstance(failure, BaseException):
            raise failure

    def spawn(self, name: str, own_netns: bool = False) -> FakeProcess:
        process = FakeProcess(name, own_netns)
        self.processes.append(process)
        return process

    def alive(self) -> list[str]:
        """Names of the fake processes still running."""
        return [p.name for p in self.processes if p.alive()]

    def names(self, *kinds: str) -> list[Event]:
        """The events whose first element is one of ``kinds`` (all when none)."""
        return [e for e in self.events if not kinds or e[0] in kinds]

    def install_shims(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Replace the container shim (sandbox/runtime/shim.py) by a fake process that
        stands for the container: alive while it runs (:attr:`shims`; kill it to make the
        container exit). Spawns are recorded as ``("shim", "spawn", id)``; a shim asked
        for a network namespace of its own (``netns``) is in a new one (unshare(1)), owned
        by the host's user namespace whatever the maps."""
        from sandbox.runtime import shim

        def spawn(
            root: Path, container_id: str, pod_address: str, netns: Any = None, **_: Any
        ) -> ProcessHandle:
            self.record("shim", "spawn", container_id)
            self.check("shim.spawn")
            self.shims[container_id] = process = self.spawn(
                f"shim-{container_id}", own_netns=netns is not None
            )
            return process.handle

        monkeypatch.setattr(shim, "spawn", spawn)

    def close(self) -> None:
        for failure in self.fail.values():
            if isinstance(failure, threading.Event):
                failure.set()  # agent calls still waiting return
        for server in self.servers.values():
            server.stop(0).wait()  # gRPC unlinks its socket on shutdown: not later
        for process in self.processes:
            process.kill()

    # -- Drivers -----------------------------------------------------------------------------

    def hypervisor(self, config: VMConfig) -> Hypervisor:
        vm = FakeVM(self, config)
        self.vms.append(vm)
        return vm

    def running(self, config: VMConfig, process: ProcessHandle) -> Hypervisor:
        vm = next(v for v in self.vms if v.process is not None and v.process.handle == process)
        return vm

    def file_server(
        self,
        socket_path: Path,
        shared_dir: Path,
        log_path: Path,
        *,
        privileged_files: bool,
        locks: LockMode = "local",
        cached: bool = False,
    ) -> FakeFileServer:
        self.privileged_files = privileged_files
        self.locks = locks
        self.cached = cached
        return FakeFileServer(self, socket_path, shared_dir)

    def start_proxy(
        self, directory: Path, vm_pid: int, forward: socket.socket | None = None
    ) -> ProcessHandle:
        self.record("proxy", "start")
        self.check("proxy.start")
        vm = next((v for v in self.vms if v.process is not None and v.pid == vm_pid), None)
        if vm is None or not vm.is_running():
            raise AgentError(f"agent proxy failed to start; see {directory / 'proxy.log'}")
        process = self.spawn("proxy")
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="fake-agent"),
            options=GRPC_OPTIONS,
        )
        pb_grpc.add_AgentServicer_to_server(vm.guest, server)  # type: ignore[no-untyped-call]
        server.add_insecure_port(f"unix:{directory / 'agent.sock'}")
        server.start()
        self.servers[process.handle.pid] = server
        return process.handle

    def terminate(self, name: str, process: ProcessHandle) -> None:
        self.record("terminate", name)
        for fake in self.processes:
            if fake.handle == process:
                fake.kill()
                server = self.servers.pop(process.pid, None)
                if server is not None:
                    server.stop(0).wait()  # gRPC unlinks its socket on shutdown: not later
        for vm in self.vms:
            if vm.process is not None and vm.process.handle == process:
                vm.guest.power_off()


class FakeFileServer:
    """virtiofsd: its "socket" is a plain file that exists while it serves."""

    def __init__(self, drivers: FakeDrivers, socket_path: Path, shared_dir: Path) -> None:
        self.drivers = drivers
        self.socket_path = socket_path
        self.shared_dir = shared_dir
        self.process: FakeProcess | None = None

    @property
    def handle(self) -> ProcessHandle:
        assert self.process is not None
        return self.process.handle

    def start(self) -> None:
        self.drivers.record("virtiofsd", "start")
        self.drivers.check("virtiofsd.start")
        assert self.shared_dir.is_dir()
        self.process = self.drivers.spawn("virtiofsd")
        self.socket_path.touch()

    def stop(self, timeout: float = 1.0) -> None:
        self.drivers.record("virtiofsd", "stop")
        if self.process is not None:
            self.process.kill()


class FakeVM(Hypervisor):
    """QEMU: a sleep process, QMP calls recorded, a :class:`FakeGuest` as the guest."""

    def __init__(self, drivers: FakeDrivers, config: VMConfig) -> None:
        self.drivers = drivers
        self.config = config
        self.process: FakeProcess | None = None
        self.guest = FakeGuest(drivers, self)
        self.running = False

    def _call(self, what: str, *detail: Any) -> None:
        self.drivers.record("qemu", what, *detail)
        self.drivers.check(f"qemu.{what}")
        if what != "start" and not self.is_running():
            raise HypervisorError(f"qmp {what} impossible: vm {self.config.name} is not running")

    @property
    def kind(self) -> str:
        if self.config.incoming_fd is not None:
            return "restore"
        return "cold" if self.config.shares else "template"

    def start(self, *, paused: bool = True) -> None:
        self._call("start", self.kind)
        for _tag, sock_path in self.config.shares:
            if not sock_path.exists():  # QEMU connects to the vhost-user socket at start
                raise LaunchError(f"qemu for vm {self.config.name}: {sock_path} refused")
        if self.config.incoming_fd is not None:  # QEMU reads the whole state from the fd
            loaded = os.pread(self.config.incoming_fd, 1 << 20, 0)
            if loaded != FAKE_STATE:
                raise LaunchError(
                    f"qemu for vm {self.config.name}: bad saved state {loaded!r}", reported=True
                )
        self.config.console_log.write_text("fake console: booting\n")
        self.process = self.drivers.spawn("qemu")

    def resume(self) -> None:
        self._call("resume")
        self.running = True

    def status(self) -> str:
        if not self.is_running():
            return SHUTDOWN
        return "running" if self.running else "paused"

    def is_running(self) -> bool:
        return self.process is not None and self.process.alive()

    def stop(self, timeout: float = 10.0) -> None:
        self.kill()

    def kill(self) -> None:
        self.drivers.record("qemu", "kill")
        if self.process is not None:
            self.process.kill()
        self.guest.power_off()

    def pids(self) -> list[int]:
        return [self.pid] if self.is_running() else []

    @property
    def console_log(self) -> Path:
        return self.config.console_log

    @property
    def handle(self) -> ProcessHandle:
        if self.process is None:
            raise HypervisorError(f"vm {self.config.name} was not started")
        return self.process.handle

    def wait_incoming(self, timeout: float) -> None:
        self._call("wait_incoming")

    def release_zero_pages(self, known: ZeroMap | None = None) -> int:
        self._call("release_zero_pages")
        return 0

    def hotplug_share(self, tag: str, socket: Path, index: int = 0) -> None:
        self._call("hotplug_share", tag)
        if not socket.exists():
            raise HypervisorError(f"vhost-user socket {socket} refused")

    def hotplug_nic(self, nic: NicConfig, index: int) -> None:
        self._call("hotplug_nic", index)

    def save_state(self, fd: int, timeout: float) -> None:
        self._call("save_state")
        os.write(fd, FAKE_STATE)


class FakeGuest(pb_grpc.AgentServicer):
    """The agent of a fake VM: answers what a pod and the runtime ask, records each call;
    once the VM is gone every call fails UNAVAILABLE (as through a proxy of a dead VM)."""

    def __init__(self, drivers: FakeDrivers, vm: FakeVM) -> None:
        self.drivers = drivers
        self.vm = vm
        self.gone = False
        self.containers: dict[str, int] = {}
        self.specs: dict[str, bytes] = {}  # container id -> the config.json it was sent
        self.files: dict[str, bytes] = {}  # guest path -> what WriteFile wrote there

    def power_off(self) -> None:
        self.gone = True

    def _enter(self, method: str, context: grpc.ServicerContext) -> None:
        if self.gone:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the vm is gone")
        self.drivers.record("agent", method)
        failure = self.drivers.fail.get(f"agent.{method}")
        if isinstance(failure, str):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, failure)
        if isinstance(failure, threading.Event):  # a guest stuck (on a dead share...)
            failure.wait(60)

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthResponse:
        self._enter("Health", context)
        return pb.HealthResponse(status=pb.HealthResponse.SERVING, uptime_seconds=0.5)

    def Restored(
        self, request: pb.RestoredRequest, context: grpc.ServicerContext
    ) -> pb.RestoredResponse:
        self._enter("Restored", context)
        assert len(request.entropy) == 64 and request.realtime_ns > 0
        if self.drivers.agent_minor < 8 or not request.HasField("share"):
            return pb.RestoredResponse()
        self.drivers.shares.append((request.share.tag, request.share.path))
        return pb.RestoredResponse(share_mounted=True)

    def PrepareTemplate(
        self, request: pb.PrepareTemplateRequest, context: grpc.ServicerContext
    ) -> pb.PrepareTemplateResponse:
        self._enter("PrepareTemplate", context)
        return pb.PrepareTemplateResponse(zeroed_bytes=1 << 20)

    def MountShare(
        self, request: pb.MountShareRequest, context: grpc.ServicerContext
    ) -> pb.MountShareResponse:
        self._enter("MountShare", context)
        self.drivers.shares.append((request.tag, request.path))
        return pb.MountShareResponse()

    def Version(
        self, request: pb.VersionRequest, context: grpc.ServicerContext
    ) -> pb.VersionResponse:
        self._enter("Version", context)
        return pb.VersionResponse(agent_version="fake", protocol_version=PROTOCOL_VERSION)

    def WriteFile(
        self, request: pb.WriteFileRequest, context: grpc.ServicerContext
    ) -> pb.WriteFileResponse:
        self._enter("WriteFile", context)
        self.files[request.path] = request.data
        return pb.WriteFileResponse()

    def ConfigureNetwork(
        self, request: pb.ConfigureNetworkRequest, context: grpc.ServicerContext
    ) -> pb.ConfigureNetworkResponse:
        self._enter("ConfigureNetwork", context)
        self.drivers.networks.append(request)
        return pb.ConfigureNetworkResponse(
            resolv_conf="/run/pysandbox-network/resolv.conf",
            hosts="/run/pysandbox-network/hosts",
        )

    def Shutdown(
        self, request: pb.ShutdownRequest, context: grpc.ServicerContext
    ) -> pb.ShutdownResponse:
        self._enter("Shutdown", context)
        # The guest powers off: QEMU exits (-no-reboot), and with it the guest.
        if self.vm.process is not None:
            self.vm.process.kill()
        self.power_off()
        return pb.ShutdownResponse()

    def CreateContainer(
        self, request: pb.CreateContainerRequest, context: grpc.ServicerContext
    ) -> pb.CreateContainerResponse:
        self._enter("CreateContainer", context)
        self.specs[request.container_id] = request.oci_spec
        self.containers[request.container_id] = pid = 100 + len(self.containers)
        self.drivers.creates.append((request.container_id, request.start, request.close_stdin))
        if self.drivers.agent_minor >= 14:  # the files its spec binds, written first
            self.files.update({f.path: f.data for f in request.files})
        started = request.start and self.drivers.agent_minor >= 8
        return pb.CreateContainerResponse(pid=pid, started=started)

    def StartContainer(
        self, request: pb.ContainerRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        self._enter("StartContainer", context)
        if request.container_id not in self.containers:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no container {request.container_id}")
        return pb.Empty()

    def CloseStdin(self, request: pb.ProcessRef, context: grpc.ServicerContext) -> pb.Empty:
        self._enter("CloseStdin", context)
        if request.container_id not in self.containers:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no container {request.container_id}")
        return pb.Empty()

    def RemoveContainer(
        self, request: pb.ContainerRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        self._enter("RemoveContainer", context)
        self.containers.pop(request.container_id, None)
        return pb.Empty()

    def SignalProcess(
        self, request: pb.SignalProcessRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        self._enter("SignalProcess", context)
        return pb.Empty()


class FakeMounts:
    """The mount table of :mod:`sandbox.pod.hostfs`, kept in memory: binds are recorded as
    mount points (and their directories created as the real code creates them), unmounts
    remove them; ``mounts_below`` answers from the table."""

    def __init__(self, drivers: FakeDrivers) -> None:
        self.drivers = drivers
        self.points: set[str] = set()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(hostfs, "_mount", self._mount)
        monkeypatch.setattr(hostfs, "_attach", self._attach)
        monkeypatch.setattr(hostfs, "_mounts", self._mounts)
        monkeypatch.setattr(hostfs, "_mount_id", self._mount_id)
        monkeypatch.setattr(hostfs, "_umount_fd", self._umount_fd)
        monkeypatch.setattr(hostfs, "mounts_below", self.mounts_below)

    def _mount(self, source: str | None, target: str, flags: int) -> None:
        if target.startswith("/proc/self/fd/"):
            target = os.readlink(target)  # the inode the real code mounts onto
        self.drivers.check("mount")
        if flags & hostfs.MS_BIND:
            self.drivers.record("mount", target)
            self.points.add(target)

    def _attach(
        self,
        source_fd: int,
        target_fd: int,
        readonly: bool,
        propagation: int,
        recursive: bool = True,
    ) -> None:
        target = os.readlink(f"/proc/self/fd/{target_fd}")  # the inode the real code mounts on
        self.drivers.check("mount")
        self.drivers.record("mount", target)
        self.points.add(target)

    def _mounts(self, prefix: str) -> list[tuple[int, str]]:
        return [(self._id(p), p) for p in self.mounts_below(Path(prefix))]

    def _mount_id(self, fd: int) -> int | None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        return self._id(target) if target in self.points else None

    def _umount_fd(self, fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if target not in self.points:
            raise OSError(22, f"umount {target}: not mounted")
        self.drivers.record("umount", target, os.path.isdir(target))
        self.points.discard(target)

    @staticmethod
    def _id(point: str) -> int:
        return zlib.crc32(point.encode())

    def mounts_below(self, path: Path) -> list[str]:
        prefix = str(path).rstrip("/")
        found = [p for p in self.points if p == prefix or p.startswith(prefix + "/")]
        # Deterministic (a set's order follows string hashing): deepest first, then by path.
        return sorted(found, key=lambda p: (p.count("/"), p), reverse=True)


def guest_image(directory: Path) -> Path:
    """A guest image directory whose manifest :func:`hypervisor.guest_image.find_image`
    accepts (the files themselves are never read by the fake VM)."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "manifest.json").write_text(
        json.dumps(
            {
                "format": 1,
                "kernel": {"file": "vmlinux", "boot": "pvh"},
                "files": {},
                "sizes": {"root.erofs": 2 << 20},
                "root_device": "virtio-pmem",
            },
        )
    )
    return directory


def fixture_drivers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDrivers]:
    """Body of the ``fake`` fixtures: a FakeDrivers installed, templates off, TCG, a fake
    guest image; everything it started killed afterwards."""
    from sandbox.pod import drivers

    monkeypatch.setenv("PYSANDBOX_GUEST_IMAGE", str(guest_image(tmp_path / "guest")))
    monkeypatch.setenv("PYSANDBOX_TEMPLATES", "0")
    monkeypatch.setenv("PYSANDBOX_TEMPLATE_DIR", str(tmp_path / "templates"))
    monkeypatch.setenv("PYSANDBOX_ACCEL", "tcg")
    monkeypatch.setenv("PYSANDBOX_BOOT_TIMEOUT", "5")
    fake = FakeDrivers()
    fake.mounts.install(monkeypatch)
    try:
        with drivers.installed(fake):
            yield fake
    finally:
        fake.close()
