"""Host-side client of the guest agent: deadlines on every call, replies treated as untrusted.

Connects to a pod's agent proxy socket (``unix:<pod>/agent.sock``). Every method applies a
deadline, converts gRPC failures into :class:`~sandbox.errors.AgentError` carrying the RPC name,
the status code, the agent's Failure reason (:mod:`agentapi.failure`) and the ids the call was
about (:class:`~sandbox.errors.CommandError` when the reason is that the container's program
cannot be run), and checks the shape of what came back before handing it on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import grpc

from agentapi.channel import new_nonce
from agentapi.limits import DEFAULT_RPC_TIMEOUT, GRPC_OPTIONS, MAX_READ_BYTES
from agentapi.proto import agent_pb2 as pb
from agentapi.proto import agent_pb2_grpc as pb_grpc
from agentapi.version import PROTOCOL_VERSION, protocol_major
from sandbox.errors import AgentError, AgentTimeout, PodProcessDied
from sandbox.pod import output_port
from sandbox.pod.agent_errors import call_error, chunk_data, guest_pid, wait_exit

if TYPE_CHECKING:
    from sandbox.pod.network import NetworkConfig

#: Where the agent writes resolv.conf and hosts (agent.proto, ConfigureNetwork).
GUEST_NETWORK_DIR = "/run/pysandbox-network"


@dataclass(frozen=True)
class GuestInfo:
    """What GuestDetails and Version told us, validated."""

    agent_version: str
    protocol_version: str
    kernel_release: str
    mem_total_bytes: int
    cpus: int
    transport: str
    shares: tuple[tuple[str, str], ...]
    python_version: str


@dataclass(frozen=True)
class GuestNetworkFiles:
    """Guest paths of the resolv.conf and hosts ConfigureNetwork wrote ("" when not written)."""

    resolv_conf: str
    hosts: str


@dataclass(frozen=True)
class GuestProcess:
    """One row of a container's process table (ListProcesses), validated and printable."""

    pid: int  # as the container sees it
    ppid: int  # 0: the parent is outside the container
    uid: int
    command: str  # non-printable characters replaced by "?"
    guest_pid: int
    exec_id: str  # "" unless this is an exec's process
    init: bool


#: Longest command text accepted per process (the agent sends at most 4096 bytes of it).
MAX_COMMAND_CHARS = 4200

_pid = guest_pid


def _bounded(text: str, name: str, limit: int = 256) -> str:
    if len(text) > limit or not text.isprintable():
        raise AgentError(f"agent sent an invalid {name} ({len(text)} chars)")
    return text


def _rpc_error(
    exc: grpc.RpcError, rpc: str, request: Any, pod_id: str, waited: float | None = None
) -> AgentError:
    """The AgentError for a failed call ``rpc`` of ``request`` (:func:`call_error`)."""
    call = exc if isinstance(exc, grpc.Call) else None
    code = call.code() if call is not None else None
    details = call.details() if call is not None else str(exc)
    trailing = call.trailing_metadata() if call is not None else None
    name = code.name if code is not None else ""
    return call_error(rpc, name, details or str(code), trailing, request, pod_id, waited)


#: Seconds between two looks at the pod's processes while a call is under way.
WATCH_INTERVAL = 0.2

#: What a client asks while a call waits: a line naming a process of the pod that died (and
#: where its log is), or None while all of them live.
Watch = Callable[[], str | None]


#: Status codes of a call whose channel broke (rather than an answer of the agent).
_BROKEN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)


def _first_death(watch: Watch, patience: float = 0.5) -> str | None:
    """What ``watch`` reports within ``patience`` seconds (None: nothing died)."""
    deadline = time.monotonic() + patience
    while (died := watch()) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return died


