"""SIGTERM/SIGHUP during a start-up: undone like Ctrl-C, never half-way through a clean-up.

A ``create`` or ``run`` stopped while it boots must undo what it started (the default action
would leave a booting VM for ``delete --force`` to find). The signal becomes ``SystemExit(128
+ N)`` raised in the main thread, so each step's ``except``/``finally`` rolls back what it
made — but Python runs a handler between any two bytecodes, finalisers included: raised
inside an object's ``__del__`` the exception is printed ("Exception ignored in ...") and
lost, and the command goes on as if never signalled; raised inside a context manager's
``__exit__`` it cuts a clean-up (a release, a move out of a cgroup) in two; raised in a
descriptor's ``__set_name__`` it becomes a RuntimeError. So while the main thread runs one
of these the signal is kept and tried again :data:`RETRY_SECONDS` later (``SIGALRM`` from an
interval timer), until the interrupted code is outside them. Blocks that must not be cut at all use
:func:`hypervisor.process.signals_held`, which re-raises the signal at its end (and so
comes back here).

A second signal while the first is undone is ignored (exit status stays 128+N of the first).
"""

from __future__ import annotations

import signal
from types import FrameType

#: Seconds between tries of a signal that arrived in a finaliser or ``__exit__``.
RETRY_SECONDS = 0.05

#: Code names of frames in which the exception is not raised (see the module's docstring;
#: Python 3.11 wraps an exception raised in ``__set_name__`` — a dataclass field's, while a
#: module is imported — into RuntimeError: "Error calling __set_name__ ...").
_CLEAN_UP_FRAMES = frozenset({"__del__", "__exit__", "__aexit__", "__set_name__"})

_TERMINATING = (signal.SIGTERM, signal.SIGHUP)

_pending: list[int] = []


def _in_clean_up(frame: FrameType | None) -> bool:
    """Whether ``frame`` or a frame that called it is a finaliser or ``__exit__``."""
    while frame is not None:
        if frame.f_code.co_name in _CLEAN_UP_FRAMES:
            return True
        frame = frame.f_back
    return False


def _stop(signum: int, frame: FrameType | None) -> None:
    if _in_clean_up(frame):
        if not _pending:
            _pending.append(signum)
        signal.setitimer(signal.ITIMER_REAL, RETRY_SECONDS)
        return
    _pending.clear()
    for each in (*_TERMINATING, signal.SIGINT, signal.SIGALRM):
        signal.signal(each, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def _retry(_signum: int, _frame: FrameType | None) -> None:
    # Raised again rather than handled here: inside a signals_held block it is noted (and
    # comes back when the block ends); outside, _stop judges the frame it now interrupts.
    if _pending:
        signal.raise_signal(_pending[0])


def undo_on_termination() -> None:
    """From now on SIGTERM/SIGHUP raise ``SystemExit(128 + signum)`` in the main thread,
    outside finalisers and ``__exit__`` (module docstring). One this process was started
    with ignored stays ignored (``nohup`` ignores SIGHUP: the command must outlive its
    terminal; POSIX keeps ignored signals ignored across exec for that). Main thread only
    (signal.signal raises ValueError elsewhere)."""
    _pending.clear()
    signal.signal(signal.SIGALRM, _retry)
    for signum in _TERMINATING:
        if signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, _stop)


def default_termination() -> None:
    """Undo :func:`undo_on_termination`: SIGTERM/SIGHUP end the process again. One kept (it
    came during the last clean-up) is raised now as ``SystemExit(128 + signum)``: call this
    inside the ``try`` whose ``except`` undoes the start-up."""
    _restore(signal.SIG_DFL)
    if _pending:
        raise SystemExit(128 + _pending.pop())


def finished() -> None:
    """The command's work is done (what is left cannot be undone and is quick): SIGTERM/SIGHUP
    are ignored until it exits, and one kept from the last clean-up is dropped — as if it had
    come a moment later, once the command had exited with its status."""
    _restore(signal.SIG_IGN)
    _pending.clear()


def _restore(action: signal.Handlers) -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)
    for signum in _TERMINATING:
        if signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, action)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
