"""Processes identified by pid *and* start time, waitable from any process.

QEMU and virtiofsd outlive the CLI invocation that spawned them, so a later process must
wait for and signal a pid that is not its child. A pid alone can be reused; a
:class:`ProcessHandle` pairs it with the start time from ``/proc/<pid>/stat`` (field 22,
clock ticks since boot) and never signals a process whose start time differs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import subprocess

POLL_INTERVAL = 0.02


def start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot; None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    if not fields or fields[0] == b"Z":
        return None  # a zombie has exited; it only waits for its parent to reap it
    return int(fields[19])


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (kill(2) with signal 0; one owned by another user,
    EPERM, exists too). A pid alone can be reused: see :class:`ProcessHandle`."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap(pid: int) -> int | None:
    """Collect ``pid`` if it is our exited child; its wait status, or None."""
    with contextlib.suppress(ChildProcessError, OSError):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return status
    return None


class ProcessHandle:
    """A process we started (or re-attached to): ``pid`` + ``start`` time.

    All methods work from any process, child or not; none raises if the process is gone.
    Immutable, equal and hashed by both fields. (A plain class, not a frozen dataclass: every
    verb that finds a pod imports this module, and dataclasses cost ``exec`` ~8 ms.)
    """

    __slots__ = ("pid", "start")
    pid: int
    start: int

    def __init__(self, pid: int, start: int) -> None:
        object.__setattr__(self, "pid", pid)
        object.__setattr__(self, "start", start)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, ProcessHandle)
        return (self.pid, self.start) == (other.pid, other.start)

    def __hash__(self) -> int:
        return hash((self.pid, self.start))

    def __repr__(self) -> str:
        return f"ProcessHandle(pid={self.pid!r}, start={self.start!r})"

    def __reduce__(self) -> tuple[type[ProcessHandle], tuple[int, int]]:
        return ProcessHandle, (self.pid, self.start)  # copy and pickle through __init__

    @classmethod
    def of(cls, pid: int) -> ProcessHandle:
        """Handle of the live process ``pid``; ProcessLookupError if it is gone."""
        started = start_time(pid)
        if started is None:
            raise ProcessLookupError(pid)
        return cls(pid, started)

    @classmethod
    def from_json(cls, data: Any) -> ProcessHandle | None:
        """Parse :meth:`to_json` output; None for anything malformed."""
        if not isinstance(data, dict):
            return None
        pid, started = data.get("pid"), data.get("start")
        if isinstance(pid, int) and isinstance(started, int) and pid > 0:
            return cls(pid, started)
        return None

    def to_json(self) -> dict[str, int]:
        return {"pid": self.pid, "start": self.start}

    def alive(self) -> bool:
        """True while this very process exists and has not exited (zombies count as gone)."""
        return start_time(self.pid) == self.start

    def pidfd(self) -> int:
        """A pidfd (pidfd_open(2)) of this very process, for the caller to close: it polls
        readable once the process has exited. ProcessLookupError if it is gone (the pid
        may have been reused: the start time is checked after the pidfd is open), OSError
        where pidfds are missing (Linux < 5.3)."""
        fd = os.pidfd_open(self.pid)
        if not self.alive():
            os.close(fd)
            raise ProcessLookupError(self.pid)
        return fd

    def signal(self, signum: int) -> bool:
        """Send ``signum`` if the process is still this one; True if it was sent."""
        if not self.alive():
            return False
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            return False
        return True

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the process to end (reaping it if it is our
        child); True if it has ended."""
        deadline = time.monotonic() + timeout
        while self.alive():
            reap(self.pid)
            if not self.alive():
                break
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_INTERVAL)
        reap(self.pid)
        return True

    def terminate(self, timeout: float = 3.0) -> bool:
        """SIGTERM, wait up to ``timeout``; then SIGKILL and wait up to 5 s.

        Idempotent. True if the process is gone afterwards.
        """
        if not self.alive():
            reap(self.pid)
            return True
        self.signal(signal.SIGTERM)
        if self.wait(timeout):
            return True
        return self.kill()

    def kill(self, timeout: float = 5.0) -> bool:
        """SIGKILL and wait up to ``timeout``. Idempotent; True if the process is gone."""
        self.signal(signal.SIGKILL)
        return self.wait(timeout)


def attached(pid: int, start: int | None, mentions: bytes) -> ProcessHandle:
    """The handle of a process spawned earlier, maybe by another process, for re-attaching.

    ``start`` is the start time recorded at spawn. Without it the pid is trusted only if its
    command line contains ``mentions`` (e.g. its socket path, as written on that command
    line). A handle that cannot be trusted gets start time -1, which never matches: it is
    then permanently "gone", so nothing is ever signalled through it.
    """
    current = start_time(pid)
    if start is None and current is not None:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            cmdline = b""
        if mentions in cmdline:
            start = current
    return ProcessHandle(pid, start if start is not None else -1)


class SpawnedProcess:
    """What a driver of one host process (QEMU, virtiofsd) has in common: the process's
    :class:`ProcessHandle` (set by ``start`` or ``attach``) and, when this process spawned
    it, its ``Popen`` (so that its exit is seen, and reaped, at once)."""

    _handle: ProcessHandle | None = None
    _popen: subprocess.Popen[bytes] | None = None

    def _not_started(self) -> Exception:
        """The error :attr:`handle` raises before ``start``/``attach``."""
        raise NotImplementedError

    @property
    def handle(self) -> ProcessHandle:
        """pid + start time (persist it to re-attach); :meth:`_not_started` if unstarted."""
        if self._handle is None:
            raise self._not_started()
        return self._handle

    @property
    def pid(self) -> int:
        """The process's pid; :meth:`_not_started` if never started or attached."""
        return self.handle.pid

    def _running(self) -> bool:
        """True while the process exists and has not exited (a zombie child counts as exited)."""
        if self._handle is None:
            return False
        if self._popen is not None and self._popen.poll() is not None:
            return False
        return self._handle.alive()


def remove_quietly(*paths: Path | None) -> None:
    """Unlink each path that exists; never raises for a missing file."""
    for path in paths:
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def log_tail(path: Path, lines: int = 10, limit: int = 4096) -> str:
    """The last ``lines`` lines (at most ``limit`` bytes) of ``path``; "" if unreadable."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - limit))
            data = handle.read()
    except OSError:
        return ""
    text = data.decode(errors="replace").strip()
    return "\n".join(text.splitlines()[-lines:])


#: The signals whose Python handlers :func:`signals_held` defers.
_HELD = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Run the block (a step that must not be cut in two: a process started and recorded,
    a QMP exchange) with :data:`_HELD` noted instead of handled; once it ends, the
    previous handlers are back and each noted signal is raised again, so it is handled
    (or kills the process, or is ignored) as it would have been. Python runs signal handlers
    in the main thread only: elsewhere the block just runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous = {
        each: signal.signal(each, lambda signum, _f: noted.append(signum)) for each in _HELD
    }
    try:
        yield
    finally:
        for each, handler in previous.items():  # None: one not set from Python
            signal.signal(each, signal.SIG_DFL if handler is None else handler)
        for signum in dict.fromkeys(noted):
            signal.raise_signal(signum)
