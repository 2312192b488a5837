"""The host treats agent replies as untrusted: hostile answers become clean AgentErrors.

A failed call's reason travels as a field (agent.proto ``Failure``): from the in-guest
runtime's sync line through the real agent, its gRPC server and the pod's agent proxy into the
host's error, never guessed from the message.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import agent.oci.errors as oci_errors
from agent import pid1
from agent.containers import Container, ContainerManager, Process
from agent.server import AgentService, make_server
from agentapi import failure
from agentapi.proto import agent_pb2 as pb
from agentapi.proto import agent_pb2_grpc as pb_grpc
from sandbox.errors import AgentError, AgentTimeout, CommandError, FailureReason
from sandbox.pod.agent_client import ContainerClient
from sandbox.pod.agent_proxy import start_relay
from sandbox.pod.standin_service import listen

REPO = Path(__file__).resolve().parents[2]


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

    def ListProcesses(
        self, request: pb.ContainerRequest, context: grpc.ServicerContext
    ) -> pb.ListProcessesResponse:
        entry = pb.ProcessEntry(pid=1, guest_pid=7, command="sh \x1b]0;owned\x07-c", init=True)
        if request.container_id == "huge":
            entry.command = "x" * 100_000
        elif request.container_id == "badpid":
            entry.pid = 0
        return pb.ListProcessesResponse(pids=[7], processes=[entry])


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


def test_process_table_is_made_safe_to_print(hostile: ContainerClient) -> None:
    (row,) = hostile.process_table("c1")
    assert (row.pid, row.guest_pid, row.init, row.command) == (1, 7, True, "sh ?]0;owned?-c")
    with pytest.raises(AgentError, match="oversized command line"):
        hostile.process_table("huge")
    with pytest.raises(AgentError, match="impossible pid 0"):
        hostile.process_table("badpid")


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


# -- failure reasons -------------------------------------------------------------------------


def test_the_reasons_are_the_same_on_both_sides_of_the_protocol() -> None:
    proto = list(pb.Failure.Reason.keys())
    assert [reason.value for reason in FailureReason] == proto
    assert list(oci_errors.REASONS) == proto
    assert (
        FailureReason.EXECUTABLE_NOT_FOUND.command_status,
        FailureReason.NOT_EXECUTABLE.command_status,
    ) == (127, 126)


class _WatchedReaper(pid1.Reaper):
    """A reaper that is not installed (this is not PID 1) but remembers what to reap."""

    def __init__(self) -> None:
        super().__init__()
        self.watched: list[int] = []

    def watch(self, pid: int, callback: Callable[[int], None]) -> None:
        self.watched.append(pid)
        super().watch(pid, callback)


def _connect_unix(path: Path) -> tuple[socket.socket, bytes]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    return sock, b""


@pytest.fixture
def guest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """The real agent service and container manager, whose in-guest runtime is
    tests/unit/fake_oci_runtime.py, with a running container "c1"; served directly
    ("direct") and through the pod's agent proxy ("proxy")."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setattr(pid1, "SHARE_ROOT", str(tmp_path))
    (tmp_path / "rootfs").mkdir()
    real_spawn = ContainerManager._spawn

    def spawn(self: ContainerManager, module: str, *args: Any, **kwargs: Any) -> Any:
        assert module in ("agent.oci.init", "agent.oci.exec")
        return real_spawn(self, "tests.unit.fake_oci_runtime", *args, **kwargs)

    monkeypatch.setattr(ContainerManager, "_spawn", spawn)
    reaper = _WatchedReaper()
    manager = ContainerManager(reaper, cgroup_parent=str(tmp_path / "cgroups"))
    init = Process(os.getpid(), False, None, None, None)
    manager._containers["c1"] = Container("c1", str(tmp_path / "rootfs"), "", init, None)
    manager._containers["c1"].started = True
    server = make_server(AgentService(transport="unix", containers=manager))
    direct = f"unix:{tmp_path / 'agent.sock'}"
    server.add_insecure_port(direct)
    server.start()
    listener = listen(tmp_path / "proxy.sock", socket.SOCK_STREAM)
    relay = start_relay(listener, functools.partial(_connect_unix, tmp_path / "agent.sock"))
    proxied = f"unix:{tmp_path / 'proxy.sock'}"
    yield {"direct": direct, "proxy": proxied, "rootfs": str(tmp_path / "rootfs")}
    relay.loop.stop()
    server.stop(0)
    for pid in reaper.watched:
        os.waitpid(pid, 0)


