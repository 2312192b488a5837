"""The agent proxy's HTTP/2 relay (sandbox/pod/grpc_relay.py) between a real grpcio client
and a real grpcio server on unix sockets, in this process: what a client of ``agent.sock``
sees must be what it saw through the grpcio proxy (codes, messages, the Failure reason,
deadlines, cancellation both ways, upstream death), and what the relay holds stays bounded.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from agentapi import failure
from agentapi.limits import GRPC_OPTIONS, MAX_MESSAGE_BYTES
from sandbox.pod import grpc_stream
from sandbox.pod.agent_proxy import start_relay
from sandbox.pod.grpc_relay import STREAM_WINDOW, CallError, Relay
from sandbox.pod.standin_service import listen

SERVICE = "pysandbox.agent.v1.Agent"


class Upstream:
    """A grpcio server with raw-bytes methods (the "agent"), and what it saw."""

    def __init__(self, path: Path, options: list[tuple[str, int]] | None = None) -> None:
        self.path = path
        self.cancelled = threading.Event()
        self.remaining: list[float | None] = []
        self.yielded = 0
        self.entered = threading.Event()
        handlers = {
            "Echo": grpc.unary_unary_rpc_method_handler(self.echo),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
            "Slow": grpc.unary_unary_rpc_method_handler(self.slow),
            "Flood": grpc.unary_stream_rpc_method_handler(self.flood),
            "Huge": grpc.unary_unary_rpc_method_handler(self.huge),
            "Sum": grpc.stream_unary_rpc_method_handler(self.sum),
        }
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8),
            handlers=[grpc.method_handlers_generic_handler(SERVICE, handlers)],
            options=options if options is not None else GRPC_OPTIONS,
        )
        self.server.add_insecure_port(f"unix:{path}")
        self.server.start()

    def echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.remaining.append(context.time_remaining())
        return request[::-1]

    def fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        context.set_trailing_metadata(
            (*failure.trailer("EXECUTABLE_NOT_FOUND"), ("x-other", "dropped"))
        )
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "exec: nope: not found ü")

    def slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.remaining.append(context.time_remaining())
        context.add_callback(self.cancelled.set)
        self.entered.set()
        time.sleep(3)
        return b"late"

    def flood(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        """``request``: how many 64 KiB messages."""
        context.add_callback(self.cancelled.set)
        self.entered.set()
        for i in range(int(request)):
            chunk = bytes([i % 256]) * 65536
            self.yielded += len(chunk)
            yield chunk

    def huge(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"h" * int(request)

    def sum(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return str(sum(len(r) for r in requests)).encode()


class Setup:
    def __init__(self, tmp: Path, agent_options: list[tuple[str, int]] | None = None) -> None:
        self.upstream = Upstream(tmp / "agent.sock", agent_options)
        self.connections: list[socket.socket] = []
        self.connect_failures = 0
        self.listener = listen(tmp / "proxy.sock", socket.SOCK_STREAM)
        self.relay: Relay = start_relay(self.listener, self.connect)
        self.address = f"unix:{tmp / 'proxy.sock'}"

    def connect(self) -> tuple[socket.socket, bytes]:
        if self.connect_failures:
            self.connect_failures -= 1
            raise OSError("not yet")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.upstream.path))
        self.connections.append(sock)
        return sock, b""

    def channel(self, options: list[tuple[str, int]] | None = None) -> grpc.Channel:
        return grpc.insecure_channel(
            self.address, options=options if options is not None else GRPC_OPTIONS
        )

    def close(self) -> None:
        self.relay.loop.stop()
        self.upstream.server.stop(0).wait()


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    each = Setup(tmp_path)
    yield each
    each.close()


def _method(channel: grpc.Channel, name: str, kind: str = "unary_unary") -> Any:
    return getattr(channel, kind)(f"/{SERVICE}/{name}")


def test_unary_and_messages_larger_than_the_windows(setup: Setup) -> None:
    with setup.channel() as channel:
        assert _method(channel, "Echo")(b"abc", timeout=10) == b"cba"
        big = bytes(range(256)) * (3 * 1024 * 1024 // 256)  # 12 x the stream window
        assert len(big) > 10 * STREAM_WINDOW
        assert _method(channel, "Echo")(big, timeout=30) == big[::-1]
        replies = list(_method(channel, "Flood", "unary_stream")(b"64", timeout=30))
        assert [r[:1] for r in replies] == [bytes([i]) for i in range(64)]
        assert all(len(r) == 65536 for r in replies)
        requests = iter([b"x" * 1000000] * 5)
        assert _method(channel, "Sum", "stream_unary")(requests, timeout=30) == b"5000000"


def test_many_calls_at_once_share_the_connection(setup: Setup) -> None:
    with setup.channel() as channel:
        echo = _method(channel, "Echo")
        with futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda i: echo(str(i).encode(), timeout=20), range(200)))
    assert results == [str(i).encode()[::-1] for i in range(200)]
    assert len(setup.connections) == 1


def test_an_error_keeps_code_message_and_failure_reason_only(setup: Setup) -> None:
    with setup.channel() as channel, pytest.raises(grpc.RpcError) as failed:
        _method(channel, "Fail")(b"", timeout=10)
    error: Any = failed.value
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == "exec: nope: not found ü"
    trailing = error.trailing_metadata()
    assert failure.reason_of(trailing) == "EXECUTABLE_NOT_FOUND"
    assert "x-other" not in [entry[0] for entry in trailing]


def test_an_unknown_service_is_unimplemented(setup: Setup) -> None:
    with setup.channel() as channel, pytest.raises(grpc.RpcError) as failed:
        channel.unary_unary("/other.Service/Echo")(b"", timeout=10)
    assert failed.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
    assert setup.connections == []  # never relayed


def test_the_deadline_passes_on_and_expires(setup: Setup) -> None:
    with setup.channel() as channel:
        _method(channel, "Echo")(b"x", timeout=7)
        with pytest.raises(grpc.RpcError) as failed:
            _method(channel, "Slow")(b"", timeout=0.5)
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    first, second = setup.upstream.remaining
    assert first is not None and 5 < first <= 7.05  # grpcio rounds to its timer ticks
    assert second is not None and 0 < second <= 0.52  # grpcio rounds to its timer ticks
    assert setup.upstream.cancelled.wait(5)


def test_without_a_deadline_none_is_invented(setup: Setup) -> None:
    with setup.channel() as channel:
        _method(channel, "Echo")(b"x")
    (remaining,) = setup.upstream.remaining
    assert remaining is None or remaining > 1e6


def test_a_cancelled_call_is_cancelled_upstream(setup: Setup) -> None:
    with setup.channel() as channel:
        call = _method(channel, "Flood", "unary_stream")(b"100000", timeout=60)
        next(call)
        call.cancel()
        assert setup.upstream.cancelled.wait(5)


def test_a_client_that_goes_away_cancels_its_calls_upstream(setup: Setup) -> None:
    channel = setup.channel()
    future = _method(channel, "Slow").future(b"", timeout=60)
    assert setup.upstream.entered.wait(5)
    channel.close()
    assert setup.upstream.cancelled.wait(5)
    assert future.cancelled() or future.exception() is not None


def test_upstream_death_fails_open_calls_unavailable_then_reconnects(setup: Setup) -> None:
    with setup.channel() as channel:
        future = _method(channel, "Slow").future(b"", timeout=30)
        assert setup.upstream.entered.wait(5)
        setup.connections[0].shutdown(socket.SHUT_RDWR)  # the channel to the guest breaks
        with pytest.raises(grpc.RpcError) as failed:
            future.result(timeout=10)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        assert _method(channel, "Echo")(b"ab", timeout=10) == b"ba"
    assert len(setup.connections) == 2


def test_calls_wait_for_the_agent_until_their_deadline(setup: Setup) -> None:
    setup.connect_failures = 3  # the agent is not there yet: connecting fails three times
    with setup.channel() as channel:
        assert _method(channel, "Echo")(b"ab", timeout=10, wait_for_ready=True) == b"ba"
        setup.connections[0].shutdown(socket.SHUT_RDWR)
        time.sleep(0.2)
        setup.connect_failures = 1000
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as failed:
            _method(channel, "Echo")(b"ab", timeout=0.7, wait_for_ready=True)
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    assert time.monotonic() - started < 5


def test_oversized_messages_fail_resource_exhausted(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    try:
        with setup.channel(options=[]) as unbounded:  # a client without a send limit
            with pytest.raises(grpc.RpcError) as failed:
                _method(unbounded, "Echo")(b"x" * (MAX_MESSAGE_BYTES + 1), timeout=30)
            assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    finally:
        setup.close()
    (tmp_path / "other").mkdir()
    setup = Setup(tmp_path / "other", agent_options=[])  # an agent that sends them
    try:
        with setup.channel() as channel, pytest.raises(grpc.RpcError) as failed:
            _method(channel, "Huge")(str(MAX_MESSAGE_BYTES + 1).encode(), timeout=30)
        assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        # The relay's own calls refuse it from the message's header, before holding it.
        with pytest.raises(CallError) as refused:
            setup.relay.unary(f"/{SERVICE}/Huge", str(MAX_MESSAGE_BYTES + 1).encode(), 30)
        assert refused.value.code_name == "RESOURCE_EXHAUSTED"
        size = str(MAX_MESSAGE_BYTES).encode()
        assert len(setup.relay.unary(f"/{SERVICE}/Huge", size, 30)) == MAX_MESSAGE_BYTES
    finally:
        setup.close()


class FloodingAgent:
    """A bare HTTP/2 server (h2) that answers every call with :data:`COUNT` gRPC messages of
    64 KiB, sent as fast as its peer's windows let it: ``sent`` counts the bytes it could
    send, which is what the relay accepted."""

    COUNT = 512  # 32 MiB

    def __init__(self, path: Path) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.sent = 0
        self.stopped = False
        self.reset_code: int | None = None  # reset every call with this HTTP/2 error code
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        import h2.config
        import h2.connection
        import h2.events

        sock, _ = self.listener.accept()
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        conn = h2.connection.H2Connection(config)
        conn.initiate_connection()
        message = b"\0" + (65536).to_bytes(4, "big") + b"m" * 65536
        pending: dict[int, bytearray] = {}
        while not self.stopped:
            data = None
            if select.select([sock], [], [], 0.02)[0]:
                data = sock.recv(65536)
            if data == b"":
                break
            for event in conn.receive_data(data) if data else ():
                if isinstance(event, h2.events.RequestReceived) and self.reset_code is not None:
                    conn.reset_stream(event.stream_id, self.reset_code)
                elif isinstance(event, h2.events.RequestReceived):
                    headers = [(b":status", b"200"), (b"content-type", b"application/grpc")]
                    conn.send_headers(event.stream_id, headers)
                    pending[event.stream_id] = bytearray(message * self.COUNT)
                elif isinstance(event, h2.events.StreamReset):
                    pending.pop(event.stream_id, None)
            for sid, buffer in list(pending.items()):
                while buffer:
                    window = conn.local_flow_control_window(sid)
                    size = min(len(buffer), window, conn.max_outbound_frame_size)
                    if size <= 0:
                        break
                    conn.send_data(sid, bytes(buffer[:size]))
                    del buffer[:size]
                    self.sent += size
                if not buffer:
                    conn.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
                    del pending[sid]
            try:
                sock.sendall(conn.data_to_send())
            except OSError:  # the relay is gone
                break
        sock.close()


@pytest.fixture
def flooding(tmp_path: Path) -> Iterator[tuple[FloodingAgent, Relay, str]]:
    agent = FloodingAgent(tmp_path / "agent.sock")

    def connect() -> tuple[socket.socket, bytes]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(tmp_path / "agent.sock"))
        return sock, b""

    relay = start_relay(listen(tmp_path / "proxy.sock", socket.SOCK_STREAM), connect)
    yield agent, relay, f"unix:{tmp_path / 'proxy.sock'}"
    agent.stopped = True
    relay.loop.stop()


def test_what_the_guest_sends_a_reader_that_stops_is_bounded(
    flooding: tuple[FloodingAgent, Relay, str],
) -> None:
    """The relay's own call: the guest can only send what the stream window lets it."""
    agent, relay, _ = flooding
    call = relay.call(f"/{SERVICE}/Flood", 60)
    call.send(b"")
    call.done_sending()
    time.sleep(1.5)
    assert 0 < agent.sent <= STREAM_WINDOW + 2 * 65541, agent.sent
    assert sum(len(m) for m in call) == 65536 * FloodingAgent.COUNT


