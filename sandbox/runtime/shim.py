"""The per-container host shim (design decision 3).

Clients (conmon, containerd's runc shim) wait on the pid written to ``--pid-file`` and take its
exit status as the container's. The container runs inside a VM, so that pid is this small
process: it relays the container's stdio between its own fds (inherited from ``create``/
``exec``) or a host pty (whose master went to ``--console-socket``) and the guest agent, waits
for the process to exit, records the exit status and exits with it (128+N for signal N).

Started by :func:`spawn` in a new session; when the spawning CLI exits it is reparented to the
caller's subreaper. It reports ``ready`` (or ``error <message>``) on ``--ready-fd`` before relaying.
With a terminal it holds none of the caller's stdio: containerd's shim reads the output of
``create``/``exec`` until EOF before it takes the pty master from the console socket, so a
shim keeping that pipe open would hang ``ctr run -t`` for good (runc's container process has
the pty, not runc's stdio, too).

The exit status is reported as soon as the process is gone: the output relay is then given
:data:`DRAIN_TIMEOUT` seconds at most to deliver what the process wrote (the agent ends the
streams once that is read, even while a background child still holds them open), so a
leftover holder of stdout cannot keep the container "running" for a client.

An exec's shim names itself in ``<exec id>.standin`` in the container's directory while it
runs, so that ``ps --format json`` can list the host pids standing for the container's
processes.

Clients also signal that pid directly: containerd's runc shim kills exec processes with
kill(2) on the pid of their ``--pid-file`` (``ctr task kill --exec-id``, and SIGKILL when a
CRI ExecSync, e.g. a probe, times out). So the shim forwards the catchable signals in
:data:`FORWARDED_SIGNALS` to its process in the guest, and a watcher process it forks first
kills that process if the shim dies before it (SIGKILL cannot be caught); otherwise the
guest process would outlive what the client believes is gone.

The shim of a detached run (``--monitor``) has that watcher do the run's monitoring too, so a
run costs no extra host process: once the shim is gone it releases the run's VM
(:func:`sandbox.run.monitor.release_after_shim`), and after ``--timeout`` seconds it kills
the run's processes (the shim then exits 137). The watcher is forked before anything heavy is
imported; what the release needs is imported only then.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import fcntl
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from hypervisor.process import ProcessHandle
from sandbox import IMPORT_ROOT
from sandbox import store as state
from sandbox.errors import AgentError, ConfigError, NetworkError
from sandbox.runtime import standin_netns
from sandbox.runtime.record import EXIT_FILE, standin_file
from sandbox.signal_forward import SignalForwarder

if TYPE_CHECKING:
    from sandbox.pod.agent_client import ContainerClient
    from sandbox.pod.stdio import StdioRelay

_READY_TIMEOUT = 30.0
#: Signals sent to the shim that are meant for its process in the guest.
FORWARDED_SIGNALS = (
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGALRM,
    signal.SIGTERM,
)
_WATCHER_DISMISS = b"d"
#: In a shim with a terminal, the fd that holds the host pty slave.
TERMINAL_FD = 0
#: Seconds the output relay may take, after the process exited, to deliver what it wrote.
DRAIN_TIMEOUT = 5.0


def spawn(
    root: Path,
    container_id: str,
    pod_address: str,
    exec_id: str = "",
    terminal: bool = False,
    console_socket: Path | None = None,
    monitor: bool = False,
    timeout: float | None = None,
    netns: standin_netns.StandinNetns | None = None,
) -> ProcessHandle:
    """Start a shim inheriting this process's stdio (none of it with a terminal: the pty from
    ``console_socket`` is its stdio then); return it once it reported ready.

    ``netns``: the shim moves into a new, empty network namespace made so before it reports
    ready (:mod:`sandbox.runtime.standin_netns`); AgentError if it cannot.

    ``monitor``: the container is detached run ``container_id`` (see the module docstring),
    killed after ``timeout`` seconds when that is set."""
    ready_r, ready_w = os.pipe()
    argv = [
        sys.executable,
        "-m",
        "sandbox.runtime.shim",
        "--root",
        str(root),
        "--id",
        container_id,
        "--agent",
        pod_address,
        "--exec-id",
        exec_id,
        "--ready-fd",
        str(ready_w),
    ]
    if terminal:
        argv.append("--terminal")
    if console_socket is not None:
        argv += ["--console-socket", str(console_socket)]
    if monitor:
        argv.append("--monitor")
        if timeout is not None:
            argv += ["--timeout", repr(float(timeout))]
    if netns is not None:
        argv += netns.argv()
    try:
        stdio = subprocess.DEVNULL if terminal else None
        proc = subprocess.Popen(
            argv,
            stdin=stdio,
            stdout=stdio,
            stderr=stdio,
            pass_fds=(ready_w,),
            start_new_session=True,
            cwd="/",
            env={**os.environ, "PYTHONPATH": IMPORT_ROOT},
        )
    finally:
        os.close(ready_w)
    with os.fdopen(ready_r, "rb") as ready:
        line = ready.readline(4096).decode(errors="replace").strip()
    if line != "ready":
        with contextlib.suppress(OSError):
            proc.kill()
        proc.wait()
        raise AgentError(line.removeprefix("error ") or "container shim failed to start")
    handle = ProcessHandle.of(proc.pid)
    proc.returncode = 0  # we never wait for it: its subreaper does (silences Popen.__del__)
    return handle


def _send_console(console_socket: Path, master: int) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(console_socket))
        fds = array.array("i", [master])
        sock.sendmsg([b"/dev/ptmx"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])


def _start_watcher(args: argparse.Namespace) -> int:
    """Fork the process that kills the guest process if this shim dies before it.

    Called before anything opens gRPC channels, threads or the terminal (fork-safe). The
    watcher blocks reading a pipe whose only write end the shim holds: a byte written there
    (:func:`_dismiss_watcher`) means the shim is done and the watcher just exits; EOF means
    the shim died first, so the watcher sends SIGKILL to the guest process. With
    ``args.monitor`` it then releases the detached run (and kills it after
    ``args.timeout`` seconds). Returns the write end.
    """
    read_end, write_end = os.pipe()
    if os.fork() != 0:
        os.close(read_end)
        return write_end
    status = 0
    try:
        os.close(write_end)
        os.close(args.ready_fd)  # the spawner's ready pipe: only the shim answers on it
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # never hold the container's stdio (clients wait for its EOF)
            os.dup2(devnull, fd)
        os.close(devnull)
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        if _await_shim(read_end, args) != _WATCHER_DISMISS:
            from sandbox.pod.agent_client import ContainerClient

            with contextlib.suppress(Exception):
                client = ContainerClient(args.agent, timeout=5.0)
                client.signal(args.id, args.exec_id, signal.SIGKILL)
        if args.monitor:
            from sandbox.run.monitor import release_after_shim

            release_after_shim(args.root, args.id)
    except BaseException:
        status = 1
    finally:
        os._exit(status)


def _await_shim(read_end: int, args: argparse.Namespace) -> bytes:
    """In the watcher: the byte the shim sent (b"" when it died), once it is done. A detached
    run still running after ``args.timeout`` seconds is killed (SIGKILL to all its processes)
    and then awaited as any other."""
    if args.monitor and args.timeout is not None:
        ready, _, _ = select.select([read_end], [], [], args.timeout)
        if not ready:
            from sandbox.runtime import kill

            with contextlib.suppress(Exception):  # it may be ending meanwhile, or its VM gone
                kill.kill(args.root, args.id, signal.SIGKILL, all_processes=True)
    return os.read(read_end, 1)


def _dismiss_watcher(write_end: int) -> None:
    with contextlib.suppress(OSError):
        os.write(write_end, _WATCHER_DISMISS)
        os.close(write_end)


def _forward_signals(
    client: ContainerClient,
    container_id: str,
    exec_id: str,
    watcher: int,
    done: threading.Event,
    standin: Path | None,
) -> None:
    """Relay :data:`FORWARDED_SIGNALS` received by the shim to its guest process.

    A signal that cannot be delivered (the agent no longer knows the process, or the VM is
    gone) while the process has not been seen to exit takes its default action on the shim
    instead: it exits with 128+N, as the process would have.
    """

    def forward(signum: int) -> None:
        try:
            client.signal(container_id, exec_id, signum)
        except AgentError:
            if not done.is_set():
                _dismiss_watcher(watcher)
                drop_standin(standin)
                os._exit(128 + signum)

    SignalForwarder(dict.fromkeys(FORWARDED_SIGNALS, forward)).install()


def name_standin(root: Path, container_id: str, exec_id: str) -> Path | None:
    """Record this process as the host stand-in of exec ``exec_id`` (see
    :meth:`ContainerRecord.exec_standins`); the file to remove when it ends, or None when
    it could not be written (``ps`` then just does not list it)."""
    path = standin_file(root / container_id, exec_id)
    try:
        state.write_json_atomic(path, ProcessHandle.of(os.getpid()).to_json())
    except (OSError, ProcessLookupError):
        return None
    return path


def drop_standin(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()


def _wait(
    client: ContainerClient, args: argparse.Namespace, relay: StdioRelay, out: tuple[int, int]
) -> tuple[int, bool, list[StdioRelay]]:
    """Wait for the process: (status, oom, the relays to join).

    The agent proxy is a host process of its own: if it dies (or is killed) the calls in
    flight fail while the VM and the process run on. Then a new proxy is started (as any
    verb would) and the wait and the output relay resume; at most a chunk of output in flight
    is lost. Only when the VM is gone has the process gone with it (status 137).
    """
    from sandbox.pod.stdio import StdioRelay

    relays = [relay]
    for _ in range(_MAX_RECONNECTS):
        try:
            status, _sig, oom = client.wait_process(args.id, args.exec_id)
            return status, oom, relays
        except AgentError as exc:
            if not _transport_error(exc) or not _agent_back(args.root, args.id):
                break
        if relays[-1].errors:  # its streams broke with the connection: read them again
            relays.append(StdioRelay(client, args.id, args.exec_id, None, *out, args.terminal))
            relays[-1].start()
    return 137, False, relays  # the VM is gone: the container was killed with it


_MAX_RECONNECTS = 100


def _transport_error(exc: AgentError) -> bool:
    """Whether ``exc`` is the connection failing (not the agent answering an error)."""
    return exc.code in ("UNAVAILABLE", "CANCELLED")


def _agent_back(root: Path, container_id: str) -> bool:
    """Reach the agent of the container's pod again, through a new proxy if the old one
    died; False if the container or its VM is gone."""
    from sandbox.errors import SandboxError
    from sandbox.pod.lifecycle import Pod
    from sandbox.runtime.record import ContainerRecord

    time.sleep(0.2)
    try:
        pod = Pod.load(root, ContainerRecord.load(root, container_id).pod_id)
        qemu = pod.process("qemu")
        if qemu is None or not qemu.alive():
            return False
        with pod.client(timeout=10.0) as agent:
            agent.health()
    except (SandboxError, OSError):
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m sandbox.runtime.shim``; see the module docstring."""
    parser = argparse.ArgumentParser(prog="pysandbox-shim")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--agent", required=True)
    parser.add_argument("--exec-id", default="")
    parser.add_argument("--terminal", action="store_true")
    parser.add_argument("--console-socket", type=Path)
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--monitor", action="store_true")
    parser.add_argument("--timeout", type=float)
    parser.add_argument("--new-netns", nargs=2, metavar=("UID_MAP", "GID_MAP"))
    args = parser.parse_args(argv)
    if args.new_netns is not None:
        # First, while single-threaded; never go on in the caller's namespace.
        try:
            standin_netns.enter(standin_netns.from_options(*args.new_netns))
        except (ConfigError, NetworkError, OSError) as exc:
            with os.fdopen(args.ready_fd, "wb", buffering=0) as failed:
                failed.write(f"error {exc}\n".encode())
            sys.exit(1)
    watcher = _start_watcher(args)
    ready = os.fdopen(args.ready_fd, "wb", buffering=0)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    # A capped output file (RLIMIT_FSIZE, run -d's log) fails writes with EFBIG instead.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        from sandbox.pod.agent_client import ContainerClient
        from sandbox.pod.stdio import StdioRelay

        client = ContainerClient(args.agent)
        stdin: int | None = 0
        stdout, stderr = 1, 2

        def resize(*_: object) -> None:
            """Without a terminal there is nothing to resize."""

        if args.terminal:
            if args.console_socket is None:
                raise ConfigError("a terminal needs --console-socket")
            master, slave = os.openpty()
            _send_console(args.console_socket, master)
            os.close(master)
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)  # SIGWINCH reaches us on resize
            tty_attrs = termios.tcgetattr(slave)
            tty_attrs[3] &= ~(termios.ECHO | termios.ICANON | termios.ISIG | termios.IEXTEN)
            tty_attrs[1] &= ~termios.OPOST
            termios.tcsetattr(slave, termios.TCSANOW, tty_attrs)
            # The terminal is our fd 0, where `start` reads the size the caller set on the
            # master before the process runs (see runtime.start): a SIGWINCH relayed later
            # could lose the race with the process's first look at its terminal.
            os.dup2(slave, TERMINAL_FD)
            os.close(slave)
            slave = TERMINAL_FD
            stdin = stdout = stderr = slave

            def resize(*_: object) -> None:
                rows, cols = struct.unpack(
                    "HHHH", fcntl.ioctl(slave, termios.TIOCGWINSZ, b"\0" * 8)
                )[:2]
                if rows and cols:
                    with contextlib.suppress(AgentError):
                        client.resize(args.id, args.exec_id, rows, cols)

            SignalForwarder({signal.SIGWINCH: resize}).install()
        relay = StdioRelay(client, args.id, args.exec_id, stdin, stdout, stderr, args.terminal)
    except Exception as exc:
        _dismiss_watcher(watcher)  # nothing runs yet: the caller tears the container down
        ready.write(f"error {exc}\n".encode())
        sys.exit(1)
    standin = name_standin(args.root, args.id, args.exec_id) if args.exec_id else None
    done = threading.Event()
    _forward_signals(client, args.id, args.exec_id, watcher, done, standin)
    ready.write(b"ready\n")
    ready.close()
    relay.start()
    if args.terminal:
        resize()  # the size the caller set before we became the terminal's session leader
    status, oom, relays = _wait(client, args, relay, (stdout, stderr))
    done.set()
    drain_deadline = time.monotonic() + DRAIN_TIMEOUT
    for each in relays:
        each.join(max(0.0, drain_deadline - time.monotonic()))
    if not args.exec_id:  # an exec's status is its stand-in's exit status: nothing to keep
        with contextlib.suppress(OSError):
            state.write_json_atomic(args.root / args.id / EXIT_FILE, {"status": status, "oom": oom})
    drop_standin(standin)
    _dismiss_watcher(watcher)
    os._exit(status)


if __name__ == "__main__":
    main()
