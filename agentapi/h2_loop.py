"""A small single-threaded event loop for HTTP/2 connections: the host's per-pod agent proxy
(sandbox/pod/grpc_relay.py) and the guest agent's gRPC server (agent/grpc_server.py).

One thread (:meth:`Loop.run`) owns every socket and every ``h2`` connection object; other
threads hand it work with :meth:`Loop.call_soon` (thread-safe, it wakes the loop through a
pipe). :class:`H2Socket` is one non-blocking socket and its ``h2.connection.H2Connection``:
what h2 has to send is buffered in ``outbuf`` and written as the socket takes it; while
``outbuf`` holds more than :data:`OUT_LIMIT` bytes the socket is not read (so a peer that
does not read cannot make this side buffer without bound: what it sends waits in the
kernel, and h2's answers to it, PINGs or SETTINGS ACKs, are not produced).

Only the loop thread may touch an :class:`H2Socket` or its ``conn``; after doing so it calls
:meth:`H2Socket.touch`, and the loop writes what is due once the current event is handled.

Why not asyncio: the proxy runs once per pod and the agent in every guest, and their
resident size is what they are measured by (issue 12); asyncio's import (with grpc.aio and
protobuf's pure-Python messages, the proxy's lazy imports avoided ~3.5 MiB of own pages,
agentapi/lazy_import.py) would be most of what this replaces; this loop is ``selectors``
(what asyncio itself runs on), timers and a wake-up pipe.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import selectors
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

#: Bytes an :class:`H2Socket` may hold unwritten before it stops reading its peer (and
#: the relay stops moving more data into it: :meth:`H2Socket.room`).
OUT_LIMIT = 1024 * 1024
#: Bytes read from a socket at a time.
READ_CHUNK = 65536


class Timer:
    """A callback due at a monotonic time (:meth:`Loop.call_at`); :meth:`cancel` drops it."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Writer(Protocol):
    """What :meth:`Loop.mark` takes: something with output to write once an event is handled."""

    def write_out(self) -> None: ...


