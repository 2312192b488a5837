"""A container process's stdio between host file descriptors and the agent's stdio RPCs."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import stat
import threading
import time
from collections.abc import Iterable
from typing import Protocol


class StdioClient(Protocol):
    """The agent calls a :class:`StdioRelay` makes (those of
    :class:`~sandbox.pod.agent_client.ContainerClient`, or of the agent proxy's own
    :class:`~sandbox.pod.proxy_client.ProxyClient`)."""

    def read_stream(self, container_id: str, exec_id: str, which: str) -> Iterable[bytes]: ...
    def close_output(self, container_id: str, exec_id: str, which: str) -> bool: ...
    def signal(self, container_id: str, exec_id: str, signum: int, all: bool = False) -> None: ...
    def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> None: ...
    def close_stdin(self, container_id: str, exec_id: str = "") -> None: ...


class StdioRelay:
    """Copies a process's stdout/stderr from the agent to host fds, and host stdin to it.

    ``start()`` launches one thread per stream; ``join()`` waits until both output streams
    ended (the agent ends them once the process exited and what it wrote was read), so no
    output is lost.

    ``output_limit`` (bytes): regular files among the output fds do not grow beyond it, as
    if the writer had that RLIMIT_FSIZE (the agent proxy writes for a shim that has it);
    output beyond is read and dropped. A write failing with EFBIG (this process's own
    limit) is handled the same way.
    """

    def __init__(
        self,
        client: StdioClient,
        container_id: str,
        exec_id: str,
        stdin: int | None,
        stdout: int,
        stderr: int,
        terminal: bool,
        output_limit: int | None = None,
    ) -> None:
        self._client = client
        self._ids = (container_id, exec_id)
        self._stdin, self._stdout, self._stderr = stdin, stdout, stderr
        self._terminal = terminal
        self._limit = output_limit
        self._threads: list[threading.Thread] = []
        self._stop_r, self._stop_w = -1, -1
        self._stop_lock = threading.Lock()
        self.errors: list[BaseException] = []

    def start(self) -> None:
        streams = [("stdout", self._stdout)]
        if not self._terminal:
            streams.append(("stderr", self._stderr))
        for which, fd in streams:
            thread = threading.Thread(target=self._copy_out, args=(which, fd), daemon=True)
            thread.start()
            self._threads.append(thread)
        if self._stdin is not None:
            # A copy of its own, and a pipe that stops it: the caller may close its fds
            # while the copy waits for input (and the numbers be reused at once).
            stdin = os.dup(self._stdin)
            self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
            threading.Thread(target=self._copy_in, args=(stdin, self._stop_r), daemon=True).start()

    def _copy_out(self, which: str, fd: int) -> None:
        # Keep draining, drop the rest, once the output file reached its size limit or the
        # reader of ``fd`` is gone (EPIPE: the process's own writes fail so, see _reader_gone).
        full = gone = False
        try:
            for data in self._client.read_stream(*self._ids, which):
                if full or gone:
                    continue
                try:
                    room = _room(fd, self._limit)
                    if room is not None and room < len(data):
                        full = True
                        data = data[:room]
                    _write_all(fd, data)
                except BrokenPipeError:
                    gone = True
                    self._reader_gone(which)
                except OSError as exc:
                    if exc.errno != errno.EFBIG:
                        raise
                    full = True
        except BaseException as exc:  # reported by join()
            self.errors.append(exc)

    def _reader_gone(self, which: str) -> None:
        """The reader of ``which``'s host fd closed it (``run … | head``). Under runc the
        process writes to that pipe itself, so its next write fails with EPIPE and raises
        SIGPIPE (pipe(7)). Here the agent is told to drop its end of the process's pipe
        (CloseOutput), with the same effect in the guest; what was still on the way is
        drained and dropped. An agent older than that call (protocol < 1.10) gets SIGPIPE
        sent to the process instead (ignored by a container's PID 1 without a handler, so
        such a writer goes on writing into the void)."""
        with contextlib.suppress(Exception):  # the process is gone already: nothing to stop
            if not self._client.close_output(*self._ids, which):
                self._client.signal(*self._ids, signal.SIGPIPE)

    def _copy_in(self, stdin: int, stop: int) -> None:
        """Copy ``stdin`` (ours: closed here) to the process until EOF, then close the
        process's stdin; or until ``stop`` is readable (:meth:`stop_input`): then what has
        not been read stays for the next reader of that input (a shell's terminal)."""
        poller = select.poll()
        poller.register(stdin, select.POLLIN)
        poller.register(stop, select.POLLIN)
        try:
            with contextlib.suppress(BaseException):
                while True:
                    ready = {fd for fd, _ in poller.poll()}
                    if stop in ready:
                        return
                    data = os.read(stdin, 65536)
                    if not data:
                        break
                    self._client.write_stdin(*self._ids, data)
            with contextlib.suppress(BaseException):
                self._client.close_stdin(*self._ids)
        finally:
            os.close(stdin)
            os.close(stop)

    def stop_input(self) -> None:
        """Stop copying stdin (the process is gone): input not read yet is left to the
        next reader. Idempotent."""
        with self._stop_lock:  # called from two threads: close once
            if self._stop_w >= 0:
                os.close(self._stop_w)  # EOF on the stop pipe
                self._stop_w = -1

    def join(self, timeout: float | None = None) -> None:
        """Wait until the output streams ended, ``timeout`` seconds at most for all of them."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))


def _room(fd: int, limit: int | None) -> int | None:
    """Bytes ``fd`` may still take under ``limit`` (None: no bound): only regular files are
    bounded, from the offset the next write lands at (the end with O_APPEND)."""
    if limit is None:
        return None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        return None
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:
        offset = info.st_size
    else:
        offset = os.lseek(fd, 0, os.SEEK_CUR)
    return max(0, limit - offset)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