#: Sync lines of the in-guest runtime (docs/oci-in-guest.md) and what the host makes of them.
RUNTIME_FAILURES = [
    pytest.param(
        'error EXECUTABLE_NOT_FOUND exec: "nope": executable file not found in $PATH',
        (CommandError, 127, "FAILED_PRECONDITION", FailureReason.EXECUTABLE_NOT_FOUND),
        'exec: "nope": executable file not found in $PATH',
        id="not-found",
    ),
    pytest.param(
        'error NOT_EXECUTABLE exec: "/x/script": permission denied',
        (CommandError, 126, "FAILED_PRECONDITION", FailureReason.NOT_EXECUTABLE),
        'exec: "/x/script": permission denied',
        id="not-executable",
    ),
    pytest.param(
        'error INVALID_SPEC unknown namespace type "bogus"',
        (AgentError, 1, "INVALID_ARGUMENT", FailureReason.INVALID_SPEC),
        'unknown namespace type "bogus"',
        id="invalid-spec",
    ),
    pytest.param(
        "error SETUP_FAILED chdir to cwd (/nope) set in config.json: No such file or directory",
        (AgentError, 1, "FAILED_PRECONDITION", FailureReason.SETUP_FAILED),
        "chdir to cwd (/nope) set in config.json: No such file or directory",
        id="setup-failed",
    ),
    pytest.param(
        "error BOGUS_REASON exec: executable file not found",
        (AgentError, 1, "INTERNAL", FailureReason.UNSPECIFIED),
        "in-guest runtime failed with 'error BOGUS_REASON exec: executable file not found'",
        id="unknown-reason",
    ),
]


@pytest.mark.parametrize("via", ["direct", "proxy"])
@pytest.mark.parametrize(("line", "expected", "detail"), RUNTIME_FAILURES)
def test_create_failure_reason_survives_the_round_trip(
    guest: dict[str, str],
    via: str,
    line: str,
    expected: tuple[type[AgentError], int, str, FailureReason],
    detail: str,
) -> None:
    kind, exit_code, code, reason = expected
    spec = json.dumps({"process": {"args": ["x"]}, "sync_line": line}).encode()
    with ContainerClient(guest[via], timeout=30.0, pod_id="pod-1") as client:
        with pytest.raises(AgentError) as caught:
            client.create_container("c2", spec, guest["rootfs"])
        assert client.container_status("c1")[0] == "running"  # the agent serves on
    error = caught.value
    assert type(error) is kind
    assert (error.exit_code, error.code, error.reason) == (exit_code, code, reason)
    assert (error.rpc, error.pod_id, error.container_id, error.exec_id) == (
        "CreateContainer",
        "pod-1",
        "c2",
        "",
    )
    assert error.detail == detail
    assert str(error) == f"agent CreateContainer failed: {detail}"  # the message users know


@pytest.mark.parametrize("via", ["direct", "proxy"])
@pytest.mark.parametrize(("line", "expected", "detail"), RUNTIME_FAILURES[:3])
def test_exec_failure_reason_survives_the_round_trip(
    guest: dict[str, str],
    via: str,
    line: str,
    expected: tuple[type[AgentError], int, str, FailureReason],
    detail: str,
) -> None:
    kind, exit_code, code, reason = expected
    process = json.dumps({"args": ["x"], "sync_line": line}).encode()
    with (
        ContainerClient(guest[via], timeout=30.0, pod_id="pod-1") as client,
        pytest.raises(AgentError) as caught,
    ):
        client.exec_process("c1", "e1", process)
    error = caught.value
    assert type(error) is kind
    assert (error.exit_code, error.code, error.reason) == (exit_code, code, reason)
    assert (error.rpc, error.container_id, error.exec_id) == ("ExecProcess", "c1", "e1")
    assert str(error) == f"agent ExecProcess failed: {detail}"


