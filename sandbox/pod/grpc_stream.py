"""What the agent proxy's HTTP/2 relay (:mod:`sandbox.pod.grpc_relay`) and its own calls
(:mod:`sandbox.pod.grpc_call`) share: gRPC over HTTP/2 as the wire carries it (status codes,
``grpc-timeout``, ``grpc-message`` quoting, ``-bin`` metadata; grpc's PROTOCOL-HTTP2.md), the
relay's HTTP/2 settings, and :class:`Stream`, one call on the upstream connection.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

import h2.config
import h2.connection
import h2.errors
import h2.settings

if TYPE_CHECKING:
    from sandbox.pod.h2_loop import Loop, Timer

SERVICE_PREFIX = "/pysandbox.agent.v1.Agent/"
#: HTTP/2 stream window each side is given (bytes held per call and direction at most).
STREAM_WINDOW = 256 * 1024
#: Connection window: large, so that one stalled call never stops the others (the stream
#: windows bound what is held).
CONNECTION_WINDOW = 1 << 30
#: Largest header block accepted (grpcio's ``grpc.max_metadata_size`` of agentapi/limits.py).
MAX_HEADER_LIST_BYTES = 16 * 1024

# gRPC status codes (grpc/doc/statuscodes.md).
OK, CANCELLED, UNKNOWN_CODE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED = 0, 1, 2, 4, 8
UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 12, 13, 14
CODE_NAMES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)

_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}

Headers = list[tuple[bytes, bytes]]


def parse_timeout(value: bytes) -> float | None:
    """Seconds of a ``grpc-timeout`` value (1 to 8 digits and a unit); None if malformed."""
    digits, unit = value[:-1], value[-1:]
    if not digits.isdigit() or len(digits) > 8 or unit not in _TIMEOUT_UNITS:
        return None
    return int(digits) * _TIMEOUT_UNITS[unit]


def format_timeout(seconds: float) -> bytes:
    """A ``grpc-timeout`` value for ``seconds`` (rounded up to the unit, at least 1 ns)."""
    for unit, scale in ((b"n", 1e-9), (b"u", 1e-6), (b"m", 1e-3), (b"S", 1.0), (b"M", 60.0)):
        count = -int(-max(seconds, 0.0) // scale)
        if count < 100_000_000:
            return str(max(count, 1)).encode() + unit
    return str(min(-int(-seconds // 3600), 99_999_999)).encode() + b"H"


def quote(message: str) -> bytes:
    """``grpc-message`` percent-encoding (of everything outside printable ASCII, and %)."""
    out = bytearray()
    for byte in message.encode():
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def unquote(value: bytes) -> str:
    from urllib.parse import unquote_to_bytes

    return unquote_to_bytes(value).decode(errors="replace")


def metadatum(key: bytes, value: bytes) -> tuple[str, bytes]:
    """A metadata entry as grpcio gives it: a ``-bin`` key's value base64-decoded (b"" when
    that fails)."""
    name = key.decode(errors="replace")
    if name.endswith("-bin"):
        import base64
        import binascii

        try:
            value = base64.b64decode(value + b"=" * (-len(value) % 4), validate=True)
        except (binascii.Error, ValueError):
            value = b""
    return name, value


def status_trailers(code: int, message: str, trailers_only: bool) -> Headers:
    """The trailers of a call that ends with ``code`` here; with the response headers too
    when nothing was sent yet (a "trailers-only" response)."""
    headers: Headers = []
    if trailers_only:
        headers += [(b":status", b"200"), (b"content-type", b"application/grpc")]
    return [*headers, (b"grpc-status", str(code).encode()), (b"grpc-message", quote(message))]


#: gRPC status of a call reset with an HTTP/2 error code (as grpcio maps them).
RESET_CODES: dict[int, int] = {
    h2.errors.ErrorCodes.CANCEL: CANCELLED,
    h2.errors.ErrorCodes.REFUSED_STREAM: UNAVAILABLE,
    h2.errors.ErrorCodes.ENHANCE_YOUR_CALM: RESOURCE_EXHAUSTED,
}


def h2_connection(config: h2.config.H2Configuration, settings: dict[Any, int]) -> Any:
    """A new h2 connection with the relay's windows and header limit, its preface queued."""
    conn = h2.connection.H2Connection(config)
    conn.initiate_connection()
    conn.update_settings(
        {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_BYTES,
            **settings,
        }
    )
    conn.increment_flow_control_window(CONNECTION_WINDOW)
    return conn


def still_open(conn: Any, stream_id: int) -> bool:
    """Whether HTTP/2 stream ``stream_id`` of ``conn`` is not closed yet."""
    stream = conn.streams.get(stream_id)
    return stream is not None and not stream.closed


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
