"""The agent's container bookkeeping (agent/containers.py) without a VM: stdio fd ownership
and OOM attribution, on real pipes and a fake cgroup directory."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from agent import pid1
from agent.containers import Container, ContainerError, ContainerManager, Process, Signal


def _pipes_process() -> tuple[Process, int, int]:
    """A Process with pipe stdio; also returns the child's ends (stdin read, stdout write)."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    os.close(err_w)
    return Process(123, False, in_w, out_r, err_r), in_r, out_w


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def _manager(tmp_path: Path, proc: Process) -> ContainerManager:
    manager = ContainerManager(pid1.Reaper(), cgroup_parent=str(tmp_path))
    (tmp_path / "c1").mkdir()
    container = Container("c1", "/run/pysandbox/c1/rootfs", str(tmp_path / "c1"), proc, None)
    container.started = True
    manager._containers["c1"] = container
    return manager


def test_exit_releases_stdin_and_eof_releases_stdout(tmp_path: Path) -> None:
    before = _open_fds()
    proc, in_r, out_w = _pipes_process()
    manager = _manager(tmp_path, proc)
    manager.write_stdin("c1", "", b"abc")
    assert os.read(in_r, 10) == b"abc"
    os.write(out_w, b"out")
    os.close(out_w)
    assert list(manager.read_stream("c1", "", "stdout")) == [b"out"]
    assert list(manager.read_stream("c1", "", "stderr")) == []
    assert proc.stdout is None and proc.stderr is None  # released at EOF
    proc.on_exit(7 << 8)
    assert (proc.status, proc.signal, proc.stdin) == (7, 0, None)
    assert os.read(in_r, 10) == b""  # the child's stdin sees EOF
    os.close(in_r)
    with pytest.raises(ContainerError, match="stdin is closed"):
        manager.write_stdin("c1", "", b"late")
    assert list(manager.read_stream("c1", "", "stdout")) == []
    assert _open_fds() == before


def test_a_reader_that_stops_early_leaves_the_stream_for_the_next(tmp_path: Path) -> None:
    proc, in_r, out_w = _pipes_process()
    manager = _manager(tmp_path, proc)
    os.write(out_w, b"first")
    stream = manager.read_stream("c1", "", "stdout")
    assert next(stream) == b"first"
    stream.close()  # the host cancelled the RPC
    os.write(out_w, b"second")
    os.close(out_w)
    assert list(manager.read_stream("c1", "", "stdout")) == [b"second"]
    for which in ("stdin", "stdout", "stderr"):
        proc.release(which)
    os.close(in_r)


def test_a_reader_whose_rpc_ended_takes_nothing_more(tmp_path: Path) -> None:
    """The host's proxy died while a reader was blocked: once its RPC ends (``stop``), the
    next bytes go to the reader of the reconnected host, not to the dead one."""
    before = _open_fds()
    proc, in_r, out_w = _pipes_process()
    manager = _manager(tmp_path, proc)
    chunks: list[bytes] = []
    with Signal() as ended:
        old = threading.Thread(
            target=lambda: chunks.extend(manager.read_stream("c1", "", "stdout", stop=ended.fd))
        )
        old.start()
        time.sleep(0.1)  # blocked in poll()
        ended.set()
        old.join(5)
        assert not old.is_alive(), "stop did not end the blocked reader"
    ended.set()  # a late termination callback is harmless
    os.write(out_w, b"two")
    os.close(out_w)
    assert chunks == []
    assert list(manager.read_stream("c1", "", "stdout")) == [b"two"]
    os.close(in_r)
    proc.release_all()
    assert _open_fds() == before


def test_the_exit_ends_the_stream_while_a_background_child_holds_it(tmp_path: Path) -> None:
    """``sh -c 'sleep 1000 & exec sleep 2000'``: the child keeps stdout open after the init
    is gone; the reader gets what the init wrote, then the stream ends without EOF."""
    before = _open_fds()
    proc, in_r, out_w = _pipes_process()  # out_w: the background child's copy of stdout
    manager = _manager(tmp_path, proc)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(manager.read_stream("c1", "", "stdout")))
    reader.start()
    os.write(out_w, b"before exit")
    time.sleep(0.1)  # the reader is blocked in poll() again, the pipe empty
    assert reader.is_alive()
    proc.on_exit(signal.SIGKILL)
    reader.join(5)
    assert not reader.is_alive(), "the exit did not wake the reader"
    assert b"".join(chunks) == b"before exit"
    assert proc.stdout is not None  # no EOF yet: kept for a later reader (until removal)
    os.write(out_w, b"late")  # the child writes on; a new reader gets it
    assert list(manager.read_stream("c1", "", "stdout")) == [b"late"]
    os.close(out_w)
    os.close(in_r)
    proc.release_all()
    assert _open_fds() == before


