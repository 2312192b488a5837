"""The runtime zygote (agent/zygote.py, agent/oci/zygote.py) on the host, without a VM: a
forked runtime gets the request's fds as 0-4 and behaves as ``python3 -m MODULE`` would;
a dead zygote makes the agent fall back to spawning."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import pid1
from agent.zygote import Zygote

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def zygote() -> Iterator[Zygote]:
    reaper = pid1.Reaper()
    z = Zygote(reaper, {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    z.start()
    assert z.wait_ready(30)
    yield z
    assert z.pid is not None
    os.kill(z.pid, signal.SIGKILL)
    os.waitpid(z.pid, 0)


def _request(z: Zygote, module: str, args: list[str], payload: bytes) -> tuple[int, str, bytes]:
    """(pid, stderr, what the runtime wrote on its sync socket) of one forked runtime."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pay_r, pay_w = os.pipe()
    os.write(pay_w, payload)
    os.close(pay_w)
    ours, theirs = socket.socketpair()
    fds = (in_r, out_w, err_w, pay_r, theirs.fileno())
    pid = z.spawn(module, args, fds)
    for fd in fds[:4]:
        os.close(fd)
    theirs.close()
    os.close(in_w)
    assert pid is not None
    ours.settimeout(30)
    sync = b""
    while chunk := ours.recv(4096):
        sync += chunk
    ours.close()
    err = b""
    while chunk := os.read(err_r, 4096):
        err += chunk
    for fd in (out_r, err_r):
        os.close(fd)
    return pid, err.decode(), sync


def test_the_runtime_gets_the_payload_on_fd_3_and_reports_on_fd_4(zygote: Zygote) -> None:
    pid, _err, sync = _request(
        zygote, "agent.oci.init", ["--bundle-fd", "3", "--sync-fd", "4"], b"not json"
    )
    assert pid > 0 and pid != zygote.pid
    assert sync.startswith(b"error INVALID_SPEC "), sync


def test_bad_usage_is_reported_on_its_stderr_as_a_fresh_runtime_does(zygote: Zygote) -> None:
    _pid, err, _sync = _request(zygote, "agent.oci.exec", ["--bogus", "1"], b"")
    fresh = subprocess.run(
        [sys.executable, "-m", "agent.oci.exec", "--bogus", "1"],
        capture_output=True,
        env={"PYTHONPATH": str(REPO)},
        check=False,
    )
    assert fresh.returncode == 2
    assert err == fresh.stderr.decode()


def test_only_the_runtime_modules_can_be_asked_for(zygote: Zygote) -> None:
    r, w = os.pipe()
    try:
        assert zygote.spawn("os", [], (r, w, w, r, w)) is None
        # and the zygote still serves
        _pid, _err, sync = _request(
            zygote, "agent.oci.init", ["--bundle-fd", "3", "--sync-fd", "4"], b"[]"
        )
        assert sync.startswith(b"error "), sync
    finally:
        os.close(r)
        os.close(w)


def test_a_dead_zygote_is_not_used(zygote: Zygote) -> None:
    assert zygote.pid is not None
    os.kill(zygote.pid, signal.SIGKILL)
    time.sleep(0.2)
    r, w = os.pipe()
    try:
        assert zygote.spawn("agent.oci.init", [], (r, w, w, r, w)) is None
    finally:
        os.close(r)
        os.close(w)


def test_forked_runtimes_do_not_share_random_state() -> None:
    """What the zygote relies on: ``random`` reseeds itself in every forked child."""
    code = (
        "import os, random\n"
        "random.random()\n"
        "r, w = os.pipe()\n"
        "for _ in range(2):\n"
        "    if os.fork() == 0:\n"
        "        os.write(w, repr(random.random()).encode() + b'\\n'); os._exit(0)\n"
        "    os.wait()\n"
        "os.close(w)\n"
        "print(os.read(r, 100).decode())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    values = out.split()
    assert len(values) == 2 and values[0] != values[1]
