"""An attached ``exec`` served by the agent proxy's stand-in service (``exec`` on shim.sock):
the proxy starts the process, relays the caller's stdio, forwards its signals and sends
the exit status; an agent's refusal reaches the caller as the error the gRPC client would
have raised; a caller that goes away gets its output pipes back at once and the process
killed. The agent is a fake client; the wire is real (a socketpair)."""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from ocispec.document import MAX_DOCUMENT_BYTES
from sandbox.errors import AgentError, CommandError, FailureReason
from sandbox.pod import standin_service
from sandbox.pod import standin_wire as wire
from sandbox.runtime import exec_attach


class FakeAgent:
    """The calls the stand-in service makes, recorded; the process exits with ``status``
    once ``exited`` is set."""

    def __init__(
        self, refuse: AgentError | None = None, kill_ends: bool = True, closes_stdin: bool = True
    ) -> None:
        self.refuse = refuse
        #: Whether it honours ExecProcess.close_stdin (protocol 1.13; an older agent: False).
        self.closes_stdin = closes_stdin
        self.close_stdin_asked: bool | None = None
        self.kill_ends = kill_ends  # False: a guest that does not answer (its share is gone)
        self.exited = threading.Event()
        self.status = 3
        self.calls: list[tuple[Any, ...]] = []
        self.stdin = bytearray()

    def exec_process(self, container_id: str, exec_id: str, process: bytes) -> int:
        self.calls.append(("exec", container_id, exec_id, process))
        if self.refuse is not None:
            raise self.refuse
        return 42

    def start_exec(
        self, container_id: str, exec_id: str, process: bytes, close_stdin: bool = False
    ) -> tuple[int, bool]:
        self.close_stdin_asked = close_stdin
        return self.exec_process(container_id, exec_id, process), close_stdin and self.closes_stdin

    def read_stream(self, container_id: str, exec_id: str, which: str) -> Iterator[bytes]:
        yield f"{which} of {exec_id}\n".encode()
        self.exited.wait(30)

    def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> None:
        self.stdin += data

    def close_stdin(self, container_id: str, exec_id: str = "") -> None:
        self.calls.append(("close_stdin",))

    def wait_process(self, container_id: str, exec_id: str = "") -> tuple[int, int, bool]:
        self.exited.wait(30)
        return self.status, 0, False

    def signal(self, container_id: str, exec_id: str, signum: int, all: bool = False) -> None:
        self.calls.append(("signal", signum))
        if signum == signal.SIGKILL and self.kill_ends:
            self.exited.set()

    def resize(self, container_id: str, exec_id: str, rows: int, cols: int) -> None:
        self.calls.append(("resize", rows, cols))


class Exec:
    """One ``exec`` sent to a stand-in service thread: the caller's end and its pipes."""

    def __init__(
        self, agent: FakeAgent, document: bytes = b'{"args": ["x"]}', null_stdin: bool = False
    ) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.server = threading.Thread(
            target=standin_service._serve_one, args=(theirs, agent, lambda: True), daemon=True
        )
        self.server.start()
        memfd = os.memfd_create("doc")
        os.write(memfd, document)
        stdin_r, self.stdin = os.pipe()
        if null_stdin:  # the caller's stdin is /dev/null (ours: the pipe's write end, unused)
            os.close(stdin_r)
            stdin_r = os.open(os.devnull, os.O_RDONLY)
        self.out, out_w = os.pipe()
        self.err, err_w = os.pipe()
        message = {"op": "exec", "id": "c1", "exec_id": "e1", "terminal": False}
        wire.send(self.sock, message, (memfd, stdin_r, out_w, err_w))
        for fd in (memfd, stdin_r, out_w, err_w):
            os.close(fd)
        self.link = exec_attach._Link(self.sock, SimpleNamespace(processes={}))  # type: ignore[arg-type]

    def read_all(self, fd: int, within: float = 5.0) -> bytes:
        """Everything until EOF, which must come within ``within`` seconds."""
        import select
        import time

        deadline = time.monotonic() + within
        chunks = []
        while True:
            left = deadline - time.monotonic()
            assert left > 0 and select.select([fd], [], [], left)[0], "no EOF in time"
            chunk = os.read(fd, 4096)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def close(self) -> None:
        self.sock.close()
        for fd in (self.stdin, self.out, self.err):
            os.close(fd)
        self.server.join(10)


def test_the_proxy_starts_relays_forwards_and_reports_the_status() -> None:
    agent = FakeAgent()
    call = Exec(agent, b'{"args": ["sh"]}')
    try:
        assert call.link.receive(10) == {"op": "attached"}
        assert agent.calls[0] == ("exec", "c1", "e1", b'{"args": ["sh"]}')
        os.write(call.stdin, b"typed")
        os.close(call.stdin)
        call.stdin = os.open(os.devnull, os.O_RDONLY)  # (closed again by close())
        wire.send(call.sock, {"op": "signal", "signum": int(signal.SIGTERM)})
        assert _eventually(lambda: ("signal", signal.SIGTERM) in agent.calls)
        assert _eventually(lambda: ("close_stdin",) in agent.calls)
        assert bytes(agent.stdin) == b"typed"
        agent.exited.set()
        assert exec_attach._exit_status(call.link) == 3
        assert call.read_all(call.out) == b"stdout of e1\n"  # EOF: the proxy let go of it
        assert call.read_all(call.err) == b"stderr of e1\n"
    finally:
        call.close()


