"""The agent's gRPC façade: validates each request, does the work, shapes the reply.

Handlers never let an exception escape as a crash: bad input becomes INVALID_ARGUMENT,
a precondition failure FAILED_PRECONDITION, anything else INTERNAL with a one-line message.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import platform
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import NoReturn

# The server without grpcio (agent/grpc_server.py), by the names its servicers use of grpcio:
# grpc.StatusCode, grpc.ServicerContext.
from agent import cgroup_layout, pid1, restore, stream_port  # restore: before a template is saved
from agent import grpc_server as grpc
from agent.containers import START_TIMEOUT, ContainerError, ContainerManager, Signal
from agent.network import NetworkError, NetworkManager
from agent.oci import syscalls
from agentapi import failure
from agentapi.limits import MAX_MESSAGE_BYTES, MAX_READ_BYTES
from agentapi.proto import agent_pb2 as pb
from agentapi.stream_wire import PORT_COUNT, valid_nonce
from agentapi.version import AGENT_VERSION, PROTOCOL_VERSION
from ocispec import linux

_TAG_RE = re.compile(r"^[A-Za-z0-9_.-]{1,36}$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,1023}$")


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("unreachable")  # context.abort always raises


#: How long MountShare waits for a share's device to be probed (seconds), and how often it
#: looks (a hot-plugged device appears within ~0.1 s under TCG).
SHARE_WAIT = 10.0
SHARE_POLL = 0.01


class AgentService:
    """Implements the Agent service of agent.proto (each method as grpcio's servicers:
    ``(request, context)``, served by :class:`agent.grpc_server.Server`).

    ``transport`` is reported in GuestDetails; ``power_off`` is called (from a helper thread,
    after the Shutdown reply has been sent) to stop the VM; ``share_root`` is the only guest
    directory under which MountShare may mount.
    """

    def __init__(
        self,
        transport: str,
        power_off: Callable[[], None] = pid1.power_off,
        share_root: str = pid1.SHARE_ROOT,
        containers: ContainerManager | None = None,
        network: NetworkManager | None = None,
    ) -> None:
        self._containers = containers
        self._network = network
        self._transport = transport
        self._power_off = power_off
        self._share_root = share_root.rstrip("/")
        self._output_ports = stream_port.OutputPorts()
        self._shares: dict[str, str] = {}  # path -> tag
        self._lock = threading.Lock()

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthResponse:
        with open("/proc/uptime", encoding="ascii") as uptime:
            seconds = float(uptime.read().split()[0])
        return pb.HealthResponse(status=pb.HealthResponse.SERVING, uptime_seconds=seconds)

    def Version(
        self, request: pb.VersionRequest, context: grpc.ServicerContext
    ) -> pb.VersionResponse:
        return pb.VersionResponse(agent_version=AGENT_VERSION, protocol_version=PROTOCOL_VERSION)

    def GuestDetails(
        self, request: pb.GuestDetailsRequest, context: grpc.ServicerContext
    ) -> pb.GuestDetailsResponse:
        mem_total = 0
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    mem_total = int(line.split()[1]) * 1024
                    break
        with self._lock:
            shares = [pb.MountedShare(tag=tag, path=path) for path, tag in self._shares.items()]
        return pb.GuestDetailsResponse(
            kernel_release=platform.release(),
            mem_total_bytes=mem_total,
            cpus=os.cpu_count() or 1,
            transport=self._transport,
            shares=shares,
            python_version=platform.python_version(),
        )

    def MountShare(
        self, request: pb.MountShareRequest, context: grpc.ServicerContext
    ) -> pb.MountShareResponse:
        self._mount_share(request, context)
        return pb.MountShareResponse()

    def _mount_share(self, request: pb.MountShareRequest, context: grpc.ServicerContext) -> None:
        """MountShare's work (also Restored's with a share): aborts the call on failure."""
        if not _TAG_RE.match(request.tag):
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"invalid share tag {request.tag!r}")
        path = os.path.normpath(request.path)
        if not path.startswith(self._share_root + "/") or path != request.path.rstrip("/"):
            _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"share path {request.path!r} must be a normalised path under {self._share_root}",
            )
        with self._lock:
            mounted = self._shares.get(path)
            if mounted == request.tag:
                return
            if mounted is not None:
                _abort(
                    context,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{path} already holds share {mounted!r}",
                )
            flags = linux.MS_RDONLY if request.readonly else 0
            try:
                os.makedirs(path, mode=0o755, exist_ok=True)
                _mount_virtiofs(request.tag, path, flags, _wait_limit(context, SHARE_WAIT))
            except OSError as exc:
                _abort(context, grpc.StatusCode.INTERNAL, f"mounting share: {exc}")
            self._shares[path] = request.tag

    def ReadFile(
        self, request: pb.ReadFileRequest, context: grpc.ServicerContext
    ) -> pb.ReadFileResponse:
        if not os.path.isabs(request.path):
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "path must be absolute")
        limit = min(request.max_bytes or MAX_READ_BYTES, MAX_READ_BYTES)
        try:
            with open(request.path, "rb") as handle:
                data = handle.read(limit + 1)
        except FileNotFoundError:
            _abort(context, grpc.StatusCode.NOT_FOUND, f"{request.path}: no such file")
        except OSError as exc:
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION, f"reading {request.path}: {exc}")
        return pb.ReadFileResponse(data=data[:limit], truncated=len(data) > limit)

    def WriteFile(
        self, request: pb.WriteFileRequest, context: grpc.ServicerContext
    ) -> pb.WriteFileResponse:
        _write_file(request, context)
        return pb.WriteFileResponse()

    def Shutdown(
        self, request: pb.ShutdownRequest, context: grpc.ServicerContext
    ) -> pb.ShutdownResponse:
        # Synced before the answer: once the host has it, what containers wrote through
        # the shares is on the host, whether or not it waits for QEMU to exit.
        os.sync()
        timer = threading.Timer(0.2, self._power_off)
        timer.daemon = True
        timer.start()
        return pb.ShutdownResponse()

    def Restored(
        self, request: pb.RestoredRequest, context: grpc.ServicerContext
    ) -> pb.RestoredResponse:
        if request.cgroup_layout not in ("", *cgroup_layout.VERSIONS):
            _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown cgroup layout {request.cgroup_layout[:16]!r}",
            )
        try:
            restore.reseed(request.entropy)
            restore.set_clock(request.realtime_ns)
            if request.hostname:  # protocol 1.11
                restore.set_hostname(request.hostname)
        except ValueError as exc:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except OSError as exc:
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION, f"restoring: {exc}")
        mounted = False
        if request.HasField("share"):  # protocol 1.8
            self._mount_share(request.share, context)
            mounted = True
        if self._containers is not None:  # the CRNG is this VM's own now
            self._containers.netns_ahead.start()
            self._containers.prepare_ahead(request.cgroup_layout)  # protocol 1.14
        return pb.RestoredResponse(share_mounted=mounted, protocol_version=PROTOCOL_VERSION)

    def PrepareTemplate(
        self, request: pb.PrepareTemplateRequest, context: grpc.ServicerContext
    ) -> pb.PrepareTemplateResponse:
        from agent import template_memory

        try:
            done = template_memory.prepare()
        except (OSError, ValueError) as exc:
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION, f"preparing the template: {exc}")
        return pb.PrepareTemplateResponse(
            free_before_bytes=done.free_before,
            free_after_drop_bytes=done.free_after_drop,
            zeroed_bytes=done.zeroed,
        )

    # -- containers ----------------------------------------------------------------------------

    def _manager(self, context: grpc.ServicerContext) -> ContainerManager:
        if self._containers is None:
            _abort(context, grpc.StatusCode.UNIMPLEMENTED, "this agent runs no containers")
        return self._containers

    def _check_id(self, context: grpc.ServicerContext, *ids: str) -> None:
        for value in ids:
            if value and (not _ID_RE.match(value) or ".." in value):
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"invalid id {value[:80]!r}")

    def CreateContainer(
        self, request: pb.CreateContainerRequest, context: grpc.ServicerContext
    ) -> pb.CreateContainerResponse:
        self._check_id(context, request.container_id)
        manager = self._manager(context)
        for file in request.files:  # protocol 1.14: the files its spec binds, first
            _write_file(file, context)
        with _container_errors(context):
            pid = manager.create(
                request.container_id,
                request.oci_spec,
                request.rootfs,
                request.overlay,
                close_stdin=request.close_stdin,
                stdin_null=request.stdin_null,
                stderr_to_stdout=request.stderr_to_stdout,
            )
            if request.start:  # protocol 1.8: StartContainer in the same call
                manager.start(request.container_id, _start_timeout(context))
        return pb.CreateContainerResponse(pid=pid, started=request.start)

    def StartContainer(
        self, request: pb.ContainerRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        with _container_errors(context):
            self._manager(context).start(request.container_id, _start_timeout(context))
        return pb.Empty()

    def ExecProcess(
        self, request: pb.ExecProcessRequest, context: grpc.ServicerContext
    ) -> pb.ProcessResponse:
        self._check_id(context, request.container_id, request.exec_id)
        with _container_errors(context):
            pid, stdin_closed = self._manager(context).exec(
                request.container_id,
                request.exec_id,
                request.process,
                close_stdin=request.close_stdin,
            )
        return pb.ProcessResponse(pid=pid, stdin_closed=stdin_closed)

    def SignalProcess(
        self, request: pb.SignalProcessRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        with _container_errors(context):
            self._manager(context).signal(
                request.container_id, request.exec_id, request.signal, request.all
            )
        return pb.Empty()

    def WaitProcess(
        self, request: pb.ProcessRef, context: grpc.ServicerContext
    ) -> pb.WaitProcessResponse:
        manager = self._manager(context)
        with _container_errors(context):
            while context.is_active():
                remaining = context.time_remaining()
                proc = manager.wait(
                    request.container_id, request.exec_id, min(remaining or 5.0, 5.0)
                )
                if proc is not None:
                    oom = manager.oom_killed(request.container_id, request.exec_id)
                    return pb.WaitProcessResponse(
                        status=proc.status, signal=proc.signal, oom_killed=oom
                    )
        _abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, "process still running")

    def WriteStdin(self, request: pb.WriteStdinRequest, context: grpc.ServicerContext) -> pb.Empty:
        with _container_errors(context):
            self._manager(context).write_stdin(request.container_id, request.exec_id, request.data)
        return pb.Empty()

    def CloseStdin(self, request: pb.ProcessRef, context: grpc.ServicerContext) -> pb.Empty:
        with _container_errors(context):
            self._manager(context).close_stdin(request.container_id, request.exec_id)
        return pb.Empty()

    def CloseOutput(
        self, request: pb.CloseOutputRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        with _container_errors(context):
            self._manager(context).close_output(
                request.container_id, request.exec_id, "stderr" if request.stderr else "stdout"
            )
        return pb.Empty()

    def _stream(
        self, request: pb.ProcessRef, context: grpc.ServicerContext, which: str
    ) -> Iterator[pb.Chunk]:
        # A reader whose RPC ended (the host's proxy died, its session was torn down) must
        # stop at once rather than take the next chunk for nobody: the reader of a later
        # ReadStdout of the same process would never see it.
        with _container_errors(context), Signal() as ended:
            context.add_callback(ended.set)
            manager = self._manager(context)
            port = self._output_port(manager, request)
            if port is None:
                for data in manager.read_stream(
                    request.container_id, request.exec_id, which, stop=ended.fd
                ):
                    yield pb.Chunk(data=bytes(data))
                return
            try:
                chunks = manager.read_stream(
                    request.container_id, request.exec_id, which, ended.fd, port.payload
                )
                # The port only once there is something to carry: an output that ends empty
                # (most stderrs, both of ``exec … true``) ends the call as in messages, with
                # none, instead of an ``on_port`` message, the port's opening line and end
                # frame (the guest's CPU pays each under TCG: ~15 ms of an exec for both).
                first = next(chunks, None)
                if first is None:
                    return
                yield pb.Chunk(on_port=True)
                stream_port.write_stream(
                    port, request.stream_nonce, itertools.chain((first,), chunks), ended.fd
                )
            except stream_port.Stopped:
                return
            finally:
                port.lock.release()

    def _output_port(
        self, manager: ContainerManager, request: pb.ProcessRef
    ) -> stream_port.OutputPort | None:
        """The output port the host asked for, locked; None (stream over gRPC) when it asked
        for none, for a terminal (its output stays on gRPC), or the port is missing or busy."""
        index = request.stream_port - 1
        if not 0 <= index < PORT_COUNT or not valid_nonce(request.stream_nonce):
            return None
        if manager.process(request.container_id, request.exec_id).terminal:
            return None
        return self._output_ports.acquire(index)

    def ReadStdout(
        self, request: pb.ProcessRef, context: grpc.ServicerContext
    ) -> Iterator[pb.Chunk]:
        return self._stream(request, context, "stdout")

    def ReadStderr(
        self, request: pb.ProcessRef, context: grpc.ServicerContext
    ) -> Iterator[pb.Chunk]:
        return self._stream(request, context, "stderr")

    def TtyWinResize(
        self, request: pb.TtyWinResizeRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        with _container_errors(context):
            self._manager(context).resize(
                request.container_id, request.exec_id, request.rows, request.cols
            )
        return pb.Empty()

    def RemoveContainer(
        self, request: pb.ContainerRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        with _container_errors(context):
            self._manager(context).remove(request.container_id)
        return pb.Empty()

    def ListProcesses(
        self, request: pb.ContainerRequest, context: grpc.ServicerContext
    ) -> pb.ListProcessesResponse:
        with _container_errors(context):
            manager = self._manager(context)
            pids = manager.pids(request.container_id)
            table = manager.processes(request.container_id, pids)
        return pb.ListProcessesResponse(
            pids=pids,
            processes=[
                pb.ProcessEntry(
                    pid=entry.pid,
                    ppid=entry.ppid,
                    uid=entry.uid,
                    command=entry.command,
                    guest_pid=entry.guest_pid,
                    exec_id=entry.exec_id,
                    init=entry.init,
                )
                for entry in table
            ],
        )

    def ContainerStatus(
        self, request: pb.ContainerRequest, context: grpc.ServicerContext
    ) -> pb.ContainerStatusResponse:
        with _container_errors(context):
            container = self._manager(context).get(request.container_id)
        return pb.ContainerStatusResponse(
            status=container.status, pid=container.init.pid, exit_status=container.init.status
        )

    def PauseContainer(
        self, request: pb.ContainerRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        with _container_errors(context):
            self._manager(context).pause(request.container_id)
        return pb.Empty()

    def ResumeContainer(
        self, request: pb.ContainerRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        with _container_errors(context):
            self._manager(context).resume(request.container_id)
        return pb.Empty()

    def UpdateContainer(
        self, request: pb.UpdateContainerRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        with _container_errors(context):
            self._manager(context).update(request.container_id, request.resources)
        return pb.Empty()

    def StatsContainer(
        self, request: pb.ContainerRequest, context: grpc.ServicerContext
    ) -> pb.StatsContainerResponse:
        with _container_errors(context):
            stats = self._manager(context).stats(request.container_id)
        return pb.StatsContainerResponse(**stats)

    # -- network -------------------------------------------------------------------------------

    def ConfigureNetwork(
        self, request: pb.ConfigureNetworkRequest, context: grpc.ServicerContext
    ) -> pb.ConfigureNetworkResponse:
        if self._network is None:
            _abort(context, grpc.StatusCode.UNIMPLEMENTED, "this agent configures no network")
        from agent import network

        settings = network.Settings(
            interfaces=tuple(
                network.Interface(nic.name, nic.mac, nic.mtu, tuple(nic.addresses))
                for nic in request.interfaces
            ),
            routes=tuple(
                network.Route(r.destination, r.gateway, r.device, r.metric) for r in request.routes
            ),
            dns_servers=tuple(request.dns_servers),
            dns_search=tuple(request.dns_search),
            dns_options=tuple(request.dns_options),
            hosts=tuple((h.address, tuple(h.names)) for h in request.hosts),
            hostname=request.hostname,
        )
        netns_pid = None
        if request.container_id:
            self._check_id(context, request.container_id)
            with _container_errors(context):
                netns_pid = self._manager(context).get(request.container_id).init.pid
        try:
            outcome = self._network.configure(settings, netns_pid)
        except NetworkError as exc:
            _abort(context, getattr(grpc.StatusCode, exc.code), str(exc))
        except OSError as exc:
            _abort(context, grpc.StatusCode.INTERNAL, f"configuring the network: {exc}")
        return pb.ConfigureNetworkResponse(
            resolv_conf=outcome.resolv_conf, hosts=outcome.hosts, interfaces=outcome.interfaces
        )

    def PortForward(
        self, request_iterator: Iterator[pb.PortForwardRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.PortForwardResponse]:
        from agent import portforward

        first = next(request_iterator, None)
        if first is None or not first.port:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "the first request names no port")
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(portforward.slot())
            sock = stack.enter_context(portforward.connect(first.port))
        except portforward.PortForwardError as exc:
            stack.close()
            _abort(context, getattr(grpc.StatusCode, exc.code), str(exc))
        with stack:
            # The call ending (host cancel, deadline) wakes both directions up.
            context.add_callback(lambda: _shutdown(sock))
            if first.data:
                with contextlib.suppress(OSError):
                    sock.sendall(first.data)
            threading.Thread(
                target=portforward.feed,
                args=((r.data for r in request_iterator), sock),
                name="port-forward",
                daemon=True,
            ).start()
            yield pb.PortForwardResponse(connected=True)
            for data in portforward.drain(sock):
                yield pb.PortForwardResponse(data=data)


def _write_file(request: pb.WriteFileRequest, context: grpc.ServicerContext) -> None:
    """WriteFile's work (created or truncated, mode 0644); INVALID_ARGUMENT for a relative
    path, FAILED_PRECONDITION naming the path when it cannot be written."""
    if not os.path.isabs(request.path):
        _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "path must be absolute")
    try:
        fd = os.open(request.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(request.data)
    except OSError as exc:
        _abort(context, grpc.StatusCode.FAILED_PRECONDITION, f"writing {request.path}: {exc}")


def _wait_limit(context: grpc.ServicerContext, longest: float) -> float:
    """Seconds a call may wait for something: ``longest``, less if the caller's deadline
    comes sooner (with a second left to answer)."""
    remaining = context.time_remaining()
    return longest if remaining is None else max(min(longest, remaining - 1.0), 0.0)


def _mount_virtiofs(tag: str, path: str, flags: int, wait: float) -> None:
    """Mount virtio-fs ``tag`` at ``path``. The kernel answers EINVAL for a tag it does not
    know: a device hot-plugged just before (a restored template VM's share) may still be
    being probed, so EINVAL is retried for up to ``wait`` seconds; OSError otherwise."""
    deadline = time.monotonic() + wait
    while True:
        try:
            syscalls.mount(tag, path, "virtiofs", flags)
            return
        except OSError as exc:
            if exc.errno != errno.EINVAL or time.monotonic() >= deadline:
                raise
        time.sleep(SHARE_POLL)


def _start_timeout(context: grpc.ServicerContext) -> float:
    """How long a start may wait for the hooks: the caller's deadline less a second (to
    answer in time), or :data:`START_TIMEOUT` without one."""
    remaining = context.time_remaining()
    return START_TIMEOUT if remaining is None else max(remaining - 1.0, 0.1)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def _container_errors(context: grpc.ServicerContext) -> Iterator[None]:
    """Answer ContainerError with its status code, message and Failure reason (trailing
    metadata, :mod:`agentapi.failure`), and OSError with INTERNAL."""
    try:
        yield
    except ContainerError as exc:
        context.set_trailing_metadata(failure.trailer(exc.reason))
        _abort(context, getattr(grpc.StatusCode, exc.code), str(exc))
    except OSError as exc:
        _abort(context, grpc.StatusCode.INTERNAL, str(exc))


def make_server(service: AgentService) -> grpc.Server:
    """A gRPC server carrying ``service``, with the shared size limits
    (:mod:`agentapi.limits`); no transport yet."""
    assert MAX_MESSAGE_BYTES > MAX_READ_BYTES
    return grpc.Server(service)
