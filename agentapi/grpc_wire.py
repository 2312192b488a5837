"""gRPC over HTTP/2 as the wire carries it, shared by the host's agent proxy
(sandbox/pod/grpc_relay.py) and the guest agent's server (agent/grpc_server.py): status codes,
``grpc-timeout``, ``grpc-message`` quoting, ``-bin`` metadata (grpc's PROTOCOL-HTTP2.md), and
the HTTP/2 settings both ends use.
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.settings

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
