"""LinuxSyscalls.reset_signals with the signals the zygote noted (agent.oci.syscalls
.preload_signals): a process forked afterwards ends with every action at its default and an
empty mask, as after the full reset. Real system calls, in a forked child."""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable

import pytest

from agent.oci import syscalls as sc


def _in_child(check: Callable[[], str]) -> str:
    """Run ``check`` in a forked child; what it returned (or the exception it raised)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        try:
            text = check()
        except BaseException as exc:  # reported to the parent
            text = f"raised {exc!r}"
        os.write(write, text.encode())
        os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 4096):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


def _status_masks() -> str:
    with open("/proc/self/status") as status:
        return " ".join(
            line.split()[1] for line in status if line.startswith(("SigBlk", "SigIgn", "SigCgt"))
        )


def _disturb(system: sc.LinuxSyscalls) -> None:
    """Actions a runtime may inherit: ignored, caught, glibc's 33 ignored, a blocked one."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, lambda *_: None)
    ignore = ctypes.create_string_buffer(32)
    ignore[0] = 1  # SIG_IGN
    system._rawcall("rt_sigaction", ctypes.c_int(33), ignore, None, ctypes.c_size_t(8))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})


@pytest.mark.parametrize("preloaded", [True, False])
def test_reset_leaves_every_action_default_and_no_signal_blocked(
    monkeypatch: pytest.MonkeyPatch, preloaded: bool
) -> None:
    def check() -> str:
        system = sc.LinuxSyscalls()
        _disturb(system)
        if preloaded:
            sc.preload_signals()
            noted = sc._not_default
            assert noted is not None
            expected = {signal.SIGUSR1, signal.SIGUSR2, 33, signal.SIGPIPE, signal.SIGINT}
            assert expected <= set(noted), noted
        system.reset_signals()
        return f"{_status_masks()} {system.signals_not_default()}"

    monkeypatch.setattr(sc, "_not_default", None)
    assert _in_child(check) == "0000000000000000 0000000000000000 0000000000000000 ()"


def test_sigchld_with_nocldwait_counts_as_not_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIG_DFL with SA_NOCLDWAIT still changes what happens to children: reset too."""

    def check() -> str:
        system = sc.LinuxSyscalls()
        action = ctypes.create_string_buffer(32)
        action[8] = sc._SA_NOCLDWAIT  # handler SIG_DFL, flags
        system._rawcall("rt_sigaction", ctypes.c_int(17), action, None, ctypes.c_size_t(8))
        before = signal.SIGCHLD in system.signals_not_default()
        sc.preload_signals()
        system.reset_signals()
        return f"{before} {signal.SIGCHLD in system.signals_not_default()}"

    monkeypatch.setattr(sc, "_not_default", None)
    assert _in_child(check) == "True False"
