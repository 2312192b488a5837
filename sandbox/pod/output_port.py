"""Host side of the output ports: a process's stdout/stderr read from a virtio-serial port's
socket instead of gRPC messages (:mod:`agentapi.stream_wire`, docs/stream-ports.md).

A pod's directory has ``stream-N.sock`` (QEMU listens; one connection at a time) and, made
on first use, ``stream-N.lock``. Every host process that relays output (the CLI's foreground
``run``, the agent proxy for shims and attached execs) leases a free port by taking that
lock (flock, released when the holder dies), connects, then asks the agent for the stream on
that port. When no port is free, or the pod's VM has none (made by an older pysandbox), the
caller streams over gRPC as before.

The guest is untrusted: frames are bounded (:class:`~agentapi.stream_wire.FrameReader`),
the bytes before the opening line are bounded, and once the agent's call ended the end frame
must arrive within :data:`TAIL_TIMEOUT` seconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import select
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

from agentapi.stream_wire import PORT_COUNT, FrameReader, StreamError

#: Seconds the host waits, once the agent's call ended, for the bytes still in the port up to
#: the end frame (the agent wrote them before it ended the call).
TAIL_TIMEOUT = 30.0
#: Bytes read from the port's socket at once (the socket holds ~200 KiB at most).
READ_BYTES = 256 * 1024


class PortLease:
    """Output port ``index`` held by this process and connected (close() gives it back)."""

    def __init__(self, index: int, lock_fd: int, sock: socket.socket) -> None:
        self.index = index
        self.sock = sock
        self._lock_fd = lock_fd

    def close(self) -> None:
        """Disconnect and release the lock. Idempotent."""
        self.sock.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def lease(directory: Path, count: int = PORT_COUNT) -> PortLease | None:
    """A free output port of the pod in ``directory``, connected; None when all are taken or
    the VM has none."""
    for index in range(count):
        path = directory / f"stream-{index}.sock"
        if not path.exists():
            return None  # a VM without output ports: none of them exists
        try:
            lock_fd = os.open(
                directory / f"stream-{index}.lock",
                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                0o600,
            )
        except OSError:
            return None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            continue
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(5.0)
            sock.connect(str(path))
            sock.setblocking(False)
        except OSError:
            sock.close()
            os.close(lock_fd)
            continue
        return PortLease(index, lock_fd, sock)
    return None


def read_frames(
    sock: socket.socket,
    nonce: str,
    ended: int,
    outcome: Callable[[], BaseException | None],
    tail_timeout: float = TAIL_TIMEOUT,
) -> Iterator[bytes]:
    """The stream's bytes from the port ``sock`` (non-blocking) up to the end frame.

    ``ended`` is an fd that becomes readable when the agent's call ended; ``outcome()`` then
    tells how: None (it ended normally: the end frame is on its way) or the exception to
    raise. StreamError on a broken stream, on EOF before the end frame (QEMU went away), or
    when the end frame did not come within ``tail_timeout`` seconds after the call ended.
    """
    reader = FrameReader(nonce)
    # Anonymous memory: untouched until bytes come (a relay of an idle run's stream holds
    # one for the run's life; a bytearray would be zero-filled at once).
    buffer = mmap.mmap(-1, READ_BYTES)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(ended, select.POLLIN)
    call_over = False
    while not reader.ended:
        ready = poller.poll(tail_timeout * 1000 if call_over else None)
        if not ready:
            raise StreamError(f"the output port's stream did not end within {tail_timeout:g}s")
        if not call_over and any(fd == ended for fd, _ in ready):
            call_over = True
            poller.unregister(ended)
            error = outcome()
            if error is not None:
                raise error
        try:
            count = sock.recv_into(buffer)
        except BlockingIOError:
            continue
        except OSError as exc:
            raise StreamError(f"the output port failed: {exc}") from exc
        if not count:
            raise StreamError("the output port closed before its stream ended")
        for piece in reader.feed(memoryview(buffer)[:count]):
            yield bytes(piece)


@contextlib.contextmanager
def leased(directory: Path | None) -> Iterator[PortLease | None]:
    """:func:`lease` for the block (None without ``directory``)."""
    port = lease(directory) if directory is not None else None
    try:
        yield port
    finally:
        if port is not None:
            port.close()
