"""sandbox/signal_forward.py: signals reach their action, even in a storm, and nothing stalls."""

from __future__ import annotations

import os
import signal
import textwrap
import threading

from sandbox.signal_forward import SignalForwarder, forwarding
from tests.processes import run_python


def test_each_signal_runs_its_action_and_restore_puts_the_old_handler_back() -> None:
    seen: list[int] = []
    arrived = threading.Semaphore(0)

    def act(signum: int) -> None:
        seen.append(signum)
        arrived.release()

    before = signal.getsignal(signal.SIGUSR1)
    with forwarding({signal.SIGUSR1: act, signal.SIGUSR2: act}):
        for signum in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGUSR1):
            os.kill(os.getpid(), signum)
            assert arrived.acquire(timeout=10), f"no action for signal {signum}"
    assert seen == [signal.SIGUSR1, signal.SIGUSR2, signal.SIGUSR1]
    assert signal.getsignal(signal.SIGUSR1) is before


# The main thread starts threads (threading's locked sections) while another thread sends a
# storm of signals: a handler that started a thread itself could wait for a lock the main
# thread holds. The forwarder's handler takes none.
_STORM = textwrap.dedent(
    """
    import os, signal, sys, threading
    from sandbox.signal_forward import SignalForwarder

    acted = threading.Event()
    SignalForwarder({signal.SIGUSR1: lambda _s: acted.set()}).install()

    def storm():
        for _ in range(20000):
            os.kill(os.getpid(), signal.SIGUSR1)

    sender = threading.Thread(target=storm)
    sender.start()
    while sender.is_alive():
        worker = threading.Thread(target=lambda: None)
        worker.start()
        worker.join()
    assert acted.wait(10), "no action ran"
    print("survived", flush=True)
    """
)


def test_a_storm_of_signals_never_stalls_the_main_thread() -> None:
    out = run_python(_STORM, timeout=60, stalled="the main thread stalled in a storm of signals")
    assert out.strip() == "survived"


def test_install_outside_the_main_thread_is_refused() -> None:
    errors: list[BaseException] = []

    def install() -> None:
        try:
            SignalForwarder({signal.SIGUSR1: lambda _s: None}).install()
        except ValueError as exc:
            errors.append(exc)

    thread = threading.Thread(target=install)
    thread.start()
    thread.join()
    assert len(errors) == 1
