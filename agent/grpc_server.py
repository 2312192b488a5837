"""The agent's gRPC server, over HTTP/2 with ``h2`` (pure Python), without grpcio.

It serves a servicer whose methods take ``(request, context)`` as grpcio's do (the service
of agent.proto, agent/server.py), on the virtio-serial port directly (:meth:`Server.serve_serial`:
the channel handshake of :mod:`agentapi.channel`, then HTTP/2 on the port's bytes), and on
listening sockets (:meth:`Server.add_insecure_port`: ``vsock:CID:PORT``, ``unix:PATH``).
This module also provides the names the servicer uses of grpcio (:class:`StatusCode`,
:class:`ServicerContext`), so agent/server.py imports it as ``grpc``.

What a client sees, as from grpcio's server (``grpc.server`` with the limits of
:mod:`agentapi.limits`):

* A method the servicer lacks, or a path outside the service: UNIMPLEMENTED.
* ``context.abort(code, details)``: that status; ``set_trailing_metadata`` entries go in the
  trailers (``-bin`` keys base64-encoded). An exception out of a handler: UNKNOWN
  ("Exception calling application: ..."), the traceback on stderr.
* Deadlines (``grpc-timeout``): :meth:`ServicerContext.time_remaining`; at the deadline the
  call ends with DEADLINE_EXCEEDED and counts as cancelled (``is_active()`` False, callbacks
  run) while the handler may still be running: what it answers later is dropped.
* Cancellation (the client's RST_STREAM, its connection or host session lost, the server
  stopped): ``is_active()`` turns False, the callbacks of ``add_callback`` run (in the I/O
  thread: they must not block), a streaming request iterator raises :class:`CallEnded`, a
  streaming response's generator is closed at its next message.
* Concurrency: each call runs in a thread of its own (a pool of threads that stay while
  idle, :class:`Workers`), so a call that blocks (WaitProcess, ReadStdout) never holds up
  another. At most ``max_concurrent_rpcs`` handlers run: a call beyond is refused with
  RESOURCE_EXHAUSTED ("Concurrent RPC limit exceeded!").
* Messages over :data:`~agentapi.limits.MAX_MESSAGE_BYTES` either way: RESOURCE_EXHAUSTED
  (a request is refused from its 5-byte header, before it is held).
* Bounded windows: a streaming response's handler waits while :data:`SEND_BACKLOG` bytes of
  its messages are not yet taken by HTTP/2 flow control; streamed requests are acknowledged
  (their window reopened) only while fewer than ``STREAM_WINDOW`` bytes wait for the
  handler; nothing more is read from a peer while :data:`~agentapi.h2_loop.OUT_LIMIT` bytes
  wait to be written to it.
* Host reconnects (serial): a new SYNC, or EOF on the port, ends the session: every call of
  it is cancelled as above, unsent output is dropped, and the next session starts on a fresh
  HTTP/2 connection after the ACK.

One I/O thread (:class:`agentapi.h2_loop.Loop`) owns the file descriptors and the h2
connections; handler threads hand it their answers with ``call_soon``.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import errno
import faulthandler
import os
import queue
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import h2.config
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from agentapi import grpc_wire as wire
from agentapi.channel import SERIAL_PORT_NAME, SyncScanner, ack_line
from agentapi.h2_loop import OUT_LIMIT, READ_CHUNK, Loop
from agentapi.limits import MAX_MESSAGE_BYTES

#: Bytes of a streaming response's messages that may wait for the HTTP/2 window before its
#: handler waits.
SEND_BACKLOG = 256 * 1024
#: Most calls whose handlers run at once (grpcio's ``maximum_concurrent_rpcs`` of before).
MAX_CONCURRENT_RPCS = 256
#: Handler threads kept while idle (more are started as calls need them, and end when idle).
KEEP_WORKERS = 8
#: Seconds an idle handler thread beyond :data:`KEEP_WORKERS` waits for a call before ending.
IDLE_WORKER_SECONDS = 30.0
#: Pauses before reopening the serial port after EOF, one per EOF in a row (the last repeats).
REOPEN_BACKOFF = (0.02, 0.05, 0.1, 0.2)
#: An I/O loop that has not turned for this long (seconds) dumps every thread's stack once.
STALL_DUMP_SECONDS = 30.0
#: The loop re-arms that dump this often (seconds): each arming starts a (C) thread.
STALL_REARM_SECONDS = 5.0

_LOG = "pysandbox-agent"


class StatusCode(enum.Enum):
    """gRPC status codes (grpc/doc/statuscodes.md), by grpcio's names."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class Aborted(Exception):
    """Raised by :meth:`ServicerContext.abort`: the call ends with the status it set."""


