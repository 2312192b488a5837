"""A compromised guest against the host's agent client and agent proxy (generated, hypothesis).

The guest is untrusted (docs/security.md): whatever its agent answers -- random bytes,
well-formed messages with hostile values, oversized messages, failures with any status code,
message and trailing metadata, answers after the deadline, endless streams -- each host call
returns a value that passed its checks or raises AgentError whose message is one printable
line of bounded length; nothing else escapes, and the proxy keeps serving afterwards.

The fake agent is a raw gRPC server (bytes in, bytes out) that plays whatever behaviour the
example drew; the client reaches it directly and through the real proxy forwarder
(:class:`sandbox.pod.grpc_relay.Relay`), in this process. ``PYSANDBOX_HYPOTHESIS=large``
(``make campaign``) draws many more examples.
"""

from __future__ import annotations

import functools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentapi.limits import GRPC_OPTIONS, MAX_MESSAGE_BYTES, MAX_READ_BYTES
from agentapi.proto import agent_pb2 as pb
from sandbox.errors import AgentError
from sandbox.pod.agent_client import GUEST_NETWORK_DIR, MAX_COMMAND_CHARS, ContainerClient
from sandbox.pod.agent_proxy import start_relay
from sandbox.pod.grpc_relay import SERVICE_PREFIX
from sandbox.pod.network import NetworkConfig
from sandbox.pod.standin_service import listen

SERVICE = SERVICE_PREFIX.strip("/").rstrip("/")
#: The client's deadline here; a "slow" agent answers after it.
DEADLINE = 0.4
#: Longest error message a hostile agent may cause (the client cuts details at 4096).
MAX_MESSAGE_CHARS = 4400


@dataclass
class Behaviour:
    """What the fake agent does with the next call."""

    kind: str  # reply | abort | slow | stream
    payload: bytes = b""
    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""
    trailers: tuple[tuple[str, bytes], ...] = ()
    chunks: tuple[bytes, ...] = ()


@dataclass
class HostileAgent:
    """A raw agent server answering every method with :attr:`behaviour`."""

    behaviour: Behaviour = field(default_factory=lambda: Behaviour("reply"))
    release: threading.Event = field(default_factory=threading.Event)

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        b = self.behaviour
        if b.kind == "slow":
            self.release.wait(DEADLINE * 2)
            return b.payload
        if b.kind == "abort":
            context.set_trailing_metadata(b.trailers)
            context.abort(b.code, b.details)
        return b.payload

    def stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        b = self.behaviour
        if b.kind == "abort":
            context.set_trailing_metadata(b.trailers)
            context.abort(b.code, b.details)
        if b.kind == "endless":
            while context.is_active():
                yield b.payload
            return
        yield from b.chunks or (b.payload,)

    def handler(self) -> grpc.GenericRpcHandler:
        methods: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        for method in pb.DESCRIPTOR.services_by_name["Agent"].methods:
            if method.server_streaming:
                methods[method.name] = grpc.unary_stream_rpc_method_handler(self.stream)
            else:
                methods[method.name] = grpc.unary_unary_rpc_method_handler(self.unary)
        return grpc.method_handlers_generic_handler(SERVICE, methods)


@dataclass
class Guest:
    agent: HostileAgent
    direct: ContainerClient
    proxied: ContainerClient


def _connect_unix(path: Path) -> tuple[socket.socket, bytes]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    return sock, b""


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    tmp = tmp_path_factory.mktemp("hostile")
    agent = HostileAgent()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((agent.handler(),))
    server.add_insecure_port(f"unix:{tmp / 'agent.sock'}")
    server.start()
    relay = start_relay(
        listen(tmp / "proxy.sock", socket.SOCK_STREAM),
        functools.partial(_connect_unix, tmp / "agent.sock"),
    )
    direct = ContainerClient(f"unix:{tmp / 'agent.sock'}", timeout=DEADLINE, pod_id="hostile")
    proxied = ContainerClient(f"unix:{tmp / 'proxy.sock'}", timeout=DEADLINE, pod_id="hostile")
    yield Guest(agent, direct, proxied)
    agent.release.set()
    for each in (direct, proxied):
        each.close()
    relay.loop.stop()
    server.stop(0).wait()


# -- hostile values ---------------------------------------------------------------------------