def test_after_the_exit_only_what_was_pending_is_read(tmp_path: Path) -> None:
    """A child writing on forever cannot keep the stream going after the init exited: the
    bytes pending at the exit are read, then the stream ends."""
    proc, in_r, out_w = _pipes_process()
    manager = _manager(tmp_path, proc)
    os.write(out_w, b"x" * 100)
    proc.on_exit(0)
    stream = manager.read_stream("c1", "", "stdout")
    assert next(stream) == b"x" * 100
    os.write(out_w, b"y" * 100)  # written by the child after the init's exit
    assert list(stream) == []
    os.close(out_w)
    os.close(in_r)
    proc.release_all()


def test_borrowed_fd_survives_a_concurrent_close(tmp_path: Path) -> None:
    proc, in_r, out_w = _pipes_process()
    borrowed = proc.borrow("stdout")
    assert borrowed is not None
    proc.release("stdout")  # e.g. RemoveContainer while a stream is being read
    os.write(out_w, b"still ours")
    assert os.read(borrowed, 20) == b"still ours"
    for fd in (borrowed, in_r, out_w):
        os.close(fd)
    proc.release("stdin")
    proc.release("stderr")


def _oom_kills(tmp_path: Path, count: int) -> None:
    (tmp_path / "c1" / "memory.events").write_text(
        f"low 0\nhigh 0\nmax 3\noom {count}\noom_kill {count}\noom_group_kill 0\n"
    )


def test_oom_is_attributed_to_the_exec_that_was_killed_while_it_grew(tmp_path: Path) -> None:
    init, in_r, out_w = _pipes_process()
    manager = _manager(tmp_path, init)
    _oom_kills(tmp_path, 0)
    assert not manager.oom_killed("c1")
    container = manager.get("c1")
    for name, before, raw in (("hog", 0, signal.SIGKILL), ("other", 0, 1 << 8), ("old", 1, 9)):
        proc = Process(200, False, None, None, None, oom_kills_before=before)
        proc.on_exit(raw)
        container.execs[name] = proc
    _oom_kills(tmp_path, 1)
    assert manager.oom_killed("c1", "hog")  # SIGKILLed while the count went 0 -> 1
    assert not manager.oom_killed("c1", "other")  # exited normally
    assert not manager.oom_killed("c1", "old")  # the kill happened before it started
    assert manager.oom_killed("c1")  # the container as a whole (containerd's OOMKilled)
    for which in ("stdin", "stdout", "stderr"):
        init.release(which)
    os.close(in_r)
    os.close(out_w)


def test_paused_container_refuses_exec(tmp_path: Path) -> None:
    init, in_r, out_w = _pipes_process()
    manager = _manager(tmp_path, init)
    manager.get("c1").paused = True
    assert manager.get("c1").status == "paused"
    with pytest.raises(ContainerError, match="is paused, not running"):
        manager.exec("c1", "e1", b"{}")
    for which in ("stdin", "stdout", "stderr"):
        init.release(which)
    os.close(in_r)
    os.close(out_w)


def test_collected_execs_are_forgotten_beyond_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent import containers

    monkeypatch.setattr(containers, "MAX_COLLECTED_EXECS", 3)
    init, in_r, out_w = _pipes_process()
    manager = _manager(tmp_path, init)
    container = manager.get("c1")
    for n in range(6):
        proc = Process(300 + n, False, None, None, None)
        proc.on_exit(0)
        container.execs[f"e{n}"] = proc
    running = Process(400, False, None, None, None)
    container.execs["running"] = running
    for name in ("e0", "e1", "e2", "e3", "e4"):  # e5 exited but nobody has its status yet
        assert manager.wait("c1", name, 0) is not None
    manager._forget_old_execs(container)
    assert list(container.execs) == ["e2", "e3", "e4", "e5", "running"]
    with pytest.raises(ContainerError, match="does not exist"):
        manager.wait("c1", "e0", 0)
    for which in ("stdin", "stdout", "stderr"):
        init.release(which)
    os.close(in_r)
    os.close(out_w)


