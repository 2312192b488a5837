"""Guest side of the virtio-serial transport: relays the port to the local gRPC server.

The port is one byte pipe shared by successive host connections. The relay loops forever:
wait for a SYNC line (discarding stale bytes, see :mod:`agentapi.channel`), answer ACK, open a
fresh connection to the agent's gRPC server on a guest-local unix socket, and pump bytes both
ways until the host disconnects — then start over. One session at a time.

A host disconnect shows as EOF on the port, and the port then stays at EOF until it is
reopened, so the relay reopens it. Writes are non-blocking (a write while no host is connected
would otherwise block forever), so a session can always be torn down promptly.
"""

from __future__ import annotations

import contextlib
import errno
import faulthandler
import os
import select
import socket
import threading
import time
from pathlib import Path

from agentapi.channel import SERIAL_PORT_NAME, SyncScanner, ack_line

_CHUNK = 65536
#: What the writer takes from the gRPC server per read (guest to host: the bulk of stdout).
_UPSTREAM_CHUNK = 1024 * 1024
_REOPEN_BACKOFF = (0.02, 0.05, 0.1, 0.2)
#: A relay loop that has not turned for this long (seconds) dumps every thread's stack once.
STALL_DUMP_SECONDS = 30.0
#: The loop re-arms that dump at most this often (seconds): each arming starts a thread.
STALL_REARM_SECONDS = 5.0


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


class _Session:
    """One host connection: the upstream socket and the thread copying it to the port."""

    def __init__(self, fd: int, upstream: socket.socket, lock: threading.Lock) -> None:
        self.fd = fd
        self.upstream = upstream
        self.closed = threading.Event()
        self._lock = lock
        self.writer = threading.Thread(target=self._pump, name="serial-writer", daemon=True)

    def write(self, data: bytes) -> bool:
        """Write all of ``data`` to the port; False if the session closed first."""
        with self._lock:
            view = memoryview(data)
            while view:
                if self.closed.is_set():
                    return False
                try:
                    view = view[os.write(self.fd, view) :]
                except BlockingIOError:
                    select.select([], [self.fd], [], 0.1)
                except OSError:
                    return False
        return True

    def _pump(self) -> None:
        while not self.closed.is_set():
            try:
                data = self.upstream.recv(_UPSTREAM_CHUNK)
            except OSError:
                return
            if not data or not self.write(data):
                return

    def close(self) -> None:
        self.closed.set()
        with contextlib.suppress(OSError):
            self.upstream.shutdown(socket.SHUT_RDWR)
        self.writer.join(5.0)
        self.upstream.close()


class SerialRelay:
    """Relays the serial port at ``port_path`` to the unix socket ``server_path``."""

    def __init__(self, port_path: Path, server_path: str) -> None:
        self._port_path = port_path
        self._server_path = server_path
        self._write_lock = threading.Lock()

    def _open(self) -> int:
        return os.open(self._port_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)

    def serve_forever(self) -> None:
        """Run the relay; never returns under normal operation."""
        fd = self._open()
        scanner = SyncScanner()
        session: _Session | None = None
        idle_eofs = 0
        rearm_at = 0.0
        while True:
            if (now := time.monotonic()) >= rearm_at:
                _arm_stall_dump()
                rearm_at = now + STALL_REARM_SECONDS
            readable, _, _ = select.select([fd], [], [], 1.0)
            if not readable:
                continue
            try:
                chunk = os.read(fd, _CHUNK)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EINTR):
                    continue
                chunk = b""
            if not chunk:
                # The host went away (or none is connected yet): end the session and reopen
                # the port, which otherwise stays at EOF.
                if session is not None:
                    _log("host disconnected; session closed")
                    session.close()
                    session = None
                os.close(fd)
                time.sleep(_REOPEN_BACKOFF[min(idle_eofs, len(_REOPEN_BACKOFF) - 1)])
                idle_eofs += 1
                fd = self._open()
                scanner = SyncScanner()
                continue
            idle_eofs = 0
            found = scanner.feed(chunk)
            if found is not None:
                # A SYNC opens a session; one arriving mid-session means the host reconnected
                # without the port ever reading EOF.
                if session is not None:
                    session.close()
                nonce, chunk = found
                session = self._open_session(fd, nonce)
            if session is None or not chunk:
                continue
            try:
                session.upstream.sendall(chunk)
            except OSError:
                session.close()
                session = None
                scanner = SyncScanner()

    def _open_session(self, fd: int, nonce: str) -> _Session | None:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(self._server_path)
        except OSError as exc:
            _log(f"cannot reach the local gRPC server: {exc}")
            upstream.close()
            return None
        session = _Session(fd, upstream, self._write_lock)
        if not session.write(ack_line(nonce)):
            session.close()
            return None
        session.writer.start()
        _log(f"host session {nonce[:8]} opened")
        return session


def _arm_stall_dump() -> None:
    """(Re)arm faulthandler's watchdog: if the loop does not re-arm it within
    :data:`STALL_DUMP_SECONDS`, the Python stack of every thread goes to the console (fd 2).
    CPython starts a new watchdog thread on every arming, so the loop re-arms at most every
    :data:`STALL_REARM_SECONDS`, not per chunk: a stall is reported 25 to 30 s after it began.

    The loop turns at least once a second; a loop that stops stops every RPC of the pod, and
    the console log (kept by the host on failure) is then the only evidence of where the
    agent is stuck. faulthandler's watchdog is a C thread: it dumps even when no Python
    thread can run.
    """
    with contextlib.suppress(ValueError, OSError):  # diagnostics never stop the relay
        faulthandler.dump_traceback_later(STALL_DUMP_SECONDS, repeat=False, file=2)


def _log(message: str) -> None:
    """One line on the guest console (rare events only: session changes)."""
    print(f"pysandbox-agent: channel: {message}", flush=True)
