"""Host processes as tests look at them, and waiting for a condition instead of sleeping.

The one copy of these helpers for every test module (unit, host and VM tests).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def processes_mentioning(text: str, *, live_only: bool = False) -> list[str]:
    """``"pid: command line"`` of every process but this one whose command line (arguments
    joined by spaces) contains ``text``; with ``live_only``, zombies are left out."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            zombie = live_only and "\nState:\tZ" in (entry / "status").read_text()
        except OSError:
            continue
        if text in cmdline and not zombie:
            found.append(f"{entry.name}: {cmdline.strip()}")
    return found


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def wait_until(check: Callable[[], object], timeout: float = 30.0, interval: float = 0.1) -> bool:
    """Call ``check`` every ``interval`` seconds until it returns something true (True) or
    ``timeout`` seconds have passed (False)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def run_python(program: str, *args: str, timeout: float, stalled: str) -> str:
    """Run ``program`` (Python source) in a fresh interpreter that imports this repository;
    its stdout. AssertionError ``stalled`` if it has not ended within ``timeout`` seconds,
    AssertionError with its stderr's end if it exits non-zero."""
    try:
        result = subprocess.run(
            [sys.executable, "-c", program, *args],
            cwd=REPO,
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(stalled) from None
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def netns_identity(pid: int | str) -> str:
    """``dev:inode`` of the network namespace of ``pid`` (or ``"self"``)."""
    st = os.stat(f"/proc/{pid}/ns/net")
    return f"{st.st_dev}:{st.st_ino}"


def netns_holders(identity: str) -> list[int]:
    """Pids of the processes in the network namespace ``identity`` (``dev:inode``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if netns_identity(entry.name) == identity:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def proc_status(pid: int) -> dict[str, str]:
    """``/proc/PID/status`` as field -> value (OSError if the process is gone)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def assert_capless(pid: int) -> None:
    """``pid`` runs as uid 0 with every capability set empty and no_new_privs (the host
    stand-ins' and proxy's profile, docs/trust-boundaries.md)."""
    fields = proc_status(pid)
    assert fields["Uid"].split() == ["0"] * 4, fields["Uid"]
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[caps], 16) == 0, (pid, caps, fields[caps])
    assert fields["NoNewPrivs"] == "1", fields["NoNewPrivs"]


def pristine_signals() -> None:
    """A ``preexec_fn``: every signal at its default disposition and none blocked, as a
    command started from a fresh login shell has them. This test process may have changed
    some (a suite run as a background job ignores INT/QUIT/HUP; code run in-process by
    earlier tests may have ignored or blocked others), and ignored signals and the mask
    survive execve: a comparison with what runc's container starts with needs this."""
    for signum in signal.valid_signals():
        if signum not in (signal.SIGKILL, signal.SIGSTOP):
            with contextlib.suppress(OSError, ValueError):
                signal.signal(signum, signal.SIG_DFL)
    # glibc's internal 32 and 33 are out of signal()'s reach; the CI's launch left 32 ignored
    # (SigIgn 0x80000000, passed on by podman and runc): the kernel's call, x86-64's number.
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    default = ctypes.create_string_buffer(32)  # struct sigaction: SIG_DFL, no flags, no mask
    for signum in (32, 33):
        libc.syscall(ctypes.c_long(13), ctypes.c_int(signum), default, None, ctypes.c_size_t(8))
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def default_signals() -> None:
    """A ``preexec_fn`` (or a forked child's first step): SIGINT, SIGQUIT and SIGHUP at their
    defaults, as a command typed at an interactive shell has them. A test suite started as a
    background job (``nohup ... &``: INT and QUIT ignored, and HUP) hands them on ignored,
    and ``pysandbox run`` keeps a signal ignored at its start ignored, as any program does:
    a test of their forwarding starts its run with this."""
    for signum in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
