"""The shim <-> agent proxy messages (sandbox/pod/standin_wire.py): fds travel with their
message, malformed packets are refused with their fds closed, EOF is told apart."""

from __future__ import annotations

import os
import socket

import pytest

from sandbox.pod import standin_wire as wire


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def test_a_message_carries_its_fds() -> None:
    left, right = _pair()
    read_end, write_end = os.pipe()
    wire.send(left, {"op": "attach", "id": "c"}, (write_end,))
    os.close(write_end)
    message, fds = wire.receive(right)
    assert message == {"op": "attach", "id": "c"} and len(fds) == 1
    os.write(fds[0], b"through the passed fd")
    wire.close_all(fds)
    assert os.read(read_end, 100) == b"through the passed fd"
    os.close(read_end)


def test_eof_is_none() -> None:
    left, right = _pair()
    left.close()
    assert wire.receive(right) == (None, [])


@pytest.mark.parametrize(
    "packet", [b"not json", b"[1, 2]", b'{"no": "op"}', b"x" * (wire.MAX_MESSAGE + 1)]
)
def test_malformed_packets_are_refused_and_their_fds_closed(packet: bytes) -> None:
    left, right = _pair()
    read_end, write_end = os.pipe()
    fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, write_end.to_bytes(4, "little"))]
    left.sendmsg([packet], fds)
    os.close(write_end)
    with pytest.raises(wire.WireError):
        wire.receive(right)
    assert os.read(read_end, 1) == b""  # every write end is closed: the passed one too
    os.close(read_end)


def test_too_many_fds_are_not_sent() -> None:
    left, _right = _pair()
    with pytest.raises(wire.WireError):
        wire.send(left, {"op": "attach"}, (0,) * (wire.MAX_FDS + 1))


def test_socket_path_is_next_to_the_agent_socket() -> None:
    assert str(wire.socket_path("unix:/run/x/p/abc/agent.sock")) == "/run/x/p/abc/shim.sock"


def test_the_shim_imports_no_grpc() -> None:
    """The shim's point: a few MiB, no grpcio, no protobuf (python -S, as spawn starts it)."""
    import subprocess
    import sys

    from sandbox import IMPORT_ROOT

    code = "import sys, sandbox.runtime.shim; print(sorted(sys.modules))"
    done = subprocess.run(
        [sys.executable, "-S", "-c", code],
        env={"PYTHONPATH": IMPORT_ROOT},
        capture_output=True,
        text=True,
        check=True,
    )
    loaded = done.stdout
    for heavy in ("grpc", "google.protobuf", "sandbox.pod.agent_client", "sandbox.pod.lifecycle"):
        assert f"'{heavy}'" not in loaded, heavy


def test_output_files_are_kept_within_the_shims_limit(tmp_path: os.PathLike[str]) -> None:
    """The proxy writes a shim's output: a regular file stays within the shim's
    RLIMIT_FSIZE (what run -d --log-max-size sets), pipes are not bounded."""
    from pathlib import Path

    from sandbox.pod.stdio import _room

    log = Path(tmp_path) / "log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.write(fd, b"x" * 100)
    assert _room(fd, 64 * 1024) == 64 * 1024 - 100
    assert _room(fd, 50) == 0
    assert _room(fd, None) is None
    os.close(fd)
    read_end, write_end = os.pipe()
    assert _room(write_end, 10) is None
    os.close(read_end)
    os.close(write_end)
