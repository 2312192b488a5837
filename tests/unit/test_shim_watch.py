"""The watcher of a detached run's shim (sandbox.runtime.shim_watch): a /bin/sh that waits for
end-of-file on a pipe whose write end only the shim holds, then becomes the monitor.

A stand-in "python" records the command line the watcher execs into; a ``sleep`` holding the
write end stands for the shim."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from sandbox.runtime import shim_watch


def _fake_python(tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "monitor-argv"
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {out}\n')
    python.chmod(0o755)
    return python, out


@contextlib.contextmanager
def _watching(
    tmp_path: Path, timeout: float | None, say: str = ""
) -> Iterator[tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], Path]]:
    """(the watcher, the stand-in shim holding the write end — which first writes ``say``
    there, if set —, the monitor's argv file); both processes killed and reaped after."""
    python, out = _fake_python(tmp_path)
    held_r, held_w = os.pipe()
    code = f"import os, time; os.write({held_w}, {say.encode()!r} + b'\\n'); time.sleep(60)"
    stand_in = [sys.executable, "-c", code] if say else ["sleep", "60"]
    holder = subprocess.Popen(stand_in, pass_fds=(held_w,))
    os.close(held_w)
    try:
        watcher = subprocess.Popen(
            shim_watch.argv(str(python), "/run/x", "r1", timeout), stdin=held_r
        )
    finally:
        os.close(held_r)
    try:
        yield watcher, holder, out
    finally:
        for proc in (holder, watcher):
            proc.kill()
            proc.wait()


def _monitor_argv(watcher: subprocess.Popen[bytes], out: Path) -> list[str]:
    """The watcher's exit status must be 0; the arguments it ran the monitor with."""
    assert watcher.wait(timeout=10) == 0
    return out.read_text().split("\n")[:-1]


MONITOR = ["-m", "sandbox.run.monitor", "/run/x", "r1"]


def test_the_watcher_waits_while_the_shim_lives_and_runs_the_monitor_once_it_is_killed(
    tmp_path: Path,
) -> None:
    with _watching(tmp_path, None) as (watcher, holder, out):
        time.sleep(0.5)
        assert watcher.poll() is None and not out.exists()  # the shim still runs
        assert shim_watch.LABEL in Path(f"/proc/{watcher.pid}/cmdline").read_text()
        os.kill(holder.pid, signal.SIGKILL)  # SIGKILL of the shim closes its fds too
        holder.wait()
        assert _monitor_argv(watcher, out) == MONITOR


def test_the_watcher_kills_the_run_after_its_timeout(tmp_path: Path) -> None:
    began = time.monotonic()
    with _watching(tmp_path, 1.0) as (watcher, holder, out):
        assert _monitor_argv(watcher, out) == [*MONITOR, "--kill"]
        assert 0.9 <= time.monotonic() - began < 9
        assert holder.poll() is None  # the monitor, not the watcher, kills the run


def test_a_shim_that_ends_before_the_timeout_is_not_killed(tmp_path: Path) -> None:
    with _watching(tmp_path, 30.0) as (watcher, holder, out):
        holder.terminate()
        holder.wait()
        assert _monitor_argv(watcher, out) == MONITOR


def test_a_shim_that_says_its_pod_is_broken_gets_the_monitor_with_broken(tmp_path: Path) -> None:
    """The shim writes ``broken`` when the pod's virtiofsd is gone: it is still alive, and the
    monitor (--broken) kills it and releases the VM."""
    for timeout in (None, 30.0):
        with _watching(tmp_path, timeout, say="broken") as (watcher, holder, out):
            assert _monitor_argv(watcher, out) == [*MONITOR, "--broken"], timeout
            assert holder.poll() is None
