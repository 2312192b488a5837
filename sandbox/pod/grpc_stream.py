"""What the agent proxy's HTTP/2 relay (:mod:`sandbox.pod.grpc_relay`) and its own calls
(:mod:`sandbox.pod.grpc_call`) share: :class:`Stream`, one call on the upstream connection,
and (re-exported) the wire pieces the guest agent's server shares too
(:mod:`agentapi.grpc_wire`).
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from agentapi.grpc_wire import (
    CANCELLED,
    CODE_NAMES,
    CONNECTION_WINDOW,
    DEADLINE_EXCEEDED,
    INTERNAL,
    MAX_HEADER_LIST_BYTES,
    OK,
    RESET_CODES,
    RESOURCE_EXHAUSTED,
    SERVICE_PREFIX,
    STREAM_WINDOW,
    UNAVAILABLE,
    UNIMPLEMENTED,
    UNKNOWN_CODE,
    Headers,
    format_timeout,
    h2_connection,
    metadatum,
    parse_timeout,
    quote,
    status_trailers,
    still_open,
    unquote,
)

if TYPE_CHECKING:
    from agentapi.h2_loop import Loop, Timer

__all__ = [
    "CANCELLED",
    "CODE_NAMES",
    "CONNECTION_WINDOW",
    "DEADLINE_EXCEEDED",
    "INTERNAL",
    "MAX_HEADER_LIST_BYTES",
    "OK",
    "RESET_CODES",
    "RESOURCE_EXHAUSTED",
    "SERVICE_PREFIX",
    "STREAM_WINDOW",
    "UNAVAILABLE",
    "UNIMPLEMENTED",
    "UNKNOWN_CODE",
    "Headers",
    "Stream",
    "Upstream",
    "format_timeout",
    "h2_connection",
    "metadatum",
    "parse_timeout",
    "quote",
    "status_trailers",
    "still_open",
    "unquote",
]


class Upstream(Protocol):
    """What a :class:`Stream` asks of the relay that carries it
    (:class:`sandbox.pod.grpc_relay.Relay`)."""

    loop: Loop

    def open(self, stream: Stream) -> None: ...
    def flush_up(self, stream: Stream) -> None: ...
    def ack_up(self, stream: Stream, size: int) -> None: ...
    def forget(self, stream: Stream) -> None: ...


class Stream:
    """One call on the upstream connection: what goes up (request data, queued until the
    window takes it) and the handlers of what comes down. Loop thread only."""

    def __init__(self, relay: Upstream, headers: Headers, deadline: float | None) -> None:
        self.relay = relay
        self.headers = headers
        self.deadline = deadline
        self.usid: int | None = None
        self.unacked = 0  # response bytes received and not acknowledged yet
        self.up: deque[list[Any]] = deque()  # [data, credit] not yet sent up
        self.up_end = False  # the request side ends after what is queued
        self.up_done = False  # END_STREAM (or a reset) sent up
        self.finished = False
        self.timer: Timer | None = None
        if deadline is not None:
            self.timer = relay.loop.call_at(deadline, self.expired)

    def request_headers(self) -> Headers:
        if self.deadline is None:
            return self.headers
        timeout = format_timeout(self.deadline - time.monotonic())
        return [(k, timeout if k == b"grpc-timeout" else v) for k, v in self.headers]

    # what the relay calls (overridden)
    def sent_up(self, credit: int) -> None:
        """``credit`` bytes of request data went up."""

    def on_response(self, headers: Headers, ended: bool) -> None: ...
    def on_data(self, data: bytes, credit: int) -> None: ...
    def on_trailers(self, headers: Headers) -> None: ...
    def on_end(self) -> None: ...
    def on_reset(self, error_code: int) -> None: ...
    def on_lost(self, message: str) -> None: ...
    def expired(self) -> None: ...

    def finish(self) -> None:
        """Forget the call (its upstream stream is reset if still open)."""
        if self.finished:
            return
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
        self.relay.forget(self)
