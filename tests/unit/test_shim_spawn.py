"""shim.spawn: a shim that never reports ready does not hold its caller forever; a detached
run's watcher waits for the shim's lock."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from sandbox.errors import AgentError, ConfigError
from sandbox.pod import standin_wire
from sandbox.runtime import shim
from tests.processes import processes_mentioning


def test_a_shim_that_never_reports_ready_is_given_up_and_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy that takes the shim's attach and never answers: the shim would wait for it
    # (its own attach timeout, 30 s); spawn gives up after SPAWN_TIMEOUT and kills it.
    pod = tmp_path / "pod"
    pod.mkdir()
    address = f"unix:{pod / 'agent.sock'}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(standin_wire.socket_path(address)))
    listener.listen(1)
    monkeypatch.setattr(shim, "SPAWN_TIMEOUT", 2.0)
    root = tmp_path / "root"
    (root / "c1").mkdir(parents=True)
    began = time.monotonic()
    try:
        with pytest.raises(AgentError, match="did not report ready within 2s"):
            shim.spawn(root, "c1", address)
        assert time.monotonic() - began < 15
        assert processes_mentioning(str(root), live_only=True) == []  # the shim is gone
    finally:
        listener.close()


def test_a_detached_runs_lock_watcher_acts_once_the_lock_holder_is_gone_even_killed(
    tmp_path: Path,
) -> None:
    # The descriptor spawn hands to the shim is stood in for by a sleeping child holding it;
    # the watcher (flock -o ... python -m sandbox.run.monitor) must wait while it lives and
    # run the monitor once it is SIGKILLed (the monitor of a run whose directory is gone
    # returns at once).
    root = tmp_path / "root"
    (root / "r1").mkdir(parents=True)
    with shim._watcher_lock(root, "r1", True) as held:
        assert held is not None
        holder = subprocess.Popen(["sleep", "1000"], pass_fds=(held,))
        shim._spawn_lock_watcher(root, "r1")
    try:
        time.sleep(1.5)
        waiting = processes_mentioning(f"sandbox.run.monitor {root} r1", live_only=True)
        assert len(waiting) == 1 and "/flock -o " in waiting[0], waiting  # flock only
        shutil.rmtree(root / "r1")  # the monitor then finds no run: it returns at once
        holder.kill()
        holder.wait()
        deadline = time.monotonic() + 30
        while processes_mentioning(f"sandbox.run.monitor {root} r1", live_only=True):
            assert time.monotonic() < deadline, "the watcher did not end after the holder"
            time.sleep(0.1)
    finally:
        holder.kill()
        holder.wait()


def test_without_flock_a_detached_run_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shim, "FLOCK", tmp_path / "no-flock")
    (tmp_path / "r1").mkdir()
    with pytest.raises(
        ConfigError, match="no-flock not found; install it with 'apt-get install util-linux'"
    ):
        shim.spawn(tmp_path, "r1", "unix:/nonexistent/agent.sock", monitor=True)
    assert list((tmp_path / "r1").iterdir()) == []
