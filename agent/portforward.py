"""PortForward in the guest: one TCP connection to a port of the pod network, relayed over the
agent channel (agent.proto ``PortForward``; the host side is sandbox/pod/portforward.py).

containerd's CRI PortForward dials ``localhost:PORT`` in the pod's network namespace, IPv4
first and IPv6 if that fails. Containers that share the pod network run in the guest's root
network namespace, the agent's, so :func:`connect` dials 127.0.0.1 and then ::1 here. Each
connection costs one gRPC worker thread (the reply generator) and one thread of its own (the
requests into the socket); :data:`MAX_CONNECTIONS` bound them.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

CONNECT_TIMEOUT = 5.0
#: Connections relayed at once; the agent's gRPC pool has room for these beside control RPCs.
MAX_CONNECTIONS = 8
#: Largest data message either way (agent.proto).
CHUNK = 64 * 1024


class PortForwardError(Exception):
    """A connection the agent refuses; ``code`` is the gRPC status name to answer with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


_slots = threading.BoundedSemaphore(MAX_CONNECTIONS)


@contextlib.contextmanager
def slot() -> Iterator[None]:
    """One of :data:`MAX_CONNECTIONS`; RESOURCE_EXHAUSTED when none is free."""
    if not _slots.acquire(blocking=False):
        raise PortForwardError(
            "RESOURCE_EXHAUSTED", f"at most {MAX_CONNECTIONS} forwarded connections at a time"
        )
    try:
        yield
    finally:
        _slots.release()


def connect(port: int, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    """A connection to ``port`` on the guest's loopback (127.0.0.1, then ::1).

    PortForwardError INVALID_ARGUMENT for a port outside 1..65535, UNAVAILABLE with both
    attempts' errors when neither connects.
    """
    if not 1 <= port <= 65535:
        raise PortForwardError("INVALID_ARGUMENT", f"port {port} is not in 1..65535")
    errors = []
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
        except OSError as exc:
            sock.close()
            errors.append(f"{host}: {exc.strerror or exc}")
            continue
        sock.settimeout(None)
        return sock
    raise PortForwardError(
        "UNAVAILABLE", f"cannot connect to port {port} in the pod: {'; '.join(errors)}"
    )


def feed(requests: Iterator[bytes], sock: socket.socket) -> None:
    """Write each request's data to ``sock``; at the end of the requests (the host's side
    closed for writing) shut ``sock`` down for writing. Stops quietly when the socket or the
    call goes away."""
    try:
        for data in requests:
            if data:
                sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except Exception:  # the call was cancelled or the guest side closed: the reader ends it
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def drain(sock: socket.socket) -> Iterator[bytes]:
    """What the guest side sends, in chunks of at most :data:`CHUNK`, until it closes."""
    while True:
        try:
            data = sock.recv(CHUNK)
        except OSError:
            return
        if not data:
            return
        yield data
