"""The agent calls the agent proxy makes itself, without grpcio: for the container
stand-ins (:mod:`sandbox.pod.standin_service`, :class:`~sandbox.pod.stdio.StdioRelay`).

:class:`ProxyClient` has the methods of :class:`~sandbox.pod.agent_client.ContainerClient`
that those use, with the same deadlines, the same checks of what the guest answers and the
same errors (:mod:`sandbox.pod.agent_errors`), over the proxy's own upstream connection
(:class:`~sandbox.pod.grpc_relay.Relay`): protobuf messages of agentapi's generated
``agent_pb2`` module in gRPC's framing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agentapi.channel import new_nonce
from agentapi.limits import DEFAULT_RPC_TIMEOUT
from agentapi.proto import agent_pb2 as pb
from sandbox.errors import AgentError
from sandbox.pod import output_port
from sandbox.pod.agent_errors import call_error, chunk_data, guest_pid, wait_exit
from sandbox.pod.grpc_relay import SERVICE_PREFIX, Call, CallError, Relay

#: Deadline of one WaitProcess call; waits longer than this are retried.


class _Messages:
    """A streaming call's response messages, decoded as ``reply_type``; ``cancel()`` ends it."""

    def __init__(self, call: Call, reply_type: Any) -> None:
        self._call = call
        self._type = reply_type

    def __iter__(self) -> Iterator[Any]:
        for message in self._call:
            yield self._type.FromString(message)

    def cancel(self) -> None:
        self._call.cancel()


class ProxyClient:
    """Container calls over ``relay``; ``output_ports``: the pod's directory when its
    output ports may carry streams (:meth:`read_stream`)."""

    def __init__(
        self,
        relay: Relay,
        timeout: float = DEFAULT_RPC_TIMEOUT,
        output_ports: Path | None = None,
    ) -> None:
        self._relay = relay
        self.timeout = timeout
        self.pod_id = ""
        self.output_ports = output_ports

    def _call(self, name: str, request: Any, reply_type: Any, timeout: float | None = None) -> Any:
        waited = timeout or self.timeout
        try:
            reply = self._relay.unary(SERVICE_PREFIX + name, request.SerializeToString(), waited)
        except CallError as exc:
            raise call_error(
                name, exc.code_name, exc.details, exc.trailers, request, self.pod_id, waited
            ) from exc
        try:
            return reply_type.FromString(reply)
        except Exception as exc:  # protobuf's DecodeError: the guest sent garbage
            raise AgentError(f"agent sent a malformed {name} reply") from exc

    def exec_process(self, container_id: str, exec_id: str, process: bytes) -> int:
        """ExecProcess: run OCI ``process`` JSON in the running container as ``exec_id``;
        the exec's guest pid."""
        return self.start_exec(container_id, exec_id, process)[0]

    def start_exec(
        self, container_id: str, exec_id: str, process: bytes, close_stdin: bool = False
    ) -> tuple[int, bool]:
        """ExecProcess, and with ``close_stdin`` its stdin closed in the same call (protocol
        1.13): (the exec's guest pid, whether its stdin was closed). False from an agent
        before 1.13 or for a terminal: the caller closes it (:meth:`close_stdin`) as before."""
        request = pb.ExecProcessRequest(
            container_id=container_id, exec_id=exec_id, process=process, close_stdin=close_stdin
        )
        reply = self._call("ExecProcess", request, pb.ProcessResponse, timeout=120.0)
        pid = guest_pid(reply.pid, f"exec {exec_id} of container {container_id}")
        return pid, bool(reply.stdin_closed)

    def signal(self, container_id: str, exec_id: str, signum: int, all: bool = False) -> None:
        """SignalProcess: ``signum`` to one process (or, with ``all``, every process)."""
        request = pb.SignalProcessRequest(
            container_id=container_id, exec_id=exec_id, signal=signum, all=all
        )
        self._call("SignalProcess", request, pb.Empty)

    def wait_process(
        self, container_id: str, exec_id: str = "", timeout: float | None = None
    ) -> tuple[int, int, bool]:
        """Block until the process exits: (status, signal, oom_killed); ``timeout`` None
        waits forever (in slices, so a dead channel is still noticed)."""
        ref = pb.ProcessRef(container_id=container_id, exec_id=exec_id)
        return wait_exit(
            lambda seconds: self._call("WaitProcess", ref, pb.WaitProcessResponse, timeout=seconds),
            timeout,
        )

    def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> None:
        """WriteStdin: all of ``data``; AgentError once stdin is closed or the process exited."""
        request = pb.WriteStdinRequest(container_id=container_id, exec_id=exec_id, data=data)
        self._call("WriteStdin", request, pb.Empty, timeout=300.0)

    def close_stdin(self, container_id: str, exec_id: str = "") -> None:
        """CloseStdin: EOF on the process's stdin."""
        ref = pb.ProcessRef(container_id=container_id, exec_id=exec_id)
        self._call("CloseStdin", ref, pb.Empty)

    def close_output(self, container_id: str, exec_id: str, which: str) -> bool:
        """CloseOutput: nobody reads the process's ``which`` any more; False from an agent
        older than the call (UNIMPLEMENTED)."""
        request = pb.CloseOutputRequest(
            container_id=container_id, exec_id=exec_id, stderr=which == "stderr"
        )
        try:
            self._call("CloseOutput", request, pb.Empty)
        except AgentError as exc:
            if exc.code == "UNIMPLEMENTED":
                return False
            raise
        return True

    def resize(self, container_id: str, exec_id: str, rows: int, cols: int) -> None:
        """TtyWinResize: set the process's terminal size."""
        request = pb.TtyWinResizeRequest(
            container_id=container_id, exec_id=exec_id, rows=rows, cols=cols
        )
        self._call("TtyWinResize", request, pb.Empty)

    def read_stream(self, container_id: str, exec_id: str, which: str) -> Iterator[bytes]:
        """Chunks of the process's stdout or stderr until EOF (no deadline), through a free
        output port of the pod when the agent takes it (as
        :meth:`~sandbox.pod.agent_client.ContainerClient.read_stream`)."""
        rpc = f"Read{which.capitalize()}"
        with output_port.leased(self.output_ports) as port:
            ref = pb.ProcessRef(container_id=container_id, exec_id=exec_id)
            nonce = ""
            if port is not None:
                nonce = new_nonce()
                ref.stream_port, ref.stream_nonce = port.index + 1, nonce
            call = self._relay.call(SERVICE_PREFIX + rpc, None)
            try:
                call.send(ref.SerializeToString())
                call.done_sending()
                messages = _Messages(call, pb.Chunk)
                yield from chunk_data(messages, port, nonce, which)
            except CallError as exc:
                if exc.code_name == "CANCELLED":
                    return
                raise call_error(
                    rpc, exc.code_name, exc.details, exc.trailers, ref, self.pod_id
                ) from exc
            finally:
                call.cancel()
