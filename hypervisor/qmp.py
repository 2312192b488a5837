"""A small synchronous QMP client with a timeout on everything.

Wraps :class:`qemu.qmp.QMPClient` (asyncio) in a private event loop, so callers stay
synchronous and nothing touches a global loop. A SIGTERM, SIGHUP or SIGINT that arrives while
the loop runs is held until that exchange ends (at most its timeout) and then handled as
usual: a handler that raises (the CLI turns SIGTERM into SystemExit to undo a start) would
otherwise leave asyncio tasks half-run and their tracebacks on stderr. Every failure becomes
:class:`~hypervisor.errors.QMPError` (with ``command`` and ``reply``) or
:class:`~hypervisor.errors.HypervisorTimeout`, chained to the original exception.

Usage::

    with QMP.connect(path, timeout=5.0) as qmp:
        qmp.execute("cont")
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp import QMPError as _LibQMPError

from hypervisor.errors import HypervisorTimeout, QMPError
from hypervisor.process import signals_held

_T = TypeVar("_T")
DEFAULT_TIMEOUT = 5.0
#: Errors that mean "the connection went away" (expected after ``quit``).
DISCONNECT_ERRORS = (EOFError, ConnectionError, BrokenPipeError)

# qemu.qmp logs a traceback at ERROR level when QEMU hangs up after "quit"; that is normal.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class QMP:
    """One QMP connection to a unix socket. Not thread-safe. Close it (or use ``with``)."""

    def __init__(self, path: Path, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        with signals_held():  # cut half-way, a loop's __del__ prints a traceback
            self._loop = asyncio.new_event_loop()
            self._client = QMPClient(f"pysandbox:{path.name}")
        self._connected = False

    @classmethod
    def connect(cls, path: Path, *, timeout: float = DEFAULT_TIMEOUT) -> QMP:
        """Connect, read the greeting and negotiate capabilities within ``timeout`` seconds.

        Raises QMPError if the socket refuses or the handshake fails, HypervisorTimeout if
        it takes too long. Nothing is left open on failure.
        """
        qmp = cls(path, timeout=timeout)
        try:
            qmp._run(qmp._client.connect(str(path)), timeout, "connect")
        except BaseException:
            qmp.close()
            raise
        qmp._connected = True
        return qmp

    def _run(self, coro: Coroutine[Any, Any, _T], timeout: float, what: str) -> _T:
        task = self._loop.create_task(asyncio.wait_for(coro, timeout))
        # A signal handler raising (SystemExit on SIGTERM) can abandon the task mid-call; it
        # then fails when the connection closes, and asyncio would print its traceback
        # ("Task exception was never retrieved") to stderr. Its outcome is retrieved here.
        task.add_done_callback(_retrieve)
        try:
            with signals_held():
                return self._loop.run_until_complete(task)
        except TimeoutError as exc:
            raise HypervisorTimeout(
                f"qmp {what} on {self.path} timed out after {timeout:g}s; "
                "is qemu hung? stop it and check its log"
            ) from exc
        except ExecuteError as exc:
            raise QMPError(
                f"qmp command {what} failed: {exc.error_class}: {exc}",
                command=what,
                reply=exc.received,
            ) from exc
        except (_LibQMPError, OSError, EOFError, AssertionError) as exc:
            # AssertionError: the library's own state checks ("assert self.runstate ==
            # Runstate.RUNNING") fail when QEMU went away in the middle of a call.
            reason = str(exc) or "connection lost"
            raise QMPError(
                f"qmp {what} on {self.path} failed: {reason}; is qemu running?", command=what
            ) from exc

    def execute(
        self,
        command: str,
        arguments: dict[str, object] | None = None,
        *,
        timeout: float | None = None,
        fd: int | None = None,
    ) -> object:
        """Run ``command`` and return its ``return`` value.

        ``fd`` is passed to QEMU with the command (SCM_RIGHTS; ``getfd``/``add-fd`` take it);
        it stays open here. Raises QMPError on an error reply or a broken connection,
        HypervisorTimeout after ``timeout`` (default: the connection's) seconds.
        """
        if fd is not None:
            try:
                self._client.send_fd_scm(fd)
            except (_LibQMPError, OSError, AssertionError) as exc:  # see _run
                raise QMPError(
                    f"qmp {command}: passing fd failed: {str(exc) or 'connection lost'}",
                    command=command,
                ) from exc
        return self._run(
            self._client.execute(command, arguments),
            self.timeout if timeout is None else timeout,
            command,
        )

    def quit(self, *, timeout: float | None = None) -> None:
        """Send ``quit``; QEMU hanging up before or after the reply counts as success."""
        try:
            self.execute("quit", timeout=timeout)
        except QMPError as exc:
            if exc.reply is not None:
                raise
            # The reply raced with the hang-up: EOF/reset/ExecInterrupted are all fine.

    def close(self) -> None:
        """Disconnect and free the loop. Idempotent; never raises for a dead peer."""
        if self._loop.is_closed():
            return
        with signals_held():
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(
                    asyncio.wait_for(self._client.disconnect(), DEFAULT_TIMEOUT)
                )
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()
        self._connected = False

    def __enter__(self) -> QMP:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark ``task``'s exception as retrieved (whoever awaited it has handled it already)."""
    if not task.cancelled():
        task.exception()
