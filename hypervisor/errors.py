"""Errors of the hypervisor layer.

::

    HypervisorError              every failure of this package (one-line message)
     ├── LaunchError             QEMU missing, failed to start, or exited before QMP answered
     ├── QMPError                a QMP connection or command failed (carries command and reply)
     ├── VirtiofsdError          virtiofsd missing, failed to start, or socket never appeared
     ├── AccelError              invalid accelerator request (e.g. PYSANDBOX_ACCEL=bogus)
     ├── GuestImageError         the guest image is missing, incomplete, stale or corrupt
     ├── JailError               the VMM's jail cannot be set up (ids, user, namespaces)
     └── HypervisorTimeout       a bounded wait expired (socket, QMP, process exit)

Messages are lowercase, one line, say what failed and, where there is one, what to do.
Causes are chained with ``raise ... from exc``; ``BaseException`` (KeyboardInterrupt,
cancellation) is never wrapped. This package imports nothing from ``sandbox``; how the sandbox
layer reports these errors is drawn in ``sandbox/errors.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class HypervisorError(Exception):
    """Base of every error raised by :mod:`hypervisor`."""


class LaunchError(HypervisorError):
    """QEMU could not be started, or exited before it was ready.

    ``exitcode`` is the process exit status (negative: killed by that signal; None: still
    running, never started, or not known: a jailed QEMU is not our child), ``argv`` the
    command line, ``log`` the stderr log file and ``log_tail`` its last lines (for the
    caller's report). ``reported`` is True when QEMU itself said why it failed (an error exit
    status, an error message on its log, or a wrong run state): only then is a state it was
    loading to blame; never for a QEMU killed by a signal (SIGKILL, the OOM killer).
    """

    def __init__(
        self,
        message: str,
        *,
        exitcode: int | None = None,
        argv: Sequence[str] = (),
        log: Path | None = None,
        log_tail: str = "",
        reported: bool = False,
    ) -> None:
        super().__init__(message)
        self.reported = reported
        self.exitcode = exitcode
        self.argv = list(argv)
        self.log = log
        self.log_tail = log_tail


class QMPError(HypervisorError):
    """A QMP connection or command failed.

    ``command`` is the command being executed (None for connect), ``reply`` the error
    reply QEMU sent, if any.
    """

    def __init__(
        self, message: str, *, command: str | None = None, reply: object | None = None
    ) -> None:
        super().__init__(message)
        self.command = command
        self.reply = reply


class VirtiofsdError(HypervisorError):
    """virtiofsd is missing, failed to start, or never created its socket."""


class AccelError(HypervisorError):
    """The requested accelerator is invalid or unusable."""


class GuestImageError(HypervisorError):
    """The guest image is missing, incomplete, stale or corrupt (the message names the fix,
    e.g. ``run 'make guest-image'``)."""


class HypervisorTimeout(HypervisorError):
    """A bounded wait (socket, QMP, process exit) expired."""


class JailError(HypervisorError):
    """The VMM's jail cannot be set up: a misconfigured or exhausted id range
    (``PYSANDBOX_JAIL_IDS``), an unknown ``PYSANDBOX_JAIL_USER``, or a namespace, mount or
    credential step the host refuses. The message names what is wrong and how to fix it; a
    pod never falls back to an unjailed VMM (docs/trust-boundaries.md)."""
