"""Signal handlers that hand their work to a thread without taking a lock.

Python runs a signal handler in the main thread between two bytecodes, wherever that thread
is: inside ``threading``'s own locked sections (starting a thread), or inside the handler's
previous run when signals come in a burst. A handler that takes a lock (``Thread.start``,
``Event.set``) can then wait forever for a lock its own thread holds — the guest agent's main
thread stopped that way on a burst of SIGCHLD. The handlers installed here only write the
signal's number to a pipe (``os.write`` takes no Python lock); a dispatcher thread reads it
and runs the action for that signal, each in a daemon thread of its own so that one slow
action (an RPC to the guest) does not hold up the next signal. Python's documentation
recommends the same ("Note on Signal Handlers and Exceptions", library/signal.html).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping

Action = Callable[[int], None]


class SignalForwarder:
    """Runs ``actions[signum](signum)`` in a thread for every signal ``signum`` received.

    :meth:`install` must be called from the main thread (``signal.signal`` raises
    ValueError elsewhere). Signals of one kind may be merged by the kernel while pending, as
    always; none is lost once Python has seen it (the pipe holds 64 KiB of signal numbers).
    """

    def __init__(self, actions: Mapping[int, Action]) -> None:
        self._actions = dict(actions)
        self._previous: dict[int, object] = {}
        self._write_fd: int | None = None

    def install(self) -> None:
        """Install the handlers and start the dispatcher thread."""
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(write_fd, False)  # a handler must never block
        self._write_fd = write_fd
        threading.Thread(
            target=self._dispatch, args=(read_fd,), name="signal-forward", daemon=True
        ).start()
        for signum in self._actions:
            self._previous[signum] = signal.signal(signum, self._handler)

    def restore(self) -> None:
        """Put the previous handlers back; the dispatcher ends once it has run what came."""
        for signum, previous in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)  # type: ignore[arg-type]
        self._previous.clear()
        if self._write_fd is not None:
            os.close(self._write_fd)  # EOF for the dispatcher
            self._write_fd = None

    def _handler(self, signum: int, _frame: object) -> None:
        fd = self._write_fd
        if fd is not None:
            with contextlib.suppress(OSError):  # full pipe or closed by restore: dropped
                os.write(fd, bytes((signum,)))

    def _dispatch(self, read_fd: int) -> None:
        try:
            while received := os.read(read_fd, 256):
                for signum in received:
                    action = self._actions.get(signum)
                    if action is not None:
                        threading.Thread(target=action, args=(signum,), daemon=True).start()
        finally:
            os.close(read_fd)


@contextlib.contextmanager
def forwarding(actions: Mapping[int, Action]) -> Iterator[None]:
    """:class:`SignalForwarder` installed for the block, restored after it."""
    forwarder = SignalForwarder(actions)
    forwarder.install()
    try:
        yield
    finally:
        forwarder.restore()