@pytest.mark.parametrize(
    ("refusal", "status"),
    [
        (
            CommandError(
                'agent ExecProcess failed: exec: "nope": executable file not found in $PATH',
                reason=FailureReason.EXECUTABLE_NOT_FOUND,
                rpc="ExecProcess",
                code="FAILED_PRECONDITION",
                detail='exec: "nope": executable file not found in $PATH',
            ),
            127,
        ),
        (
            AgentError(
                "agent ExecProcess failed: container c1 is paused, not running",
                rpc="ExecProcess",
                code="FAILED_PRECONDITION",
                detail="container c1 is paused, not running",
            ),
            1,
        ),
    ],
)
def test_an_agents_refusal_reaches_the_caller_as_the_grpc_client_raised_it(
    refusal: AgentError, status: int
) -> None:
    call = Exec(FakeAgent(refuse=refusal))
    try:
        answer = call.link.receive(10)
        assert answer is not None and answer["op"] == "error"
        error = exec_attach._refusal(answer, "c1", "e1")
        assert type(error) is type(refusal)
        assert (str(error), error.exit_code) == (str(refusal), status)
        assert (error.rpc, error.code, error.reason, error.detail) == (
            refusal.rpc,
            refusal.code,
            refusal.reason,
            refusal.detail,
        )
        assert call.read_all(call.out) == b""  # nothing relayed, the fds closed
    finally:
        call.close()


def test_a_process_document_over_the_guests_bound_is_refused_unread() -> None:
    agent = FakeAgent()
    call = Exec(agent, b" " * (MAX_DOCUMENT_BYTES + 1))
    try:
        answer = call.link.receive(10)
        assert answer is not None and answer["op"] == "error"
        assert "process document over" in answer["message"]
        assert agent.calls == []
    finally:
        call.close()


def test_a_caller_that_goes_away_gets_its_pipes_back_and_the_process_killed() -> None:
    """A killed ``pysandbox exec``: whoever reads its output sees EOF at once (the process
    still runs in the guest: its stream has not ended), and the process is killed."""
    agent = FakeAgent(kill_ends=False)
    call = Exec(agent)
    try:
        assert call.link.receive(10) == {"op": "attached"}
        assert os.read(call.out, 100) == b"stdout of e1\n"
        assert os.read(call.err, 100) == b"stderr of e1\n"
        call.sock.close()
        assert call.read_all(call.out) == b""
        assert call.read_all(call.err) == b""
        assert _eventually(lambda: ("signal", signal.SIGKILL) in agent.calls)
    finally:
        agent.exited.set()
        call.close()


def _eventually(check: Any, timeout: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return False


def test_a_proxy_older_than_attached_exec_is_named_with_what_to_do() -> None:
    """A pod started by an earlier pysandbox keeps its proxy, which knew only ``attach``:
    its answer, as that version words it, becomes one line saying what to do."""
    old = {"op": "error", "message": "expected attach with id and exec_id"}
    error = exec_attach._refusal(old, "c1", "e1")
    assert type(error) is AgentError and error.exit_code == 1
    assert "older pysandbox" in str(error) and "exec --detach" in str(error)
    assert "\n" not in str(error)


@pytest.mark.parametrize("closes_stdin", [True, False], ids=["agent-1.13", "older-agent"])
def test_a_dev_null_stdin_is_closed_by_execprocess_itself(closes_stdin: bool) -> None:
    """The caller's stdin is /dev/null: ExecProcess closes the process's stdin in the same
    call (no CloseStdin after it); an agent before 1.13 does not, and the relay closes it at
    /dev/null's EOF as before."""
    agent = FakeAgent(closes_stdin=closes_stdin)
    call = Exec(agent, null_stdin=True)
    try:
        assert call.link.receive(10) == {"op": "attached"}
        assert agent.close_stdin_asked is True
        if not closes_stdin:
            assert _eventually(lambda: ("close_stdin",) in agent.calls)
        agent.exited.set()
        assert exec_attach._exit_status(call.link) == 3
        assert (("close_stdin",) in agent.calls) is not closes_stdin
        assert bytes(agent.stdin) == b""
    finally:
        call.close()


def test_a_piped_stdin_is_relayed_then_closed() -> None:
    agent = FakeAgent()
    call = Exec(agent)
    try:
        assert call.link.receive(10) == {"op": "attached"}
        assert agent.close_stdin_asked is False
        os.write(call.stdin, b"in")
        os.close(call.stdin)
        call.stdin = os.open(os.devnull, os.O_RDONLY)  # (closed again by close())
        assert _eventually(lambda: ("close_stdin",) in agent.calls)
        assert bytes(agent.stdin) == b"in"
        agent.exited.set()
        assert exec_attach._exit_status(call.link) == 3
    finally:
        call.close()