def test_the_first_container_chooses_the_vms_cgroup_layout() -> None:
    from agent import cgroup_layout

    calls: list[tuple[str, str]] = []
    layout = cgroup_layout.Layout("/sys/fs/cgroup/pysandbox", lambda v, p: calls.append((v, p)))
    assert layout.runtime_args() == []
    layout.choose(cgroup_layout.requested({"annotations": {"org.pysandbox.cgroup": "v1"}}))
    layout.choose(cgroup_layout.requested({"annotations": {"org.pysandbox.cgroup": "v1"}}))
    assert calls == [("v1", "/sys/fs/cgroup/pysandbox")]  # set up once
    assert layout.runtime_args() == ["--cgroup-v1", "/run/cgroup-v1"]
    layout.choose(cgroup_layout.requested({}))  # no preference: the VM's layout
    assert layout.version == "v1"
    with pytest.raises(ValueError, match=r"asks for cgroup v2 .* use cgroup v1"):
        layout.choose(cgroup_layout.requested({"annotations": {"org.pysandbox.cgroup": "v2"}}))
    with pytest.raises(ValueError, match=r'org\.pysandbox\.cgroup: "v3" is not "v1" or "v2"'):
        cgroup_layout.requested({"annotations": {"org.pysandbox.cgroup": "v3"}})


def test_a_layout_the_kernel_refuses_is_not_chosen() -> None:
    from agent import cgroup_layout

    def refuse(version: str, parent: str) -> None:
        raise OSError(16, "Device or resource busy")

    layout = cgroup_layout.Layout("/sys/fs/cgroup/pysandbox", refuse)
    with pytest.raises(OSError):
        layout.choose("v1")
    assert layout.version is None


def test_a_first_container_without_a_preference_gets_v2() -> None:
    from agent import cgroup_layout

    calls: list[str] = []
    layout = cgroup_layout.Layout("/sys/fs/cgroup/pysandbox", lambda v, p: calls.append(v))
    layout.choose(None)
    assert calls == ["v2"] and layout.version == "v2"


