"""What every host client of the agent makes of a failed call or a suspicious reply, with
or without grpcio (:mod:`sandbox.pod.agent_client` for the command line, and
:mod:`sandbox.pod.proxy_client` inside the agent proxy)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from agentapi import failure
from agentapi.limits import MAX_READ_BYTES
from agentapi.stream_wire import StreamError
from sandbox.errors import AgentError, AgentTimeout, CommandError, FailureReason
from sandbox.pod import output_port

#: Largest pid a Linux guest can hand out (PID_MAX_LIMIT on 64-bit).
PID_MAX = 4 * 1024 * 1024
#: Deadline of one WaitProcess call; waits longer than this are retried.
WAIT_SLICE_SECONDS = 30.0


def guest_pid(value: int, what: str) -> int:
    """``value`` as a guest pid; AgentError unless 1 <= value <= PID_MAX_LIMIT."""
    if not 0 < value <= PID_MAX:
        raise AgentError(f"agent reported an impossible pid {value} for {what}")
    return int(value)


def wait_exit(call: Callable[[float], Any], timeout: float | None) -> tuple[int, int, bool]:
    """WaitProcess until the process exits: ``call(seconds)`` makes one call with that
    deadline and returns its WaitProcessResponse (AgentTimeout when it expired); the calls
    are sliced (:data:`WAIT_SLICE_SECONDS`) so that a dead channel is still noticed while
    ``timeout`` (None: for ever) lasts. Returns (status, signal, oom_killed); AgentTimeout
    once ``timeout`` passed, AgentError for an impossible status."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        slice_ = WAIT_SLICE_SECONDS
        if deadline is not None:
            slice_ = min(slice_, max(deadline - time.monotonic(), 0.01))
        try:
            reply = call(slice_)
        except AgentTimeout:
            if deadline is not None and time.monotonic() >= deadline:
                raise
            continue
        status, sig = int(reply.status), int(reply.signal)
        if not 0 <= status <= 255 or not 0 <= sig <= 64:
            raise AgentError(f"agent reported an impossible exit status {status}/{sig}")
        return status, sig, bool(reply.oom_killed)


def bounded_detail(text: str, limit: int = 4096) -> str:
    """The agent's message as one printable line of at most ``limit`` characters: runs of
    white space become one space, anything else unprintable (terminal escapes...) "?"."""
    line = "".join(c if c.isprintable() else "?" for c in " ".join(text.split()))
    return line if len(line) <= limit else line[:limit] + "…"


def call_error(
    rpc: str,
    code: str,
    details: str,
    trailing: Iterable[Any] | None,
    request: Any,
    pod_id: str,
    waited: float | None = None,
) -> AgentError:
    """The AgentError for a failed call ``rpc`` of ``request`` with status ``code`` (its
    name, "" when none), message ``details`` and trailing metadata ``trailing``: the
    Failure reason from it, the ids from the request (ours, not the guest's).

    DEADLINE_EXCEEDED is an AgentTimeout (naming ``waited``), a reason that the program cannot
    run a CommandError.
    """
    fields: dict[str, Any] = {
        "rpc": rpc,
        "code": code,
        "pod_id": pod_id,
        "container_id": str(getattr(request, "container_id", "")),
        "exec_id": str(getattr(request, "exec_id", "")),
    }
    if code == "DEADLINE_EXCEEDED" and waited is not None:
        return AgentTimeout(f"agent did not answer {rpc} within {waited:g}s", **fields)
    detail = bounded_detail(details or code)
    reason = FailureReason.named(failure.reason_of(trailing))
    message = f"agent {rpc} failed: {detail}"
    if reason.command_status is not None:
        return CommandError(message, reason=reason, detail=detail, **fields)
    return AgentError(message, reason=reason, detail=detail, **fields)


def port_stream(
    call: Iterable[Any], port: output_port.PortLease, nonce: str, which: str
) -> Iterator[bytes]:
    """The stream's bytes from ``port`` while a thread waits for the end of ``call`` (which
    carries no more messages; it ends after the agent wrote the end frame, or fails).
    ``call`` may have a ``cancel()``: it is called when the reader stops early."""
    outcome: list[BaseException] = []
    ended = os.eventfd(0, os.EFD_CLOEXEC)

    def finish() -> None:
        try:
            for _extra in call:
                outcome.append(AgentError(f"agent sent {which} messages after choosing a port"))
                break
        except BaseException as exc:
            outcome.append(exc)
        os.eventfd_write(ended, 1)

    waiter = threading.Thread(target=finish, daemon=True)
    waiter.start()
    try:
        yield from output_port.read_frames(
            port.sock, nonce, ended, lambda: outcome[0] if outcome else None
        )
        waiter.join(output_port.TAIL_TIMEOUT)  # the call ends right after the end frame
    except StreamError as exc:
        raise AgentError(f"{which} of the process: {exc}") from exc
    finally:
        cancel = getattr(call, "cancel", None)
        if waiter.is_alive() and cancel is not None:
            cancel()  # the reader stopped early (or failed): end the agent's side too
        waiter.join(5.0)
        if not waiter.is_alive():  # else it may still signal: leave it the fd
            os.close(ended)


def chunk_data(
    chunks: Iterable[Any], port: output_port.PortLease | None, nonce: str, which: str
) -> Iterator[bytes]:
    """The bytes of a ReadStdout/ReadStderr call's ``chunks`` (``pb.Chunk`` messages): from
    ``port`` once the agent says the stream is on it (:func:`port_stream`; ``chunks`` is then
    that call), else from the messages, each at most MAX_READ_BYTES (AgentError for a larger
    one). A port the agent does not use is closed at its first message."""
    for chunk in chunks:
        if port is not None:
            if chunk.on_port:
                yield from port_stream(chunks, port, nonce, which)
                return
            port.close()  # the agent streams in messages: free the port now
            port = None
        data = bytes(chunk.data)
        if len(data) > MAX_READ_BYTES:
            raise AgentError(f"agent sent an oversized {which} chunk")
        yield data
