"""QemuVM lifecycle and cleanup against a fake QEMU that speaks just enough QMP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypervisor.errors import HypervisorError, LaunchError, QMPError
from hypervisor.process import start_time
from hypervisor.qemu import QemuVM
from hypervisor.qemu_args import VMConfig

ROOT = Path(__file__).resolve().parents[2]

# The fake reads the same argv QemuVM renders; FAKE_QEMU_MODE selects a misbehaviour:
#   exit        print an error and exit 3 before creating the QMP socket
#   killed      SIGKILL itself before creating the QMP socket
#   silent      never create the QMP socket
#   stubborn    answer "quit" but keep running, ignore SIGTERM (needs SIGKILL)
#   lazy        answer "quit" but keep running until SIGTERM
FAKE_QEMU = textwrap.dedent(
    """
    import json, os, signal, socket, sys, time
    argv = sys.argv[1:]
    mode = os.environ.get("FAKE_QEMU_MODE", "")
    def chardev(ident):
        for i, arg in enumerate(argv):
            if arg == "-chardev" and f"id={ident}," in argv[i + 1]:
                opts = dict(kv.split("=", 1) for kv in argv[i + 1].split(",")[1:] if "=" in kv)
                return opts["path"]
        return None
    if mode == "exit":
        print("fake-qemu: -device bogus: no such device", file=sys.stderr)
        sys.exit(3)
    if mode == "killed":  # the OOM killer, or kill -9, before QMP answers
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "silent":
        time.sleep(3600)
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if "-pidfile" in argv:
        with open(argv[argv.index("-pidfile") + 1], "w") as f:
            f.write(f"{os.getpid()}\\n")
    agent = chardev("agent")
    if agent:
        a = socket.socket(socket.AF_UNIX); a.bind(agent); a.listen(1)
    srv = socket.socket(socket.AF_UNIX); srv.bind(chardev("qmp")); srv.listen(1)
    status = "prelaunch" if "-S" in argv else "running"
    def messages(conn):
        # QMP is a JSON stream: clients need not end messages with a newline.
        buf, decoder = "", json.JSONDecoder()
        while True:
            data = conn.recv(4096)
            if not data:
                return
            buf += data.decode()
            while buf.strip():
                try:
                    msg, end = decoder.raw_decode(buf.lstrip())
                except ValueError:
                    break
                buf = buf.lstrip()[end:]
                yield msg
    def serve(conn):
        global status
        greeting = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
                    "package": "fake"}, "capabilities": []}}
        conn.sendall(json.dumps(greeting).encode() + b"\\r\\n")
        for msg in messages(conn):
            cmd, ident = msg.get("execute"), msg.get("id")
            reply = {"return": {}}
            if cmd == "query-status":
                reply = {"return": {"status": status, "running": status == "running"}}
            elif cmd == "cont":
                status = "running"
            elif cmd == "stop":
                status = "paused"
            elif cmd not in ("qmp_capabilities", "quit"):
                reply = {"error": {"class": "CommandNotFound",
                                   "desc": f"The command {cmd} has not been found"}}
            if ident is not None:
                reply["id"] = ident
            conn.sendall(json.dumps(reply).encode() + b"\\r\\n")
            if cmd == "quit" and mode not in ("stubborn", "lazy"):
                sys.exit(0)
    print("fake-qemu: started", flush=True)
    while True:
        conn, _ = srv.accept()
        try:
            serve(conn)
        except OSError:
            pass  # the client hung up mid-reply: wait for the next one
        conn.close()
        """
)


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short path: unix socket paths are limited to 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="hv", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fake_qemu(workdir: Path) -> Path:
    script = workdir / "fake-qemu"
    script.write_text(f"#!{sys.executable}\n{FAKE_QEMU}")
    script.chmod(0o755)
    return script


@pytest.fixture
def vms() -> Iterator[list[QemuVM]]:
    """Every VM a test makes; all are killed at teardown whatever happened."""
    made: list[QemuVM] = []
    yield made
    for vm in made:
        vm.kill()


def make_config(workdir: Path) -> VMConfig:
    kernel = workdir / "vmlinux"
    kernel.write_bytes(b"")
    return VMConfig(
        name="t",
        kernel=kernel,
        cmdline="console=ttyS0",
        qmp_socket=workdir / "qmp.sock",
        agent_socket=workdir / "agent.sock",
        console_log=workdir / "console.log",
        pidfile=workdir / "qemu.pid",
    )


def new_vm(workdir: Path, fake_qemu: Path, vms: list[QemuVM], **kwargs: float) -> QemuVM:
    vm = QemuVM(make_config(workdir), qemu_binary=fake_qemu, **kwargs)
    vms.append(vm)
    return vm


def leftovers(workdir: Path) -> list[str]:
    return sorted(p.name for p in workdir.iterdir() if p.suffix in (".sock", ".pid"))


def test_start_paused_resume_stop(workdir: Path, fake_qemu: Path, vms: list[QemuVM]) -> None:
    vm = new_vm(workdir, fake_qemu, vms)
    vm.start()
    assert vm.status() == "prelaunch"
    assert vm.pids() == [vm.pid]
    assert leftovers(workdir) == ["agent.sock", "qemu.pid", "qmp.sock"]
    vm.resume()
    assert vm.status() == "running"
    vm.pause()
    assert vm.status() == "paused"
    vm.stop(timeout=5)
    assert vm.status() == "shutdown"
    assert vm.pids() == []
    assert vm.exitcode == 0
    assert leftovers(workdir) == []
    assert "fake-qemu: started" in vm.log_path.read_text()
    vm.stop()  # idempotent
    vm.kill()


def test_start_not_paused(workdir: Path, fake_qemu: Path, vms: list[QemuVM]) -> None:
    vm = new_vm(workdir, fake_qemu, vms)
    vm.start(paused=False)
    assert "-S" not in vm.argv
    assert vm.status() == "running"


def test_unknown_command_raises_qmp_error(
    workdir: Path, fake_qemu: Path, vms: list[QemuVM]
) -> None:
    vm = new_vm(workdir, fake_qemu, vms)
    vm.start()
    with pytest.raises(QMPError, match="CommandNotFound") as info:
        vm.qmp_execute("bogus")
    assert info.value.command == "bogus"
    assert info.value.reply is not None
    assert vm.status() == "prelaunch"  # the connection is per command: still usable


def test_kill_is_idempotent_and_cleans_up(
    workdir: Path, fake_qemu: Path, vms: list[QemuVM]
) -> None:
    vm = new_vm(workdir, fake_qemu, vms)
    vm.start()
    vm.kill()
    vm.kill()
    assert vm.status() == "shutdown"
    assert leftovers(workdir) == []


def test_early_exit_raises_launch_error_with_log_tail(
    workdir: Path, fake_qemu: Path, vms: list[QemuVM], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "exit")
    vm = new_vm(workdir, fake_qemu, vms)
    with pytest.raises(LaunchError, match="exited with status 3") as info:
        vm.start()
    assert info.value.exitcode == 3
    assert "no such device" in info.value.log_tail
    assert "no such device" in str(info.value)
    assert info.value.argv[0] == str(fake_qemu)
    assert info.value.reported  # QEMU said why: a state it was loading is to blame
    assert vm.status() == "shutdown"
    assert leftovers(workdir) == []


def test_a_killed_qemu_is_named_killed_and_not_reported(
    workdir: Path, fake_qemu: Path, vms: list[QemuVM], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "killed")
    vm = new_vm(workdir, fake_qemu, vms)
    with pytest.raises(LaunchError) as info:
        vm.start()
    assert "was killed by SIGKILL during startup" in str(info.value)
    assert "None" not in str(info.value)
    assert info.value.exitcode == -9
    assert not info.value.reported  # not the fault of what it was given to load
    assert vm.status() == "shutdown"
    assert leftovers(workdir) == []


def test_qmp_never_ready_times_out_and_kills(
    workdir: Path, fake_qemu: Path, vms: list[QemuVM], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "silent")
    vm = new_vm(workdir, fake_qemu, vms, launch_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(LaunchError, match="did not answer qmp"):
        vm.start()
    assert time.monotonic() - started < 5
    assert vm.pids() == []


def test_missing_kernel(workdir: Path, fake_qemu: Path, vms: list[QemuVM]) -> None:
    vm = new_vm(workdir, fake_qemu, vms)
    vm.config.kernel.unlink()
    with pytest.raises(LaunchError, match="does not exist"):
        vm.start()


def test_missing_binary(workdir: Path, vms: list[QemuVM], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYSANDBOX_QEMU", "no-such-qemu-binary")
    vm = QemuVM(make_config(workdir))
    with pytest.raises(LaunchError, match="apt-get install qemu-system-x86"):
        vm.start()


def test_start_twice(workdir: Path, fake_qemu: Path, vms: list[QemuVM]) -> None:
    vm = new_vm(workdir, fake_qemu, vms)
    vm.start()
    with pytest.raises(HypervisorError, match="already started"):
        vm.start()


def test_stale_sockets_are_replaced(workdir: Path, fake_qemu: Path, vms: list[QemuVM]) -> None:
    (workdir / "qmp.sock").write_text("stale")
    vm = new_vm(workdir, fake_qemu, vms)
    vm.start()
    assert vm.status() == "prelaunch"


@pytest.mark.parametrize("mode", ["lazy", "stubborn"])
def test_stop_falls_back_to_signals(
    workdir: Path,
    fake_qemu: Path,
    vms: list[QemuVM],
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", mode)
    vm = new_vm(workdir, fake_qemu, vms)
    vm.start()
    vm.stop(timeout=0.2)
    assert vm.status() == "shutdown"
    assert leftovers(workdir) == []
    assert vm.exitcode == (-15 if mode == "lazy" else -9)


def test_attach_in_same_process(workdir: Path, fake_qemu: Path, vms: list[QemuVM]) -> None:
    vm = new_vm(workdir, fake_qemu, vms)
    vm.start()
    again = QemuVM.attach(vm.config, vm.handle.pid, vm.handle.start)
    assert again.status() == "prelaunch"
    again.resume()
    assert vm.status() == "running"
    # Without a start time the pid is accepted because its cmdline names the QMP socket.
    assert QemuVM.attach(vm.config, vm.pid).status() == "running"
    # A wrong start time (pid reuse) is never signalled.
    reused = QemuVM.attach(vm.config, vm.pid, vm.handle.start + 1)
    assert reused.status() == "shutdown"
    reused.stop()
    assert vm.status() == "running"
    again.stop(timeout=5)
    assert vm.status() == "shutdown"
    assert leftovers(workdir) == []


def test_attach_to_unrelated_pid_is_shutdown(workdir: Path) -> None:
    other = QemuVM.attach(make_config(workdir), os.getpid())
    assert other.status() == "shutdown"
    other.kill()  # must not signal the test process
    assert start_time(os.getpid()) is not None


def test_vm_outlives_its_starter_and_is_stopped_by_another_process(
    workdir: Path, fake_qemu: Path
) -> None:
    starter = textwrap.dedent(
        f"""
        import json, sys
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_qemu_lifecycle import make_config
        from hypervisor.qemu import QemuVM
        vm = QemuVM(make_config(Path({str(workdir)!r})), qemu_binary={str(fake_qemu)!r})
        vm.start()
        vm.resume()
        print(json.dumps(vm.handle.to_json()))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", starter], check=True, capture_output=True, text=True, timeout=30
    )
    record = json.loads(out.stdout)
    vm = QemuVM.attach(make_config(workdir), record["pid"], record["start"])
    try:
        assert vm.status() == "running"  # the starter has exited; QEMU has not
        vm.stop(timeout=5)
        assert vm.status() == "shutdown"
        assert leftovers(workdir) == []
    finally:
        vm.kill()


