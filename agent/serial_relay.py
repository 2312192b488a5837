"""Guest side of the virtio-serial transport: relays the port to the local gRPC server.

The port is one byte pipe shared by successive host connections. The relay loops forever:
wait for a SYNC line (discarding stale bytes, see :mod:`agent.channel`), answer ACK, open a
fresh connection to the agent's gRPC server on a guest-local unix socket, and pump bytes both
ways until the host disconnects (the port reads EOF) — then start over. One session at a time.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import threading
import time
from pathlib import Path

from agent.channel import SERIAL_PORT_NAME, SyncScanner, ack_line

_CHUNK = 65536
_IDLE_POLL_SECONDS = 0.02


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


def _write_all(fd: int, data: bytes, lock: threading.Lock) -> None:
    with lock:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]


class SerialRelay:
    """Relays the serial port at ``port_path`` to the unix socket ``server_path``."""

    def __init__(self, port_path: Path, server_path: str) -> None:
        self._port_path = port_path
        self._server_path = server_path
        self._write_lock = threading.Lock()
        self._writer: threading.Thread | None = None

    def serve_forever(self) -> None:
        """Run the relay; never returns under normal operation."""
        fd = os.open(self._port_path, os.O_RDWR | os.O_CLOEXEC)
        scanner = SyncScanner()
        upstream: socket.socket | None = None
        while True:
            readable, _, _ = select.select([fd], [], [], 1.0)
            if not readable:
                continue
            try:
                chunk = os.read(fd, _CHUNK)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EINTR):
                    continue
                raise
            if not chunk:
                # Host went away (or none is connected): end the session, idle briefly.
                if upstream is not None:
                    _close(upstream)
                    upstream = None
                scanner = SyncScanner()
                time.sleep(_IDLE_POLL_SECONDS)
                continue
            if upstream is None:
                found = scanner.feed(chunk)
                if found is None:
                    continue
                nonce, rest = found
                upstream = self._open_session(fd, nonce)
                chunk = rest
                if not chunk:
                    continue
            else:
                # A new SYNC mid-session means the host reconnected without us seeing EOF.
                found = scanner.feed(chunk)
                if found is not None:
                    _close(upstream)
                    nonce, chunk = found
                    upstream = self._open_session(fd, nonce)
                    if not chunk:
                        continue
            try:
                upstream.sendall(chunk)
            except OSError:
                _close(upstream)
                upstream = None
                scanner = SyncScanner()

    def _open_session(self, fd: int, nonce: str) -> socket.socket:
        previous = self._writer
        if previous is not None:
            previous.join()  # its last bytes must precede our ACK
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.connect(self._server_path)
        _write_all(fd, ack_line(nonce), self._write_lock)
        writer = threading.Thread(
            target=self._pump_to_port, args=(upstream, fd), name="serial-writer", daemon=True
        )
        writer.start()
        self._writer = writer
        return upstream

    def _pump_to_port(self, upstream: socket.socket, fd: int) -> None:
        while True:
            try:
                data = upstream.recv(_CHUNK)
            except OSError:
                return
            if not data:
                return
            try:
                _write_all(fd, data, self._write_lock)
            except OSError:
                return


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
