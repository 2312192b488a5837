"""The agent's side of the runtime zygote (:mod:`agent.oci.zygote`).

The agent starts one zygote at boot, before it reports ready (so a template VM is saved with
a zygote that has finished its imports), and asks it for each container init and exec
instead of spawning a fresh ``python3 -m agent.oci.init``/``exec``. When the zygote is
missing, dead, or does not answer within :data:`REQUEST_TIMEOUT`, :meth:`Zygote.spawn`
returns None and the caller spawns the runtime as before: the zygote only makes things
faster, never decides whether they work.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading

from agent import pid1

#: How long one fork request may take (two forks of a ~20 MiB process).
REQUEST_TIMEOUT = 10.0
#: How long a spawn waits for a zygote that is still importing (e.g. just restored).
READY_TIMEOUT = 30.0
#: The request for a spare runtime ahead (:meth:`Zygote.spare_ahead`; no fds attached).
SPARE_AHEAD = b"spare-ahead"


class Zygote:
    """One zygote process, child of the agent. Thread-safe (requests are serialised)."""

    def __init__(self, reaper: pid1.Reaper, env: dict[str, str]) -> None:
        self._reaper = reaper
        self._env = env
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._pid: int | None = None
        self._ready = False
        self._dead = threading.Event()

    @property
    def pid(self) -> int | None:
        return self._pid

    def start(self) -> None:
        """Spawn the zygote (it imports the runtime in the background); OSError if it
        cannot be spawned."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.set_inheritable(False)
        try:
            self._pid = os.posix_spawn(
                sys.executable,
                [sys.executable, "-m", "agent.oci.zygote"],
                self._env,
                file_actions=[(os.POSIX_SPAWN_DUP2, theirs.fileno(), 3)],
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours
        self._reaper.watch(self._pid, lambda _status: self._dead.set())

    def wait_ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the zygote's ``ready``; whether it is ready."""
        with self._lock:
            return self._wait_ready_locked(timeout)

    def _wait_ready_locked(self, timeout: float) -> bool:
        if self._ready:
            return True
        if self._sock is None or self._dead.is_set():
            return False
        self._sock.settimeout(timeout)
        try:
            message = self._sock.recv(64)
        except TimeoutError:
            return False
        except OSError:
            message = b""
        if message != b"ready":
            self._give_up()
            return False
        self._ready = True
        return True

    def spawn(
        self, module: str, args: list[str], fds: tuple[int, int, int, int, int]
    ) -> int | None:
        """Fork ``python3 -m module args`` with ``fds`` as its 0-4; its pid, or None when the
        zygote cannot serve (the caller spawns the runtime itself)."""
        with self._lock:
            if not self._wait_ready_locked(READY_TIMEOUT):
                return None
            assert self._sock is not None
            request = json.dumps({"module": module, "args": args}).encode()
            try:
                self._sock.settimeout(REQUEST_TIMEOUT)
                socket.send_fds(self._sock, [request], list(fds))
                reply = self._sock.recv(256)
            except OSError:  # TimeoutError included: a stuck zygote is not used again
                self._give_up()
                return None
            if reply.isdigit():
                return int(reply)
            if not reply:
                self._give_up()
            return None

    def spare_ahead(self) -> bool:
        """Ask the zygote to fork its spare runtime once it idles (:mod:`agent.oci.zygote`,
        "A spare runtime"), ahead of the first request, which it otherwise waits for. Only
        once the VM's CRNG is its own (after ``Restored``). Whether the zygote took it."""
        with self._lock:
            if not self._wait_ready_locked(READY_TIMEOUT):
                return False
            assert self._sock is not None
            try:
                self._sock.settimeout(REQUEST_TIMEOUT)
                self._sock.send(SPARE_AHEAD)
                reply = self._sock.recv(256)
            except OSError:
                self._give_up()
                return False
            if not reply:
                self._give_up()
            return reply == b"ok"

    def _give_up(self) -> None:
        """Stop using the zygote: kill it (the reaper collects it), close our end."""
        self._ready = False
        if self._pid is not None and not self._dead.is_set():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
