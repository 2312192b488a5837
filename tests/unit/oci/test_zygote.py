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
from tests.processes import wait_until

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


def _spares(z: Zygote) -> list[int]:
    """Pids of the zygote's spare runtimes: forks of it (same command line) other than it."""
    assert z.pid is not None
    mine = Path(f"/proc/{z.pid}/cmdline").read_bytes()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == z.pid:
            continue
        try:
            if (entry / "cmdline").read_bytes() == mine:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _wait_for_spare(z: Zygote) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        spares = _spares(z)
        if spares:
            assert len(spares) == 1, spares
            return spares[0]
        time.sleep(0.05)
    raise AssertionError("no spare runtime was forked")


def test_no_spare_before_a_first_request(zygote: Zygote) -> None:
    """A template VM's zygote has served nothing: no spare is saved with it."""
    time.sleep(0.6)
    assert _spares(zygote) == []


def test_a_spare_is_forked_ahead_of_the_first_request_when_the_agent_asks(
    zygote: Zygote,
) -> None:
    """After ``Restored`` (the CRNG the VM's own) the agent asks for the spare at once, so a
    VM of the warm pool has it before its first container."""
    assert zygote.spare_ahead()
    spare = _wait_for_spare(zygote)
    args = ["--bundle-fd", "3", "--sync-fd", "4"]
    pid, _err, sync = _request(zygote, "agent.oci.init", args, b"not json")
    assert pid == spare
    assert sync.startswith(b"error INVALID_SPEC "), sync


def test_an_idle_zygote_serves_the_next_request_with_a_spare_forked_ahead(
    zygote: Zygote,
) -> None:
    args = ["--bundle-fd", "3", "--sync-fd", "4"]
    first, _err, _sync = _request(zygote, "agent.oci.init", args, b"not json")
    spare = _wait_for_spare(zygote)
    assert spare != first
    # The spare runs the request exactly as a runtime forked for it: fds 0-4, same reports.
    pid, _err, sync = _request(zygote, "agent.oci.init", args, b"not json")
    assert pid == spare
    assert sync.startswith(b"error INVALID_SPEC "), sync
    _pid, err, _sync = _request(zygote, "agent.oci.exec", ["--bogus", "1"], b"")
    fresh = subprocess.run(
        [sys.executable, "-m", "agent.oci.exec", "--bogus", "1"],
        capture_output=True,
        env={"PYTHONPATH": str(REPO)},
        check=False,
    )
    assert err == fresh.stderr.decode()


def test_a_killed_spare_is_not_used_and_a_bad_request_leaves_it_waiting(zygote: Zygote) -> None:
    args = ["--bundle-fd", "3", "--sync-fd", "4"]
    _request(zygote, "agent.oci.init", args, b"[]")
    spare = _wait_for_spare(zygote)
    r, w = os.pipe()
    try:
        assert zygote.spawn("os", [], (r, w, w, r, w)) is None
    finally:
        os.close(r)
        os.close(w)
    assert _spares(zygote) == [spare]
    os.kill(spare, signal.SIGKILL)
    # Gone once it has exited (its socket closed): a zombie, or reaped. A fixed pause was
    # not always enough on a loaded host (the request then went to the dying spare).
    assert _wait_gone(spare), "the killed spare did not exit"
    pid, _err, sync = _request(zygote, "agent.oci.init", args, b"[]")
    assert pid != spare
    assert sync.startswith(b"error "), sync


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    """Whether ``pid`` exited (a zombie or reaped) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.01)
    return False


def test_spares_go_with_the_zygote(zygote: Zygote) -> None:
    _request(zygote, "agent.oci.init", ["--bundle-fd", "3", "--sync-fd", "4"], b"[]")
    spare = _wait_for_spare(zygote)
    assert zygote.pid is not None
    os.kill(zygote.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{spare}").exists():
        state = Path(f"/proc/{spare}/stat").read_text().split(")")[-1].split()[0]
        if state == "Z":
            break
        time.sleep(0.05)
    else:
        assert not Path(f"/proc/{spare}").exists(), "the spare outlived its zygote"


def _fds(pid: int) -> dict[int, str]:
    folder = Path(f"/proc/{pid}/fd")
    return {int(entry.name): os.readlink(entry) for entry in folder.iterdir()}


def test_the_default_device_program_is_loaded_once_and_every_runtime_holds_it(
    zygote: Zygote,
) -> None:
    """The zygote loads the device filter of runc's default rules at start (as root, with
    this host's kernel), above the fds a runtime is handed; a forked runtime keeps it (and
    nothing else beyond 0-4) to attach it to its container's cgroup."""
    if os.geteuid() != 0:
        pytest.fail("loading a BPF program needs root: run the tests as root, as CI does")
    assert zygote.pid is not None
    programs = [fd for fd, target in _fds(zygote.pid).items() if target == "anon_inode:bpf-prog"]
    assert len(programs) == 1 and programs[0] >= 64, _fds(zygote.pid)
    # A runtime reading its spec from a pipe that stays open waits in that read: look at it.
    pay_r, pay_w = os.pipe()
    ours, theirs = socket.socketpair()
    null = os.open("/dev/null", os.O_RDWR)
    fds = (null, null, null, pay_r, theirs.fileno())
    try:
        pid = zygote.spawn("agent.oci.init", ["--bundle-fd", "3", "--sync-fd", "4"], fds)
        assert pid is not None
        try:
            # Until it has moved the request's fds into place and closed the rest.
            wanted = [0, 1, 2, 3, 4, programs[0]]
            assert wait_until(lambda: sorted(_fds(pid)) == wanted, 10), _fds(pid)
            assert _fds(pid)[programs[0]] == "anon_inode:bpf-prog"
        finally:
            os.close(pay_w)
            pay_w = -1
            ours.settimeout(30)
            assert ours.recv(4096).startswith(b"error INVALID_SPEC ")
    finally:
        for fd in (null, pay_r, pay_w):
            if fd >= 0:
                os.close(fd)
        ours.close()
        theirs.close()
