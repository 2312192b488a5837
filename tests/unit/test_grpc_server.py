"""The guest agent's gRPC server without grpcio (agent/grpc_server.py), driven by a real
grpcio client over a unix socket (and over a pty standing in for the serial port): what a
client sees must be what grpcio's server gave it (codes, messages, trailing metadata,
deadlines, cancellation, streaming, size limits), calls that block never hold up others,
and what the server holds for a client that does not read stays bounded.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import tty
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent import grpc_server
from agent.grpc_server import SEND_BACKLOG, Server, StatusCode
from agentapi import failure
from agentapi.channel import SyncScanner, ack_line, sync_line
from agentapi.limits import GRPC_OPTIONS, MAX_MESSAGE_BYTES
from agentapi.proto import agent_pb2 as pb
from agentapi.proto import agent_pb2_grpc as pb_grpc

CHUNK = 64 * 1024


class Servicer:
    """Some of the Agent service's methods, each a behaviour under test, and what they saw."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)
        self.ended: list[str] = []  # "callback" / "inactive" / "closed" as they happen
        self.remaining: list[float | None] = []
        self.yielded = 0
        self.lock = threading.Lock()

    def _note(self, what: str) -> None:
        with self.lock:
            self.ended.append(what)

    def Health(self, request: pb.HealthRequest, context: Any) -> pb.HealthResponse:
        self.remaining.append(context.time_remaining())
        return pb.HealthResponse(status=pb.HealthResponse.SERVING, uptime_seconds=1.5)

    def Version(self, request: pb.VersionRequest, context: Any) -> pb.VersionResponse:
        raise RuntimeError("boom")

    def CreateContainer(self, request: pb.CreateContainerRequest, context: Any) -> Any:
        context.set_trailing_metadata(failure.trailer("NOT_EXECUTABLE"))
        context.abort(StatusCode.FAILED_PRECONDITION, f"no: {request.container_id} é%")

    def WaitProcess(self, request: pb.ProcessRef, context: Any) -> pb.WaitProcessResponse:
        """Blocks until released or the call ends (as the agent's: polls is_active)."""
        context.add_callback(lambda: self._note("callback"))
        self.entered.release()
        while context.is_active():
            if self.release.wait(0.02):
                return pb.WaitProcessResponse(status=7)
        self._note("inactive")
        return pb.WaitProcessResponse(status=-1)

    def ReadStdout(self, request: pb.ProcessRef, context: Any) -> Iterator[pb.Chunk]:
        """``stream_port`` chunks of CHUNK bytes (0: without end), then the end."""
        try:
            index = 0
            while request.stream_port == 0 or index < request.stream_port:
                yield pb.Chunk(data=bytes([index % 256]) * CHUNK)
                with self.lock:
                    self.yielded += 1
                index += 1
        finally:
            self._note("closed")

    def ReadFile(self, request: pb.ReadFileRequest, context: Any) -> pb.ReadFileResponse:
        return pb.ReadFileResponse(data=b"x" * request.max_bytes)

    def WriteFile(self, request: pb.WriteFileRequest, context: Any) -> pb.WriteFileResponse:
        with self.lock:
            self.yielded = len(request.data)
        return pb.WriteFileResponse()

    def PortForward(
        self, requests: Iterator[pb.PortForwardRequest], context: Any
    ) -> Iterator[pb.PortForwardResponse]:
        yield pb.PortForwardResponse(connected=True)
        for request in requests:
            yield pb.PortForwardResponse(data=request.data[::-1])


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Servicer, pb_grpc.AgentStub, str]]:
    servicer = Servicer()
    server = Server(servicer)
    address = f"unix:{tmp_path / 'agent.sock'}"
    server.add_insecure_port(address)
    server.start()
    with grpc.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        yield servicer, pb_grpc.AgentStub(channel), address  # type: ignore[no-untyped-call]
    servicer.release.set()
    server.stop(0)


def _wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_unary_call_and_its_deadline(served: tuple[Servicer, Any, str]) -> None:
    servicer, stub, _ = served
    assert stub.Health(pb.HealthRequest(), timeout=30).uptime_seconds == 1.5
    assert stub.Health(pb.HealthRequest()).status == pb.HealthResponse.SERVING
    first, second = servicer.remaining
    assert first is not None and 25 < first <= 30
    assert second is None


def test_abort_sends_code_message_and_trailing_metadata(
    served: tuple[Servicer, Any, str],
) -> None:
    _, stub, _ = served
    with pytest.raises(grpc.RpcError) as caught:
        stub.CreateContainer(pb.CreateContainerRequest(container_id="c1"), timeout=5)
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == "no: c1 é%"
    assert failure.reason_of(error.trailing_metadata()) == "NOT_EXECUTABLE"


