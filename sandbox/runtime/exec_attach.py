"""An attached ``exec`` through the pod's agent proxy, without gRPC (the command line's side).

``pysandbox exec ID CMD`` (attached) is the host stand-in of the process it starts, as a
shim is for a detached one (:mod:`sandbox.runtime.shim`): it sends one ``exec`` message to
the pod's agent proxy over ``<pod>/shim.sock`` (:mod:`sandbox.pod.standin_wire`) with the
process document and its own stdin, stdout and stderr, and the proxy starts the process
(ExecProcess), relays its stdio between those fds and the agent, waits for it and sends its
exit status. So this process loads no gRPC, no protobuf and no pod machinery: its start-up
is most of what an exec costs on the host (docs/performance.md, "exec").

While the process runs, the signals of :data:`~sandbox.runtime.shim.FORWARDED_SIGNALS`
sent to this process go to it (as ``runc exec`` forwards them), and with a terminal so does
the window size of our terminal (SIGWINCH). If this process dies (SIGKILL), the proxy kills
the exec's process, as for a shim. If the proxy cannot be reached (it died), the pod
machinery starts a new one (the only case that loads it) and the exec is sent again; if
the proxy dies while the process runs, the call fails with one line naming what died.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sandbox import terminal_size
from sandbox.errors import AgentError, CommandError, FailureReason, PodProcessDied
from sandbox.pod import record as pod_record
from sandbox.pod import standin_wire as wire
from sandbox.runtime import shim

#: Seconds to wait for the proxy's answer to ``exec`` (ExecProcess's own deadline is 120 s).
_START_TIMEOUT = 150.0
#: Seconds between two looks at the pod's QEMU and virtiofsd while we wait (as the pod's
#: gRPC client looks: sandbox.pod.agent_client.WATCH_INTERVAL).
_WATCH_INTERVAL = 0.2


def run(
    root: Path, pod_id: str, container_id: str, exec_id: str, document: bytes, terminal: bool
) -> int:
    """Start ``document`` (the OCI process JSON the agent gets) as exec ``exec_id`` of
    ``container_id`` in pod ``pod_id`` with this process's stdio; its exit status (128+N
    when killed by signal N). AgentError (CommandError when the program cannot be run) when
    the agent refuses it or the pod's proxy cannot serve it."""
    _fill_stdio()
    pod = pod_record.load(root, pod_id)
    path = pod_record.directory(root, pod_id) / wire.SOCKET_NAME
    try:
        sock = _connect(path)
    except OSError:
        _revive_proxy(root, pod_id)  # it died: the pod machinery starts a new one
        try:
            sock = _connect(path)
        except OSError as exc:
            raise AgentError(
                f"cannot reach the agent proxy of pod {pod_id} ({path}): {exc.strerror}"
            ) from None
    # Named, and our signals forwarded, before the process can run: once it has written
    # something, a client may look for its stand-in (ps --format json) or signal it.
    # Signals sent meanwhile wait in the socket until the proxy started the process.
    standin = shim.name_standin(root, container_id, exec_id)
    link = _Link(sock, pod)
    try:
        with sock, _raw_terminal(terminal):
            started = _start(link, container_id, exec_id, document, terminal)
            status = _exit_status(link) if started else None
    finally:
        shim.drop_standin(standin)
    if status is None:
        raise _proxy_gone(root, pod_id, container_id, exec_id, started)
    return status


