"""shim.spawn: a shim that never reports ready does not hold its caller forever."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from sandbox.errors import AgentError
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