class CallEnded(Exception):
    """A streaming request iterator's call ended (cancelled, deadline, connection lost)."""


@dataclass(frozen=True)
class Method:
    """One RPC of the service: its handler and how its messages go."""

    name: str
    handler: Callable[[Any, ServicerContext], Any]
    request_type: Any
    client_streaming: bool
    server_streaming: bool


def service_methods(servicer: object) -> dict[bytes, Method]:
    """The methods of agent.proto's service that ``servicer`` implements, by HTTP/2 path."""
    from agentapi.proto import agent_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["Agent"]
    methods: dict[bytes, Method] = {}
    for desc in service.methods:
        handler = getattr(servicer, desc.name, None)
        if handler is None:
            continue
        methods[f"/{service.full_name}/{desc.name}".encode()] = Method(
            desc.name,
            handler,
            getattr(pb, desc.input_type.name),
            desc.client_streaming,
            desc.server_streaming,
        )
    return methods


# -- handler threads ---------------------------------------------------------------------------


class Workers:
    """Threads that run jobs: an idle one takes the next job, a new one starts when none is
    idle. :data:`KEEP_WORKERS` stay while idle; the others end after
    :data:`IDLE_WORKER_SECONDS` without a job."""

    def __init__(self, keep: int = KEEP_WORKERS, idle_seconds: float = IDLE_WORKER_SECONDS):
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # idle threads no job was promised to
        self._threads = 0
        self._keep = keep
        self._idle_seconds = idle_seconds

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            start = self._idle == 0
            if start:
                self._threads += 1
            else:
                self._idle -= 1  # promised this job
        self._jobs.put(job)
        if start:
            threading.Thread(target=self._work, name="rpc", daemon=True).start()

    def _work(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self._idle_seconds)
            except queue.Empty:
                with self._lock:
                    # Idle threads outnumber the jobs promised to them: one may go.
                    if self._idle > 0 and self._threads > self._keep:
                        self._idle -= 1
                        self._threads -= 1
                        return
                continue
            job()
            with self._lock:
                self._idle += 1


# -- one call ----------------------------------------------------------------------------------