def test_v1_counters_come_from_the_v1_files(tmp_path: Path) -> None:
    from agent import cgroup_layout

    files = {
        "memory/c1/memory.usage_in_bytes": "4096\n",
        "memory/c1/memory.limit_in_bytes": "67108864\n",
        "memory/c1/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        "cpu,cpuacct/c1/cpuacct.usage": "7000123\n",
        "pids/c1/pids.current": "3\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    pairs = [(h, str(tmp_path / h / "c1")) for h in ("cpu,cpuacct", "memory", "pids")]
    assert cgroup_layout.read_counters("/nonexistent", pairs) == {
        "cpu_usage_usec": 7000,
        "memory_usage_bytes": 4096,
        "memory_limit_bytes": 67108864,
        "pids_current": 3,
        "oom_kills": 2,
    }
    # What an exec reads before it starts: the same count, from the same file.
    assert cgroup_layout.read_oom_kills("/nonexistent", pairs) == 2
    assert cgroup_layout.read_oom_kills("/nonexistent", pairs[:1]) == 0  # no memory hierarchy
    (tmp_path / "memory/c1/memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cgroup_layout.read_counters("/nonexistent", pairs)["memory_limit_bytes"] == 0


def _created(tmp_path: Path) -> tuple[ContainerManager, socket.socket, Process, int, int]:
    """A created container whose init runtime is the other end of a socketpair."""
    init, in_r, out_w = _pipes_process()
    manager = _manager(tmp_path, init)
    ours, theirs = socket.socketpair()
    container = manager.get("c1")
    container.started = False
    container.control = ours
    return manager, theirs, init, in_r, out_w


def _release(init: Process, *fds: int) -> None:
    for which in ("stdin", "stdout", "stderr"):
        init.release(which)
    for fd in fds:
        os.close(fd)


def test_start_returns_at_eof_of_the_sync_socket(tmp_path: Path) -> None:
    manager, runtime, init, in_r, out_w = _created(tmp_path)

    def runtime_execs() -> None:
        assert runtime.recv(64) == b"start\n"
        runtime.close()  # what its execve does (close-on-exec)

    thread = threading.Thread(target=runtime_execs)
    thread.start()
    manager.start("c1", timeout=5)
    thread.join()
    assert manager.get("c1").status == "running"
    _release(init, in_r, out_w)


def test_a_failed_start_container_hook_fails_start_with_its_reason(tmp_path: Path) -> None:
    manager, runtime, init, in_r, out_w = _created(tmp_path)
    runtime.sendall(b"error HOOK_FAILED startContainer hook #0 (/h) failed: exit status 1\n")
    with pytest.raises(ContainerError) as info:
        manager.start("c1", timeout=5)
    assert (info.value.code, info.value.reason, str(info.value)) == (
        "FAILED_PRECONDITION",
        "HOOK_FAILED",
        "startContainer hook #0 (/h) failed: exit status 1",
    )
    with pytest.raises(ContainerError, match="not created"):
        manager.start("c1")  # started once, whatever came of it
    runtime.close()
    _release(init, in_r, out_w)


def test_start_kills_an_init_whose_hooks_outlive_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    killed: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append((pid, sig)))
    manager, runtime, init, in_r, out_w = _created(tmp_path)
    with pytest.raises(ContainerError) as info:
        manager.start("c1", timeout=0.2)
    assert info.value.code == "DEADLINE_EXCEEDED"
    assert killed == [(123, signal.SIGKILL)]
    runtime.close()
    _release(init, in_r, out_w)


class _RuntimeWaitingForStart:
    """A zygote whose "runtime" (a thread) waits for ``start`` before it reports ready: it
    gets it only if the agent sends it ahead (an exec), and then plays a runtime that
    execs (ready with the pid of a real process, its sync socket closed)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.got: bytes = b""
        self.thread: threading.Thread | None = None

    def spawn(self, module: str, args: list[str], fds: tuple[int, ...]) -> int:
        sync = socket.socket(fileno=os.dup(fds[4]))

        def runtime() -> None:
            with sync:
                sync.settimeout(5)
                try:
                    self.got = sync.recv(64)
                except TimeoutError:
                    return  # never got it: the agent times out waiting for ready
                sync.sendall(f"ready {self.pid}\n".encode())

        self.thread = threading.Thread(target=runtime)
        self.thread.start()
        return self.pid


def test_an_exec_runs_as_soon_as_it_is_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent sends an exec's ``start`` ahead of its ``ready``: the runtime goes on to
    execve without waiting for the agent to be scheduled between the two."""
    from agent import containers

    monkeypatch.setattr(containers, "READY_TIMEOUT", 10.0)
    init, in_r, out_w = _pipes_process()
    manager = _manager(tmp_path, init)
    target = subprocess.Popen(["sleep", "30"])
    try:
        zygote = _RuntimeWaitingForStart(target.pid)
        manager._zygote = zygote  # type: ignore[assignment]
        started = time.monotonic()
        assert manager.exec("c1", "e1", b'{"args": ["true"]}') == (target.pid, False)
        assert zygote.got == b"start\n"
        assert time.monotonic() - started < 5
        assert zygote.thread is not None
        zygote.thread.join()
    finally:
        target.kill()
        target.wait()
    proc = manager.process("c1", "e1")
    proc.release_all()
    _release(init, in_r, out_w)


class _RuntimeKeepingStdin(_RuntimeWaitingForStart):
    """As its parent, and it keeps a copy of the stdin it was given (the pipe's read end)."""

    def spawn(self, module: str, args: list[str], fds: tuple[int, ...]) -> int:
        self.stdin = os.dup(fds[0])
        return super().spawn(module, args, fds)


@pytest.mark.parametrize("close_stdin", [True, False])
def test_exec_process_closes_the_stdin_pipe_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, close_stdin: bool
) -> None:
    """ExecProcess.close_stdin (protocol 1.13): the exec's stdin is still a pipe (as runc
    exec's), at EOF as soon as the call returns; without it the agent keeps the write end."""
    from agent import containers

    monkeypatch.setattr(containers, "READY_TIMEOUT", 10.0)
    init, in_r, out_w = _pipes_process()
    manager = _manager(tmp_path, init)
    target = subprocess.Popen(["sleep", "30"])
    zygote = _RuntimeKeepingStdin(target.pid)
    try:
        manager._zygote = zygote  # type: ignore[assignment]
        got = manager.exec("c1", "e1", b'{"args": ["cat"]}', close_stdin=close_stdin)
        assert got == (target.pid, close_stdin)
        assert stat.S_ISFIFO(os.fstat(zygote.stdin).st_mode)
        proc = manager.process("c1", "e1")
        assert (proc.stdin is None) is close_stdin
        if close_stdin:
            assert os.read(zygote.stdin, 1) == b""  # EOF: no writer left
        assert zygote.thread is not None
        zygote.thread.join()
    finally:
        target.kill()
        target.wait()
        os.close(zygote.stdin)
    manager.process("c1", "e1").release_all()
    _release(init, in_r, out_w)


