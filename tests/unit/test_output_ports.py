"""Output ports (docs/stream-ports.md) without a VM: the frame format against hostile bytes
(hypothesis), the agent's writer and the host's reader over a socket pair standing for the
port, and the host's port leases."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import stream_port
from agentapi.proto import agent_pb2 as pb
from agentapi.proto import agent_pb2_grpc as pb_grpc
from agentapi.stream_wire import (
    END_FRAME,
    HEADER,
    MAX_DISCARD_BYTES,
    MAX_FRAME_BYTES,
    FrameReader,
    StreamError,
    opening_line,
)
from sandbox.errors import AgentError
from sandbox.pod import output_port
from sandbox.pod.agent_client import ContainerClient

NONCE = "0123456789abcdef0123456789abcdef"


def _stream(payloads: list[bytes], nonce: str = NONCE) -> bytes:
    body = b"".join(HEADER.pack(len(p)) + p for p in payloads if p)
    return opening_line(nonce) + body + END_FRAME


def _split(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    start = 0
    for point in [*points, len(data)]:
        yield data[start:point]
        start = point


def _parse(pieces: Iterator[bytes], nonce: str = NONCE) -> tuple[bytes, bool]:
    reader = FrameReader(nonce)
    out = bytearray()
    for piece in pieces:
        for view in reader.feed(piece):
            out += view
    return bytes(out), reader.ended


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    garbage=st.binary(max_size=300),
    payloads=st.lists(st.binary(max_size=300), max_size=8),
    cuts=st.lists(st.integers(min_value=0), max_size=12),
    trailing=st.binary(max_size=50),
)
def test_payload_survives_any_split_after_any_stale_bytes(
    garbage: bytes, payloads: list[bytes], cuts: list[int], trailing: bytes
) -> None:
    """Whatever stale bytes come first (a previous reader's stream, even one with another
    nonce's opening line) and however the socket splits the stream, the reader gets exactly
    the payload, sees the end frame, and ignores anything after it."""
    stale = garbage + _stream([b"old"], nonce="f" * 32)[:-2]
    data = stale + _stream(payloads) + trailing
    assert _parse(_split(data, cuts)) == (b"".join(payloads), True)


@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_hostile_bytes_never_yield_more_than_fed_nor_crash(data: bytes, cuts: list[int]) -> None:
    """Arbitrary guest bytes: the reader yields at most what it was fed after an opening
    line, or raises StreamError; nothing else."""
    reader = FrameReader(NONCE)
    fed = got = 0
    try:
        for piece in _split(opening_line(NONCE) + data, cuts):
            fed += len(piece)
            got += sum(len(v) for v in reader.feed(piece))
    except StreamError:
        return
    assert got <= fed


def test_an_oversized_frame_is_refused() -> None:
    data = opening_line(NONCE) + HEADER.pack(MAX_FRAME_BYTES + 1) + b"x" * 10
    with pytest.raises(StreamError, match="frame"):
        _parse(iter([data]))
    # The largest allowed frame passes.
    payload = b"y" * MAX_FRAME_BYTES
    assert _parse(iter([_stream([payload])])) == (payload, True)


def test_endless_garbage_before_the_opening_line_is_refused() -> None:
    reader = FrameReader(NONCE)
    chunk = b"z" * (1 << 20)
    with pytest.raises(StreamError, match="before its stream"):
        for _ in range(MAX_DISCARD_BYTES // len(chunk) + 2):
            list(reader.feed(chunk))


# -- the agent's writer and the host's reader over a socket pair -----------------------------


class _Pair:
    """A non-blocking socket pair: ``port`` stands for the guest's port device, ``host`` for
    the QEMU chardev socket the host reads."""

    def __init__(self, buffer_bytes: int = 64 * 1024) -> None:
        self.port_sock, self.host = socket.socketpair()
        for sock in (self.port_sock, self.host):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
            sock.setblocking(False)
        self.port = stream_port.OutputPort(Path("/nonexistent"))
        self.port.fd = self.port_sock.fileno()

    def close(self) -> None:
        self.port_sock.close()
        self.host.close()


def _chunks(port: stream_port.OutputPort, payloads: list[bytes]) -> Iterator[memoryview]:
    """As the agent's reads: each payload put at the start of the port's payload buffer."""
    room = port.payload
    for payload in payloads:
        room[: len(payload)] = payload
        yield room[: len(payload)]


def test_writer_to_reader_byte_exact_with_backpressure() -> None:
    """8 MiB of varied bytes through a 64 KiB socket buffer, the reader slower than the
    writer: everything arrives in order, the end frame ends the stream, and the call's end
    (signalled) does not cut it short."""
    pair = _Pair()
    payloads = [os.urandom(n) for n in (1, 4096, MAX_FRAME_BYTES, 65537, 3)] * 6
    ended = os.eventfd(0)
    writer = threading.Thread(
        target=lambda: (
            stream_port.write_stream(pair.port, NONCE, _chunks(pair.port, payloads), None),
            os.eventfd_write(ended, 1),
        )
    )
    writer.start()
    got = bytearray()
    for piece in output_port.read_frames(pair.host, NONCE, ended, lambda: None):
        got += piece
        time.sleep(0.0005)
    writer.join(10)
    assert bytes(got) == b"".join(payloads)
    pair.close()
    os.close(ended)


def test_a_blocked_writer_stops_when_its_call_ends() -> None:
    """Nobody reads the port: the writer waits for room, and leaves as soon as ``stop`` (the
    RPC ended) is readable, instead of blocking for good."""
    pair = _Pair()
    stop_r, stop_w = os.pipe()
    raised: list[BaseException] = []

    def write() -> None:
        try:
            stream_port.write_stream(
                pair.port, NONCE, _chunks(pair.port, [b"a" * MAX_FRAME_BYTES] * 4), stop_r
            )
        except BaseException as exc:
            raised.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    time.sleep(0.3)
    assert writer.is_alive()  # blocked: the socket buffer is full
    os.close(stop_w)
    writer.join(5)
    assert not writer.is_alive()
    assert [type(e) for e in raised] == [stream_port.Stopped]
    pair.close()
    os.close(stop_r)


def test_the_calls_failure_is_raised_and_a_silent_end_times_out() -> None:
    pair = _Pair()
    ended = os.eventfd(0)
    pair.port_sock.send(opening_line(NONCE) + HEADER.pack(3) + b"abc")
    os.eventfd_write(ended, 1)
    failure = RuntimeError("agent said no")
    with pytest.raises(RuntimeError, match="agent said no"):
        list(output_port.read_frames(pair.host, NONCE, ended, lambda: failure))
    # The call ended well but the end frame never comes: bounded by the tail timeout.
    started = time.monotonic()
    with pytest.raises(StreamError, match="did not end"):
        list(output_port.read_frames(pair.host, NONCE, ended, lambda: None, tail_timeout=0.3))
    assert time.monotonic() - started < 5
    pair.close()
    os.close(ended)


def test_eof_before_the_end_frame_is_an_error() -> None:
    pair = _Pair()
    never = os.eventfd(0)
    pair.port_sock.send(opening_line(NONCE) + HEADER.pack(10) + b"short")
    pair.port_sock.close()
    got = bytearray()
    with pytest.raises(StreamError, match="closed before"):
        for piece in output_port.read_frames(pair.host, NONCE, never, lambda: None):
            got += piece
    assert bytes(got) == b"short"
    pair.host.close()
    os.close(never)


# -- host leases -------------------------------------------------------------------------------


def test_each_port_is_leased_once_and_given_back(tmp_path: Path) -> None:
    listeners = []
    for index in range(2):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(tmp_path / f"stream-{index}.sock"))
        listener.listen(4)
        listeners.append(listener)
    first = output_port.lease(tmp_path, count=2)
    second = output_port.lease(tmp_path, count=2)
    assert first is not None and second is not None
    assert (first.index, second.index) == (0, 1)
    assert output_port.lease(tmp_path, count=2) is None  # all taken: the caller uses gRPC
    first.close()
    again = output_port.lease(tmp_path, count=2)
    assert again is not None and again.index == 0
    for lease in (again, second):
        lease.close()
    for listener in listeners:
        listener.close()


def test_a_vm_without_output_ports_gets_no_lease(tmp_path: Path) -> None:
    assert output_port.lease(tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_the_agent_finds_its_ports_by_name(tmp_path: Path) -> None:
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    for node, name in (("vport0p1", "agent.0"), ("vport0p2", "stream.0"), ("vport0p3", "stream.1")):
        (sysfs / "class" / "virtio-ports" / node).mkdir(parents=True)
        (sysfs / "class" / "virtio-ports" / node / "name").write_text(name + "\n")
    dev.mkdir()
    for node in ("vport0p2", "vport0p3"):
        os.mkfifo(dev / node)
    keep = [os.open(dev / n, os.O_RDONLY | os.O_NONBLOCK) for n in ("vport0p2", "vport0p3")]
    ports = stream_port.OutputPorts(sysfs, dev)
    port = ports.acquire(1)
    assert port is not None and port.path == dev / "vport0p3"
    assert ports.acquire(2) is None  # no such port
    port.lock.release()
    for fd in keep:
        os.close(fd)


# -- ContainerClient.read_stream against a stand-in agent -----------------------------------


class PortAgent(pb_grpc.AgentServicer):
    """ReadStdout as a 1.9 agent does (``mode`` "port"), as an older one ("old": data in
    messages), or as a hostile or failing one."""

    def __init__(self, directory: Path, mode: str, payload: bytes) -> None:
        self.mode = mode
        self.payload = payload
        self.listeners: dict[int, socket.socket] = {}
        for index in range(2):
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(directory / f"stream-{index}.sock"))
            listener.listen(4)
            self.listeners[index] = listener
        self.requests: list[pb.ProcessRef] = []
        self.connections: list[socket.socket] = []

    def ReadStdout(
        self, request: pb.ProcessRef, context: grpc.ServicerContext
    ) -> Iterator[pb.Chunk]:
        self.requests.append(request)
        if self.mode == "old":
            for start in range(0, len(self.payload), 65536):
                yield pb.Chunk(data=self.payload[start : start + 65536])
            return
        conn, _ = self.listeners[request.stream_port - 1].accept()
        self.connections.append(conn)  # open after the call, as QEMU's chardev stays
        yield pb.Chunk(on_port=True)
        conn.sendall(b"stale bytes of an earlier reader" + opening_line(request.stream_nonce))
        if self.mode == "hostile":
            conn.sendall(HEADER.pack(MAX_FRAME_BYTES + 1) + b"x" * 100)
            time.sleep(1)
            return
        for start in range(0, len(self.payload), 100_000):
            piece = self.payload[start : start + 100_000]
            conn.sendall(HEADER.pack(len(piece)) + piece)
        if self.mode == "fail":
            context.abort(grpc.StatusCode.NOT_FOUND, "process went away")
        conn.sendall(END_FRAME)


@pytest.fixture
def agent_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "pod"
    directory.mkdir()
    return directory


def _client_of(directory: Path, mode: str, payload: bytes) -> tuple[grpc.Server, PortAgent]:
    agent = PortAgent(directory, mode, payload)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_AgentServicer_to_server(agent, server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"unix:{directory / 'agent.sock'}")
    server.start()
    return server, agent


@pytest.mark.parametrize("mode", ["port", "old"])
def test_the_client_reads_a_port_or_messages_alike(agent_dir: Path, mode: str) -> None:
    """Through the port (a 1.9 agent; stale bytes before the opening line dropped) or in
    messages (an older agent, which ignores the request's port: the port is given back at
    its first message), the caller gets the same bytes; the port is free afterwards."""
    payload = os.urandom(3 * 1024 * 1024 + 17)
    server, agent = _client_of(agent_dir, mode, payload)
    try:
        with ContainerClient(f"unix:{agent_dir / 'agent.sock'}", output_ports=agent_dir) as client:
            got = bytearray()
            for data in client.read_stream("c", "", "stdout"):
                if mode == "old" and not got:  # given back while the stream goes on
                    lease = output_port.lease(agent_dir, count=1)
                    assert lease is not None
                    lease.close()
                got += data
        assert bytes(got) == payload
        assert agent.requests[0].stream_port == 1 and len(agent.requests[0].stream_nonce) == 32
        lease = output_port.lease(agent_dir, count=1)
        assert lease is not None and lease.index == 0
        lease.close()
    finally:
        server.stop(None)


@pytest.mark.parametrize(("mode", "message"), [("fail", "process went away"), ("hostile", "frame")])
def test_a_failing_or_hostile_port_stream_is_an_agent_error(
    agent_dir: Path, mode: str, message: str
) -> None:
    server, _agent = _client_of(agent_dir, mode, b"z" * 300_000)
    try:
        address = f"unix:{agent_dir / 'agent.sock'}"
        with (
            ContainerClient(address, output_ports=agent_dir) as client,
            pytest.raises(AgentError, match=message),
        ):
            for _ in client.read_stream("c", "", "stdout"):
                pass
    finally:
        server.stop(None)


# -- the agent's side of ReadStdout with a port ----------------------------------------------


class _Context:
    """What AgentService's stream methods use of a gRPC servicer context."""

    def add_callback(self, callback: object) -> bool:
        return True

    def abort(self, code: object, details: str) -> None:
        raise AssertionError(f"aborted: {code} {details}")


def _agent_with_a_port(tmp_path: Path, output: bytes) -> tuple[object, int, list[int]]:
    """An AgentService whose container c1 has one process that wrote ``output`` to its
    stdout and closed it, and one output port (a FIFO); the FIFO's read end, fds to close."""
    from agent import pid1
    from agent.containers import Container, ContainerManager, Process
    from agent.server import AgentService

    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    (sysfs / "class" / "virtio-ports" / "vport0p2").mkdir(parents=True)
    (sysfs / "class" / "virtio-ports" / "vport0p2" / "name").write_text("stream.0\n")
    dev.mkdir()
    os.mkfifo(dev / "vport0p2")
    port_r = os.open(dev / "vport0p2", os.O_RDONLY | os.O_NONBLOCK)
    out_r, out_w = os.pipe()
    os.write(out_w, output)
    os.close(out_w)
    manager = ContainerManager(pid1.Reaper(), cgroup_parent=str(tmp_path))
    proc = Process(123, False, None, out_r, None)
    container = Container("c1", "/run/pysandbox/c1/rootfs", str(tmp_path / "c1"), proc, None)
    container.started = True
    manager._containers["c1"] = container
    service = AgentService("test", containers=manager)
    service._output_ports = stream_port.OutputPorts(sysfs, dev)
    return service, port_r, [port_r]


def _port_bytes(fd: int) -> bytes:
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def test_an_empty_output_ends_without_the_port_and_any_other_goes_through_it(
    tmp_path: Path,
) -> None:
    ref = pb.ProcessRef(container_id="c1", exec_id="", stream_port=1, stream_nonce=NONCE)
    service, port_r, fds = _agent_with_a_port(tmp_path / "empty", b"")
    try:
        # The host sees a call without messages: it frees its lease, as for an agent that
        # declines the port; nothing at all went to the port.
        assert list(service.ReadStdout(ref, _Context())) == []  # type: ignore[attr-defined]
        assert _port_bytes(port_r) == b""
    finally:
        for fd in fds:
            os.close(fd)
    service, port_r, fds = _agent_with_a_port(tmp_path / "some", b"hello")
    try:
        messages = list(service.ReadStdout(ref, _Context()))  # type: ignore[attr-defined]
        assert [m.on_port for m in messages] == [True] and not messages[0].data
        assert _parse(iter([_port_bytes(port_r)])) == (b"hello", True)
    finally:
        for fd in fds:
            os.close(fd)