class ServicerContext:
    """One call, as its handler sees it (grpcio's ``ServicerContext``: the methods the agent
    uses), and its state in the server. Handler methods may be called from any thread;
    the others run in the I/O thread."""

    def __init__(self, conn: _Connection, sid: int, method: Method, deadline: float | None) -> None:
        self._conn = conn
        self._loop = conn.loop
        self.sid = sid
        self.method = method
        self.deadline = deadline
        self._cond = threading.Condition()
        # Under _cond (shared with the handler's thread):
        self._done = False  # the status is decided (or the call was cancelled)
        self._callbacks: list[Callable[[], None]] = []
        self._queued_out = 0  # bytes the handler queued not yet given to h2
        self._requests: deque[bytes] = deque()
        self._queued_in = 0  # bytes of _requests
        self._held_credit = 0  # request bytes not acknowledged (the handler is behind)
        self._request_end = False
        # The handler's (read by the I/O thread only after the handler ended):
        self._code: Any = None  # as set (a StatusCode, or grpcio's of a test's servicer)
        self._details: str | None = None
        self._trailing: tuple[tuple[str, str | bytes], ...] = ()
        # The I/O thread's:
        self.inbuf = bytearray()
        self.messages = 0
        self.dispatched = False
        self.headers_sent = False
        self.out: deque[list[Any]] = deque()  # [data, offset]
        self.ending: wire.Headers | None = None  # trailers to send after ``out``
        self.stream_done = False  # END_STREAM or RST_STREAM sent; forgotten by the connection
        self.timer = None if deadline is None else self._loop.call_at(deadline, self._expired)

    # -- grpcio's ServicerContext ---------------------------------------------------------

    def abort(self, code: StatusCode, details: str) -> NoReturn:
        """End the call with ``code`` (UNKNOWN for OK) and ``details``: raises
        :class:`Aborted`."""
        if _code_number(code) == 0:
            code = StatusCode.UNKNOWN
        self._code = code
        self._details = details
        raise Aborted(details)

    def set_code(self, code: StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def set_trailing_metadata(self, metadata: Iterable[tuple[str, str | bytes]]) -> None:
        """Entries for the trailers (keys ending ``-bin`` carry bytes)."""
        self._trailing = tuple(metadata)

    def time_remaining(self) -> float | None:
        """Seconds to the call's deadline (not below 0); None without one."""
        if self.deadline is None:
            return None
        return max(self.deadline - time.monotonic(), 0.0)

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """The request's metadata (none is kept: the agent's clients send none it reads)."""
        return ()

    def peer(self) -> str:
        return "host"

    def is_active(self) -> bool:
        """False once the call ended (answered, cancelled, past its deadline)."""
        return not self._done

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """Have ``callback`` called when the call ends (in the I/O thread: it must not
        block); False (not added) if it already ended."""
        with self._cond:
            if self._done:
                return False
            self._callbacks.append(callback)
            return True

    # -- the handler's thread ---------------------------------------------------------------

    def run(self, request: bytes | None) -> None:
        """Run the handler (in a worker thread) and hand its answer to the I/O thread."""
        method = self.method
        final: bytes | None = None
        try:
            if method.client_streaming:
                argument: Any = self._request_iterator()
            else:
                argument = self._parse(request or b"")
            result = method.handler(argument, self)
            if method.server_streaming:
                self._stream_out(result)
            else:
                final = self._frame(result)
        except Aborted:
            pass
        except Exception as exc:
            import traceback

            # As grpcio: a code or details the handler set win over these.
            what = "iterating responses" if method.server_streaming else "calling application"
            print(f"{_LOG}: {method.name}: exception {what}:", file=sys.stderr, flush=True)
            traceback.print_exc(file=sys.stderr)
            if self._code is None:
                self._code = StatusCode.UNKNOWN
            if self._details is None:
                self._details = f"Exception {what}: {exc}"
            final = None
        code = 0 if self._code is None else _code_number(self._code)
        details, trailing = self._details or "", self._trailing
        self._loop.call_soon(lambda: self._answer(final, code, details, trailing))

    def _parse(self, raw: bytes) -> Any:
        from google.protobuf.message import DecodeError

        try:
            return self.method.request_type.FromString(raw)
        except DecodeError:
            self.abort(StatusCode.INTERNAL, "Exception deserializing request!")

    def _frame(self, message: Any) -> bytes:
        try:
            data: bytes = message.SerializeToString()
        except AttributeError:
            self.abort(StatusCode.INTERNAL, "Exception serializing response!")
        if len(data) > MAX_MESSAGE_BYTES:
            self.abort(
                StatusCode.RESOURCE_EXHAUSTED,
                f"Sent message larger than max ({len(data)} vs. {MAX_MESSAGE_BYTES})",
            )
        return b"\0" + len(data).to_bytes(4, "big") + data

    def _stream_out(self, responses: Iterator[Any]) -> None:
        try:
            for message in responses:
                frame = self._frame(message)
                with self._cond:
                    while self._queued_out > SEND_BACKLOG and not self._done:
                        self._cond.wait()
                    if self._done:
                        return
                    self._queued_out += len(frame)
                self._loop.call_soon(lambda frame=frame: self._push(frame))  # type: ignore[misc]
        finally:
            close = getattr(responses, "close", None)
            if close is not None:
                close()

    def _request_iterator(self) -> Iterator[Any]:
        while True:
            with self._cond:
                while not self._requests and not self._request_end and not self._done:
                    self._cond.wait()
                if self._done:
                    raise CallEnded("the call ended")
                if not self._requests:
                    return
                raw = self._requests.popleft()
                self._queued_in -= len(raw) + 5
                release = self._held_credit if self._queued_in < wire.STREAM_WINDOW else 0
                self._held_credit -= release
            if release:
                self._loop.call_soon(lambda release=release: self._conn.ack(self, release))  # type: ignore[misc]
            yield self._parse(raw)

    # -- the I/O thread -----------------------------------------------------------------------

    def on_data(self, data: bytes, credit: int) -> None:
        """Request bytes arrived (``credit`` of the stream's window)."""
        if self._done:
            self._conn.ack(self, credit)
            return
        buffer = self.inbuf
        buffer += data
        ready: list[bytes] = []
        while len(buffer) >= 5:
            if buffer[0] != 0:
                self._conn.ack(self, credit)
                self.fail(StatusCode.INTERNAL, "compressed message without grpc-encoding")
                return
            size = int.from_bytes(buffer[1:5], "big")
            if size > MAX_MESSAGE_BYTES:
                self._conn.ack(self, credit)
                self.fail(
                    StatusCode.RESOURCE_EXHAUSTED,
                    f"Received message larger than max ({size} vs. {MAX_MESSAGE_BYTES})",
                )
                return
            if len(buffer) < 5 + size:
                break
            ready.append(bytes(buffer[5 : 5 + size]))
            del buffer[: 5 + size]
        self.messages += len(ready)
        if not self.method.client_streaming:
            # One message, held until END_STREAM: bounded by the size limit.
            self._conn.ack(self, credit)
            if ready:
                self._requests.extend(ready)
            return
        with self._cond:
            self._requests.extend(ready)
            self._queued_in += sum(len(r) + 5 for r in ready)
            hold = self._queued_in >= wire.STREAM_WINDOW
            if hold:
                self._held_credit += credit
            if ready:
                self._cond.notify_all()
        if not hold:
            self._conn.ack(self, credit)

    def on_request_end(self) -> None:
        """The client sent END_STREAM."""
        if self._done or (self.dispatched and not self.method.client_streaming):
            return
        if self.inbuf:
            self.fail(StatusCode.INTERNAL, "the request ended inside a message")
            return
        if self.method.client_streaming:
            with self._cond:
                self._request_end = True
                self._cond.notify_all()
            return
        if self.messages != 1:
            self.fail(StatusCode.UNIMPLEMENTED, f"expected one request, got {self.messages}")
            return
        self._conn.dispatch(self, self._requests.popleft())

    def _push(self, frame: bytes) -> None:
        if not self._done:
            self.out.append([frame, 0])
            self.flush()

    def _answer(
        self,
        final: bytes | None,
        code: int,
        details: str,
        trailing: tuple[tuple[str, str | bytes], ...],
    ) -> None:
        """The handler ended: send its answer unless the call ended first."""
        self._conn.handler_ended()
        if self._done:
            return
        if final is not None and code == 0:
            self.out.append([final, 0])
        self._end(code, details, trailing)

    def fail(self, code: StatusCode, details: str) -> None:
        """End the call here with ``code`` (what was queued is dropped)."""
        if self._done:
            return
        self.out.clear()
        self._end(code.value, details, ())

    def _expired(self) -> None:
        self.timer = None
        self.fail(StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    def _end(self, code: int, details: str, trailing: tuple[tuple[str, str | bytes], ...]) -> None:
        trailers = wire.status_trailers(code, details, not self.headers_sent and not self.out)
        if not details:
            trailers = [(k, v) for k, v in trailers if k != b"grpc-message"]
        self.ending = trailers + [_metadatum(key, value) for key, value in trailing]
        self._terminate()
        self.flush()

    def cancel(self) -> None:
        """The call is gone (reset by the client, connection lost): nothing more is sent."""
        self.out.clear()
        self.ending = None
        self.stream_done = True
        self._terminate()

    def _terminate(self) -> None:
        """The call ended: wake its handler, run its callbacks."""
        with self._cond:
            if self._done:
                return
            self._done = True
            callbacks, self._callbacks = self._callbacks, []
            self._cond.notify_all()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self._held_credit:
            self._conn.ack(self, self._held_credit)
            self._held_credit = 0
        for callback in callbacks:
            try:
                callback()
            except Exception as exc:  # grpcio logs and goes on too
                print(f"{_LOG}: a call's callback failed: {exc!r}", file=sys.stderr, flush=True)

    def flush(self) -> None:
        """Send what is queued as the windows allow; the trailers after it."""
        if self.stream_done:
            return
        conn = self._conn.h2
        pipe = self._conn.pipe
        sent = 0
        try:
            while self.out and pipe.room():
                entry = self.out[0]
                data, offset = entry
                window = conn.local_flow_control_window(self.sid)
                size = min(len(data) - offset, window, conn.max_outbound_frame_size)
                if size <= 0:
                    break
                if not self.headers_sent:
                    self._send_headers()
                conn.send_data(self.sid, data[offset : offset + size])
                sent += size
                if offset + size < len(data):
                    entry[1] = offset + size
                else:
                    self.out.popleft()
            if not self.out and self.ending is not None and pipe.room():
                conn.send_headers(self.sid, self.ending, end_stream=True)
                self.ending = None
                self.stream_done = True
                if wire.still_open(conn, self.sid):  # the client still sending: no need
                    conn.reset_stream(self.sid, h2.errors.ErrorCodes.NO_ERROR)
                self._conn.forget(self)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.cancel()
            self._conn.forget(self)
        if sent:
            with self._cond:
                self._queued_out -= sent
                self._cond.notify_all()
        pipe.touch()

    def _send_headers(self) -> None:
        self._conn.h2.send_headers(
            self.sid, [(b":status", b"200"), (b"content-type", b"application/grpc")]
        )
        self.headers_sent = True


def _code_number(code: Any) -> int:
    """The number of a status code: a :class:`StatusCode`, or grpcio's (a servicer of the
    tests'), whose value is ``(number, name)``."""
    value = code.value
    return int(value[0] if isinstance(value, tuple) else value)


def _metadatum(key: str, value: str | bytes) -> tuple[bytes, bytes]:
    if key.endswith("-bin"):
        raw = value if isinstance(value, bytes) else value.encode()
        return key.encode(), base64.b64encode(raw).rstrip(b"=")
    return key.encode(), value.encode() if isinstance(value, str) else value


# -- connections -------------------------------------------------------------------------------


class _Connection:
    """One HTTP/2 connection (a host session) and its calls. I/O thread only."""

    def __init__(self, server: Server, pipe: _Pipe) -> None:
        self.server = server
        self.loop = server.loop
        self.pipe = pipe
        self.calls: dict[int, ServicerContext] = {}
        self.closed = False
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = wire.h2_connection(
            config,
            {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 4 * MAX_CONCURRENT_RPCS},
        )
        pipe.touch()

    def received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            _log(f"HTTP/2 protocol error: {exc}")
            with contextlib.suppress(Exception):
                self.h2.close_connection()
            self.pipe.touch()
            self.lost()
            return
        E = h2.events
        for event in events:
            sid = getattr(event, "stream_id", 0)
            call = self.calls.get(sid) if sid else None
            if isinstance(event, E.RequestReceived):
                self._request(sid, list(event.headers))
            elif isinstance(event, E.DataReceived):
                if call is None:
                    self._ack(sid, event.flow_controlled_length)
                else:
                    call.on_data(event.data, event.flow_controlled_length)
            elif isinstance(event, E.StreamEnded) and call is not None:
                call.on_request_end()
            elif isinstance(event, E.StreamReset) and call is not None:
                call.cancel()
                self.forget(call)
            elif isinstance(event, (E.WindowUpdated, E.RemoteSettingsChanged)):
                for each in [call] if call is not None else list(self.calls.values()):
                    each.flush()
            if self.closed:
                return
        self.pipe.touch()

    def _request(self, sid: int, headers: wire.Headers) -> None:
        fields = dict(headers)
        method = self.server.methods.get(fields.get(b":path", b""))
        if fields.get(b":method") != b"POST" or method is None:
            self._refuse(sid, StatusCode.UNIMPLEMENTED, "Method not found!")
            return
        if fields.get(b"grpc-encoding", b"identity") != b"identity":
            self._refuse(sid, StatusCode.UNIMPLEMENTED, "compressed requests are not supported")
            return
        deadline = None
        if b"grpc-timeout" in fields:
            seconds = wire.parse_timeout(fields[b"grpc-timeout"])
            if seconds is not None:
                deadline = time.monotonic() + seconds
        call = ServicerContext(self, sid, method, deadline)
        self.calls[sid] = call
        if method.client_streaming:
            self.dispatch(call, None)

    def _refuse(self, sid: int, code: StatusCode, message: str) -> None:
        self.h2.send_headers(sid, wire.status_trailers(code.value, message, True), end_stream=True)
        if wire.still_open(self.h2, sid):
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.NO_ERROR)

    def dispatch(self, call: ServicerContext, request: bytes | None) -> None:
        """Run ``call``'s handler in a worker thread, if under the limit."""
        if self.server.running >= self.server.max_concurrent_rpcs:
            call.fail(StatusCode.RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!")
            return
        self.server.running += 1
        call.dispatched = True
        self.server.workers.submit(lambda: call.run(request))

    def handler_ended(self) -> None:
        self.server.running -= 1

    def ack(self, call: ServicerContext, size: int) -> None:
        """Reopen ``size`` bytes of ``call``'s request window."""
        if not self.closed:
            self._ack(call.sid, size)
            self.pipe.touch()

    def _ack(self, sid: int, size: int) -> None:
        if size:
            with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self.h2.acknowledge_received_data(size, sid)

    def forget(self, call: ServicerContext) -> None:
        self.calls.pop(call.sid, None)

    def drained(self) -> None:
        for call in list(self.calls.values()):
            call.flush()

    def lost(self) -> None:
        """The connection ended: every call of it is cancelled."""
        if self.closed:
            return
        self.closed = True
        calls = list(self.calls.values())
        self.calls.clear()
        for call in calls:
            call.cancel()


class _Pipe:
    """A non-blocking file descriptor carrying an HTTP/2 connection, registered with the
    loop; nothing is read from it while :data:`OUT_LIMIT` bytes wait to be written."""

    def __init__(self, server: Server, fd: int) -> None:
        self.server = server
        self.loop = server.loop
        self.fd = fd
        self.outbuf = bytearray()
        self.conn: _Connection | None = None
        self._mask = 0

    def register(self) -> None:
        from selectors import EVENT_READ

        self._mask = EVENT_READ
        self.loop.selector.register(self.fd, self._mask, self._ready)

    def room(self) -> bool:
        return self.fd >= 0 and len(self.outbuf) < OUT_LIMIT

    def touch(self) -> None:
        if self.fd >= 0:
            self.loop.mark(self)

    def _ready(self, mask: int) -> None:
        from selectors import EVENT_READ, EVENT_WRITE

        if mask & EVENT_WRITE:
            self.write_out()
        if mask & EVENT_READ and self.fd >= 0 and len(self.outbuf) < OUT_LIMIT:
            try:
                data = os.read(self.fd, READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if data:
                self.received(data)
            else:
                self.ended()

    def write_out(self) -> None:
        """Write what is due, as much as the descriptor takes now."""
        if self.fd < 0:
            return
        before = len(self.outbuf)
        if self.conn is not None:
            self.outbuf += self.conn.h2.data_to_send()
        if self.outbuf:
            try:
                written = os.write(self.fd, self.outbuf)
            except (BlockingIOError, InterruptedError):
                written = 0
            except OSError:
                self.ended()
                return
            del self.outbuf[:written]
        self._interest()
        if before >= OUT_LIMIT > len(self.outbuf) and self.conn is not None:
            self.conn.drained()

    def _interest(self) -> None:
        from selectors import EVENT_READ, EVENT_WRITE

        mask = (EVENT_READ if len(self.outbuf) < OUT_LIMIT else 0) | (
            EVENT_WRITE if self.outbuf else 0
        )
        if mask != self._mask:
            self._mask = mask
            self.loop.selector.modify(self.fd, mask, self._ready)

    def _unregister(self) -> None:
        self.loop.unmark(self)
        with contextlib.suppress(KeyError, ValueError):
            self.loop.selector.unregister(self.fd)

    def received(self, data: bytes) -> None: ...
    def ended(self) -> None: ...
    def close(self) -> None: ...


class _SocketPipe(_Pipe):
    """An accepted connection (vsock, unix): one HTTP/2 connection, no handshake."""

    def __init__(self, server: Server, sock: socket.socket) -> None:
        sock.setblocking(False)
        super().__init__(server, sock.fileno())
        self.sock = sock
        self.register()
        self.conn = _Connection(server, self)
        server.pipes.add(self)

    def received(self, data: bytes) -> None:
        assert self.conn is not None
        self.conn.received(data)
        if self.conn.closed:  # a protocol error: what h2 said goes out first, best effort
            self.write_out()
            self.ended()

    def ended(self) -> None:
        self.close()

    def close(self) -> None:
        if self.fd < 0:
            return
        self._unregister()
        self.fd = -1
        self.sock.close()
        self.server.pipes.discard(self)
        if self.conn is not None:
            self.conn.lost()


class _SerialPipe(_Pipe):
    """The virtio-serial port: one host session after another, each opened by the channel
    handshake (:mod:`agentapi.channel`) and carrying a fresh HTTP/2 connection.

    A host disconnect shows as EOF on the port, which then stays at EOF until it is
    reopened: the session ends and the port is reopened (after :data:`REOPEN_BACKOFF`). A
    SYNC in the middle of a session means the host reconnected without the port reading EOF.
    Writes are non-blocking: a write while no host is connected would otherwise block.
    """

    def __init__(self, server: Server, path: Path, fd: int) -> None:
        super().__init__(server, fd)
        self.path = path
        self.scanner = SyncScanner()
        self.idle_eofs = 0
        server.pipes.add(self)
        self.register()

    def _open(self) -> None:
        self.fd = _open_port(self.path)
        self.outbuf.clear()
        self.scanner = SyncScanner()
        self.register()

    def received(self, data: bytes) -> None:
        self.idle_eofs = 0
        found = self.scanner.feed(data)
        if found is not None:
            nonce, data = found
            self._end_session()
            self.outbuf.clear()  # the old session's: the new one starts with the ACK
            self.outbuf += ack_line(nonce)
            self.conn = _Connection(self.server, self)
            _log(f"host session {nonce[:8]} opened")
        if self.conn is not None and data:
            self.conn.received(data)
            if self.conn.closed:  # a protocol error: wait for the host's next SYNC
                self.write_out()
                self.conn = None
        self.touch()

    def _end_session(self) -> None:
        if self.conn is not None:
            self.conn.lost()
            self.conn = None

    def ended(self) -> None:
        if self.fd < 0:
            return
        if self.conn is not None:
            _log("host disconnected; session closed")
        self._end_session()
        self._unregister()
        os.close(self.fd)
        self.fd = -1
        pause = REOPEN_BACKOFF[min(self.idle_eofs, len(REOPEN_BACKOFF) - 1)]
        self.idle_eofs += 1
        self.loop.call_at(time.monotonic() + pause, self._reopen)

    def _reopen(self) -> None:
        if self in self.server.pipes:
            try:
                self._open()
            except OSError as exc:  # the port went away? try again, as after an EOF
                _log(f"cannot reopen {self.path}: {exc}")
                self.loop.call_at(time.monotonic() + REOPEN_BACKOFF[-1], self._reopen)


def find_serial_port(name: str = SERIAL_PORT_NAME, sysfs: Path = Path("/sys")) -> Path | None:
    """Return the /dev node of the virtio-serial port called ``name``, or None if absent."""
    ports = sysfs / "class" / "virtio-ports"
    if not ports.is_dir():
        return None
    for entry in sorted(ports.iterdir()):
        try:
            if (entry / "name").read_text().strip() == name:
                return Path("/dev") / entry.name
        except OSError:
            continue
    return None


def _open_port(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)

    def close(self) -> None:
        self.server.pipes.discard(self)
        self._end_session()
        if self.fd >= 0:
            self._unregister()
            os.close(self.fd)
            self.fd = -1


# -- the server --------------------------------------------------------------------------------


class Server:
    """The gRPC server of ``servicer`` (see the module docstring). Add transports
    (:meth:`add_insecure_port`, :meth:`serve_serial`), then :meth:`start`."""

    def __init__(self, servicer: object, max_concurrent_rpcs: int = MAX_CONCURRENT_RPCS) -> None:
        self.methods = service_methods(servicer)
        self.max_concurrent_rpcs = max_concurrent_rpcs
        self.loop = Loop(_LOG)
        self.workers = Workers()
        self.running = 0  # handlers running (I/O thread only)
        self.pipes: set[_Pipe] = set()
        self._listeners: list[socket.socket] = []
        self._serial: list[tuple[Path, int]] = []
        self._stopped = threading.Event()

    def add_insecure_port(self, address: str) -> int:
        """Listen on ``unix:PATH`` or ``vsock:CID:PORT`` (bound now); returns the port."""
        if address.startswith("unix:"):
            path = address[len("unix:") :]
            path = path[2:] if path.startswith("//") else path
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
            port = 1
        elif address.startswith("vsock:"):
            cid, port = (int(part) for part in address[len("vsock:") :].split(":"))
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            sock.bind((cid, port))
        else:
            raise ValueError(f"unsupported address {address!r} (unix:PATH or vsock:CID:PORT)")
        sock.listen(64)
        sock.setblocking(False)
        self._listeners.append(sock)
        return port

    def serve_serial(self, port: Path) -> None:
        """Serve the host on the virtio-serial port at ``port`` (opened now: OSError)."""
        self._serial.append((port, _open_port(port)))

    def start(self) -> None:
        """Serve from an I/O thread of its own (returns at once)."""
        self.loop.call_soon(self._opening)
        self.loop.start()

    def serve_forever(self) -> None:
        """Serve from this thread (the guest's main thread); returns after :meth:`stop`."""
        self.loop.call_soon(self._opening)
        self.loop.run()

    def _opening(self) -> None:
        from selectors import EVENT_READ

        for listener in self._listeners:
            self.loop.selector.register(
                listener, EVENT_READ, lambda _mask, listener=listener: self._accept(listener)
            )
        for port, fd in self._serial:
            _SerialPipe(self, port, fd)

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                time.sleep(0.01)
            return
        _SocketPipe(self, sock)

    def watch_stalls(self) -> None:
        """Have the I/O thread dump every thread's stack (to fd 2) if it stops turning
        for :data:`STALL_DUMP_SECONDS`: a stopped loop stops every call of the pod, and the
        console log (the host keeps it on failure) is then the only evidence of where.
        faulthandler's watchdog is a C thread, so it dumps even when no Python thread runs.
        Re-armed every :data:`STALL_REARM_SECONDS` (each arming starts a thread)."""

        def arm() -> None:
            with contextlib.suppress(ValueError, OSError):  # diagnostics never stop serving
                faulthandler.dump_traceback_later(STALL_DUMP_SECONDS, repeat=False, file=2)
            self.loop.call_at(time.monotonic() + STALL_REARM_SECONDS, arm)

        self.loop.call_soon(arm)

    def stop(self, grace: float | None = None) -> threading.Event:
        """Stop serving (any thread): calls under way are cancelled, transports closed."""

        def stopping() -> None:
            for pipe in list(self.pipes):
                pipe.close()
            for listener in self._listeners:
                with contextlib.suppress(KeyError, ValueError):
                    self.loop.selector.unregister(listener)
                listener.close()

        if self.loop.thread is not None and not self._stopped.is_set():
            self.loop.call_soon(stopping)
            self.loop.stop()
        self._stopped.set()
        return self._stopped

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Wait until :meth:`stop`; whether it was called."""
        return self._stopped.wait(timeout)


def _log(message: str) -> None:
    """One line on the guest console (rare events only: session changes)."""
    print(f"{_LOG}: channel: {message}", flush=True)