class Loop:
    """An event loop: file descriptors (each with a callback taking the ready mask), timers,
    and callbacks from other threads. ``name`` prefixes its lines on stderr."""

    def __init__(self, name: str = "agent-proxy") -> None:
        self.name = name
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._drain_wake)
        self._soon: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._dirty: dict[Writer, None] = {}
        self._stopped = False
        self.thread: threading.Thread | None = None

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` in the loop thread (any thread may call this)."""
        with self._lock:
            if self._wake_w < 0:
                return  # stopped
            self._soon.append(callback)
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"\0")

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        """Run ``callback`` at monotonic time ``when`` (loop thread only)."""
        timer = Timer(when, callback)
        heapq.heappush(self._timers, (when, next(self._seq), timer))
        return timer

    def mark(self, writer: Writer) -> None:
        """Call ``writer.write_out()`` once the current event is handled (loop thread only)."""
        self._dirty[writer] = None

    def unmark(self, writer: Writer) -> None:
        """Undo :meth:`mark` (a closed writer; loop thread only)."""
        self._dirty.pop(writer, None)

    def _drain_wake(self, _mask: int) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass

    def start(self) -> None:
        """Run the loop in a daemon thread of its own."""
        self.thread = threading.Thread(target=self.run, name="h2-loop", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop the loop (any thread): it closes every socket it has and returns."""

        def stopping() -> None:
            self._stopped = True

        self.call_soon(stopping)
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()

    def run(self) -> None:
        """Run until :meth:`stop`; an exception of a callback is logged and the loop goes on."""
        while not self._stopped:
            timeout: float | None = None
            if self._soon:
                timeout = 0.0
            elif self._timers:
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
            for key, mask in self.selector.select(timeout):
                self._guarded(key.data, mask)
                self._flush_dirty()
            while self._soon:
                with self._lock:
                    callback = self._soon.popleft()
                self._guarded(callback)
                self._flush_dirty()
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                timer = heapq.heappop(self._timers)[2]
                if not timer.cancelled:
                    self._guarded(timer.callback)
                    self._flush_dirty()
        for key in list(self.selector.get_map().values()):
            if isinstance(key.fileobj, socket.socket):
                key.fileobj.close()
        self.selector.close()
        with self._lock:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_w = -1

    def _guarded(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception as exc:  # a bug here must not stop every call of the pod
            import traceback

            print(f"{self.name}: internal error: {exc!r}", file=sys.stderr, flush=True)
            traceback.print_exc(file=sys.stderr)

    def _flush_dirty(self) -> None:
        while self._dirty:
            h2sock = next(iter(self._dirty))
            del self._dirty[h2sock]
            h2sock.write_out()


class H2Socket:
    """A non-blocking socket and its h2 connection, registered with ``loop``.

    ``on_events(events)`` gets what h2 made of each read; ``on_closed()`` is called once
    when the connection ends (EOF, an error, a protocol violation, :meth:`close`).
    ``on_drained()`` is called when ``outbuf`` fell below :data:`OUT_LIMIT` after being
    above it (the relay then moves more data in).
    """

    def __init__(
        self,
        loop: Loop,
        sock: socket.socket,
        conn: Any,
        on_events: Callable[[list[Any]], None],
        on_closed: Callable[[], None],
        on_drained: Callable[[], None],
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.conn = conn
        self.outbuf = bytearray()
        self.closed = False
        self._on_events = on_events
        self._on_closed = on_closed
        self._on_drained = on_drained
        self._mask = selectors.EVENT_READ
        sock.setblocking(False)
        loop.selector.register(sock, self._mask, self._ready)

    def room(self) -> bool:
        """Whether more may be sent on this connection now (``outbuf`` under the limit)."""
        return not self.closed and len(self.outbuf) < OUT_LIMIT

    def touch(self) -> None:
        """h2 may have something to send: write it once the current event is handled."""
        if not self.closed:
            self.loop.mark(self)

    def feed(self, data: bytes) -> None:
        """Hand ``data`` (read by someone else: a handshake's leftover) to h2."""
        self._received(data)

    def _ready(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self.write_out()
        if mask & selectors.EVENT_READ and not self.closed and len(self.outbuf) < OUT_LIMIT:
            try:
                data = self.sock.recv(READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self.close()
                return
            self._received(data)

    def _received(self, data: bytes) -> None:
        import h2.exceptions

        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            print(f"{self.loop.name}: HTTP/2 protocol error: {exc}", file=sys.stderr, flush=True)
            with contextlib.suppress(Exception):
                self.conn.close_connection()
                self.outbuf += self.conn.data_to_send()
                self.sock.send(self.outbuf)
            self.close()
            return
        self.touch()
        self._on_events(events)

    def write_out(self) -> None:
        """Write what h2 has to send, as much as the socket takes now."""
        if self.closed:
            return
        before = len(self.outbuf)
        self.outbuf += self.conn.data_to_send()
        if self.outbuf:
            try:
                sent = self.sock.send(self.outbuf)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.close()
                return
            del self.outbuf[:sent]
        self._interest()
        if before >= OUT_LIMIT > len(self.outbuf):
            self._on_drained()

    def _interest(self) -> None:
        mask = 0
        if len(self.outbuf) < OUT_LIMIT:
            mask |= selectors.EVENT_READ
        if self.outbuf:
            mask |= selectors.EVENT_WRITE
        if mask != self._mask:  # never 0: a full outbuf is not empty
            self._mask = mask
            self.loop.selector.modify(self.sock, mask, self._ready)

    def close(self) -> None:
        """End the connection (idempotent): the socket is closed, ``on_closed`` called."""
        if self.closed:
            return
        self.closed = True
        self.loop.unmark(self)
        with contextlib.suppress(KeyError, ValueError):
            self.loop.selector.unregister(self.sock)
        self.sock.close()
        self._on_closed()