#: Trailing metadata of a failed CreateContainer, by container id.
TRAILERS: dict[str, tuple[tuple[str, bytes], ...]] = {
    "text-only": (),
    "field-only": failure.trailer("NOT_EXECUTABLE"),
    "garbage": ((failure.METADATA_KEY, b"\xff\xff\xff"),),
    # Valid (a repeated field: the last wins) but longer than a Failure needs to be.
    "oversized": (
        (failure.METADATA_KEY, pb.Failure(reason="NOT_EXECUTABLE").SerializeToString() * 40),
    ),
    "unknown": ((failure.METADATA_KEY, pb.Failure(reason=99).SerializeToString()),),  # type: ignore[arg-type]
    "twice": failure.trailer("NOT_EXECUTABLE") * 2,
}


class ReasonAgent(pb_grpc.AgentServicer):
    """Fails CreateContainer with the trailing metadata the container id names."""

    def CreateContainer(
        self, request: pb.CreateContainerRequest, context: grpc.ServicerContext
    ) -> pb.CreateContainerResponse:
        context.set_trailing_metadata(TRAILERS[request.container_id])
        message = 'exec: "x": executable file not found in $PATH'
        if request.container_id == "field-only":
            message = "it did not work"
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, message)
        raise AssertionError("unreachable")


@pytest.fixture
def reasons(tmp_path: Path) -> Iterator[ContainerClient]:
    server = _serve(ReasonAgent(), tmp_path / "r.sock")
    with ContainerClient(f"unix:{tmp_path / 'r.sock'}", timeout=5.0) as client:
        yield client
    server.stop(0)


def test_the_reason_is_read_from_the_field_never_from_the_text(
    reasons: ContainerClient,
) -> None:
    with pytest.raises(AgentError) as caught:
        reasons.create_container("text-only", b"{}", "/r")
    assert type(caught.value) is AgentError and caught.value.exit_code == 1
    assert caught.value.reason is FailureReason.UNSPECIFIED
    with pytest.raises(CommandError) as command:
        reasons.create_container("field-only", b"{}", "/r")
    assert (command.value.exit_code, command.value.detail) == (126, "it did not work")


@pytest.mark.parametrize("case", ["garbage", "oversized", "unknown", "twice"])
def test_a_malformed_failure_field_is_no_reason(reasons: ContainerClient, case: str) -> None:
    with pytest.raises(AgentError) as caught:
        reasons.create_container(case, b"{}", "/r")
    assert type(caught.value) is AgentError
    assert caught.value.reason is FailureReason.UNSPECIFIED
    assert caught.value.code == "FAILED_PRECONDITION"


def test_restored_refuses_a_cgroup_layout_it_does_not_know(guest: dict[str, str]) -> None:
    """Checked before anything is done (no reseed, no clock set: this is the host's)."""
    with ContainerClient(guest["direct"], timeout=10) as client, pytest.raises(AgentError) as info:
        client.restored(b"x" * 32, 0, cgroup_layout="v3")
    assert info.value.code == "INVALID_ARGUMENT"
    assert "unknown cgroup layout 'v3'" in info.value.detail


def test_create_container_writes_its_files_first(guest: dict[str, str], tmp_path: Path) -> None:
    """Protocol 1.14: written as WriteFile would, before anything is set up (here the
    runtime fails; the file is there all the same), a relative path refused."""
    target = tmp_path / "etc-c2-hostname"
    spec = json.dumps({"process": {"args": ["x"]}, "sync_line": "error SETUP_FAILED x"}).encode()
    with ContainerClient(guest["direct"], timeout=30.0) as client:
        with pytest.raises(AgentError):
            client.create_container("c2", spec, guest["rootfs"], files={str(target): b"h\n"})
        assert target.read_bytes() == b"h\n"
        with pytest.raises(AgentError) as info:
            client.create_container("c3", spec, guest["rootfs"], files={"rel/x": b""})
    assert info.value.code == "INVALID_ARGUMENT"
