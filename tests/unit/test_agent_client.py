"""The host treats agent replies as untrusted: hostile answers become clean AgentErrors."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agent.server import make_server
from agentapi.proto import agent_pb2 as pb
from agentapi.proto import agent_pb2_grpc as pb_grpc
from sandbox.errors import AgentError, AgentTimeout
from sandbox.pod.agent_client import ContainerClient


class HostileAgent(pb_grpc.AgentServicer):
    """Answers with nonsense, or not at all."""

    def Version(
        self, request: pb.VersionRequest, context: grpc.ServicerContext
    ) -> pb.VersionResponse:
        return pb.VersionResponse(agent_version="x" * 10_000, protocol_version="1.0")

    def GuestDetails(
        self, request: pb.GuestDetailsRequest, context: grpc.ServicerContext
    ) -> pb.GuestDetailsResponse:
        return pb.GuestDetailsResponse(kernel_release="\x1b[31mred")

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthResponse:
        time.sleep(3)
        return pb.HealthResponse(status=pb.HealthResponse.SERVING)

    def WaitProcess(
        self, request: pb.ProcessRef, context: grpc.ServicerContext
    ) -> pb.WaitProcessResponse:
        return pb.WaitProcessResponse(status=99999, signal=0)

    def ReadStdout(
        self, request: pb.ProcessRef, context: grpc.ServicerContext
    ) -> Iterator[pb.Chunk]:
        yield pb.Chunk(data=b"x" * (2 * 1024 * 1024))


class OldAgent(pb_grpc.AgentServicer):
    def Version(
        self, request: pb.VersionRequest, context: grpc.ServicerContext
    ) -> pb.VersionResponse:
        return pb.VersionResponse(agent_version="0.0.1", protocol_version="0.9")


def _serve(servicer: pb_grpc.AgentServicer, path: Path) -> grpc.Server:
    server = make_server(servicer)  # type: ignore[arg-type]
    server.add_insecure_port(f"unix:{path}")
    server.start()
    return server


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[ContainerClient]:
    server = _serve(HostileAgent(), tmp_path / "a.sock")
    with ContainerClient(f"unix:{tmp_path / 'a.sock'}", timeout=1.0) as client:
        yield client
    server.stop(0)


def test_oversized_and_unprintable_strings_are_rejected(hostile: ContainerClient) -> None:
    with pytest.raises(AgentError, match="invalid agent version"):
        hostile.info()


def test_slow_agent_times_out(hostile: ContainerClient) -> None:
    with pytest.raises(AgentTimeout, match="did not answer Health within 1s"):
        hostile.health()


def test_impossible_exit_status(hostile: ContainerClient) -> None:
    with pytest.raises(AgentError, match="impossible exit status"):
        hostile.wait_process("c1")


def test_oversized_stream_chunk(hostile: ContainerClient) -> None:
    with pytest.raises(AgentError):
        list(hostile.read_stream("c1", "", "stdout"))


def test_unimplemented_call_is_an_error_not_a_crash(hostile: ContainerClient) -> None:
    with pytest.raises(AgentError, match="StartContainer failed"):
        hostile.start_container("c1")


def test_protocol_major_mismatch_names_the_fix(tmp_path: Path) -> None:
    server = _serve(OldAgent(), tmp_path / "b.sock")
    try:
        with (
            ContainerClient(f"unix:{tmp_path / 'b.sock'}") as client,
            pytest.raises(AgentError, match="make guest-image"),
        ):
            client.info()
    finally:
        server.stop(0)


def test_no_agent_at_all_times_out(tmp_path: Path) -> None:
    started = time.monotonic()
    with (
        ContainerClient(f"unix:{tmp_path / 'none.sock'}", timeout=0.5) as client,
        pytest.raises(AgentTimeout),
    ):
        client.health()
    assert time.monotonic() - started < 5
    assert threading.active_count() < 50