def test_what_the_guest_sends_a_client_that_does_not_read_is_bounded(
    flooding: tuple[FloodingAgent, Relay, str],
) -> None:
    """A relayed call: the relay's window, its output limit and the client's window."""
    agent, _, address = flooding
    with grpc.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        call = _method(channel, "Flood", "unary_stream")(b"", timeout=60)
        next(call)
        time.sleep(1.5)
        assert agent.sent < 8 * 1024 * 1024, agent.sent
        assert sum(1 for _ in call) == FloodingAgent.COUNT - 1


def test_calls_dropped_holding_data_give_the_connection_window_back(
    flooding: tuple[FloodingAgent, Relay, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call cancelled with response data not handed on yet: that data's share of the
    connection's window is given back, or a long-lived pod's connection would stall."""
    _, relay, _ = flooding
    monkeypatch.setattr(grpc_stream, "CONNECTION_WINDOW", 2 * STREAM_WINDOW)  # 3 windows
    for _ in range(8):
        call = relay.call(f"/{SERVICE}/Flood", 10)
        call.send(b"")
        call.done_sending()
        assert call.receive() is not None
        time.sleep(0.2)  # the agent fills the stream's window
        call.cancel()
    call = relay.call(f"/{SERVICE}/Flood", 20)
    call.send(b"")
    call.done_sending()
    assert sum(len(m) for m in call) == 65536 * FloodingAgent.COUNT


def test_the_agents_reset_reaches_the_client(flooding: tuple[FloodingAgent, Relay, str]) -> None:
    agent, relay, address = flooding
    agent.reset_code = 8  # CANCEL
    with grpc.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        with pytest.raises(grpc.RpcError) as failed:
            _method(channel, "Echo")(b"x", timeout=10)
        assert failed.value.code() == grpc.StatusCode.CANCELLED  # type: ignore[attr-defined]
        agent.reset_code = 11  # ENHANCE_YOUR_CALM
        with pytest.raises(grpc.RpcError) as calm:
            _method(channel, "Echo")(b"x", timeout=10)
        assert calm.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    with pytest.raises(CallError) as own:
        relay.unary(f"/{SERVICE}/Echo", b"x", 10)
    assert own.value.code_name == "RESOURCE_EXHAUSTED"


def test_the_relays_own_call_reports_status_and_deadline(setup: Setup) -> None:
    relay = setup.relay
    assert relay.unary(f"/{SERVICE}/Echo", b"xyz", 10) == b"zyx"
    with pytest.raises(CallError) as failed:
        relay.unary(f"/{SERVICE}/Fail", b"", 10)
    assert failed.value.code_name == "FAILED_PRECONDITION"
    assert failed.value.details == "exec: nope: not found ü"
    assert failure.reason_of(failed.value.trailers) == "EXECUTABLE_NOT_FOUND"
    with pytest.raises(CallError) as slow:
        relay.unary(f"/{SERVICE}/Slow", b"", 0.5)
    assert slow.value.code_name == "DEADLINE_EXCEEDED"
    assert setup.upstream.cancelled.wait(5)


def test_the_proxy_process_loads_no_grpcio(tmp_path: Path) -> None:
    """The point of the relay: the proxy as spawn() starts it (after "ready" it loads what
    serves the stand-ins) maps no grpcio library; protobuf's is there for the stand-ins."""
    import os
    import subprocess
    import sys

    from sandbox import IMPORT_ROOT
    from sandbox.pod.agent_proxy import PROGRAM

    argv = [sys.executable, "-P", "-c", PROGRAM, "--listen", str(tmp_path / "agent.sock")]
    argv += ["--serial", str(tmp_path / "none"), "--vm-pid", str(os.getpid())]
    env = {**os.environ, "PYTHONPATH": IMPORT_ROOT}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, cwd="/", env=env)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"agent-proxy: ready"
        assert (tmp_path / "shim.sock").exists()
        deadline = time.monotonic() + 20
        maps = ""
        while "_upb" not in maps and time.monotonic() < deadline:  # protobuf: the stand-ins
            time.sleep(0.1)
            maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "_upb" in maps
        assert "/grpc/" not in maps and "cygrpc" not in maps
    finally:
        proc.kill()
        proc.wait()
