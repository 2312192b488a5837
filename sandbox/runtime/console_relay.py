"""runc's foreground ``run`` of a terminal process without ``--console-socket``.

runc asks for a console socket only when it detaches; in the foreground it takes the
container's pty itself and relays it to its own stdin and stdout (runc(8) ``run``; the
bundle ``runc spec`` writes has ``terminal: true``). :class:`ConsoleRelay` does the same for
``pysandbox run --bundle``: it listens on a console socket of its own in a private temporary
directory, receives the pty master the shim sends there during ``create`` (the console-socket
protocol: one message with the fd attached, ``SCM_RIGHTS``), copies this process's terminal
size to it before ``start`` (so the process starts with the caller's size) and again on
SIGWINCH, and relays bytes both ways, the caller's terminal in raw mode, until the pty closes
(the shim, which holds its other side, exits with the container's process).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import termios
import tty
from pathlib import Path
from types import TracebackType

from sandbox.errors import RunError

#: Seconds ``create`` may take to send the pty master after it returned.
RECEIVE_TIMEOUT = 30.0
_CHUNK = 65536


class ConsoleRelay:
    """A console socket (:attr:`path`) and the relay of the pty sent to it. A context
    manager: leaving it closes the socket, the master and the temporary directory."""

    def __init__(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="psb-console-"))
        self.path = self._dir / "console.sock"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.path))
        self._listener.listen(1)
        self._master: int | None = None

    def __enter__(self) -> ConsoleRelay:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._listener.close()
        if self._master is not None:
            os.close(self._master)
            self._master = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def receive(self, timeout: float = RECEIVE_TIMEOUT) -> None:
        """Take the pty master ``create`` sent (RunError if none came within ``timeout``
        seconds) and give it this process's terminal size."""
        self._listener.settimeout(timeout)
        try:
            conn, _ = self._listener.accept()
            with conn:
                conn.settimeout(timeout)
                _msg, fds, _flags, _addr = socket.recv_fds(conn, 4096, 1)
        except OSError as exc:
            raise RunError(f"the container's terminal did not arrive: {exc}") from None
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise RunError("the container's terminal did not arrive (no fd on the console socket)")
        self._master = fds[0]
        self._copy_size()

    def _copy_size(self) -> None:
        if self._master is None or not os.isatty(sys.stdin.fileno()):
            return
        with contextlib.suppress(OSError):
            size = fcntl.ioctl(sys.stdin.fileno(), termios.TIOCGWINSZ, b"\0" * 8)
            fcntl.ioctl(self._master, termios.TIOCSWINSZ, size)

    def relay(self) -> None:
        """Copy stdin to the pty and the pty to stdout until the pty closes (EIO/EOF once
        the shim, holding its other side, is gone); stdin's EOF stops only that direction."""
        master = self._master
        if master is None:
            raise RunError("the container's terminal was not received")
        stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
        raw = os.isatty(stdin)
        saved = termios.tcgetattr(stdin) if raw else None
        previous = signal.signal(signal.SIGWINCH, lambda *_: self._copy_size())
        try:
            if raw:
                tty.setraw(stdin)
            self._pump(master, stdin, stdout)
        finally:
            signal.signal(signal.SIGWINCH, previous)
            if saved is not None:
                termios.tcsetattr(stdin, termios.TCSADRAIN, saved)

    @staticmethod
    def _pump(master: int, stdin: int, stdout: int) -> None:
        poller = select.poll()
        poller.register(master, select.POLLIN)
        poller.register(stdin, select.POLLIN)
        while True:
            try:
                events = poller.poll()
            except InterruptedError:
                continue
            for fd, _event in events:
                try:
                    data = os.read(fd, _CHUNK)
                except OSError as exc:
                    if fd == master and exc.errno == errno.EIO:
                        return  # the other side is closed: the container's process ended
                    raise
                if fd == master:
                    if not data:
                        return
                    _write_all(stdout, data)
                elif data:
                    _write_all(master, data)
                else:
                    poller.unregister(stdin)  # EOF: nothing more to type


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
