"""The per-container host shim (design decision 3): the host process standing for a container
process.

Clients (conmon, containerd's runc shim) wait on the pid written to ``--pid-file`` and take its
exit status as the container's. The container runs inside a VM, so that pid is this small
process. It hands its stdio — its own fds (inherited from ``create``/``exec``) or a host pty
(whose master went to ``--console-socket``) — to the pod's agent proxy over ``<pod>/shim.sock``
(``SCM_RIGHTS``, :mod:`sandbox.pod.standin_wire`); the proxy, which holds the pod's gRPC
channel, relays them and waits for the process (:mod:`sandbox.pod.standin_service`). The shim
forwards signals and terminal sizes as messages, records the exit status it is sent and exits
with it (128+N for signal N). It imports no gRPC and runs ``python -S``: a few MiB per
container instead of an interpreter with grpcio (docs/performance.md, "Host footprint").

Started by :func:`spawn` in a new session; when the spawning CLI exits it is reparented to the
caller's subreaper. It reports ``ready`` (or ``error <message>``) on ``--ready-fd`` once the
proxy relays. With a terminal it holds none of the caller's stdio: containerd's shim reads the
output of ``create``/``exec`` until EOF before it takes the pty master from the console
socket, so a shim keeping that pipe open would hang ``ctr run -t`` for good (runc's container
process has the pty, not runc's stdio, too).

The exit status is reported as soon as the process is gone: the proxy gives the output relay
:data:`DRAIN_TIMEOUT` seconds at most to deliver what the process wrote (the agent ends the
streams once that is read, even while a background child still holds them open), so a
leftover holder of stdout cannot keep the container "running" for a client.

An exec's shim names itself in ``<exec id>.standin`` in the container's directory while it
runs, so that ``ps --format json`` can list the host pids standing for the container's
processes.

Clients also signal that pid directly: containerd's runc shim kills exec processes with
kill(2) on the pid of their ``--pid-file`` (``ctr task kill --exec-id``, and SIGKILL when a
CRI ExecSync, e.g. a probe, times out). So the shim forwards the catchable signals in
:data:`FORWARDED_SIGNALS` to its process in the guest; SIGKILL cannot be caught, and the proxy
kills the process when the shim's connection closes before the exit status was sent;
otherwise the guest process would outlive what the client believes is gone. If the proxy dies
instead, the shim has a new one started (a short-lived full interpreter does that: the shim
itself cannot import the pod machinery) and attaches again.

The shim runs as root without any capability (``setpriv --inh-caps=-all --bounding-set=-all
--no-new-privs``): it needs uid 0 only for root's files and sockets (the pod's ``shim.sock``,
the container's state directory, the client's console socket); docs/trust-boundaries.md.

A detached run (``monitor``) also gets a watcher (:mod:`sandbox.runtime.shim_watch`), a
``/bin/sh`` started by :func:`spawn` reading a pipe whose only write end the shim inherits
(``--held-fd``): end-of-file there means the shim is gone, SIGKILL included. The watcher keeps
root's capabilities, because releasing the run's VM needs them (killing the jailed QEMU,
unmounting its files). Once the shim is gone it becomes ``python -m sandbox.run.monitor``
(exec), which releases the run (:func:`sandbox.run.monitor.release_after_shim`); after
``--timeout`` seconds it does so with ``--kill`` first (the run's processes get SIGKILL; the
shim then exits 137). The shim also gets a pidfd of a pod process its container cannot do
without (``--pod-fd``: the pod's virtiofsd); when that process is gone, the container's
processes wait for their files for ever, so the shim writes ``broken`` into that pipe and the
watcher runs the monitor with ``--broken`` (which logs the cause and kills the shim).
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import struct
import sys
import termios

from sandbox import IMPORT_ROOT
from sandbox.errors import AgentError, ConfigError
from sandbox.pod import standin_wire as wire
from sandbox.runtime.record_names import EXIT_FILE, standin_name

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~0.6 MiB)

if TYPE_CHECKING:  # the shim imports neither pathlib nor typing: ~1.5 MiB per container
    from pathlib import Path
    from typing import Any

    from hypervisor.process import ProcessHandle
    from sandbox.runtime.standin_netns import StandinNetns

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
#: In a shim with a terminal, the fd that holds the host pty slave.
TERMINAL_FD = 0
#: Seconds the output relay may take, after the process exited, to deliver what it wrote.
DRAIN_TIMEOUT = 5.0
#: Times the shim attaches to a new proxy after the last one died, at most.
_MAX_REATTACH = 100


def spawn(
    root: Path,
    container_id: str,
    pod_address: str,
    exec_id: str = "",
    terminal: bool = False,
    console_socket: Path | None = None,
    monitor: bool = False,
    timeout: float | None = None,
    output_limit: int | None = None,
    netns: StandinNetns | None = None,
    pod_process: ProcessHandle | None = None,
) -> ProcessHandle:
    """Start a shim inheriting this process's stdio (none of it with a terminal: the pty from
    ``console_socket`` is its stdio then); return it once it reported ready.

    ``netns``: the shim moves into a new, empty network namespace made so before it reports
    ready (:mod:`sandbox.runtime.standin_netns`); AgentError if it cannot. It then starts
    with root's capabilities and drops them all (exec through setpriv) once inside.

    ``monitor``: the container is detached run ``container_id`` (see the module docstring),
    killed after ``timeout`` seconds when that is set. ``output_limit``: the shim's
    RLIMIT_FSIZE (bytes), so that output files are kept within it (writes beyond are dropped);
    a limit the shim inherits applies as well. ``pod_process`` (with ``monitor``): a process
    of the pod without which the container cannot go on (its virtiofsd): the shim polls a
    pidfd of it and has the watcher release the run when it is gone, too. AgentError with the
    shim's reason if it did not get ready."""
    import subprocess

    from hypervisor.process import ProcessHandle
    from hypervisor.virtiofsd import SETPRIV

    ready_r, ready_w = os.pipe()
    # A detached run's watcher reads this pipe: the shim alone holds the write end (inherited;
    # its own children close it), so it reads end-of-file when the shim is gone.
    held_r, held_w = os.pipe() if monitor else (-1, -1)
    pod_fd = -1
    if monitor and pod_process is not None:
        with contextlib.suppress(OSError):  # gone already: the shim cannot tell
            pod_fd = pod_process.pidfd()
    passed = [fd for fd in (ready_w, held_w, pod_fd) if fd >= 0]
    # Without capabilities from the start, unless it must make its namespace first.
    unprivileged = [str(SETPRIV), *UNPRIVILEGED, "--"] if netns is None else []
    argv = [
        *unprivileged,
        sys.executable,
        "-S",  # no site: the shim needs only the standard library and this package
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
    if output_limit is not None:
        argv += ["--output-limit", str(int(output_limit))]
    if netns is not None:
        argv += netns.argv()
    if held_w >= 0:
        argv += ["--held-fd", str(held_w)]
    if pod_fd >= 0:
        argv += ["--pod-fd", str(pod_fd)]
    try:
        stdio = subprocess.DEVNULL if terminal else None
        proc = subprocess.Popen(
            argv,
            stdin=stdio,
            stdout=stdio,
            stderr=stdio,
            pass_fds=passed,
            start_new_session=True,
            cwd="/",
            env={**os.environ, "PYTHONPATH": IMPORT_ROOT},
        )
    except BaseException:
        if held_r >= 0:
            os.close(held_r)
        raise
    finally:
        for fd in passed:
            os.close(fd)
    with os.fdopen(ready_r, "rb") as ready:
        # Bounded: a shim that neither reports nor exits must not hold its caller (create,
        # with SIGTERM held meanwhile) forever. Its own steps time out well within this.
        if select.select([ready], [], [], SPAWN_TIMEOUT)[0]:
            line = ready.readline(4096).decode(errors="replace").strip()
        else:
            line = f"error the container shim did not report ready within {SPAWN_TIMEOUT:g}s"
    if line != "ready":
        if held_r >= 0:
            os.close(held_r)
        with contextlib.suppress(OSError):
            proc.kill()
        proc.wait()
        raise AgentError(line.removeprefix("error ") or "container shim failed to start")
    handle = ProcessHandle.of(proc.pid)
    try:
        if held_r >= 0:
            _spawn_watcher(root, container_id, held_r, timeout)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    proc.returncode = 0  # we never wait for it: its subreaper does (silences Popen.__del__)
    return handle


#: In a detached run's record directory: ``PID:START`` of its watcher (then its monitor).
WATCHER_FILE = "watcher"

#: How long spawn waits for a shim's ``ready`` line (seconds): its attach to the pod's proxy
#: (:data:`_READY_TIMEOUT`) and its network namespace, with room for a loaded host.
SPAWN_TIMEOUT = 90.0

#: setpriv options of a shim: no capability in any set, for good.
UNPRIVILEGED = ("--inh-caps=-all", "--bounding-set=-all", "--no-new-privs")


def _spawn_watcher(root: Path, name: str, held_r: int, timeout: float | None) -> None:
    """Start the watcher of detached run ``name`` (module docstring) with ``held_r``, the read
    end of the pipe the shim holds the write end of, as its stdin (closed here)."""
    import subprocess

    from hypervisor.process import ProcessHandle
    from sandbox.runtime import shim_watch

    try:
        watcher = subprocess.Popen(
            shim_watch.argv(sys.executable, str(root), name, timeout),
            stdin=held_r,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            cwd="/",
            env={**os.environ, "PYTHONPATH": IMPORT_ROOT},
        )
        watcher.returncode = 0  # never waited for here (silences Popen.__del__)
    finally:
        os.close(held_r)
    # Recorded so that ``rm`` can wait for it: it becomes the run's monitor, which blocks on
    # the run lock the removal holds and exits once it finds the run gone.
    with contextlib.suppress(ProcessLookupError, OSError):
        handle = ProcessHandle.of(watcher.pid)
        (root / name / WATCHER_FILE).write_text(f"{handle.pid}:{handle.start}\n")


class Args:
    """The shim's command line (written by :func:`spawn` only; argparse costs memory)."""

    def __init__(self, argv: list[str]) -> None:
        values: dict[str, str] = {}
        flags: set[str] = set()
        items = iter(argv)
        for item in items:
            if item == "--terminal":
                flags.add(item)
            elif item == "--new-netns":  # UID_MAP GID_MAP (standin_netns.StandinNetns.argv)
                values[item] = f"{next(items, '')} {next(items, '')}"
            elif item in _VALUED:
                values[item] = next(items, "")
            else:
                raise ConfigError(f"pysandbox-shim: unknown argument {item!r}")
        for needed in _NEEDED:
            if needed not in values:
                raise ConfigError(f"pysandbox-shim: {needed} is required")
        self.root = values["--root"]
        self.id = values["--id"]
        self.agent = values["--agent"]
        self.exec_id = values.get("--exec-id", "")
        self.ready_fd = int(values["--ready-fd"])
        self.terminal = "--terminal" in flags
        console = values.get("--console-socket")
        self.console_socket = console or None
        new_netns = values.get("--new-netns")
        self.new_netns = None if new_netns is None else tuple(new_netns.split(" ", 1))
        timeout = values.get("--timeout")
        self.timeout = float(timeout) if timeout else None
        limit = values.get("--output-limit")
        self.output_limit = int(limit) if limit else None
        self.held_fd = int(values.get("--held-fd") or -1)
        self.pod_fd = int(values.get("--pod-fd") or -1)


_NEEDED = ("--root", "--id", "--agent", "--ready-fd")
_VALUED = (
    "--root",
    "--id",
    "--agent",
    "--exec-id",
    "--ready-fd",
    "--console-socket",
    "--timeout",
    "--output-limit",
    "--held-fd",
    "--pod-fd",
)


def _send_console(console_socket: str, master: int) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(console_socket)
        fds = array.array("i", [master])
        sock.sendmsg([b"/dev/ptmx"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])


def name_standin(root: Path | str, container_id: str, exec_id: str) -> str | None:
    """Record this process as the host stand-in of exec ``exec_id`` (see
    :meth:`ContainerRecord.exec_standins`); the file to remove when it ends, or None when
    it could not be written (``ps`` then just does not list it)."""
    from hypervisor.process import ProcessHandle

    directory = os.path.join(root, container_id)
    path = os.path.join(directory, standin_name(exec_id))
    # Renamed into place, without fsync (a crash ends the process it names anyway) nor
    # tempfile (its import is a tenth of an attached exec's start-up).
    tmp = os.path.join(directory, f".{standin_name(exec_id)}.{os.getpid()}")
    try:
        data = json.dumps(ProcessHandle.of(os.getpid()).to_json()).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except (OSError, ProcessLookupError):
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return None
    return path


def drop_standin(path: str | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            os.unlink(path)


class _Link:
    """The shim's connection to its pod's proxy (:mod:`sandbox.pod.standin_wire`).

    Messages that cannot be sent while the proxy is being replaced are kept and sent once
    attached again (:meth:`attach`)."""

    def __init__(self, args: Args, fds: tuple[int, ...], stdin: bool) -> None:
        self._args = args
        self._fds = fds
        self._stdin = stdin
        self._sock: socket.socket | None = None
        self._pending: list[dict[str, Any]] = []

    def attach(self, resume: bool) -> None:
        """Connect, hand the fds over and wait for ``attached``; AgentError otherwise."""
        self.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.settimeout(_READY_TIMEOUT)
            sock.connect(wire.socket_path(self._args.agent))
            message = {
                "op": "attach",
                "id": self._args.id,
                "exec_id": self._args.exec_id,
                "terminal": self._args.terminal,
                "stdin": self._stdin,
                "resume": resume,
                "output_limit": _output_limit(),
            }
            wire.send(sock, message, self._fds)
            answer, fds = wire.receive(sock)
            wire.close_all(fds)
        except (OSError, wire.WireError) as exc:
            sock.close()
            raise AgentError(f"cannot reach the agent proxy: {exc}") from None
        if answer is None or answer["op"] != "attached":
            sock.close()
            why = "it closed the connection" if answer is None else answer.get("message")
            raise AgentError(f"the agent proxy did not take the container's stdio: {why}")
        sock.settimeout(None)
        self._sock = sock
        pending, self._pending = self._pending, []
        for each in pending:
            self.send(each)

    def send(self, message: dict[str, Any]) -> None:
        """Send now, or once attached again if the proxy is gone."""
        try:
            if self._sock is None:
                raise OSError("not attached")
            wire.send(self._sock, message)
        except OSError:
            self._pending.append(message)

    def receive(self) -> dict[str, Any] | None:
        """The proxy's next message; None once the proxy is gone. Meanwhile, when the pod
        process of ``--pod-fd`` is gone, tells the run's watcher so (``broken`` on
        ``--held-fd``, once; module docstring) and goes on waiting."""
        if self._sock is None:
            return None
        while self._args.pod_fd >= 0:
            sock = self._sock.fileno()
            if sock in select.select([sock, self._args.pod_fd], [], [])[0]:
                break
            _pod_process_gone(self._args)
        try:
            message, fds = wire.receive(self._sock)
        except (OSError, wire.WireError):
            return None
        wire.close_all(fds)
        return message

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _pod_process_gone(args: Args) -> None:
    """The pod process the container needs has exited: ``broken`` to the watcher (whose
    monitor kills this shim and releases the VM); stop watching the pidfd."""
    with contextlib.suppress(OSError):
        os.write(args.held_fd, b"broken\n")
    with contextlib.suppress(OSError):
        os.close(args.pod_fd)
    args.pod_fd = -1


def _revive(args: Args) -> bool:
    """Wait until the pod's agent answers again through a new proxy, in a separate full
    interpreter (the pod machinery imports gRPC; :mod:`sandbox.runtime.shim_revive`). True
    then, False if the container or its VM is gone. When the shim cannot start the proxy
    itself (a pod whose proxy needs a listener in its network namespace: CAP_SYS_ADMIN), it
    asks again, less and less often (up to every :data:`_REVIVE_MAX_PAUSE` s), until any
    pysandbox command reaching the pod has started one."""
    import time

    pause = 0.5
    while True:
        outcome = _revive_once(args)
        if outcome != WAIT_FOR_PROXY:
            return outcome == 0
        time.sleep(pause)
        pause = min(pause * 2, _REVIVE_MAX_PAUSE)


#: Exit status of sandbox.runtime.shim_revive: the proxy is gone and only a privileged
#: pysandbox command can start the next one.
WAIT_FOR_PROXY = 3
_REVIVE_MAX_PAUSE = 10.0


def _revive_once(args: Args) -> int:
    """Exit status of one run of sandbox.runtime.shim_revive (1 if it could not run)."""
    import subprocess

    code = "import sys; from sandbox.runtime.shim_revive import main; sys.exit(main(sys.argv[1:]))"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, str(args.root), args.id],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": IMPORT_ROOT},
            cwd="/",
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return 1
    return done.returncode


def _setup_terminal(args: Args, link: list[_Link]) -> int:
    """Open the host pty, send its master to the console socket, become its session's
    controlling process; the slave, at :data:`TERMINAL_FD`. SIGWINCH then sends the new
    size to the proxy (``link[0]``, set later)."""
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
    # The terminal is our fd 0, where `start` reads the size the caller set on the master
    # before the process runs (see runtime.start): a SIGWINCH relayed later could lose the
    # race with the process's first look at its terminal.
    os.dup2(slave, TERMINAL_FD)
    os.close(slave)

    def resize(*_: object) -> None:
        rows, cols = struct.unpack("HHHH", fcntl.ioctl(TERMINAL_FD, termios.TIOCGWINSZ, b"\0" * 8))[
            :2
        ]
        if rows and cols and link:
            link[0].send({"op": "resize", "rows": rows, "cols": cols})

    signal.signal(signal.SIGWINCH, resize)
    return TERMINAL_FD


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -S -m sandbox.runtime.shim``; see the module docstring."""
    args = Args(sys.argv[1:] if argv is None else argv)
    if args.new_netns is not None:
        _enter_netns_unprivileged(args, sys.argv[1:] if argv is None else argv)
    if args.output_limit is not None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (args.output_limit, args.output_limit))
    ready = os.fdopen(args.ready_fd, "wb", buffering=0)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    # A capped output file (RLIMIT_FSIZE, run -d's log) fails writes with EFBIG instead.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    holder: list[_Link] = []
    try:
        if args.terminal:
            fds: tuple[int, ...] = (_setup_terminal(args, holder),)
            has_stdin = True
        else:
            has_stdin = _open(0)
            fds = (0, 1, 2) if has_stdin else (1, 2)
        link = _Link(args, fds, has_stdin)
        link.attach(resume=False)
        holder.append(link)
    except Exception as exc:  # nothing runs yet: the caller tears the container down
        ready.write(f"error {exc}\n".encode())
        sys.exit(1)
    standin = name_standin(args.root, args.id, args.exec_id) if args.exec_id else None

    def forward(signum: int, _frame: object) -> None:
        # One packet, no lock and no thread (the shim has none): safe in a signal handler
        # wherever the main thread was (sandbox/signal_forward.py says why that matters).
        link.send({"op": "signal", "signum": signum})

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)
    ready.write(b"ready\n")
    ready.close()
    if args.terminal:
        os.kill(os.getpid(), signal.SIGWINCH)  # the size set before we led the session
    status, oom = 137, False  # unless told otherwise: the VM is gone, and the process with it
    for _ in range(_MAX_REATTACH):
        message = link.receive()
        while message is not None and message["op"] != "exit":
            failed = message.get("signum")
            if message["op"] == "signal-failed" and isinstance(failed, int) and 0 < failed < 65:
                drop_standin(standin)
                os._exit(128 + failed)
            message = link.receive()
        if message is not None:
            status, oom = _status(message)
            break
        link.close()  # the proxy died: get a new one, attach again
        if not _revive(args):
            break
        try:
            link.attach(resume=True)
        except AgentError:
            break
    if not args.exec_id:  # an exec's status is its stand-in's exit status: nothing to keep
        from pathlib import Path  # only now: an idle shim does without it

        from sandbox import store

        with contextlib.suppress(OSError):
            exit_file = Path(args.root) / args.id / EXIT_FILE
            store.write_json_atomic(exit_file, {"status": status, "oom": oom})
    drop_standin(standin)
    os._exit(status)


def _enter_netns_unprivileged(args: Args, argv: list[str]) -> None:
    """Move into the new network namespace ``args.new_netns`` asks for (first thing, while
    single-threaded; it needs root's capabilities), then become this shim again without any
    capability: exec through setpriv, same pid, same fds, the namespace kept. On failure
    answer ``error`` on the ready fd and exit 1: never go on in the caller's namespace."""
    from hypervisor.virtiofsd import SETPRIV
    from sandbox.errors import ConfigError as BadOptions
    from sandbox.errors import NetworkError
    from sandbox.runtime import standin_netns

    assert args.new_netns is not None
    try:
        standin_netns.enter(standin_netns.from_options(*args.new_netns))
    except (BadOptions, NetworkError, OSError) as exc:
        with os.fdopen(args.ready_fd, "wb", buffering=0) as failed:
            failed.write(f"error {exc}\n".encode())
        sys.exit(1)
    index = argv.index("--new-netns")
    rest = argv[:index] + argv[index + 3 :]
    python = [sys.executable, "-S", "-m", "sandbox.runtime.shim", *rest]
    os.execv(str(SETPRIV), [str(SETPRIV), *UNPRIVILEGED, "--", *python])


def _output_limit() -> int | None:
    """This process's RLIMIT_FSIZE soft limit in bytes (None: unlimited): the proxy writes
    the process's output on our behalf and keeps the files within it, as our writes were."""
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def _open(fd: int) -> bool:
    """Whether ``fd`` is open."""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _status(message: dict[str, Any]) -> tuple[int, bool]:
    """(status, oom) of an ``exit`` message, bounded (137 for nonsense)."""
    status, oom = message.get("status"), message.get("oom")
    if not isinstance(status, int) or not 0 <= status <= 255:
        return 137, False
    return status, bool(oom)


if __name__ == "__main__":
    main()