def test_a_terminal_execs_stdin_is_not_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a terminal, close_stdin does nothing (its ^D is CloseStdin's) and says so."""
    from agent import containers

    monkeypatch.setattr(containers, "READY_TIMEOUT", 10.0)
    init, in_r, out_w = _pipes_process()
    manager = _manager(tmp_path, init)
    pty_master, pty_peer = os.openpty()

    class WithTerminal(_RuntimeWaitingForStart):
        def spawn(self, module: str, args: list[str], fds: tuple[int, ...]) -> int:
            sync = socket.socket(fileno=os.dup(fds[4]))

            def runtime() -> None:
                with sync:
                    sync.recv(64)
                    socket.send_fds(sync, [f"ready {self.pid}\n".encode()], [pty_master])

            self.thread = threading.Thread(target=runtime)
            self.thread.start()
            return self.pid

    target = subprocess.Popen(["sleep", "30"])
    zygote = WithTerminal(target.pid)
    try:
        manager._zygote = zygote  # type: ignore[assignment]
        doc = b'{"args": ["sh"], "terminal": true}'
        assert manager.exec("c1", "e1", doc, close_stdin=True) == (target.pid, False)
        assert manager.process("c1", "e1").stdin is not None
        assert zygote.thread is not None
        zygote.thread.join()
    finally:
        target.kill()
        target.wait()
        os.close(pty_master)
        os.close(pty_peer)
    manager.process("c1", "e1").release_all()
    _release(init, in_r, out_w)


def test_namespaces_of_the_init_are_held_until_the_container_is_removed(tmp_path: Path) -> None:
    """The init's exit does not dismantle its namespaces (their mounts, network): the agent
    holds them until RemoveContainer, off the path of the exit status."""
    from agent.containers import HELD_NAMESPACES, hold_namespaces

    child = subprocess.Popen(["sleep", "30"])
    try:
        held = hold_namespaces(child.pid)
        assert len(held) == len(HELD_NAMESPACES)
        for fd, name in zip(held, HELD_NAMESPACES, strict=True):
            assert os.readlink(f"/proc/self/fd/{fd}") == os.readlink(f"/proc/{child.pid}/ns/{name}")
    finally:
        child.kill()
        child.wait()
    assert hold_namespaces(child.pid) == []  # gone: nothing to hold
    proc, in_r, out_w = _pipes_process()
    manager = _manager(tmp_path, proc)
    manager.get("c1").namespaces = held
    proc.on_exit(0)
    manager.remove("c1")
    for fd in held:
        with pytest.raises(OSError):
            os.fstat(fd)
    os.close(in_r)
    os.close(out_w)


def test_the_layout_is_set_up_ahead_when_the_restored_vm_says_which() -> None:
    from agent import cgroup_layout

    chosen = threading.Event()
    calls: list[str] = []

    def setup(version: str, parent: str) -> None:
        calls.append(version)
        chosen.set()

    manager = ContainerManager(pid1.Reaper(), layout=cgroup_layout.Layout("/x/pysandbox", setup))
    manager.prepare_ahead("v1")
    assert chosen.wait(10)
    manager._layout.choose(None)  # the first container, without a preference: v1, set up once
    assert calls == ["v1"]
    with pytest.raises(ValueError, match="use cgroup v1"):
        manager._layout.choose("v2")
    untouched = ContainerManager(pid1.Reaper(), layout=cgroup_layout.Layout("/x", setup))
    untouched.prepare_ahead("")
    time.sleep(0.2)
    assert untouched._layout.version is None and calls == ["v1"]