class _Link:
    """Our connection to the proxy, read while watching the pod's QEMU and virtiofsd: a
    guest without either cannot answer (without virtiofsd it waits for its share for
    ever), so the call fails at once, as a gRPC call of the pod's client does
    (:data:`sandbox.pod.agent_client.WATCH_INTERVAL`). The proxy's death is the
    connection's end."""

    def __init__(self, sock: socket.socket, pod: pod_record.PodRecord) -> None:
        self.sock = sock
        self._watched = [pod.processes[n] for n in ("qemu", "virtiofsd") if n in pod.processes]

    def receive(self, timeout: float | None) -> dict[str, Any] | None:
        """The proxy's next message; None once it closed the connection (or sent
        nonsense) or a watched process died; TimeoutError after ``timeout`` seconds (None:
        no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError("no answer from the agent proxy")
            self.sock.settimeout(_WATCH_INTERVAL if left is None else min(left, _WATCH_INTERVAL))
            try:
                message, fds = wire.receive(self.sock)
            except TimeoutError:
                if not all(process.alive() for process in self._watched):
                    return None
                continue
            except (OSError, wire.WireError):
                return None
            wire.close_all(fds)
            return message


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise
    return sock


def _start(link: _Link, container_id: str, exec_id: str, document: bytes, terminal: bool) -> bool:
    """Send ``exec``, forward our signals from then on, and wait until the proxy started
    the process: True; False if the connection ended first (the proxy, QEMU or virtiofsd
    died); AgentError when the proxy or the agent refused it."""
    memfd = os.memfd_create("exec-process", os.MFD_CLOEXEC)
    try:
        os.write(memfd, document)
        fds = (memfd, 0, 1) if terminal else (memfd, 0, 1, 2)
        message = {"op": "exec", "id": container_id, "exec_id": exec_id, "terminal": terminal}
        try:
            wire.send(link.sock, message, fds)
        except (OSError, wire.WireError) as exc:
            raise AgentError(f"the agent proxy did not take exec {exec_id}: {exc}") from None
    finally:
        os.close(memfd)
    _forward(link.sock, terminal)
    try:
        answer = link.receive(_START_TIMEOUT)
    except TimeoutError:
        raise AgentError(
            f"the agent proxy did not start exec {exec_id} within {_START_TIMEOUT:g}s"
        ) from None
    if answer is None:
        return False
    if answer["op"] != "attached":
        raise _refusal(answer, container_id, exec_id)
    return True


#: What a proxy that predates ``exec`` (it served shims only) answers to it.
_OLD_PROXY_REFUSAL = "expected attach with id and exec_id"


def _refusal(answer: dict[str, Any], container_id: str, exec_id: str) -> AgentError:
    """The AgentError of the proxy's ``error`` message (the agent's failure, if it was one),
    as the gRPC client would have raised it (:mod:`sandbox.pod.agent_client`)."""

    def text(key: str) -> str:
        value = answer.get(key)
        return value if isinstance(value, str) else ""

    message = text("message") or "the agent proxy refused the exec"
    if message == _OLD_PROXY_REFUSAL:
        message = (
            "the pod's agent proxy was started by an older pysandbox, which cannot run an "
            "attached exec: use exec --detach, or stop that proxy (kill its pid, in the pod's "
            "pod.json) and the next command starts a current one"
        )
    reason = FailureReason.named(text("reason"))
    fields: dict[str, Any] = {
        "rpc": text("rpc"),
        "code": text("code"),
        "detail": text("detail") or message,
        "container_id": container_id,
        "exec_id": exec_id,
    }
    if reason.command_status is not None:
        return CommandError(message, reason=reason, **fields)
    return AgentError(message, reason=reason, **fields)


def _forward(sock: socket.socket, terminal: bool) -> None:
    """Forward our signals (and, with a terminal, its size) to the process as messages.

    One packet from the handler, no lock and no thread: safe wherever the main thread was
    (sandbox/signal_forward.py says why that matters)."""

    def send(message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError, wire.WireError):
            wire.send(sock, message)

    def forward(signum: int, _frame: object) -> None:
        send({"op": "signal", "signum": signum})

    for signum in shim.FORWARDED_SIGNALS:
        signal.signal(signum, forward)
    if not terminal:
        return
    tty = next((fd for fd in (0, 1) if os.isatty(fd)), None)
    if tty is None:
        return

    def resize(*_: object) -> None:
        size = terminal_size.of_caller((tty,))
        if size is not None:
            send({"op": "resize", "rows": size[0], "cols": size[1]})

    signal.signal(signal.SIGWINCH, resize)
    resize()


@contextlib.contextmanager
def _raw_terminal(terminal: bool) -> Iterator[None]:
    """With a terminal, our own terminal (the first of fds 0-2 that is one) in raw mode while
    the process runs, restored after, as runc exec -t does: the process's terminal does the
    echo, line editing, ^C and newline translation, not ours as well (which would echo
    twice, hold input until Enter and turn "\r\n" into "\r\r\n")."""
    fd = next((fd for fd in (0, 1, 2) if terminal and os.isatty(fd)), None)
    if fd is None:
        yield
        return
    import tty

    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSANOW)
    try:
        yield
    finally:
        with contextlib.suppress(termios.error):
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _exit_status(link: _Link) -> int | None:
    """The status of the proxy's ``exit`` message; None if the proxy went away first."""
    while True:
        message = link.receive(None)
        if message is None:
            return None
        if message["op"] == "exit":
            status = message.get("status")
            return status if isinstance(status, int) and 0 <= status <= 255 else 137


def _revive_proxy(root: Path, pod_id: str) -> None:
    """Have the pod's agent proxy started again if it died (the pod machinery, as every
    other verb that reaches the pod; it loads gRPC)."""
    from sandbox.runtime.pods import load_pod

    load_pod(root, pod_id).client().close()


def _proxy_gone(
    root: Path, pod_id: str, container_id: str, exec_id: str, started: bool
) -> AgentError:
    """The error for a connection that ended before the exit status: the line naming the
    pod's process that died (QEMU, virtiofsd, the proxy), as a call waiting for the agent
    reports it."""
    from sandbox.runtime.pods import load_pod

    died = None
    with contextlib.suppress(Exception):
        died = load_pod(root, pod_id).casualty()
    when = "while exec {0} ran" if started else "before exec {0} started"
    return PodProcessDied(
        died or f"the agent proxy of pod {pod_id} closed the connection {when.format(exec_id)}",
        rpc="WaitProcess" if started else "ExecProcess",
        pod_id=pod_id,
        container_id=container_id,
        exec_id=exec_id,
    )


def _fill_stdio() -> None:
    """/dev/null in place of a closed fd 0, 1 or 2 (as if the process had it), before any
    fd of ours could take that number and be handed over as the process's stdio."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            # The lowest free number: ``fd`` itself, every lower one is open by now.
            os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)
