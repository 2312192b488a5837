"""PortForward without a VM: the agent's servicer on a local gRPC server, the host's Forwarder
in front of it, and a TCP server on this machine's loopback standing in for the container.

What a client of ``kubectl port-forward`` relies on: bytes go both ways unchanged, a
half-close reaches the server (it answers after EOF), the server's close reaches the client,
a port nobody listens on fails at once, and the number of connections is bounded.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agent import portforward as guest_side
from agent.server import AgentService, make_server
from agentapi.h2_loop import Loop
from agentapi.limits import GRPC_OPTIONS
from agentapi.proto import agent_pb2 as pb
from agentapi.proto import agent_pb2_grpc as pb_grpc
from sandbox.pod.grpc_relay import Relay
from sandbox.pod.portforward import Forwarder


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[grpc.Channel]:
    """A channel to an agent servicer serving on a unix socket."""
    server = make_server(AgentService(transport="unix", power_off=lambda: None))
    address = f"unix:{tmp_path / 'agent.sock'}"
    server.add_insecure_port(address)
    server.start()
    channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
    yield channel
    channel.close()
    server.stop(0).wait()


@pytest.fixture
def relay(agent: grpc.Channel, tmp_path: Path) -> Iterator[Relay]:
    """The agent proxy's own connection to that agent (what its Forwarder calls through)."""

    def connect() -> tuple[socket.socket, bytes]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(tmp_path / "agent.sock"))
        return sock, b""

    loop = Loop()
    loop.start()
    yield Relay(loop, connect)
    loop.stop()


@pytest.fixture
def upper_server() -> Iterator[int]:
    """A server on 127.0.0.1 that reads until EOF, then answers the bytes upper-cased and
    closes: the port it listens on."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                with conn:
                    received = b""
                    while chunk := conn.recv(65536):
                        received += chunk
                    conn.sendall(received.upper())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_agent_relays_both_ways_with_half_close(agent: grpc.Channel, upper_server: int) -> None:
    stub = pb_grpc.AgentStub(agent)  # type: ignore[no-untyped-call]
    payload = b"hello port-forward " * 10000  # several messages each way
    requests = iter([pb.PortForwardRequest(port=upper_server), pb.PortForwardRequest(data=payload)])
    replies = list(stub.PortForward(requests, timeout=30))
    assert replies[0].connected and not replies[0].data
    assert b"".join(r.data for r in replies[1:]) == payload.upper()
    assert all(len(r.data) <= guest_side.CHUNK for r in replies)


@pytest.mark.parametrize(
    ("first", "code"),
    [
        (None, grpc.StatusCode.UNAVAILABLE),  # a port nobody listens on
        (pb.PortForwardRequest(data=b"x"), grpc.StatusCode.INVALID_ARGUMENT),  # no port
        (pb.PortForwardRequest(port=70000), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_agent_refusals(
    agent: grpc.Channel, first: pb.PortForwardRequest | None, code: object
) -> None:
    stub = pb_grpc.AgentStub(agent)  # type: ignore[no-untyped-call]
    port = _free_port()
    request = first or pb.PortForwardRequest(port=port)
    with pytest.raises(grpc.RpcError) as failed:
        list(stub.PortForward(iter([request]), timeout=30))
    assert failed.value.code() == code, failed.value.details()
    if first is None:
        assert f"port {port}" in (failed.value.details() or "")


def test_agent_bounds_connections() -> None:
    with contextlib.ExitStack() as stack:
        for _ in range(guest_side.MAX_CONNECTIONS):
            stack.enter_context(guest_side.slot())
        with pytest.raises(guest_side.PortForwardError) as refused:
            stack.enter_context(guest_side.slot())
        assert refused.value.code == "RESOURCE_EXHAUSTED"
    with guest_side.slot():  # all free again
        pass


def _forwarder(relay: Relay, target: int) -> tuple[int, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    forwarder = Forwarder(listener, relay, port_of=lambda _conn: target)
    threading.Thread(target=forwarder.serve_forever, daemon=True).start()
    return listener.getsockname()[1], listener


def test_host_forwarder_end_to_end(relay: Relay, upper_server: int) -> None:
    port, listener = _forwarder(relay, upper_server)
    try:
        for _ in range(3):  # one connection after the other, as kubectl opens them
            with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
                client.sendall(b"abc" * 50000)
                client.shutdown(socket.SHUT_WR)
                received = b""
                while chunk := client.recv(65536):
                    received += chunk
            assert received == b"ABC" * 50000
    finally:
        listener.close()


def test_host_forwarder_resets_a_connection_to_a_closed_port(relay: Relay) -> None:
    port, listener = _forwarder(relay, _free_port())
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            client.settimeout(30)
            with pytest.raises(ConnectionResetError):
                while client.recv(100):
                    pass
    finally:
        listener.close()