def test_an_exception_is_unknown_and_a_missing_method_unimplemented(
    served: tuple[Servicer, Any, str],
) -> None:
    _, stub, _ = served
    with pytest.raises(grpc.RpcError) as caught:
        stub.Version(pb.VersionRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]
    assert "Exception calling application: boom" in caught.value.details()  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as caught:
        stub.StatsContainer(pb.ContainerRequest(container_id="c1"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]


def test_the_deadline_ends_a_blocked_call_and_the_handler_sees_it(
    served: tuple[Servicer, Any, str],
) -> None:
    servicer, stub, _ = served
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        stub.WaitProcess(pb.ProcessRef(container_id="c1"), timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    assert time.monotonic() - started < 3
    _wait_for(lambda: sorted(servicer.ended) == ["callback", "inactive"])


def test_a_cancelled_call_runs_its_callbacks_and_turns_inactive(
    served: tuple[Servicer, Any, str],
) -> None:
    servicer, stub, _ = served
    future = stub.WaitProcess.future(pb.ProcessRef(container_id="c1"), timeout=30)
    assert servicer.entered.acquire(timeout=5)
    future.cancel()
    _wait_for(lambda: sorted(servicer.ended) == ["callback", "inactive"])


def test_a_client_that_disappears_cancels_its_calls(tmp_path: Path) -> None:
    servicer = Servicer()
    server = Server(servicer)
    address = f"unix:{tmp_path / 'agent.sock'}"
    server.add_insecure_port(address)
    server.start()
    try:
        channel = grpc.insecure_channel(address)
        stub = pb_grpc.AgentStub(channel)  # type: ignore[no-untyped-call]
        call = stub.WaitProcess.future(pb.ProcessRef(container_id="c1"), timeout=30)
        assert servicer.entered.acquire(timeout=5)
        channel.close()
        assert call.done()
        _wait_for(lambda: sorted(servicer.ended) == ["callback", "inactive"])
        assert not server.pipes  # the connection is gone
    finally:
        server.stop(0)


def test_blocked_calls_do_not_hold_up_others(served: tuple[Servicer, Any, str]) -> None:
    servicer, stub, _ = served
    futures = [
        stub.WaitProcess.future(pb.ProcessRef(container_id=f"c{i}"), timeout=30) for i in range(40)
    ]
    for _ in futures:
        assert servicer.entered.acquire(timeout=10)
    started = time.monotonic()
    assert stub.Health(pb.HealthRequest(), timeout=5).uptime_seconds == 1.5
    assert time.monotonic() - started < 1
    servicer.release.set()
    assert [f.result(timeout=10).status for f in futures] == [7] * 40


def test_the_concurrency_limit_refuses_a_call_beyond_it(tmp_path: Path) -> None:
    servicer = Servicer()
    server = Server(servicer, max_concurrent_rpcs=2)
    address = f"unix:{tmp_path / 'agent.sock'}"
    server.add_insecure_port(address)
    server.start()
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.AgentStub(channel)  # type: ignore[no-untyped-call]
            blocked = [stub.WaitProcess.future(pb.ProcessRef(), timeout=30) for _ in range(2)]
            for _ in blocked:
                assert servicer.entered.acquire(timeout=5)
            with pytest.raises(grpc.RpcError) as caught:
                stub.Health(pb.HealthRequest(), timeout=5)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            servicer.release.set()
            assert [f.result(timeout=5).status for f in blocked] == [7, 7]
            assert stub.Health(pb.HealthRequest(), timeout=5).uptime_seconds == 1.5
    finally:
        server.stop(0)


def test_a_stream_arrives_whole_and_in_order(served: tuple[Servicer, Any, str]) -> None:
    _, stub, _ = served
    chunks = list(stub.ReadStdout(pb.ProcessRef(stream_port=100), timeout=30))
    assert [c.data for c in chunks] == [bytes([i]) * CHUNK for i in range(100)]


def test_a_stream_to_a_reader_that_stops_is_bounded_then_closed_on_cancel(
    served: tuple[Servicer, Any, str],
) -> None:
    servicer, stub, _ = served
    call = stub.ReadStdout(pb.ProcessRef(stream_port=0), timeout=30)
    next(call)
    time.sleep(1.0)  # the reader takes nothing more
    # What may be held: the client's windows (grpcio's stream window grows up to ~8 MiB
    # with its BDP probe), the server's backlog and h2's buffer: not the unbounded stream.
    held = servicer.yielded * CHUNK
    assert held < 16 * 1024 * 1024 + SEND_BACKLOG
    time.sleep(0.5)
    assert servicer.yielded * CHUNK == held  # stopped, not slowed
    call.cancel()
    _wait_for(lambda: servicer.ended == ["closed"])


def test_messages_over_the_limit_fail_resource_exhausted(
    served: tuple[Servicer, Any, str],
) -> None:
    servicer, stub, address = served
    # A response over the limit is not sent.
    with pytest.raises(grpc.RpcError) as caught:
        stub.ReadFile(pb.ReadFileRequest(max_bytes=MAX_MESSAGE_BYTES + 1), timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert "Sent message larger than max" in caught.value.details()  # type: ignore[attr-defined]
    # A request over the limit (from a client without one) is refused from its header.
    with grpc.insecure_channel(address) as unlimited:
        big = pb_grpc.AgentStub(unlimited)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as caught:
            big.WriteFile(pb.WriteFileRequest(data=b"y" * MAX_MESSAGE_BYTES), timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert "Received message larger than max" in caught.value.details()  # type: ignore[attr-defined]
        # Just under it passes (a message larger than the windows).
        size = MAX_MESSAGE_BYTES - 64
        big.WriteFile(pb.WriteFileRequest(data=b"y" * size), timeout=10)
        assert servicer.yielded == size


def test_a_bidirectional_stream(served: tuple[Servicer, Any, str]) -> None:
    _, stub, _ = served
    requests = [pb.PortForwardRequest(port=80)] + [
        pb.PortForwardRequest(data=bytes([i]) * 100 + b"end") for i in range(50)
    ]
    replies = list(stub.PortForward(iter(requests), timeout=10))
    assert replies[0].connected
    assert [r.data for r in replies[1:]] == [r.data[::-1] for r in requests]


def test_workers_are_reused_and_the_surplus_ends() -> None:
    workers = grpc_server.Workers(keep=1, idle_seconds=0.2)
    done = threading.Semaphore(0)
    before = threading.active_count()
    for _ in range(3):
        workers.submit(lambda: (time.sleep(0.1), done.release()))  # type: ignore[func-returns-value]
    for _ in range(3):
        assert done.acquire(timeout=5)
    assert threading.active_count() == before + 3
    workers.submit(done.release)  # an idle one takes it
    assert done.acquire(timeout=5)
    _wait_for(lambda: threading.active_count() == before + 1)


# -- the serial port ---------------------------------------------------------------------------


class _Host:
    """The host's side of a pty standing in for the serial port: the channel handshake,
    then a grpcio client over a unix socket bridged to the pty."""

    def __init__(self, master: int, path: Path) -> None:
        import socket

        self.master = master
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.address = f"unix:{path}"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._bridge, daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Disconnect: the bridge stops reading the pty (the next host's turn)."""
        self.stop.set()
        self.thread.join(5)
        self.listener.close()

    def _bridge(self) -> None:
        import select

        conn, _ = self.listener.accept()
        nonce = os.urandom(16).hex()
        os.write(self.master, b"stale bytes of an old session" + sync_line(nonce))
        expected, window = ack_line(nonce), b""
        with contextlib.suppress(OSError), conn:
            while expected not in window and not self.stop.is_set():
                select.select([self.master], [], [], 0.05)
                with contextlib.suppress(BlockingIOError):
                    window += os.read(self.master, 65536)
            conn.sendall(window[window.index(expected) + len(expected) :])
            while not self.stop.is_set():
                ready, _, _ = select.select([self.master, conn], [], [], 0.05)
                if self.master in ready:
                    with contextlib.suppress(BlockingIOError):
                        conn.sendall(os.read(self.master, 65536))
                if conn in ready:
                    data = conn.recv(65536)
                    if not data:
                        break
                    os.write(self.master, data)


def test_the_serial_port_serves_sessions_one_after_another(tmp_path: Path) -> None:
    master, slave = os.openpty()
    tty.setraw(slave)
    tty.setraw(master)
    os.set_blocking(master, False)
    servicer = Servicer()
    server = Server(servicer)
    server.serve_serial(Path(os.ttyname(slave)))
    server.start()
    try:
        first = _Host(master, tmp_path / "first.sock")
        with grpc.insecure_channel(first.address) as channel:
            stub = pb_grpc.AgentStub(channel)  # type: ignore[no-untyped-call]
            assert stub.Health(pb.HealthRequest(), timeout=10).uptime_seconds == 1.5
            call = stub.WaitProcess.future(pb.ProcessRef(), timeout=30)
            assert servicer.entered.acquire(timeout=5)
            first.close()
            # The host reconnects: its SYNC ends the session, and the call with it.
            second = _Host(master, tmp_path / "second.sock")
            with grpc.insecure_channel(second.address) as again:
                stub = pb_grpc.AgentStub(again)  # type: ignore[no-untyped-call]
                assert stub.Health(pb.HealthRequest(), timeout=10).uptime_seconds == 1.5
                second.close()
            _wait_for(lambda: sorted(servicer.ended) == ["callback", "inactive"])
            call.cancel()
    finally:
        server.stop(0)
        os.close(master)
        os.close(slave)


def test_the_scanner_finds_a_sync_after_stale_bytes() -> None:
    scanner = SyncScanner()
    assert scanner.feed(b"junk" + sync_line("ab" * 16)[:5]) is None
    assert scanner.feed(sync_line("ab" * 16)[5:] + b"PRI") == ("ab" * 16, b"PRI")
