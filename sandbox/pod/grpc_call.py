"""The agent proxy's own gRPC calls over its upstream HTTP/2 connection (see
:mod:`sandbox.pod.grpc_relay`): 5-byte gRPC message framing, the status from the trailers
(``-bin`` metadata decoded), a deadline, blocking :meth:`Call.send` / :meth:`Call.receive`
for the threads of the stand-in service and port-forward. Messages over
:data:`agentapi.limits.MAX_MESSAGE_BYTES` are refused from their header, before they are held.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator

from agentapi.limits import MAX_MESSAGE_BYTES
from sandbox.pod.grpc_stream import (
    CANCELLED,
    CODE_NAMES,
    DEADLINE_EXCEEDED,
    INTERNAL,
    OK,
    RESET_CODES,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    UNKNOWN_CODE,
    Headers,
    Stream,
    Upstream,
    format_timeout,
    metadatum,
    unquote,
)

#: Bytes a :class:`Call`'s sender may have queued before :meth:`Call.send` blocks.
SEND_BACKLOG = 256 * 1024


class CallError(Exception):
    """A call of the relay's own ended with a non-OK status: ``code`` (int), ``details``,
    ``trailers`` (the trailing metadata, (key, bytes) pairs)."""

    def __init__(self, code: int, details: str, trailers: list[tuple[str, bytes]]) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.trailers = trailers

    @property
    def code_name(self) -> str:
        return CODE_NAMES[self.code] if 0 <= self.code < len(CODE_NAMES) else "UNKNOWN"


class Call(Stream):
    """A gRPC call of the relay's own (:meth:`Relay.call`); its methods but the handlers
    may be used from any one thread (and :meth:`cancel` from any)."""

    def __init__(self, relay: Upstream, method: str, timeout: float | None) -> None:
        self._cond = threading.Condition()
        self._messages: deque[tuple[bytes, int]] = deque()  # message, its unacked credit
        self._status: CallError | None = None
        self._ended = False  # status known (OK or not)
        self._backlog = 0
        self._buffer = bytearray()
        self._acked = 0
        self.method = method
        headers: Headers = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", method.encode()),
            (b":authority", b"localhost"),
            (b"te", b"trailers"),
            (b"content-type", b"application/grpc"),
        ]
        deadline = None
        if timeout is not None:
            deadline = time.monotonic() + timeout
            headers.append((b"grpc-timeout", format_timeout(timeout)))
        self._init = (relay, headers, deadline)
        self._relay = relay
        relay.loop.call_soon(self._start)

    def _start(self) -> None:
        relay, headers, deadline = self._init
        Stream.__init__(self, relay, headers, deadline)
        if deadline is not None and deadline <= time.monotonic():
            self.expired()
            return
        relay.open(self)

    # -- the caller's side ------------------------------------------------------------------

    def send(self, message: bytes) -> bool:
        """Queue one request message, waiting while :data:`SEND_BACKLOG` bytes are queued;
        False (nothing sent) once the call ended."""
        frame = b"\0" + len(message).to_bytes(4, "big") + message
        with self._cond:
            while self._backlog > SEND_BACKLOG and not self._ended:
                self._cond.wait()
            if self._ended:
                return False
            self._backlog += len(frame)
        self._relay.loop.call_soon(lambda: self._queue(frame))
        return True

    def _queue(self, frame: bytes) -> None:
        if self.finished or self.up_end:
            return
        self.up.append([frame, len(frame)])
        self.relay.flush_up(self)

    def done_sending(self) -> None:
        """No more request messages."""
        self._relay.loop.call_soon(self._close_sending)

    def _close_sending(self) -> None:
        if not self.finished:
            self.up_end = True
            self.relay.flush_up(self)

    def receive(self) -> bytes | None:
        """The next response message; None once the call ended with OK; CallError when it
        failed (also after messages were received)."""
        with self._cond:
            while not self._messages and not self._ended:
                self._cond.wait()
            if self._messages:
                message, credit = self._messages.popleft()
                self._relay.loop.call_soon(lambda: self._took(credit))
                return message
            if self._status is not None:
                raise self._status
            return None

    def __iter__(self) -> Iterator[bytes]:
        while (message := self.receive()) is not None:
            yield message

    def cancel(self) -> None:
        """End the call with CANCELLED (reset upstream); any thread."""
        self._relay.loop.call_soon(lambda: self._complete(CallError(CANCELLED, "Cancelled", [])))

    # -- the loop's side ------------------------------------------------------------------

    def _took(self, credit: int) -> None:
        """The caller took a message of ``credit`` unacknowledged bytes."""
        self.relay.ack_up(self, credit)
        with self._cond:
            caught_up = not self._messages
        if caught_up and not self._ended:
            self._catch_up()

    def sent_up(self, credit: int) -> None:
        with self._cond:
            self._backlog -= credit
            self._cond.notify_all()

    def _complete(self, status: CallError | None) -> None:
        """The call's outcome (None: OK); it is forgotten (reset upstream unless done)."""
        with self._cond:
            if not self._ended:
                self._ended = True
                self._status = status
                self._buffer.clear()
            self._cond.notify_all()
        if hasattr(self, "finished"):
            self.finish()

    def on_response(self, headers: Headers, ended: bool) -> None:
        fields = dict(headers)
        if fields.get(b":status") != b"200":
            status = fields.get(b":status", b"?").decode(errors="replace")
            self._complete(
                CallError(UNAVAILABLE if status == "503" else INTERNAL, f"HTTP status {status}", [])
            )
        elif ended:
            self.on_trailers(headers)

    def on_data(self, data: bytes, credit: int) -> None:
        if self._ended:
            self.relay.ack_up(self, credit)
            return
        # A complete message's bytes are acknowledged when the caller takes it; those of
        # the message not complete yet only while the caller has taken all before it (the
        # size limit bounds them), so that a large message can arrive through the window.
        # The buffer holds the start of that message, its first _acked bytes acknowledged.
        buffer = self._buffer
        buffer += data
        if credit > len(data):  # padding
            self.relay.ack_up(self, credit - len(data))
        ready: list[tuple[bytes, int]] = []
        while len(buffer) >= 5:
            if buffer[0] != 0:
                self._complete(CallError(INTERNAL, "compressed message without encoding", []))
                return
            size = int.from_bytes(buffer[1:5], "big")
            if size > MAX_MESSAGE_BYTES:
                message = f"Received message larger than max ({size} vs. {MAX_MESSAGE_BYTES})"
                self._complete(CallError(RESOURCE_EXHAUSTED, message, []))
                return
            if len(buffer) < 5 + size:
                break
            own = min(self._acked, 5 + size)
            self._acked -= own
            ready.append((bytes(buffer[5 : 5 + size]), 5 + size - own))
            del buffer[: 5 + size]
        with self._cond:
            self._messages.extend(ready)
            caught_up = not self._messages
            if ready:
                self._cond.notify_all()
        if caught_up:
            self._catch_up()

    def _catch_up(self) -> None:
        """Acknowledge what arrived of the next message (the caller took all before it)."""
        if len(self._buffer) > self._acked:
            self.relay.ack_up(self, len(self._buffer) - self._acked)
            self._acked = len(self._buffer)

    def on_trailers(self, headers: Headers) -> None:
        fields = dict(headers)
        raw = fields.get(b"grpc-status", b"")
        code = int(raw) if raw.isdigit() and len(raw) < 4 else UNKNOWN_CODE
        message = unquote(fields.get(b"grpc-message", b""))
        metadata = [metadatum(k, v) for k, v in headers if not k.startswith(b":")]
        if code == OK and not self._buffer:
            self._complete(None)
        elif code == OK:
            self._complete(CallError(INTERNAL, "the stream ended inside a message", metadata))
        else:
            self._complete(CallError(code, message, metadata))

    def on_end(self) -> None:
        self._complete(CallError(INTERNAL, "the call ended without a status", []))

    def on_reset(self, error_code: int) -> None:
        code = RESET_CODES.get(error_code, INTERNAL)
        self._complete(
            CallError(code, f"stream reset by the agent (HTTP/2 error {error_code})", [])
        )

    def on_lost(self, message: str) -> None:
        self._complete(CallError(UNAVAILABLE, message, []))

    def expired(self) -> None:
        self.timer = None
        self._complete(CallError(DEADLINE_EXCEEDED, "Deadline Exceeded", []))