_INTS = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, 1, -1, 2**31, 2**32 - 1, 4 * 1024 * 1024 + 1, 2**63 - 1]),
)
_TEXT = st.one_of(
    st.text(max_size=64),
    st.sampled_from(["\x1b]0;owned\x07", "\n\nfake: line", "/etc/passwd", "../.."]),
    st.text(min_size=4000, max_size=6000),
)


def message_fields(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[bytes]:
    """Serialized messages of ``descriptor``'s type with hostile field values."""

    def value(f: FieldDescriptor) -> st.SearchStrategy[Any]:
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 2:
                return st.just(b"")
            return message_fields(f.message_type, depth + 1)
        if f.type == FieldDescriptor.TYPE_STRING:
            return _TEXT
        if f.type == FieldDescriptor.TYPE_BYTES:
            return st.binary(max_size=256)
        if f.type == FieldDescriptor.TYPE_BOOL:
            return st.booleans()
        if f.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return st.floats(allow_nan=True, allow_infinity=True, width=32)
        unsigned = f.type in (
            FieldDescriptor.TYPE_UINT32,
            FieldDescriptor.TYPE_UINT64,
            FieldDescriptor.TYPE_FIXED32,
            FieldDescriptor.TYPE_FIXED64,
        )
        bits = 64
        if f.type in (
            FieldDescriptor.TYPE_INT32,
            FieldDescriptor.TYPE_SINT32,
            FieldDescriptor.TYPE_SFIXED32,
            FieldDescriptor.TYPE_ENUM,
            FieldDescriptor.TYPE_UINT32,
            FieldDescriptor.TYPE_FIXED32,
        ):
            bits = 32
        low, high = (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        return st.integers(low, high)

    def build(values: dict[str, Any]) -> bytes:
        from google.protobuf import message_factory

        cls = message_factory.GetMessageClass(descriptor)
        msg = cls()
        for name, raw in values.items():
            f = descriptor.fields_by_name[name]
            items = raw if f.is_repeated else [raw]
            for item in items:
                if f.type == FieldDescriptor.TYPE_MESSAGE:
                    sub = getattr(msg, name).add() if f.is_repeated else None
                    if sub is None:
                        getattr(msg, name).MergeFromString(item)
                    else:
                        sub.MergeFromString(item)
                elif f.is_repeated:
                    getattr(msg, name).append(item)
                else:
                    setattr(msg, name, item)
        data: bytes = msg.SerializeToString()
        return data

    strategies: dict[str, st.SearchStrategy[Any]] = {}
    for f in descriptor.fields:
        one = value(f)
        strategies[f.name] = st.lists(one, max_size=3 if depth else 40) if f.is_repeated else one
    return st.fixed_dictionaries({}, optional=strategies).map(build)


_ANY_MESSAGE = st.sampled_from(
    [
        pb.HealthResponse,
        pb.VersionResponse,
        pb.GuestDetailsResponse,
        pb.CreateContainerResponse,
        pb.ProcessResponse,
        pb.WaitProcessResponse,
        pb.ListProcessesResponse,
        pb.ContainerStatusResponse,
        pb.ReadFileResponse,
        pb.ConfigureNetworkResponse,
        pb.StatsContainerResponse,
        pb.Chunk,
    ]
).flatmap(lambda cls: message_fields(cls.DESCRIPTOR))

_CODES = st.sampled_from([c for c in grpc.StatusCode if c is not grpc.StatusCode.OK])
_TRAILERS = st.lists(
    st.tuples(
        st.sampled_from(["pysandbox-failure-bin", "x-evil-bin", "grpc-status-details-bin"]),
        st.binary(max_size=200),
    ),
    max_size=3,
).map(tuple)

behaviours = st.one_of(
    st.builds(Behaviour, st.just("reply"), _ANY_MESSAGE),
    st.builds(Behaviour, st.just("reply"), st.binary(max_size=512)),
    st.builds(
        Behaviour,
        st.just("abort"),
        code=_CODES,
        details=st.one_of(_TEXT, st.text(min_size=5000, max_size=9000)),
        trailers=_TRAILERS,
    ),
    st.just(Behaviour("slow")),
    st.builds(
        Behaviour,
        st.just("stream"),
        chunks=st.lists(_ANY_MESSAGE, max_size=5).map(tuple),
    ),
)

# -- what the host does with it ---------------------------------------------------------------

_NETWORK = NetworkConfig(hostname="h")


def _printable_line(text: str) -> bool:
    return text.isprintable() and len(text) <= MAX_MESSAGE_CHARS


def _checked(op: str, result: Any) -> None:
    """The invariants a returned value of ``op`` must hold whatever the guest sent."""
    if op in ("create", "exec"):
        assert 0 < result <= 4 * 1024 * 1024
    elif op == "wait":
        status, sig, _oom = result
        assert 0 <= status <= 255 and 0 <= sig <= 64
    elif op == "table":
        for row in result:
            assert row.command.isprintable() and len(row.command) <= MAX_COMMAND_CHARS
            assert row.pid > 0 and row.guest_pid > 0 and row.exec_id.isprintable()
    elif op == "status":
        status, pid, exit_status = result
        assert status in ("created", "running", "paused", "stopped")
        assert 0 <= pid <= 4 * 1024 * 1024 and 0 <= exit_status <= 255
    elif op == "info":
        for text in (result.agent_version, result.kernel_release, result.transport):
            assert text.isprintable() and len(text) <= 256
    elif op == "read":
        assert len(result) <= MAX_READ_BYTES
    elif op == "network":
        for path in (result.resolv_conf, result.hosts):
            assert path == "" or path.startswith(GUEST_NETWORK_DIR + "/")
            assert ".." not in path.split("/")
    elif op == "stream":
        assert all(len(chunk) <= MAX_READ_BYTES for chunk in result)
    elif op == "stats":
        assert all(0 <= value < 2**63 for value in result.values())


OPS: dict[str, Callable[[ContainerClient], Any]] = {
    "health": lambda c: c.health(),
    "info": lambda c: c.info(),
    "create": lambda c: c.create_container("c1", b"{}", "/run/r", overlay=False),
    "exec": lambda c: c.exec_process("c1", "e1", b"{}"),
    "wait": lambda c: c.wait_process("c1", "", timeout=DEADLINE),
    "table": lambda c: c.process_table("c1"),
    "pids": lambda c: c.list_processes("c1"),
    "status": lambda c: c.container_status("c1"),
    "read": lambda c: c.read_file("/etc/hostname"),
    "network": lambda c: c.configure_network(_NETWORK),
    "stats": lambda c: c.stats_container("c1"),
    "stream": lambda c: list(c.read_stream("c1", "", "stdout")),
}


def _slow_examples() -> int:
    return max(30, settings.default.max_examples // 2)


@settings(
    max_examples=_slow_examples(),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(op=st.sampled_from(sorted(OPS)), behaviour=behaviours, via_proxy=st.booleans())
def test_whatever_the_agent_answers_the_host_gets_a_checked_value_or_one_line(
    guest: Guest, op: str, behaviour: Behaviour, via_proxy: bool
) -> None:
    guest.agent.behaviour = behaviour
    client = guest.proxied if via_proxy else guest.direct
    started = time.monotonic()
    try:
        result = OPS[op](client)
    except AgentError as exc:
        assert _printable_line(str(exc)), repr(str(exc))
        assert _printable_line(exc.detail), repr(exc.detail)
    else:
        _checked(op, result)
    assert time.monotonic() - started < DEADLINE * 2 + 5  # slow: answers after 2 deadlines


def test_an_oversized_reply_is_refused_directly_and_through_the_proxy(guest: Guest) -> None:
    guest.agent.behaviour = Behaviour("reply", b"\x0a" + b"x" * (MAX_MESSAGE_BYTES + 16))
    for client in (guest.direct, guest.proxied):
        with pytest.raises(AgentError) as caught:
            client.health()
        assert caught.value.code == "RESOURCE_EXHAUSTED", caught.value
    guest.agent.behaviour = Behaviour("reply", pb.HealthResponse(status=1).SerializeToString())
    assert guest.proxied.health() == 0.0  # the proxy serves on


def test_an_endless_stream_is_consumed_in_bounded_chunks_until_the_host_stops(
    guest: Guest,
) -> None:
    chunk = pb.Chunk(data=b"y" * 65536).SerializeToString()
    guest.agent.behaviour = Behaviour("endless", chunk)
    for client in (guest.direct, guest.proxied):
        for taken, data in enumerate(client.read_stream("c1", "", "stdout"), 1):
            assert len(data) == 65536
            if taken == 50:
                break
    guest.agent.behaviour = Behaviour("reply", pb.HealthResponse(status=1).SerializeToString())
    assert guest.proxied.health() == 0.0
