"""The agent proxy's side of the container stand-ins (:mod:`sandbox.pod.standin_wire`).

For each shim attached on ``<pod>/shim.sock`` the proxy relays the container process's stdio
between the fds the shim handed over and the agent (:class:`~sandbox.pod.stdio.StdioRelay`),
forwards the shim's signals and terminal sizes, waits for the process and sends its exit
status; if the shim dies first it kills the process. An attached ``pysandbox exec`` is served
the same way after the proxy started its process (``exec``: ExecProcess first), so that the
command line needs no gRPC. Each connection is served by a thread of its own; the calls go
over the proxy's own connection to the agent (a :class:`~sandbox.pod.proxy_client.ProxyClient`
sharing it, with the deadlines of :class:`~sandbox.pod.agent_client.ContainerClient`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ocispec.document import MAX_DOCUMENT_BYTES
from sandbox.errors import AgentError
from sandbox.pod import standin_wire as wire
from sandbox.pod.stdio import StdioRelay

if TYPE_CHECKING:
    from sandbox.pod.proxy_client import ProxyClient

#: Seconds the output relay may take, after the process exited, to deliver what it wrote.
DRAIN_TIMEOUT = 5.0
#: Seconds a new connection has to send its ``attach``.
ATTACH_TIMEOUT = 10.0
#: Pause (s) and attempts when a wait fails because the guest channel broke (QEMU lives).
_RETRY_PAUSE = 0.2
_MAX_RETRIES = 300


def listen(path: Path, kind: int = socket.SOCK_SEQPACKET) -> socket.socket:
    """A unix socket of ``kind`` (default: the stand-ins' SOCK_SEQPACKET) bound to ``path``
    (mode 0600, replacing a stale one), listening, close-on-exec."""
    listener = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(64)
    return listener


def serve(listener: socket.socket, client: ProxyClient, vm_alive: Callable[[], bool]) -> None:
    """Serve every shim that connects to ``listener``, forever (a thread each), through
    ``client`` (shared by all). ``vm_alive`` says whether the pod's QEMU still runs."""
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_serve_one, args=(conn, client, vm_alive), daemon=True).start()


class _Attach:
    """A validated ``attach`` or ``exec`` message and its fds (stdin None when not relayed);
    for ``exec``, ``document`` is the process JSON to start first (else None). ``fds`` is
    the list received (the caller's, closed once)."""

    def __init__(self, message: dict[str, Any], fds: list[int]) -> None:
        op = message.get("op")
        ids = message.get("id"), message.get("exec_id")
        if op == "exec":
            message = {**message, "stdin": True, "resume": False}
        flags = [message.get(k) for k in ("terminal", "stdin", "resume")]
        if op not in ("attach", "exec") or not all(isinstance(i, str) for i in ids):
            raise wire.WireError("expected attach or exec with id and exec_id")
        if not all(isinstance(f, bool) for f in flags):
            raise wire.WireError(f"{op} flags must be booleans")
        self.container_id, self.exec_id = str(ids[0]), str(ids[1])
        self.terminal, has_stdin, resume = (bool(f) for f in flags)
        limit = message.get("output_limit")
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            raise wire.WireError("output_limit must be a byte count or null")
        self.output_limit: int | None = limit
        self.fds = fds
        if op == "exec":  # document, stdin, stdout[, stderr]
            wanted = 3 if self.terminal else 4
        else:  # the terminal, or [stdin,] stdout, stderr
            wanted = 1 if self.terminal else 2 + int(has_stdin)
        if len(fds) != wanted:
            raise wire.WireError(f"{op} needs {wanted} fds, got {len(fds)}")
        self.document: bytes | None = None
        self.stdin: int | None
        if op == "exec":
            self.document = _read_document(fds[0])
            self.stdin, self.stdout, self.stderr = fds[1], fds[2], fds[-1]
        elif self.terminal:
            self.stdin, self.stdout, self.stderr = fds[0], fds[0], fds[0]
        else:
            self.stdin = fds[0] if has_stdin else None
            self.stdout, self.stderr = fds[-2], fds[-1]
        if resume:
            self.stdin = None  # what it had read is gone with the proxy that read it


def _is_dev_null(fd: int) -> bool:
    """Whether ``fd`` is /dev/null (the character device 1:3), which only ever reads EOF."""
    try:
        found = os.fstat(fd)
    except OSError:
        return False
    return stat.S_ISCHR(found.st_mode) and found.st_rdev == _DEV_NULL


#: st_rdev of /dev/null (1:3 on every Linux).
_DEV_NULL = os.makedev(1, 3)


def _read_document(fd: int) -> bytes:
    """The process document in ``fd`` (from offset 0); WireError when larger than the
    agent takes or unreadable."""
    chunks: list[bytes] = []
    size = 0
    try:
        while chunk := os.pread(fd, 65536, size):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_DOCUMENT_BYTES:
                raise wire.WireError(f"process document over {MAX_DOCUMENT_BYTES} bytes")
    except OSError as exc:
        raise wire.WireError(f"cannot read the process document: {exc.strerror}") from None
    return b"".join(chunks)


