"""The agent proxy's gRPC relay over HTTP/2 (``h2``), without grpcio.

:class:`Relay` keeps one HTTP/2 connection to the guest's agent ("upstream": made by a
``connect`` callable, e.g. the serial channel with its handshake) and relays onto it every
gRPC call that host clients make on the listening socket ("downstream", :meth:`Relay.serve`),
as opaque HTTP/2 streams: request headers (``grpc-timeout`` rewritten to what remains),
data, response headers, data and trailers. It knows nothing of the messages.

What a client sees, as from the grpcio proxy this replaces:

* A call to a method outside :data:`SERVICE_PREFIX`: UNIMPLEMENTED.
* While there is no upstream connection the call waits for one (grpcio's
  ``wait_for_ready``), until its deadline: DEADLINE_EXCEEDED. The connection is made when a
  call needs it and made again after it broke (every :data:`RETRY_PAUSE` s while calls wait).
* Upstream connection lost: every call under way ends with UNAVAILABLE.
* Cancellation both ways: a client's RST_STREAM (or the end of its connection) resets the
  call upstream; the agent's RST_STREAM is passed on with its error code.
* The deadline is also kept here: at it, the call is reset upstream and ends with
  DEADLINE_EXCEEDED (the guest is untrusted and might ignore ``grpc-timeout``).
* Of the agent's response headers only ``:status`` and ``content-type`` pass, of its
  trailers only ``grpc-status``, ``grpc-message`` and the Failure entry
  (:data:`agentapi.failure.METADATA_KEY`): what the grpcio proxy passed on.

Flow control bounds what is held here: data of one direction is acknowledged (its HTTP/2
window reopened) only once it was handed on to the other side's connection, so each call
holds at most :data:`STREAM_WINDOW` bytes per direction; and nothing more is handed to a
connection whose unwritten output is over :data:`~agentapi.h2_loop.OUT_LIMIT`. Message
sizes (:data:`agentapi.limits.MAX_MESSAGE_BYTES`) are the endpoints' to enforce on relayed
calls (both are grpcio with those limits); the relay's own calls (:class:`Call`) enforce them.

:class:`Call` is the relay's own gRPC client call over the same upstream connection (the
stand-in service and port-forward use it from their threads): 5-byte gRPC message framing,
status from the trailers, a deadline, blocking :meth:`Call.send` / :meth:`Call.receive`.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import h2.config
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from agentapi import failure
from agentapi.h2_loop import H2Socket, Loop
from sandbox.pod.grpc_call import Call, CallError
from sandbox.pod.grpc_stream import (
    DEADLINE_EXCEEDED,
    INTERNAL,
    SERVICE_PREFIX,
    STREAM_WINDOW,
    UNAVAILABLE,
    UNIMPLEMENTED,
    Headers,
    Stream,
    h2_connection,
    parse_timeout,
    status_trailers,
    still_open,
)

__all__ = ["SERVICE_PREFIX", "STREAM_WINDOW", "Call", "CallError", "Relay"]

#: Seconds between two connection attempts while calls wait for one.
RETRY_PAUSE = 0.2

_RESPONSE_HEADERS = frozenset({b":status", b"content-type"})
_TRAILERS = frozenset({b"grpc-status", b"grpc-message", failure.METADATA_KEY.encode()})


class Relay:
    """The upstream connection and the calls on it; see the module docstring.

    ``connect()`` (run in a thread of its own) returns a connected blocking socket and the
    bytes already read from it that belong to the HTTP/2 stream; OSError (or any
    Exception) when it cannot. All methods but :meth:`call`/:meth:`unary` and
    :meth:`serve` run in the loop thread.
    """

    def __init__(self, loop: Loop, connect: Callable[[], tuple[socket.socket, bytes]]) -> None:
        self.loop = loop
        self._connect = connect
        self._up: H2Socket | None = None
        self._connecting = False
        self._pending: deque[Stream] = deque()
        self._streams: dict[int, Stream] = {}

    # -- the upstream connection ----------------------------------------------------------

    def open(self, stream: Stream) -> None:
        """Send ``stream`` up as soon as the connection takes it."""
        self._pending.append(stream)
        self._open_pending()

    def _open_pending(self) -> None:
        up = self._up
        if up is None:
            if self._pending and not self._connecting:
                self._connecting = True
                threading.Thread(target=self._connect_thread, daemon=True).start()
            return
        while self._pending:
            stream = self._pending[0]
            try:
                usid = up.conn.get_next_available_stream_id()
                up.conn.send_headers(usid, stream.request_headers())
            except h2.exceptions.TooManyStreamsError:
                break  # when one ends
            self._pending.popleft()
            stream.usid = usid
            self._streams[usid] = stream
            up.touch()
            self.flush_up(stream)

    def _connect_thread(self) -> None:
        try:
            sock, leftover = self._connect()
        except Exception as exc:
            print(f"agent-proxy: no agent connection: {exc}", file=sys.stderr, flush=True)
            self.loop.call_soon(self._connect_failed)
            return
        self.loop.call_soon(lambda: self._connected(sock, leftover))

    def _connect_failed(self) -> None:
        self._connecting = False
        self.loop.call_at(time.monotonic() + RETRY_PAUSE, self._open_pending)

    def _connected(self, sock: socket.socket, leftover: bytes) -> None:
        self._connecting = False
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        conn = h2_connection(config, {h2.settings.SettingCodes.ENABLE_PUSH: 0})
        up: H2Socket

        def closed() -> None:
            self._lost(up, "agent connection closed")

        up = H2Socket(
            self.loop, sock, conn, lambda ev: self._up_events(up, ev), closed, self._up_drained
        )
        self._up = up
        up.touch()
        if leftover:
            up.feed(leftover)
        self._open_pending()

    def _lost(self, up: H2Socket, message: str) -> None:
        """The upstream connection ended: every call on it fails, waiting ones wait on."""
        if self._up is not up:
            return
        self._up = None
        streams = list(self._streams.values())
        self._streams.clear()
        for stream in streams:
            stream.usid = None
            stream.on_lost(message)
        self._open_pending()

    def _up_drained(self) -> None:
        for stream in list(self._streams.values()):
            self.flush_up(stream)

    def _up_events(self, up: H2Socket, events: list[Any]) -> None:
        E = h2.events
        for event in events:
            if isinstance(event, E.ConnectionTerminated):
                up.close()  # GOAWAY: the agent is going away; calls fail, new ones wait
                return
            sid = getattr(event, "stream_id", 0)
            stream = self._streams.get(sid) if sid else None
            if isinstance(event, E.DataReceived):
                if stream is None:
                    up.conn.acknowledge_received_data(event.flow_controlled_length, sid)
                else:
                    stream.unacked += event.flow_controlled_length
                    stream.on_data(event.data, event.flow_controlled_length)
            elif isinstance(event, (E.WindowUpdated, E.RemoteSettingsChanged)):
                targets = [stream] if stream is not None else list(self._streams.values())
                for each in targets:
                    if each is not None:
                        self.flush_up(each)
            elif stream is None:
                continue
            elif isinstance(event, E.ResponseReceived):
                stream.on_response(list(event.headers), event.stream_ended is not None)
            elif isinstance(event, E.TrailersReceived):
                stream.on_trailers(list(event.headers))
            elif isinstance(event, E.StreamEnded):
                stream.on_end()
            elif isinstance(event, E.StreamReset):
                self._streams.pop(sid, None)
                self._release(up, stream, sid)
                stream.up_done = True
                stream.on_reset(event.error_code)
        up.touch()

    def flush_up(self, stream: Stream) -> None:
        """Send what ``stream`` has queued as far as windows and the connection allow."""
        up, usid = self._up, stream.usid
        if up is None or usid is None or stream.up_done:
            return
        conn = up.conn
        try:
            while stream.up and up.room():
                entry = stream.up[0]
                data: bytes = entry[0]
                window = conn.local_flow_control_window(usid)
                size = min(len(data), window, conn.max_outbound_frame_size)
                if size <= 0 and data:
                    break
                conn.send_data(usid, data[:size])
                if size < len(data):
                    entry[0] = data[size:]
                    continue
                stream.up.popleft()
                stream.sent_up(entry[1])
            if stream.up_end and not stream.up:
                conn.end_stream(usid)
                stream.up_done = True
        except h2.exceptions.StreamClosedError:  # the agent is done with the call
            stream.up_done = True
        up.touch()

    def ack_up(self, stream: Stream, size: int) -> None:
        """``size`` bytes of response data of ``stream`` were handed on: reopen the window."""
        up, usid = self._up, stream.usid
        if up is not None and usid is not None and size:
            stream.unacked -= size
            up.conn.acknowledge_received_data(size, usid)
            up.touch()

    @staticmethod
    def _release(up: H2Socket, stream: Stream, usid: int) -> None:
        """``stream`` (closed) is done with ``up``: what it received and did not hand on is
        given back to the connection's window (else each such call would shrink it for
        good); later acknowledgements of the call are no-ops."""
        if stream.unacked > 0:
            up.conn.acknowledge_received_data(stream.unacked, usid)
            up.touch()
        stream.unacked = 0
        stream.usid = None

    def forget(self, stream: Stream) -> None:
        """Drop ``stream`` (pending or open; an open one is reset upstream unless done)."""
        if stream in self._pending:
            self._pending.remove(stream)
        usid = stream.usid
        if usid is None:
            return
        self._streams.pop(usid, None)
        stream.usid = None
        up = self._up
        if up is not None:
            if still_open(up.conn, usid):
                up.conn.reset_stream(usid, h2.errors.ErrorCodes.CANCEL)
            self._release(up, stream, usid)
            up.touch()
        self._open_pending()  # a stream slot may have freed

    # -- downstream: the clients on the listening socket ----------------------------------

    def serve(self, listener: socket.socket) -> None:
        """Accept clients on ``listener`` (any thread may call this)."""
        listener.setblocking(False)

        def register() -> None:
            self.loop.selector.register(listener, 1, lambda _mask: self._accept(listener))

        self.loop.call_soon(register)

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            print(f"agent-proxy: accept failed: {exc}", file=sys.stderr, flush=True)
            return
        _Downstream(self, sock)

    # -- the relay's own calls ------------------------------------------------------------

    def call(self, method: str, timeout: float | None) -> Call:
        """Start a call of ``method`` (full path) with a deadline ``timeout`` s from now
        (None: none); any thread."""
        return Call(self, method, timeout)

    def unary(self, method: str, request: bytes, timeout: float) -> bytes:
        """One request message, one response message; CallError when the call fails."""
        call = self.call(method, timeout)
        call.send(request)
        call.done_sending()
        reply = call.receive()
        if reply is None:
            raise CallError(INTERNAL, "no response message", [])
        if call.receive() is not None:
            call.cancel()
            raise CallError(INTERNAL, "more than one response message", [])
        return reply


class _Downstream:
    """One client connection on the listening socket (the HTTP/2 server side)."""

    def __init__(self, relay: Relay, sock: socket.socket) -> None:
        self.relay = relay
        self.calls: dict[int, _Relayed] = {}
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        conn = h2_connection(config, {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000})
        self.h2sock = H2Socket(relay.loop, sock, conn, self._events, self._closed, self._drained)
        self.h2sock.touch()

    def _closed(self) -> None:
        calls = list(self.calls.values())
        self.calls.clear()
        for call in calls:
            call.finish()

    def _drained(self) -> None:
        for call in list(self.calls.values()):
            call.flush_down()

    def _events(self, events: list[Any]) -> None:
        E = h2.events
        conn = self.h2sock.conn
        for event in events:
            sid = getattr(event, "stream_id", 0)
            call = self.calls.get(sid) if sid else None
            if isinstance(event, E.RequestReceived):
                self._request(sid, list(event.headers), event.stream_ended is not None)
            elif isinstance(event, E.DataReceived):
                if call is None:
                    conn.acknowledge_received_data(event.flow_controlled_length, sid)
                else:
                    call.up.append([event.data, event.flow_controlled_length])
                    self.relay.flush_up(call)
            elif isinstance(event, (E.WindowUpdated, E.RemoteSettingsChanged)):
                targets = [call] if call is not None else list(self.calls.values())
                for each in targets:
                    if each is not None:
                        each.flush_down()
            elif isinstance(event, E.StreamEnded) and call is not None:
                call.up_end = True
                self.relay.flush_up(call)
            elif isinstance(event, E.StreamReset) and call is not None:
                call.down_done = True
                call.finish()
            elif isinstance(event, E.ConnectionTerminated):
                self.h2sock.close()
                return

    def _request(self, sid: int, headers: Headers, ended: bool) -> None:
        fields = dict(headers)
        path = fields.get(b":path", b"")
        deadline = None
        if b"grpc-timeout" in fields:
            seconds = parse_timeout(fields[b"grpc-timeout"])
            if seconds is not None:
                deadline = time.monotonic() + seconds
        if fields.get(b":method") != b"POST" or not path.startswith(SERVICE_PREFIX.encode()):
            self.h2sock.conn.send_headers(
                sid, status_trailers(UNIMPLEMENTED, "Method not found!", True), end_stream=True
            )
            return
        call = _Relayed(self, sid, headers, deadline)
        call.up_end = ended
        self.calls[sid] = call
        self.relay.open(call)


class _Relayed(Stream):
    """A client's call relayed upstream: what comes down is queued for the client's
    stream and sent as its window allows; request data is acknowledged to the client
    once sent up."""

    def __init__(
        self, down: _Downstream, dsid: int, headers: Headers, deadline: float | None
    ) -> None:
        super().__init__(down.relay, headers, deadline)
        self.down = down
        self.dsid = dsid
        self.queue: deque[list[Any]] = (
            deque()
        )  # ["headers"|"data"|"trailers"|"end", payload, credit]
        self.headers_queued = False
        self.down_done = False

    def sent_up(self, credit: int) -> None:
        if not self.down_done and credit:
            self.down.h2sock.conn.acknowledge_received_data(credit, self.dsid)
            self.down.h2sock.touch()

    def on_response(self, headers: Headers, ended: bool) -> None:
        if ended:  # trailers-only
            self._end([(k, v) for k, v in headers if k in _RESPONSE_HEADERS or k in _TRAILERS])
            return
        self.headers_queued = True
        self.queue.append(["headers", [(k, v) for k, v in headers if k in _RESPONSE_HEADERS], 0])
        self.flush_down()

    def on_data(self, data: bytes, credit: int) -> None:
        self.queue.append(["data", data, credit])
        self.flush_down()

    def on_trailers(self, headers: Headers) -> None:
        self._end([(k, v) for k, v in headers if k in _TRAILERS])

    def on_end(self) -> None:
        if not self.queue or self.queue[-1][0] not in ("trailers", "end"):
            self.queue.append(["end", None, 0])
            self.flush_down()

    def on_reset(self, error_code: int) -> None:
        self._reset_down(error_code)

    def on_lost(self, message: str) -> None:
        self._fail(UNAVAILABLE, message)

    def expired(self) -> None:
        self.timer = None
        self._fail(DEADLINE_EXCEEDED, "Deadline Exceeded")

    def _fail(self, code: int, message: str) -> None:
        """End the call with ``code`` (what was queued for the client is dropped)."""
        if self.finished or (self.queue and self.queue[-1][0] in ("trailers", "end")):
            return  # done, or the agent's whole answer is on its way to the client
        # Keep response headers already queued: they may not have been sent yet.
        self.queue = deque(e for e in self.queue if e[0] == "headers")
        self._end(status_trailers(code, message, not self.headers_queued))
        self.relay.forget(self)

    def _end(self, trailers: Headers) -> None:
        self.queue.append(["trailers", trailers, 0])
        self.flush_down()

    def _reset_down(self, error_code: int) -> None:
        if not self.down_done:
            self.down_done = True
            h2sock = self.down.h2sock
            with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                h2sock.conn.reset_stream(self.dsid, error_code)
            h2sock.touch()
        self.finish()

    def flush_down(self) -> None:
        """Send what is queued for the client as far as its windows allow."""
        h2sock = self.down.h2sock
        conn = h2sock.conn
        try:
            while self.queue and not self.down_done and h2sock.room():
                entry = self.queue[0]
                kind = entry[0]
                if kind == "headers":
                    conn.send_headers(self.dsid, entry[1])
                elif kind == "data":
                    data: bytes = entry[1]
                    window = conn.local_flow_control_window(self.dsid)
                    size = min(len(data), window, conn.max_outbound_frame_size)
                    if size <= 0 and data:
                        break
                    conn.send_data(self.dsid, data[:size])
                    if size < len(data):
                        entry[1] = data[size:]
                        continue
                    self.relay.ack_up(self, entry[2])
                else:
                    if kind == "trailers":
                        conn.send_headers(self.dsid, entry[1], end_stream=True)
                    else:
                        conn.end_stream(self.dsid)
                    self.queue.clear()
                    self._done_down()
                    break
                self.queue.popleft()
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.queue.clear()
            self._reset_down(h2.errors.ErrorCodes.CANCEL)
        h2sock.touch()

    def _done_down(self) -> None:
        """The response ended: if the client is still sending, ask it to stop (HTTP/2's
        RST_STREAM NO_ERROR after a complete response); forget the call."""
        self.down_done = True
        conn = self.down.h2sock.conn
        if still_open(conn, self.dsid):
            conn.reset_stream(self.dsid, h2.errors.ErrorCodes.NO_ERROR)
        self.finish()

    def finish(self) -> None:
        if not self.finished:
            self.down.calls.pop(self.dsid, None)
            # Request data never sent up goes back to the client connection's window.
            held = sum(entry[1] for entry in self.up)
            self.up.clear()
            if held:
                self.down.h2sock.conn.acknowledge_received_data(held, self.dsid)
                self.down.h2sock.touch()
        super().finish()
