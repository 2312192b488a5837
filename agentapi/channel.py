"""The agent channel's resynchronising handshake, used by both host and guest.

A virtio-serial port is a plain byte pipe that outlives host connections: bytes the guest
wrote while no host was connected, or bytes a previous host sent that the guest never read,
are delivered to whoever connects next. So every new host connection starts with a handshake
that both sides use to discard stale bytes before gRPC's HTTP/2 stream begins::

    host  -> guest   "\\nPYSANDBOX-SYNC <nonce>\\n"   (nonce: 32 lowercase hex digits)
    guest -> host    "\\nPYSANDBOX-ACK <nonce>\\n"

The guest discards everything before a SYNC line; the host discards everything before the
ACK carrying *its* nonce. After that the stream is a fresh gRPC connection. Scanning keeps
only a small window in memory (:data:`agentapi.limits.SYNC_WINDOW_BYTES`), so a hostile peer
cannot make either side buffer without bound; the host also bounds the bytes it will discard.

vsock needs none of this: each vsock connection is its own stream.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable

from agentapi.limits import SYNC_WINDOW_BYTES

SYNC_PREFIX = b"PYSANDBOX-SYNC "
ACK_PREFIX = b"PYSANDBOX-ACK "
_SYNC_RE = re.compile(rb"PYSANDBOX-SYNC ([0-9a-f]{32})\n")

#: Name of the virtio-serial port the agent listens on (``virtserialport,name=...``).
SERIAL_PORT_NAME = "agent.0"
#: vsock port the agent listens on when the host has vhost-vsock.
VSOCK_PORT = 1024

#: Most stale bytes the host discards while waiting for the ACK before giving up.
MAX_DISCARD_BYTES = 64 * 1024 * 1024


class HandshakeError(Exception):
    """The peer did not complete the handshake (timeout, EOF or too much garbage)."""


def new_nonce() -> str:
    """Return a fresh random nonce for one handshake."""
    return os.urandom(16).hex()


def sync_line(nonce: str) -> bytes:
    """The line the host sends to open a session."""
    return b"\n" + SYNC_PREFIX + nonce.encode() + b"\n"


def ack_line(nonce: str) -> bytes:
    """The line the guest answers a SYNC with."""
    return b"\n" + ACK_PREFIX + nonce.encode() + b"\n"


class SyncScanner:
    """Finds a SYNC line in a byte stream fed in arbitrary chunks (guest side).

    ``feed`` returns ``(nonce, rest)`` once a complete SYNC line is seen, where ``rest`` holds
    the bytes that followed it in the same chunk; otherwise ``None``. Only the last
    :data:`SYNC_WINDOW_BYTES` bytes are kept between calls.
    """

    def __init__(self) -> None:
        self._window = b""

    def feed(self, chunk: bytes) -> tuple[str, bytes] | None:
        data = self._window + chunk
        # The last SYNC wins: an earlier one belongs to an abandoned host session.
        matches = list(_SYNC_RE.finditer(data))
        if matches:
            match = matches[-1]
            self._window = b""
            return match.group(1).decode(), data[match.end() :]
        self._window = data[-SYNC_WINDOW_BYTES:]
        return None


#: Seconds the host waits for an ACK before it sends a new SYNC; doubled after each resend.
#: A SYNC can be lost: the guest relay drops what the port received while it reopens the
#: port after a host disconnect (closing a virtio-console port discards its input), and a VM
#: restored from a template sees exactly that disconnect as the first host connects. Not
#: shorter: a restored guest on a loaded TCG host took up to 1.3 s to answer a SYNC it did
#: get, and each needless resend costs the guest a session torn down and opened again.
RESEND_AFTER = 2.0


def host_handshake(
    sock: socket.socket, timeout: float, on_resend: Callable[[float], None] | None = None
) -> bytes:
    """Run the host side of the handshake on a connected socket.

    Sends a SYNC with a fresh nonce, and another with a new nonce whenever no ACK came within
    :data:`RESEND_AFTER` s (then twice that); only the ACK of the latest SYNC counts,
    since the guest opens a new session for every SYNC it reads and answers each. Returns the
    bytes that arrived after that ACK line (the start of the guest's HTTP/2 stream), which the
    caller must deliver before anything else read from ``sock``. Raises
    :class:`HandshakeError` when no matching ACK arrives within ``timeout`` seconds, on EOF,
    or after :data:`MAX_DISCARD_BYTES` of stale bytes. ``on_resend`` is called with the
    seconds waited so far before each SYNC after the first.
    """
    started = time.monotonic()
    deadline = started + timeout
    resend_after = RESEND_AFTER
    window = b""
    discarded = 0
    expected = b""
    resend_at = 0.0
    while True:
        now = time.monotonic()
        if now >= resend_at:
            if expected and on_resend is not None:
                on_resend(now - started)
            nonce = new_nonce()
            expected = ACK_PREFIX + nonce.encode() + b"\n"
            try:
                sock.sendall(sync_line(nonce))
            except OSError as exc:
                raise HandshakeError(f"agent channel closed during the handshake: {exc}") from exc
            resend_at = now + resend_after
            resend_after *= 2
        remaining = deadline - now
        if remaining <= 0:
            raise HandshakeError(f"agent did not answer the channel handshake within {timeout:g}s")
        sock.settimeout(max(0.001, min(remaining, resend_at - now)))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError as exc:
            raise HandshakeError(f"agent channel closed during the handshake: {exc}") from exc
        if not chunk:
            raise HandshakeError("agent channel closed during the handshake")
        data = window + chunk
        index = data.find(expected)
        if index >= 0:
            sock.settimeout(None)
            return data[index + len(expected) :]
        discarded += len(chunk)
        if discarded > MAX_DISCARD_BYTES:
            raise HandshakeError("agent channel sent too many bytes without a handshake reply")
        window = data[-(len(expected) + SYNC_WINDOW_BYTES) :]
