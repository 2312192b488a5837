"""Guest side of the output ports: a process's stdout/stderr written straight to a
virtio-serial port, past gRPC (:mod:`agentapi.stream_wire`, docs/stream-ports.md).

Each byte then costs the guest a read from the process's pipe and a write to the port (the
driver copies it into a buffer QEMU reads), instead of also going through a protobuf
message, HTTP/2 framing, a unix socket and the channel relay.

Flow control is the port's: a host reader that does not read makes QEMU stop taking the
port's buffers, the port's queue fills, and the writer waits in poll(2) — for that port only.
The writer also waits on ``stop`` (the RPC ended): it never blocks for good.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import threading
from collections.abc import Iterable
from pathlib import Path

from agentapi.stream_wire import (
    END_FRAME,
    HEADER,
    MAX_FRAME_BYTES,
    PORT_COUNT,
    opening_line,
    port_name,
)

#: How long a request waits for the previous writer of the same port to let go, seconds.
#: The host hands a port to one reader at a time, so only a writer whose reader just went
#: away (its RPC being cancelled) can still hold it.
BUSY_WAIT = 2.0


class Stopped(Exception):
    """The RPC ended while the writer waited for the port."""


class OutputPort:
    """One port: its device node, the lock its writer holds, its fd once opened."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.fd: int | None = None
        self._frame: mmap.mmap | None = None

    @property
    def frame(self) -> mmap.mmap:
        """One frame's room (header and largest payload), made on first use and kept.
        Anonymous memory: a page costs RAM only once output was read into it (a bytearray
        would be zero-filled, all of it, on every pod that ever streamed)."""
        if self._frame is None:
            self._frame = mmap.mmap(-1, HEADER.size + MAX_FRAME_BYTES)
        return self._frame

    @property
    def payload(self) -> memoryview:
        """Where a frame's payload goes: what the writer reads the process's output into,
        so that header and payload leave in one write."""
        return memoryview(self.frame)[HEADER.size :]

    def open(self) -> int:
        if self.fd is None:
            # Kept open for the agent's life: the writes of one stream never reopen it.
            self.fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        return self.fd


class OutputPorts:
    """The guest's output ports (found by name in sysfs on first use)."""

    def __init__(self, sysfs: Path = Path("/sys"), dev: Path = Path("/dev")) -> None:
        self._sysfs = sysfs
        self._dev = dev
        self._lock = threading.Lock()
        self._ports: dict[int, OutputPort] | None = None

    def _scan(self) -> dict[int, OutputPort]:
        found: dict[int, OutputPort] = {}
        names = {port_name(index): index for index in range(PORT_COUNT)}
        root = self._sysfs / "class" / "virtio-ports"
        with contextlib.suppress(OSError):
            for entry in root.iterdir():
                with contextlib.suppress(OSError):
                    index = names.get((entry / "name").read_text().strip())
                    if index is not None:
                        found[index] = OutputPort(self._dev / entry.name)
        return found

    def acquire(self, index: int) -> OutputPort | None:
        """Port ``index`` locked for the caller (who must release ``port.lock``), or None if
        there is no such port or it stays busy for :data:`BUSY_WAIT` seconds."""
        with self._lock:
            if self._ports is None:
                self._ports = self._scan()
            port = self._ports.get(index)
        if port is None or not port.lock.acquire(timeout=BUSY_WAIT):
            return None
        try:
            port.open()
        except OSError:
            port.lock.release()
            return None
        return port


def _wait_writable(fd: int, stop: int | None) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if stop is not None:
        poller.register(stop, select.POLLIN)
    for ready, _events in poller.poll():
        if ready == stop:
            raise Stopped
    # POLLOUT (or an error the next write reports)


def _write_all(fd: int, data: bytes | memoryview, stop: int | None) -> None:
    """Write all of ``data`` to the non-blocking port ``fd`` (the driver takes at most 32 KiB
    a write), waiting while its queue is full; Stopped once ``stop`` is readable."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            _wait_writable(fd, stop)


def write_stream(
    port: OutputPort, nonce: str, chunks: Iterable[bytes | memoryview], stop: int | None
) -> None:
    """Write the opening line, one frame per chunk, then the end frame. Each chunk must be
    the start of :attr:`OutputPort.payload` (what was just read into it): the header goes in
    front of it, and the frame leaves without a copy. Stopped when ``stop`` became readable
    (the port may then hold part of a frame: the next reader discards it); OSError if the
    port fails."""
    fd = port.open()
    frame = port.frame
    whole = memoryview(frame)
    _write_all(fd, opening_line(nonce), stop)
    for data in chunks:
        size = len(data)
        HEADER.pack_into(frame, 0, size)
        _write_all(fd, whole[: HEADER.size + size], stop)
    _write_all(fd, END_FRAME, stop)