class AgentClient:
    """A connection to one agent. Cheap to create; close() when done (or use ``with``).

    ``pod_id`` (when given) is recorded in the errors of this client's calls. ``watch`` (when
    given) is asked every :data:`WATCH_INTERVAL` seconds while a unary call waits: once it
    names a dead process (QEMU, virtiofsd, the agent proxy: the call can then only wait out
    its deadline), the call is cancelled and :class:`~sandbox.errors.PodProcessDied` raised
    with that line.
    """

    def __init__(
        self,
        address: str,
        timeout: float = DEFAULT_RPC_TIMEOUT,
        pod_id: str = "",
        watch: Watch | None = None,
        channel: grpc.Channel | None = None,
        output_ports: Path | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.pod_id = pod_id
        self.watch = watch
        # A channel of the caller's (the agent proxy's own) is used as is and left open.
        self._owned = channel is None
        #: The pod's directory when its output ports may carry streams (:meth:`read_stream`).
        self.output_ports = output_ports
        self._channel = channel or grpc.insecure_channel(address, options=GRPC_OPTIONS)
        self._stub: Any = pb_grpc.AgentStub(self._channel)  # type: ignore[no-untyped-call]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owned:
            self._channel.close()

    def _call(self, name: str, request: Any, timeout: float | None = None) -> Any:
        method: Callable[..., Any] = getattr(self._stub, name)
        waited = timeout or self.timeout
        try:
            if self.watch is None:
                return method(request, timeout=waited, wait_for_ready=True)
            return self._watched(name, method, request, waited, self.watch)
        except grpc.RpcError as exc:
            raise _rpc_error(exc, name, request, self.pod_id, waited) from exc

    def _watched(self, name: str, method: Any, request: Any, waited: float, watch: Watch) -> Any:
        """The call, cancelled with PodProcessDied as soon as ``watch`` names a dead process."""
        call = method.future(request, timeout=waited, wait_for_ready=True)
        while True:
            try:
                return call.result(timeout=WATCH_INTERVAL)
            except grpc.FutureTimeoutError:
                died = watch()
                if died is None:
                    continue
                call.cancel()
            except grpc.RpcError as exc:
                # The channel broke (the proxy exits with QEMU): say which process died, if
                # one did; its death may take a moment to show (a process closes its files
                # before it is a zombie).
                if not isinstance(exc, grpc.Call) or exc.code() not in _BROKEN:
                    raise
                died = _first_death(watch)
                if died is None:
                    raise
            raise PodProcessDied(
                died,
                rpc=name,
                pod_id=self.pod_id,
                container_id=str(getattr(request, "container_id", "")),
                exec_id=str(getattr(request, "exec_id", "")),
            ) from None

    def health(self, timeout: float | None = None) -> float:
        """Return the guest's uptime in seconds once the agent is serving."""
        reply = self._call("Health", pb.HealthRequest(), timeout)
        if reply.status != pb.HealthResponse.SERVING:
            raise AgentError(f"agent reports status {reply.status}, not SERVING")
        return float(reply.uptime_seconds)

    def wait_healthy(self, timeout: float, alive: Callable[[], bool] = lambda: True) -> float:
        """Poll Health until it answers, ``timeout`` runs out, or ``alive()`` turns false."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AgentTimeout(f"agent not healthy within {timeout:g}s")
            if not alive():
                raise AgentError("the VM exited before its agent became healthy")
            try:
                return self.health(timeout=min(remaining, 1.0))
            except AgentTimeout:
                continue

    def info(self) -> GuestInfo:
        """Version and guest details, checked for protocol compatibility and sanity."""
        version = self._call("Version", pb.VersionRequest())
        try:
            major = protocol_major(version.protocol_version)
        except ValueError as exc:
            raise AgentError(f"agent sent a malformed protocol version: {exc}") from exc
        if major != protocol_major(PROTOCOL_VERSION):
            raise AgentError(
                f"agent speaks protocol {version.protocol_version}, host needs "
                f"{PROTOCOL_VERSION}: rebuild the guest image with 'make guest-image'"
            )
        details = self._call("GuestDetails", pb.GuestDetailsRequest())
        if len(details.shares) > 1024:
            raise AgentError("agent reported an implausible number of shares")
        return GuestInfo(
            agent_version=_bounded(version.agent_version, "agent version"),
            protocol_version=version.protocol_version,
            kernel_release=_bounded(details.kernel_release, "kernel release"),
            mem_total_bytes=int(details.mem_total_bytes),
            cpus=int(details.cpus),
            transport=_bounded(details.transport, "transport"),
            shares=tuple(
                (_bounded(s.tag, "share tag"), _bounded(s.path, "share path", 4096))
                for s in details.shares
            ),
            python_version=_bounded(details.python_version, "python version"),
        )

    def mount_share(self, tag: str, path: str, readonly: bool = False) -> None:
        """Mount virtio-fs ``tag`` at guest ``path`` (under /run/pysandbox)."""
        self._call("MountShare", pb.MountShareRequest(tag=tag, path=path, readonly=readonly))

    def restored(
        self,
        entropy: bytes,
        realtime_ns: int,
        timeout: float | None = None,
        share: tuple[str, str] | None = None,
        hostname: str = "",
        cgroup_layout: str = "",
    ) -> tuple[bool, str]:
        """Tell a guest restored from a template VM to reseed its CRNG and set its clock;
        with ``share`` (tag, guest path) also mount that share (protocol 1.8). Returns whether
        the share was mounted: False from an older agent, which ignores it (the caller then
        calls :meth:`mount_share`), and the agent's protocol version (1.14 on; "" from an
        older agent). A ``hostname`` names the guest (protocol 1.11; an older
        agent ignores it). A ``cgroup_layout`` ("v1", "v2") is set up by the guest in its
        idle time, ahead of the first container (protocol 1.14; an older agent ignores it).

        ``timeout`` (default: the client's): as the first call of a restored VM it also waits
        for the agent to answer at all, as :meth:`wait_healthy` would."""
        request = pb.RestoredRequest(
            entropy=entropy,
            realtime_ns=realtime_ns,
            hostname=hostname,
            cgroup_layout=cgroup_layout,
        )
        if share is not None:
            request.share.CopyFrom(pb.MountShareRequest(tag=share[0], path=share[1]))
        reply = self._call("Restored", request, timeout)
        protocol = reply.protocol_version
        if protocol and _minor(protocol) < 0:
            raise AgentError(f"agent sent a malformed protocol version {protocol[:16]!r}")
        return share is not None and bool(reply.share_mounted), protocol

    def prepare_template(self, timeout: float) -> tuple[int, int, int] | None:
        """Ask a template VM's guest to drop its caches and zero its free memory before it
        is saved; (free bytes before, after the drop, zeroed), or None if the agent is older
        than the call (UNIMPLEMENTED: its template is only larger). AgentError otherwise."""
        try:
            reply = self._call("PrepareTemplate", pb.PrepareTemplateRequest(), timeout)
        except AgentError as exc:
            if exc.code == "UNIMPLEMENTED":
                return None
            raise
        return (
            int(reply.free_before_bytes),
            int(reply.free_after_drop_bytes),
            int(reply.zeroed_bytes),
        )

    def read_file(self, path: str, max_bytes: int = MAX_READ_BYTES) -> bytes:
        """Read a guest file (at most ``max_bytes``)."""
        reply = self._call("ReadFile", pb.ReadFileRequest(path=path, max_bytes=max_bytes))
        data = bytes(reply.data)
        if len(data) > max_bytes:
            raise AgentError(f"agent returned {len(data)} bytes for a {max_bytes}-byte read")
        return data

    def write_file(self, path: str, data: bytes) -> None:
        """Write a guest file."""
        self._call("WriteFile", pb.WriteFileRequest(path=path, data=data))

    def shutdown(self) -> None:
        """Ask the agent to power the VM off."""
        self._call("Shutdown", pb.ShutdownRequest(), timeout=5.0)

    def require_protocol(self, minor: int, what: str) -> None:
        """AgentError unless the agent speaks protocol MAJOR.``minor`` or later (the MAJOR
        was checked on connecting); ``what`` names the feature that needs it."""
        version = self._call("Version", pb.VersionRequest()).protocol_version
        if _minor(version) < minor:
            raise AgentError(
                f"agent speaks protocol {version[:16]}, {what} needs "
                f"{protocol_major(PROTOCOL_VERSION)}.{minor}: "
                "rebuild the guest image with 'make guest-image'"
            )

    def configure_network(self, config: NetworkConfig, container_id: str = "") -> GuestNetworkFiles:
        """Configure the guest's pod network (ConfigureNetwork); the guest files written.

        ``container_id``: in that container's network namespace rather than the guest's
        root one (protocol 1.6: see :meth:`require_protocol`; an older agent ignores it)."""
        request = pb.ConfigureNetworkRequest(
            interfaces=[
                pb.NetworkInterface(name=n.name, mac=n.mac, mtu=n.mtu, addresses=n.addresses)
                for n in config.interfaces
            ],
            routes=[
                pb.NetworkRoute(
                    destination=r.destination, gateway=r.gateway, device=r.device, metric=r.metric
                )
                for r in config.routes
            ],
            dns_servers=config.dns_servers,
            dns_search=config.dns_search,
            hostname=config.hostname,
            container_id=container_id,
        )
        reply = self._call("ConfigureNetwork", request, timeout=60.0)
        files = GuestNetworkFiles(
            resolv_conf=_bounded(reply.resolv_conf, "resolv.conf path"),
            hosts=_bounded(reply.hosts, "hosts path"),
        )
        for path in (files.resolv_conf, files.hosts):
            if path and not path.startswith(GUEST_NETWORK_DIR + "/"):
                raise AgentError(f"agent wrote network files outside {GUEST_NETWORK_DIR}")
        return files


def _write_requests(files: dict[str, bytes] | None) -> list[Any]:
    return [pb.WriteFileRequest(path=path, data=data) for path, data in (files or {}).items()]


def _minor(version: str) -> int:
    """The MINOR of a "MAJOR.MINOR" protocol version (-1 when malformed)."""
    minor = version.partition(".")[2]
    return int(minor) if minor.isdigit() and len(minor) < 6 else -1


#: What ContainerStatus may report (agent.proto).
_CONTAINER_STATUSES = ("created", "running", "paused", "stopped")


class ContainerClient(AgentClient):
    """The container RPCs of the agent, with the same deadline and error rules."""

    def create_container(
        self,
        container_id: str,
        spec: bytes,
        rootfs: str,
        overlay: bool = False,
        stdin_null: bool = False,
        stderr_to_stdout: bool = False,
        files: dict[str, bytes] | None = None,
    ) -> int:
        """CreateContainer: set up ``container_id`` from config.json bytes ``spec`` on guest
        directory ``rootfs`` (through a throwaway overlay when ``overlay``); its init's guest pid,
        blocked before execve until :meth:`start_container`. ``stdin_null``: its stdin is
        /dev/null, not a pipe (protocol 1.12; nothing will be relayed to it). ``files``
        (guest path: content) are written first, as :meth:`write_file` would (protocol 1.14:
        see :meth:`require_protocol`; an older agent ignores them). ``stderr_to_stdout``: its
        stderr is its stdout pipe (1.15; an older agent keeps two streams). AgentError with
        the in-guest runtime's message on failure (nothing is left behind in the guest)."""
        request = pb.CreateContainerRequest(
            container_id=container_id,
            oci_spec=spec,
            rootfs=rootfs,
            overlay=overlay,
            stdin_null=stdin_null,
            stderr_to_stdout=stderr_to_stdout,
            files=_write_requests(files),
        )
        reply = self._call("CreateContainer", request, timeout=120.0)
        return _pid(reply.pid, f"container {container_id}")

    def create_and_start(
        self,
        container_id: str,
        spec: bytes,
        rootfs: str,
        overlay: bool = False,
        stderr_to_stdout: bool = False,
        files: dict[str, bytes] | None = None,
    ) -> tuple[int, bool]:
        """CreateContainer with start and close_stdin (protocol 1.8): the container created,
        its program exec'd and its stdin /dev/null (1.12; at EOF from an older agent, a pipe;
        a terminal's stdin stays open) in one round trip; ``stderr_to_stdout`` as
        :meth:`create_container`. Returns (guest pid, started);
        started is False from an agent before 1.8, which only created it: the caller then
        calls :meth:`start_container` and
        :meth:`close_stdin`. ``files`` as :meth:`create_container`'s. Errors as
        :meth:`create_container` (and :meth:`start_container`: the container is then
        stopped)."""
        request = pb.CreateContainerRequest(
            container_id=container_id,
            oci_spec=spec,
            rootfs=rootfs,
            overlay=overlay,
            start=True,
            close_stdin=True,
            stdin_null=True,
            stderr_to_stdout=stderr_to_stdout,
            files=_write_requests(files),
        )
        reply = self._call("CreateContainer", request, timeout=120.0)
        return _pid(reply.pid, f"container {container_id}"), bool(reply.started)

    def start_container(self, container_id: str, extra_seconds: float = 0.0) -> None:
        """StartContainer: run the container's startContainer hooks in the guest, then let its
        init execve its program. ``extra_seconds``: how long those hooks may take together
        (added to the deadline). A failing hook: AgentError with reason HOOK_FAILED."""
        self._call(
            "StartContainer",
            pb.ContainerRequest(container_id=container_id),
            timeout=self.timeout + max(0.0, extra_seconds),
        )

    def exec_process(self, container_id: str, exec_id: str, process: bytes) -> int:
        """ExecProcess: run OCI ``process`` JSON in the running container as ``exec_id``
        (with the container's seccomp profile); the exec's guest pid."""
        request = pb.ExecProcessRequest(container_id=container_id, exec_id=exec_id, process=process)
        reply = self._call("ExecProcess", request, timeout=120.0)
        return _pid(reply.pid, f"exec {exec_id} of container {container_id}")

    def signal(self, container_id: str, exec_id: str, signum: int, all: bool = False) -> None:
        """SignalProcess: ``signum`` to one process, or with ``all`` to every process of the
        container (SIGKILL then also reaches processes forked meanwhile). A no-op for a
        process that already exited."""
        request = pb.SignalProcessRequest(
            container_id=container_id, exec_id=exec_id, signal=signum, all=all
        )
        self._call("SignalProcess", request)

    def wait_process(
        self, container_id: str, exec_id: str = "", timeout: float | None = None
    ) -> tuple[int, int, bool]:
        """Block until the process exits: (status, signal, oom_killed).

        ``timeout`` None waits forever (in slices, so a dead channel is still noticed).
        """
        ref = pb.ProcessRef(container_id=container_id, exec_id=exec_id)
        return wait_exit(lambda seconds: self._call("WaitProcess", ref, timeout=seconds), timeout)

    def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> None:
        """WriteStdin: all of ``data`` (at most 1 MiB); AgentError once stdin is closed or
        the process exited."""
        request = pb.WriteStdinRequest(container_id=container_id, exec_id=exec_id, data=data)
        self._call("WriteStdin", request, timeout=300.0)

    def close_stdin(self, container_id: str, exec_id: str = "") -> None:
        """CloseStdin: EOF on the process's stdin (^D on a terminal)."""
        self._call("CloseStdin", pb.ProcessRef(container_id=container_id, exec_id=exec_id))

    def close_output(self, container_id: str, exec_id: str, which: str) -> bool:
        """CloseOutput: nobody reads the process's ``which`` ("stdout"/"stderr") on the host
        any more; its next write fails with EPIPE. False if the agent is older than the call
        (UNIMPLEMENTED, protocol < 1.10); AgentError otherwise."""
        request = pb.CloseOutputRequest(
            container_id=container_id, exec_id=exec_id, stderr=which == "stderr"
        )
        try:
            self._call("CloseOutput", request)
        except AgentError as exc:
            if exc.code == "UNIMPLEMENTED":
                return False
            raise
        return True

    def read_stream(self, container_id: str, exec_id: str, which: str) -> Iterator[bytes]:
        """Chunks of the process's stdout or stderr until EOF (no deadline: it follows the
        process's lifetime; the caller cancels by closing the client).

        With :attr:`output_ports` (the pod's directory) the bytes come through a free output
        port of the pod when the agent takes it (protocol 1.9, not for a terminal), else in
        the call's messages (:mod:`sandbox.pod.output_port`); the caller sees no difference.
        """
        method = self._stub.ReadStdout if which == "stdout" else self._stub.ReadStderr
        with output_port.leased(self.output_ports) as port:
            ref = pb.ProcessRef(container_id=container_id, exec_id=exec_id)
            nonce = ""
            if port is not None:
                nonce = new_nonce()
                ref.stream_port, ref.stream_nonce = port.index + 1, nonce
            try:
                call = method(ref, wait_for_ready=True)
                yield from chunk_data(call, port, nonce, which)
            except grpc.RpcError as exc:
                if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.CANCELLED:
                    return
                raise _rpc_error(exc, f"Read{which.capitalize()}", ref, self.pod_id) from exc

    def resize(self, container_id: str, exec_id: str, rows: int, cols: int) -> None:
        """TtyWinResize: set the process's terminal size (the program gets SIGWINCH);
        AgentError without a terminal."""
        request = pb.TtyWinResizeRequest(
            container_id=container_id, exec_id=exec_id, rows=rows, cols=cols
        )
        self._call("TtyWinResize", request)

    def remove_container(self, container_id: str) -> None:
        """RemoveContainer: kill every process, release its guest resources. Idempotent
        (AgentError only for an id the agent never had)."""
        self._call("RemoveContainer", pb.ContainerRequest(container_id=container_id), 30.0)

    def list_processes(self, container_id: str) -> list[int]:
        """ListProcesses: guest pids of the container's processes (validated)."""
        reply = self._call("ListProcesses", pb.ContainerRequest(container_id=container_id))
        if len(reply.pids) > 65536:
            raise AgentError("agent reported an implausible number of processes")
        return [_pid(pid, f"a process of container {container_id}") for pid in reply.pids]

    def process_table(self, container_id: str) -> list[GuestProcess]:
        """ListProcesses: the container's processes as it sees them (empty from an agent
        that predates the table). Commands are made safe to print: the guest is untrusted."""
        reply = self._call("ListProcesses", pb.ContainerRequest(container_id=container_id))
        if len(reply.processes) > 65536:
            raise AgentError("agent reported an implausible number of processes")
        what = f"a process of container {container_id}"
        table = []
        for entry in reply.processes:
            if len(entry.command) > MAX_COMMAND_CHARS:
                raise AgentError(f"agent sent an oversized command line for {what}")
            table.append(
                GuestProcess(
                    pid=_pid(entry.pid, what),
                    ppid=0 if entry.ppid == 0 else _pid(entry.ppid, what),
                    uid=int(entry.uid),
                    command="".join(c if c.isprintable() else "?" for c in entry.command),
                    guest_pid=_pid(entry.guest_pid, what),
                    exec_id=_bounded(entry.exec_id, "exec id") if entry.exec_id else "",
                    init=bool(entry.init),
                )
            )
        return table

    def container_status(self, container_id: str) -> tuple[str, int, int]:
        """ContainerStatus: ("created" | "running" | "paused" | "stopped", init pid (0: none),
        exit status 0..255); AgentError for anything else."""
        reply = self._call("ContainerStatus", pb.ContainerRequest(container_id=container_id))
        status = _bounded(reply.status, "container status", 16)
        if status not in _CONTAINER_STATUSES:
            raise AgentError(f"agent reported an unknown container status {status!r}")
        pid = 0 if reply.pid == 0 else _pid(reply.pid, f"container {container_id}")
        if not 0 <= reply.exit_status <= 255:
            raise AgentError(f"agent reported an impossible exit status {reply.exit_status}")
        return status, pid, int(reply.exit_status)

    def pause_container(self, container_id: str) -> None:
        """PauseContainer: freeze every process; returns once frozen."""
        self._call("PauseContainer", pb.ContainerRequest(container_id=container_id))

    def resume_container(self, container_id: str) -> None:
        """ResumeContainer: thaw a paused container."""
        self._call("ResumeContainer", pb.ContainerRequest(container_id=container_id))

    def update_container(self, container_id: str, resources: bytes) -> None:
        """UpdateContainer: apply OCI linux.resources JSON to the container's cgroup;
        AgentError for malformed or refused values."""
        request = pb.UpdateContainerRequest(container_id=container_id, resources=resources)
        self._call("UpdateContainer", request)

    def stats_container(self, container_id: str) -> dict[str, int]:
        """StatsContainer: cpu_usage_usec, memory_usage_bytes, memory_limit_bytes (0 = no
        limit), pids_current and oom_kills of the container's cgroup, each below 2^63 (what
        a signed 64-bit reader of them takes; AgentError otherwise)."""
        reply = self._call("StatsContainer", pb.ContainerRequest(container_id=container_id))
        stats = {
            "cpu_usage_usec": int(reply.cpu_usage_usec),
            "memory_usage_bytes": int(reply.memory_usage_bytes),
            "memory_limit_bytes": int(reply.memory_limit_bytes),
            "pids_current": int(reply.pids_current),
            "oom_kills": int(reply.oom_kills),
        }
        for name, value in stats.items():
            if not 0 <= value < 2**63:
                raise AgentError(f"agent reported an impossible {name} {value}")
        return stats