def _serve_one(conn: socket.socket, client: ProxyClient, vm_alive: Callable[[], bool]) -> None:
    fds: list[int] = []
    try:
        conn.settimeout(ATTACH_TIMEOUT)
        message, fds = wire.receive(conn)
        if message is None:
            return
        attach = _Attach(message, fds)
        conn.settimeout(None)
        _Standin(conn, client, attach, vm_alive).run()
    except (OSError, wire.WireError, AgentError) as exc:
        print(f"agent-proxy: stand-in: {exc}", file=sys.stderr, flush=True)
        with contextlib.suppress(OSError, wire.WireError):
            wire.send(conn, _error_message(exc))
    finally:
        wire.close_all(fds)
        conn.close()


def _error_message(exc: Exception) -> dict[str, Any]:
    """The ``error`` message for ``exc``; an agent's failure with its fields."""
    message: dict[str, Any] = {"op": "error", "message": str(exc)}
    if isinstance(exc, AgentError):
        message.update(rpc=exc.rpc, code=exc.code, reason=exc.reason.value, detail=exc.detail)
    return message


class _Standin:
    """One attached shim: relay, signals, wait, exit status."""

    def __init__(
        self,
        conn: socket.socket,
        client: ProxyClient,
        attach: _Attach,
        vm_alive: Callable[[], bool],
    ) -> None:
        self._conn = conn
        self._client = client
        self._attach = attach
        self._vm_alive = vm_alive
        self._done = threading.Event()
        self._relay: StdioRelay | None = None
        self._send_lock = threading.Lock()
        self._fds_lock = threading.Lock()  # a.fds: closed by run, or emptied by _listen

    def _send(self, message: dict[str, Any]) -> None:
        with self._send_lock, contextlib.suppress(OSError):
            wire.send(self._conn, message)

    def run(self) -> None:
        a = self._attach
        stdin = a.stdin
        if a.document is not None:
            # The caller's stdin is /dev/null: its EOF goes with ExecProcess (one call less);
            # the process still gets a pipe, at EOF, as from runc exec.
            nothing_in = not a.terminal and stdin is not None and _is_dev_null(stdin)
            _pid, closed = self._client.start_exec(
                a.container_id, a.exec_id, a.document, close_stdin=nothing_in
            )
            if closed:
                stdin = None
        relay = StdioRelay(
            self._client,
            a.container_id,
            a.exec_id,
            stdin,
            a.stdout,
            a.stderr,
            a.terminal,
            output_limit=a.output_limit,
        )
        relay.start()
        self._relay = relay
        self._send({"op": "attached"})
        threading.Thread(target=self._listen, daemon=True).start()
        status, oom = self._wait()
        self._done.set()
        relay.join(DRAIN_TIMEOUT)
        relay.stop_input()
        with self._fds_lock:
            wire.close_all(a.fds)
            a.fds.clear()
        self._send({"op": "exit", "status": status, "oom": oom})

    def _wait(self) -> tuple[int, bool]:
        a = self._attach
        for _ in range(_MAX_RETRIES):
            try:
                status, _sig, oom = self._client.wait_process(a.container_id, a.exec_id)
                return status, oom
            except AgentError as exc:
                if exc.code not in ("UNAVAILABLE", "CANCELLED") or not self._vm_alive():
                    break
            time.sleep(_RETRY_PAUSE)
        return 137, False  # the VM is gone: the process was killed with it

    def _listen(self) -> None:
        """The shim's messages until it closes its end; then, if the process has not been
        seen to exit, the shim died: kill the process."""
        a = self._attach
        while True:
            try:
                message, fds = wire.receive(self._conn)
            except (OSError, wire.WireError):
                message, fds = None, []
            wire.close_all(fds)
            if message is None:
                break
            with contextlib.suppress(Exception):
                self._handle(message)
        if not self._done.is_set():
            if a.document is not None:
                self._let_go()
            with contextlib.suppress(AgentError):
                self._client.signal(a.container_id, a.exec_id, signal.SIGKILL)

    def _let_go(self) -> None:
        """An attached ``exec`` call went away: what read its stdio gets EOF at once, as
        when the call held them alone (its caller may wait for that, e.g. a pipe's
        reader); the relay goes on into /dev/null. The fd numbers stay ours (dup2 over
        them), so the relay threads never write to a number reused meanwhile."""
        a = self._attach
        if self._relay is not None:
            self._relay.stop_input()
        with self._fds_lock:
            if not a.fds:
                return  # run() closed them: the process was seen to exit
            null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            try:
                for fd in {a.stdout, a.stderr}:
                    os.dup2(null, fd, inheritable=False)
            finally:
                os.close(null)

    def _handle(self, message: dict[str, Any]) -> None:
        a = self._attach
        op = message["op"]
        if op == "signal" and isinstance(message.get("signum"), int):
            signum = int(message["signum"])
            try:
                self._client.signal(a.container_id, a.exec_id, signum)
            except AgentError:
                if not self._done.is_set():
                    self._send({"op": "signal-failed", "signum": signum})
        elif op == "resize":
            rows, cols = _size(message.get("rows")), _size(message.get("cols"))
            if rows and cols:
                with contextlib.suppress(AgentError):
                    self._client.resize(a.container_id, a.exec_id, rows, cols)


def _size(value: object) -> int:
    """A terminal dimension from a message: 1..65535, or 0 for anything else."""
    return value if isinstance(value, int) and 0 < value < 65536 else 0