def test_unwritable_log_dir_is_a_launch_error(workdir: Path, fake_qemu: Path) -> None:
    config = make_config(workdir)
    bad = VMConfig(**{**config.__dict__, "console_log": workdir / "missing" / "console.log"})
    with pytest.raises(LaunchError, match="No such file or directory"):
        QemuVM(bad, qemu_binary=fake_qemu).start()


def test_tap_fds_of_nics_are_inherited(workdir: Path, fake_qemu: Path, vms: list[QemuVM]) -> None:
    import dataclasses

    from hypervisor.qemu_args import NicConfig

    read_end, write_end = os.pipe()  # stands in for an open tap (not inheritable: PEP 446)
    try:
        config = dataclasses.replace(
            make_config(workdir), nics=(NicConfig("02:00:00:00:00:01", fd=write_end),)
        )
        vm = QemuVM(config, qemu_binary=fake_qemu)
        vms.append(vm)
        vm.start()
        assert f"tap,id=net0,fd={write_end}" in vm.argv
        inherited = os.readlink(f"/proc/{vm.pid}/fd/{write_end}")
        assert inherited == os.readlink(f"/proc/self/fd/{write_end}")
        vm.kill()
    finally:
        os.close(read_end)
        os.close(write_end)


def test_sigterm_during_a_qmp_exchange_is_handled_after_it_without_asyncio_noise(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The CLI turns SIGTERM into SystemExit to undo a start (sandbox/cli/commands.py); one
    that arrives while a QMP exchange's task runs is handled once the exchange ends, so no
    asyncio task is abandoned half-way (before: "Task exception was never retrieved" with a
    traceback, "Task was destroyed but it is pending!" on stderr: seen under ``run -d``)."""
    import asyncio
    import gc
    import os
    import signal

    from hypervisor.qmp import QMP

    finished = []

    async def exchange() -> int:
        os.kill(os.getpid(), signal.SIGTERM)  # its handler runs inside this task's step
        await asyncio.sleep(0.1)
        finished.append(True)
        return 7

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    qmp = QMP(tmp_path / "qmp.sock")
    try:
        with pytest.raises(SystemExit) as caught:
            qmp._run(exchange(), 5.0, "test")
        assert caught.value.code == 128 + signal.SIGTERM
        assert finished == [True]
    finally:
        signal.signal(signal.SIGTERM, previous)
        qmp.close()
    gc.collect()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Task" not in err, err
