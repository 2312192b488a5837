"""Container bookkeeping in the guest: spawn, start, exec, signal, wait, stdio, remove.

The agent only manages processes; applying the OCI spec is the job of the in-guest runtime
``agent.oci`` (``python3 -m agent.oci.init`` / ``agent.oci.exec``), which the agent spawns with
the spec on fd 3 and a control socket on fd 4 (see docs/oci-in-guest.md for that contract).

Exit statuses come from the PID 1 reaper (:class:`agent.pid1.Reaper`); the container's pid is
the one the runtime reports in its ``ready`` line. An exit is reported as soon as the reaper sees
it, whatever still holds the process's stdio: a background child that inherited stdout does not
delay WaitProcess, and the output streams end once what the process wrote is read (see
:meth:`ContainerManager.read_stream`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import struct
import sys
import termios
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent import cgroup_layout, pid1, pod_tmpfs, proctable, share_view
from agent.netns_ahead import NetnsAhead
from agentapi.limits import MAX_READ_BYTES
from ocispec.document import MAX_DOCUMENT_BYTES

if TYPE_CHECKING:
    from agent.zygote import Zygote

#: Largest spec CreateContainer takes: what the host accepts as config.json (1 MiB).
MAX_SPEC_BYTES = MAX_DOCUMENT_BYTES
#: Guest directory holding per-container overlay layers (on the /run tmpfs).
OVERLAY_ROOT = "/run/pysandbox-overlay"
READY_TIMEOUT = 60.0
#: How long StartContainer waits for the init to exec when the caller set no deadline.
START_TIMEOUT = 60.0
#: Exited execs whose status a WaitProcess has returned are forgotten once this many newer
#: ones exist: a container probed by an exec every few seconds must not grow the agent forever.
MAX_COLLECTED_EXECS = 256
#: Removed container ids remembered to refresh the share's entries when one comes back.
MAX_REMEMBERED_IDS = 1024
#: Largest stdout/stderr chunk per message: what the host accepts (MAX_READ_BYTES). Each
#: message costs milliseconds of guest CPU under TCG, whatever its size: fewer, larger
#: messages are what makes a stream fast (docs/performance.md).
_CHUNK = MAX_READ_BYTES
#: Pipe capacity of a process's stdout/stderr (fcntl F_SETPIPE_SZ): while the host takes a
#: message, the process keeps writing, and the next read takes it all at once.
_OUTPUT_PIPE_BYTES = MAX_READ_BYTES
#: Bytes a terminal may hold beyond what TIOCINQ counts when its process exits (the pty's
#: flip buffer, not yet handed to the line discipline).
_TTY_SLACK = 64 * 1024


class Signal:
    """A one-shot flag another thread may raise at any time, pollable as an eventfd.

    :meth:`set` after :meth:`close` does nothing (a gRPC termination callback may run after
    the reader it wakes has finished). Use as a context manager.
    """

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._lock = threading.Lock()
        self._closed = False

    def set(self) -> None:
        with self._lock:
            if not self._closed:
                os.eventfd_write(self.fd, 1)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self.fd)

    def __enter__(self) -> Signal:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class ContainerError(Exception):
    """A request the agent refuses or could not carry out.

    ``code`` is the gRPC status name to answer with; ``reason`` the agent.proto
    ``Failure.Reason`` name sent along (see :mod:`agent.oci.errors`), UNSPECIFIED when the
    code says it all.
    """

    def __init__(self, code: str, message: str, reason: str = "UNSPECIFIED") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


def _runtime_failure(text: str) -> ContainerError:
    """The error for an ``error <REASON> <message>`` line of the in-guest runtime.

    A spec the runtime refused is INVALID_ARGUMENT; any other failure (the program cannot be
    run, a setup step failed) FAILED_PRECONDITION. A line without a known reason is the
    runtime misbehaving: INTERNAL.
    """
    from agent.oci.errors import INVALID_SPEC, REASONS

    reason, _, message = text.removeprefix("error ").partition(" ")
    if reason not in REASONS or not message:
        return ContainerError("INTERNAL", f"in-guest runtime failed with {text[:200]!r}")
    code = "INVALID_ARGUMENT" if reason == INVALID_SPEC else "FAILED_PRECONDITION"
    return ContainerError(code, message, reason)


@dataclass
class Process:
    """One process the agent started: a container's init or an exec.

    Its stdio fds belong to this record and are closed as soon as they are useless, so that
    finished processes (health-probe execs, say) hold nothing in the agent: stdin when the
    process exits (or the host closes it), stdout/stderr when a reader reached EOF. RPCs never
    use these numbers directly but :meth:`borrow` a duplicate, so a concurrent close cannot
    hand the number to another file under a reader or writer.

    ``wake`` is an eventfd that becomes readable (for good) when the process exits, so that a
    reader blocked on an output stream notices the exit even while other processes (a
    background child) keep the stream open; the agent's own fd is closed at exit, after
    ``exited`` is set, so a reader that cannot borrow it knows the process has exited.
    """

    pid: int
    terminal: bool
    stdin: int | None  # write end (pipe) or the pty master
    stdout: int | None  # read end (pipe) or a dup of the pty master
    stderr: int | None
    exited: threading.Event = field(default_factory=threading.Event)
    status: int = 0
    signal: int = 0
    #: The container cgroup's oom_kill count when the process was started (execs only).
    oom_kills_before: int = 0
    #: A WaitProcess has returned its exit status.
    collected: bool = False
    #: Output streams whose host reader is gone (CloseOutput): their readers end.
    closed_outputs: set[str] = field(default_factory=set)
    wake: int | None = field(default_factory=lambda: os.eventfd(0, os.EFD_CLOEXEC))
    _fds_lock: threading.Lock = field(default_factory=threading.Lock)

    def on_exit(self, raw: int) -> None:
        """Reaper callback: record the wait status, release stdin (nobody reads it now),
        wake the output readers."""
        if os.WIFSIGNALED(raw):
            self.signal = os.WTERMSIG(raw)
            self.status = 128 + self.signal
        else:
            self.status = os.WEXITSTATUS(raw)
        self.release("stdin")
        self.exited.set()
        with self._fds_lock:
            wake, self.wake = self.wake, None
        if wake is not None:
            with contextlib.suppress(OSError):
                os.eventfd_write(wake, 1)
            _close(wake)

    def borrow(self, which: str) -> int | None:
        """A new fd for ``which`` ("stdin", "stdout", "stderr" or "wake") that the caller must
        close; None when that stream is closed."""
        with self._fds_lock:
            fd: int | None = getattr(self, which)
            return None if fd is None else os.dup(fd)

    def release(self, which: str) -> None:
        """Close the agent's fd of ``which`` (borrowed duplicates stay valid). Idempotent."""
        with self._fds_lock:
            fd: int | None = getattr(self, which)
            setattr(self, which, None)
        _close(fd)

    def release_all(self) -> None:
        """Close every fd the agent holds for this process (it is being forgotten)."""
        for which in ("stdin", "stdout", "stderr", "wake"):
            self.release(which)


@dataclass
class Container:
    """A container and its processes."""

    id: str
    rootfs: str
    cgroup: str  # on cgroup2, in both layouts: procs, kill, freeze
    init: Process
    control: socket.socket | None
    seccomp: Any = None  # the spec's linux.seccomp, applied to every exec as runc does
    started: bool = False
    paused: bool = False
    execs: dict[str, Process] = field(default_factory=dict)
    starting: set[str] = field(default_factory=set)  # exec ids being spawned
    #: (hierarchy, directory) of its v1 cgroups (v1 layout only)
    cgroup_v1: list[tuple[str, str]] = field(default_factory=list)
    #: fds of its init's namespaces, held until it is removed (:func:`hold_namespaces`)
    namespaces: list[int] = field(default_factory=list)

    @property
    def status(self) -> str:
        """ "created", "running", "paused" or "stopped" (the OCI states)."""
        if self.init.exited.is_set():
            return "stopped"
        if self.paused:
            return "paused"
        return "running" if self.started else "created"


def _set_cloexec_pipe(size: int = 0) -> tuple[int, int]:
    """A close-on-exec pipe; with ``size``, its capacity raised to that (best effort: the
    default 64 KiB stays when the kernel refuses)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    if size:
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
    return r, w


def _ignore_status(_status: int) -> None:
    """Reaper callback for processes whose exit status nobody needs."""


def _read_ready(sock: socket.socket) -> tuple[bytes, int | None]:
    """The runtime's first line (at most 8 KiB; an ``error`` line when it said nothing before
    the socket's timeout) and the one fd it may attach (a terminal's master, close-on-exec)."""
    line = b""
    console: int | None = None
    try:
        while not line.endswith(b"\n") and len(line) < 8192:
            chunk, fds, _flags, _addr = socket.recv_fds(
                sock, 8192 - len(line), 1, socket.MSG_CMSG_CLOEXEC
            )
            for fd in fds:
                if console is None:
                    console = fd
                else:
                    _close(fd)
            if not chunk:
                break
            line += chunk
    except OSError as exc:
        line = f"error UNSPECIFIED in-guest runtime did not report: {exc}".encode()
    return line, console


def _ready_pid(line: str) -> int | None:
    """The pid of a ``ready <pid>`` line, or None when the line is anything else."""
    parts = line.split()
    if len(parts) == 2 and parts[0] == "ready" and parts[1].isdigit() and int(parts[1]) > 0:
        return int(parts[1])
    return None


def _remove_cgroup(path: str, v1_dirs: list[tuple[str, str]], timeout: float = 5.0) -> None:
    """Kill what is left in cgroup ``path`` and remove it and its ``v1_dirs``; a missing
    cgroup is fine.

    ``rmdir`` fails with EBUSY until the last killed process has exited (cgroup.kill is
    asynchronous), so it is retried for up to ``timeout`` seconds; after that the empty
    cgroup is left (and reused by a container of the same id).
    """
    with contextlib.suppress(OSError), open(f"{path}/cgroup.kill", "w", encoding="ascii") as kill:
        kill.write("1")
    deadline = time.monotonic() + timeout
    for directory in [path, *(directory for _hierarchy, directory in v1_dirs)]:
        while True:
            try:
                os.rmdir(directory)
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                    break
            time.sleep(0.01)


def _poll_now(fd: int) -> int:
    """The poll(2) events of ``fd`` right now (0: nothing to read, no hang-up)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    events = poller.poll(0)
    return events[0][1] if events else 0


def _read(fd: int, buffer: memoryview | None) -> bytes | memoryview:
    """One read of ``fd``: new bytes, or with ``buffer`` a view of its start (no new object
    per read)."""
    if buffer is None:
        return os.read(fd, _CHUNK)
    return buffer[: os.readv(fd, (buffer,))]


def _pending(fd: int, terminal: bool) -> int:
    """Bytes readable from ``fd`` now without blocking (an upper bound for a terminal)."""
    if terminal:
        _poll_now(fd)  # polling a pty flushes its flip buffer to the reader
    try:
        count = int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0])
    except OSError:
        count = 0
    return count + (_TTY_SLACK if terminal else 0)


def _read_reply(control: socket.socket, timeout: float) -> str | None:
    """What the runtime says after ``start``: "" at EOF (it exec'd, or died), its line (an
    error), or None when nothing came within ``timeout`` seconds. At most 8 KiB are read."""
    deadline = time.monotonic() + max(timeout, 0.0)
    data = b""
    while not data.endswith(b"\n") and len(data) < 8192:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        control.settimeout(remaining)
        try:
            chunk = control.recv(8192 - len(data))
        except TimeoutError:
            return None
        except OSError:
            chunk = b""
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def runtime_env() -> dict[str, str]:
    """The environment of the in-guest runtime (and of the zygote that forks it)."""
    return {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
    }


#: The namespaces of a container's init the agent holds until RemoveContainer: those whose
#: teardown costs the guest most when the last process leaves (the mount tree's unmounts and
#: RCU grace periods, the network namespace's pernet exits).
HELD_NAMESPACES = ("mnt", "net", "ipc", "uts", "cgroup")


def hold_namespaces(pid: int) -> list[int]:
    """fds of the namespaces :data:`HELD_NAMESPACES` of process ``pid`` (those that can be
    opened: a process that is gone gives none)."""
    held = []
    for name in HELD_NAMESPACES:
        with contextlib.suppress(OSError):
            held.append(os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC))
    return held


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


class ContainerManager:
    """All containers of this guest. Thread-safe."""

    def __init__(
        self,
        reaper: pid1.Reaper,
        cgroup_parent: str = pid1.CGROUP_PARENT,
        layout: cgroup_layout.Layout | None = None,
        zygote: Zygote | None = None,
    ) -> None:
        self._reaper = reaper
        self._zygote = zygote
        self._cgroup_parent = cgroup_parent
        self._layout = layout or cgroup_layout.Layout(cgroup_parent)
        self._containers: dict[str, Container] = {}
        #: Ids removed in this guest (bounded): the share may still show their old entries.
        self._removed: dict[str, None] = {}
        self._lock = threading.Lock()
        #: A network namespace made once the VM was restored (:mod:`agent.netns_ahead`).
        self.netns_ahead = NetnsAhead()

    def prepare_ahead(self, layout: str) -> None:
        """Once the VM was restored (its CRNG its own), in a thread at nice 19, i.e. in time
        the guest would otherwise idle: set the containers' cgroup ``layout`` up ("v1" or
        "v2", as the first container would: :meth:`cgroup_layout.Layout.choose`; "" leaves
        it to that container) and have the zygote fork its spare runtime
        (:meth:`agent.zygote.Zygote.spare_ahead`). Either one that fails is left to the
        first container, as without this call. For a VM of the warm pool both are done long
        before its container comes; in a run's own VM, what is not done when its
        CreateContainer arrives is waited for (the layout) or done as before."""

        def ahead() -> None:
            os.setpriority(os.PRIO_PROCESS, 0, 19)  # 0: this thread (Linux nice is per thread)
            if layout:
                with contextlib.suppress(OSError, ValueError):
                    self._layout.choose(layout)
            if self._zygote is not None:
                self._zygote.spare_ahead()

        threading.Thread(target=ahead, name="containers-ahead", daemon=True).start()

    # -- helpers -----------------------------------------------------------------------------

    def get(self, container_id: str) -> Container:
        with self._lock:
            container = self._containers.get(container_id)
        if container is None:
            raise ContainerError("NOT_FOUND", f"container {container_id} does not exist")
        return container

    def process(self, container_id: str, exec_id: str) -> Process:
        container = self.get(container_id)
        if not exec_id:
            return container.init
        proc = container.execs.get(exec_id)
        if proc is None:
            raise ContainerError(
                "NOT_FOUND", f"process {exec_id} does not exist in container {container_id}"
            )
        return proc

    def _spawn(
        self,
        module: str,
        args: list[str],
        payload: bytes,
        terminal: bool,
        start: bool = False,
        stdin_null: bool = False,
        stderr_to_stdout: bool = False,
    ) -> tuple[Process, socket.socket]:
        """Run the in-guest runtime and wait for its ``ready`` line; return the process.
        ``stdin_null``: its stdin is /dev/null, with no pipe for the agent to write to.
        ``stderr_to_stdout``: fds 1 and 2 are one pipe (no stderr stream).

        ``start``: send ``start`` at once, ahead of ``ready`` (it waits in the socket), so
        that the runtime goes on to execve as soon as it has reported ready, without waiting
        for this thread to be scheduled again (under TCG, 5-20 ms on an exec's path). For an
        exec, nothing happens between its ready and its start; a runtime that fails before
        ready never reads it."""
        payload_fd = os.memfd_create("oci-spec", os.MFD_CLOEXEC)
        os.write(payload_fd, payload)
        os.lseek(payload_fd, 0, os.SEEK_SET)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.set_inheritable(False)
        theirs.set_inheritable(False)
        child_fds: list[int] = []
        stderr_r: int | None
        stdin_w: int | None
        stdout_r: int | None
        if terminal:
            # The runtime allocates the pty in the container (its devpts, as runc does) and
            # sends the master with its ready line; until then its stdio is /dev/null.
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            stdio = (null, null, null)
            child_fds = [null]
            stdin_w, stdout_r, stderr_r = None, None, None
        else:
            if stdin_null:
                in_r, stdin_w = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), None
            else:
                in_r, stdin_w = _set_cloexec_pipe()
            stdout_r, out_w = _set_cloexec_pipe(_OUTPUT_PIPE_BYTES)
            if stderr_to_stdout:
                stderr_r, err_w = None, out_w
                child_fds = [in_r, out_w]
            else:
                stderr_r, err_w = _set_cloexec_pipe(_OUTPUT_PIPE_BYTES)
                child_fds = [in_r, out_w, err_w]
            stdio = (in_r, out_w, err_w)
        actions = [
            (os.POSIX_SPAWN_DUP2, stdio[0], 0),
            (os.POSIX_SPAWN_DUP2, stdio[1], 1),
            (os.POSIX_SPAWN_DUP2, stdio[2], 2),
            (os.POSIX_SPAWN_DUP2, payload_fd, 3),
            (os.POSIX_SPAWN_DUP2, theirs.fileno(), 4),
        ]
        try:
            runtime_pid = None
            if self._zygote is not None:
                runtime_pid = self._zygote.spawn(
                    module, args, (*stdio, payload_fd, theirs.fileno())
                )
            if runtime_pid is None:  # no zygote (or it failed): a fresh interpreter
                argv = [sys.executable, "-m", module, *args]
                runtime_pid = os.posix_spawn(
                    sys.executable, argv, runtime_env(), file_actions=actions
                )
        finally:
            for fd in child_fds:
                _close(fd)
            _close(payload_fd)
            theirs.close()
        if start:
            with contextlib.suppress(OSError):  # it died: its ready line says why (or not)
                ours.sendall(b"start\n")
        ours.settimeout(READY_TIMEOUT)
        line, console = _read_ready(ours)
        text = line.decode(errors="replace").strip()
        pid = _ready_pid(text)
        if pid is not None and terminal and console is None:
            text = "error UNSPECIFIED in-guest runtime sent no terminal with its ready line"
            pid = None
        if pid is not None and terminal:
            assert console is not None
            stdin_w, stdout_r = console, os.dup(console)
            console = None
        _close(console)  # one nobody asked for
        if pid is not None:
            assert stdout_r is not None and (stdin_w is not None or stdin_null)
            ours.settimeout(None)
            proc = Process(pid, terminal, stdin_w, stdout_r, None if terminal else stderr_r)
            if pid != runtime_pid:
                # The runtime forked (pid namespace); its own exit status means nothing.
                self._reaper.watch(runtime_pid, _ignore_status)
            self._reaper.watch(pid, proc.on_exit)
            return proc, ours
        for leftover in (stdin_w, stdout_r, stderr_r):
            _close(leftover)
        ours.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(runtime_pid, signal.SIGKILL)
        self._reaper.watch(runtime_pid, _ignore_status)
        if text.startswith("error "):
            raise _runtime_failure(text)
        raise ContainerError(
            "INTERNAL", f"in-guest runtime failed without a message (said {text[:200]!r})"
        )

    # -- RPC operations ----------------------------------------------------------------------

    def _overlay(self, container_id: str, lower: str) -> str:
        """Mount an overlay of ``lower`` with a tmpfs-backed upper layer; return its path."""
        from agent import kmod
        from agent.oci import syscalls

        kmod.ensure("overlay")
        base = f"{OVERLAY_ROOT}/{container_id}"
        for sub in ("upper", "work", "rootfs"):
            os.makedirs(f"{base}/{sub}", mode=0o755, exist_ok=True)
        syscalls.mount(
            "overlay",
            f"{base}/rootfs",
            "overlay",
            0,
            f"lowerdir={lower},upperdir={base}/upper,workdir={base}/work",
        )
        return f"{base}/rootfs"

    def _drop_overlay(self, container_id: str) -> None:
        from agent.oci import syscalls

        base = f"{OVERLAY_ROOT}/{container_id}"
        if os.path.isdir(base):
            with contextlib.suppress(OSError):
                syscalls.umount2(f"{base}/rootfs", syscalls.MNT_DETACH)
            shutil.rmtree(base, ignore_errors=True)

    def create(
        self,
        container_id: str,
        spec_bytes: bytes,
        rootfs: str,
        overlay: bool = False,
        *,
        close_stdin: bool = False,
        stdin_null: bool = False,
        stderr_to_stdout: bool = False,
    ) -> int:
        """Create the container (CreateContainer); its init's pid. ``close_stdin``: the
        init's stdin pipe is closed at once (EOF, as after :meth:`close_stdin`); a terminal's
        stdin is left open (its ^D is CloseStdin's). ``stdin_null``: the init's stdin is
        /dev/null instead of a pipe (no terminal: ignored with one). ``stderr_to_stdout``:
        its stderr is its stdout pipe, and its stderr stream is empty (ignored with a
        terminal)."""
        if len(spec_bytes) > MAX_SPEC_BYTES:
            raise ContainerError("INVALID_ARGUMENT", "oci spec larger than 1 MiB", "INVALID_SPEC")
        try:
            spec: dict[str, Any] = json.loads(spec_bytes)
            if not isinstance(spec, dict):
                raise ValueError("not an object")
        except RecursionError:
            raise ContainerError(
                "INVALID_ARGUMENT", "malformed oci spec: nested too deep"
            ) from None
        except ValueError as exc:
            raise ContainerError(
                "INVALID_ARGUMENT", f"malformed oci spec: {exc}", "INVALID_SPEC"
            ) from exc
        try:
            pod_tmpfs.materialize(spec)
        except ValueError as exc:
            raise ContainerError("INVALID_ARGUMENT", str(exc), "INVALID_SPEC") from exc
        except OSError as exc:
            raise ContainerError("INTERNAL", f"pod tmpfs: {exc}") from exc
        rootfs = os.path.normpath(rootfs)
        share_view.refresh(
            share_view.host_paths(rootfs, spec, pid1.SHARE_ROOT), container_id in self._removed
        )
        if not rootfs.startswith(pid1.SHARE_ROOT + "/") or not os.path.isdir(rootfs):
            raise ContainerError(
                "INVALID_ARGUMENT", f"rootfs {rootfs!r} is not a directory under {pid1.SHARE_ROOT}"
            )
        try:
            self._layout.choose(cgroup_layout.requested(spec))
        except ValueError as exc:
            raise ContainerError("FAILED_PRECONDITION", str(exc)) from exc
        except OSError as exc:
            raise ContainerError("INTERNAL", f"setting up the guest's cgroups: {exc}") from exc
        cgroup = f"{self._cgroup_parent}/{container_id}"
        with self._lock:
            if container_id in self._containers:
                raise ContainerError("ALREADY_EXISTS", f"container {container_id} already exists")
            self._containers[container_id] = None  # type: ignore[assignment]  # reserve the id
        try:
            if overlay:
                rootfs = self._overlay(container_id, rootfs)
            spec.setdefault("root", {})["path"] = rootfs
            process = spec.get("process") or {}
            terminal = bool(process.get("terminal", False)) if isinstance(process, dict) else False
            netns = self.netns_ahead.take_for(spec)
            try:
                proc, control = self._spawn(
                    "agent.oci.init",
                    [
                        "--bundle-fd",
                        "3",
                        "--sync-fd",
                        "4",
                        "--cgroup",
                        cgroup,
                        *self._layout.runtime_args(),
                    ],
                    json.dumps(spec).encode(),
                    terminal,
                    stdin_null=stdin_null,
                    stderr_to_stdout=stderr_to_stdout,
                )
            finally:
                if netns is not None:  # joined (the runtime is ready) or never to be
                    os.close(netns)
        except BaseException:
            # The runtime may have created (and joined) the cgroup before it failed.
            _remove_cgroup(cgroup, self._layout.v1_dirs(cgroup))
            self._drop_overlay(container_id)
            with self._lock:
                self._containers.pop(container_id, None)
            raise
        if close_stdin and not terminal:
            proc.release("stdin")
        held = hold_namespaces(proc.pid)
        linux = spec.get("linux")
        seccomp = linux.get("seccomp") if isinstance(linux, dict) else None
        with self._lock:
            self._containers[container_id] = Container(
                container_id,
                rootfs,
                cgroup,
                proc,
                control,
                seccomp=seccomp,
                cgroup_v1=self._layout.v1_dirs(cgroup),
                namespaces=held,
            )
        return proc.pid

    def start(self, container_id: str, timeout: float = START_TIMEOUT) -> None:
        """Send ``start`` and wait until the init has exec'd its program (EOF on the sync
        socket) or reports a failed startContainer hook (an ``error`` line: the init exits,
        the container is stopped). ``timeout``: how long the hooks may take (the caller's
        deadline); past it the init is killed (DEADLINE_EXCEEDED)."""
        container = self.get(container_id)
        control = container.control
        if container.started or control is None:
            raise ContainerError(
                "FAILED_PRECONDITION",
                f"container {container_id} is {container.status}, not created",
            )
        container.control = None
        container.started = True
        try:
            try:
                control.sendall(b"start\n")
            except OSError as exc:
                raise ContainerError("FAILED_PRECONDITION", f"starting container: {exc}") from exc
            reply = _read_reply(control, timeout)
        finally:
            control.close()
        if reply is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(container.init.pid, signal.SIGKILL)
            raise ContainerError(
                "DEADLINE_EXCEEDED",
                f"container {container_id} did not start within {timeout:g}s "
                "(its startContainer hooks were still running); it was killed",
            )
        if reply:
            raise _runtime_failure(reply)

    def exec(
        self, container_id: str, exec_id: str, process_json: bytes, *, close_stdin: bool = False
    ) -> tuple[int, bool]:
        """Run one more process in the running container (see ExecProcess): its pid, and
        whether its stdin was closed. ``close_stdin``: its stdin pipe is closed at once (EOF,
        as after :meth:`close_stdin`); a terminal's is left open."""
        container = self.get(container_id)
        if container.status != "running":
            raise ContainerError(
                "FAILED_PRECONDITION",
                f"container {container_id} is {container.status}, not running",
            )
        try:
            process = json.loads(process_json)
            if not isinstance(process, dict):
                raise ValueError("not an object")
        except RecursionError:
            raise ContainerError(
                "INVALID_ARGUMENT", "malformed process json: nested too deep"
            ) from None
        except ValueError as exc:
            raise ContainerError(
                "INVALID_ARGUMENT", f"malformed process json: {exc}", "INVALID_SPEC"
            ) from exc
        with self._lock:  # reserve the id: two concurrent requests must not both run
            if not exec_id or exec_id in container.execs or exec_id in container.starting:
                raise ContainerError("ALREADY_EXISTS", f"exec id {exec_id!r} is empty or in use")
            container.starting.add(exec_id)
        try:
            proc = self._start_exec(container, process)
            stdin_closed = close_stdin and not proc.terminal
            if stdin_closed:
                proc.release("stdin")
            # Under the lock: another exec's _forget_old_execs iterates the dict under it
            # ("dictionary changed size during iteration" failed a concurrent ExecProcess).
            with self._lock:
                container.execs[exec_id] = proc
        finally:
            with self._lock:
                container.starting.discard(exec_id)
        self._forget_old_execs(container)
        return proc.pid, stdin_closed

    def _forget_old_execs(self, container: Container) -> None:
        """Drop the oldest collected execs beyond :data:`MAX_COLLECTED_EXECS`."""
        with self._lock:
            collected = [
                exec_id
                for exec_id, proc in container.execs.items()
                if proc.collected and proc.exited.is_set()
            ]
            dropped = [
                container.execs.pop(exec_id)
                for exec_id in collected[: max(0, len(collected) - MAX_COLLECTED_EXECS)]
            ]
        for proc in dropped:
            proc.release_all()

    def _start_exec(self, container: Container, process: dict[str, Any]) -> Process:
        """Spawn agent.oci.exec for ``process`` in ``container`` and let it run."""
        if container.seccomp is not None and "seccomp" not in process:
            process["seccomp"] = container.seccomp
        oom_kills_before = self._oom_kills(container)
        proc, control = self._spawn(
            "agent.oci.exec",
            [
                "--target-pid",
                str(container.init.pid),
                "--process-fd",
                "3",
                "--sync-fd",
                "4",
                "--cgroup",
                container.cgroup,
                *self._layout.runtime_args(),
            ],
            json.dumps(process).encode(),
            bool(process.get("terminal", False)),
            start=True,  # sent ahead: an exec runs as soon as it is ready
        )
        proc.oom_kills_before = oom_kills_before
        control.close()
        return proc

    def signal(self, container_id: str, exec_id: str, signum: int, all_processes: bool) -> None:
        """Signal one process, or every process of the container (``all_processes``).

        SIGKILL to all goes through ``cgroup.kill``, which also catches processes forked while
        the signal is being delivered; other signals go to each pid in ``cgroup.procs``.
        """
        if not 0 < signum < 65:
            raise ContainerError("INVALID_ARGUMENT", f"invalid signal {signum}")
        if all_processes:
            container = self.get(container_id)
            if signum == signal.SIGKILL:
                with (
                    contextlib.suppress(OSError),
                    open(f"{container.cgroup}/cgroup.kill", "w", encoding="ascii") as kill,
                ):
                    kill.write("1")
            for pid in self.pids(container_id):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
            if container.control is not None and signum == signal.SIGKILL:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(container.init.pid, signum)
            return
        proc = self.process(container_id, exec_id)
        if not proc.exited.is_set():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signum)

    def wait(self, container_id: str, exec_id: str, timeout: float | None) -> Process | None:
        """The process once it exited (marked collected), or None after ``timeout``."""
        proc = self.process(container_id, exec_id)
        if not proc.exited.wait(timeout):
            return None
        proc.collected = True
        return proc

    @staticmethod
    def _oom_kills(container: Container) -> int:
        """The oom_kill count of the container's cgroup (0 when it cannot be read)."""
        return cgroup_layout.read_oom_kills(container.cgroup, container.cgroup_v1)

    def oom_killed(self, container_id: str, exec_id: str = "") -> bool:
        """Whether the OOM killer struck: for the init process, anywhere in the container
        (as containerd reports OOMKilled); for an exec, the exec was killed by SIGKILL and the
        container's OOM kill count grew while it ran."""
        container = self.get(container_id)
        if not exec_id:
            return self._oom_kills(container) > 0
        proc = self.process(container_id, exec_id)
        return proc.signal == signal.SIGKILL and self._oom_kills(container) > proc.oom_kills_before

    def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> None:
        """Write all of ``data``; FAILED_PRECONDITION once stdin is closed or the process
        exited."""
        proc = self.process(container_id, exec_id)
        fd = proc.borrow("stdin")
        if fd is None:
            raise ContainerError("FAILED_PRECONDITION", "stdin is closed")
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError as exc:
            raise ContainerError("FAILED_PRECONDITION", f"writing stdin: {exc}") from exc
        finally:
            _close(fd)

    def close_stdin(self, container_id: str, exec_id: str) -> None:
        """EOF on stdin: the pipe is closed; a terminal gets ^D (it stays open for output)."""
        proc = self.process(container_id, exec_id)
        if proc.terminal:
            fd = proc.borrow("stdin")
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.write(fd, b"\x04")  # EOF on a terminal in canonical mode
                _close(fd)
            return
        proc.release("stdin")

    def close_output(self, container_id: str, exec_id: str, which: str) -> None:
        """The host's reader of ``which`` ("stdout" or "stderr") is gone: drop the agent's
        end of that pipe and end its reader's stream (:meth:`read_stream` checks before each
        read), so that the process's next write fails with EPIPE and raises SIGPIPE
        (pipe(7)) as it would writing to the closed host pipe under runc. A terminal is left
        alone (its master carries the input too)."""
        proc = self.process(container_id, exec_id)
        if proc.terminal:
            return
        proc.closed_outputs.add(which)
        proc.release(which)

    def read_stream(
        self,
        container_id: str,
        exec_id: str,
        which: str,
        stop: int | None = None,
        buffer: memoryview | None = None,
    ) -> Iterator[bytes | memoryview]:
        """The stream's bytes until EOF, or until what the process wrote before it exited has
        been read, or until ``stop`` (an fd, e.g. :attr:`Signal.fd`) becomes readable: then
        the stream ends without reading further, leaving the bytes to a later reader.

        The process's exit ends the stream even when others (a background child that
        inherited stdout) still hold it open: once the exit is seen, the bytes then pending
        (FIONREAD; for a terminal TIOCINQ plus :data:`_TTY_SLACK` for its flip buffer) are
        read, and the stream ends when nothing more is immediately readable or that budget
        is spent while writers remain. At EOF the agent's fd is released; a stream that ends
        before EOF keeps it for a later reader (until the container is removed).

        With ``buffer`` each read goes into it and the stream yields memoryviews of it, valid
        until the next item is asked for (no new object per read), else ``bytes``.
        """
        proc = self.process(container_id, exec_id)
        fd = proc.borrow(which)
        if fd is None:
            return
        wake = proc.borrow("wake")
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            if wake is not None:
                poller.register(wake, select.POLLIN)
            if stop is not None:
                poller.register(stop, select.POLLIN)
            budget: int | None = None  # bytes left to read once the exit was seen
            while True:
                if stop is not None and _poll_now(stop):
                    return  # the caller is gone: leave the bytes to the next reader
                if budget is None and proc.exited.is_set():
                    budget = _pending(fd, proc.terminal)
                if budget is None:
                    if not any(ready == fd for ready, _ in poller.poll()):
                        continue  # woken by the exit or by ``stop``
                else:
                    events = _poll_now(fd)
                    if not events:
                        return  # drained; what is left belongs to other holders
                    if budget <= 0 and not events & select.POLLHUP:
                        return  # the budget is spent and other holders keep writing
                if which in proc.closed_outputs:
                    return  # nobody reads it on the host: the writer gets EPIPE (close_output)
                try:
                    data = _read(fd, buffer)
                except OSError as exc:
                    if exc.errno != errno.EIO:  # pty: EIO once the last slave holder is gone
                        raise
                    data = b""
                if not data:
                    proc.release(which)
                    return
                if budget is not None:
                    budget -= len(data)
                yield data
        finally:
            _close(fd)
            _close(wake)

    def resize(self, container_id: str, exec_id: str, rows: int, cols: int) -> None:
        """Set the terminal's size; FAILED_PRECONDITION without a terminal (or after exit)."""
        proc = self.process(container_id, exec_id)
        if not proc.terminal:
            raise ContainerError("FAILED_PRECONDITION", "process has no terminal")
        fd = proc.borrow("stdin")
        if fd is None:
            raise ContainerError("FAILED_PRECONDITION", "the process's terminal is closed")
        try:
            fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        finally:
            _close(fd)

    def pids(self, container_id: str) -> list[int]:
        container = self.get(container_id)
        try:
            with open(f"{container.cgroup}/cgroup.procs", encoding="ascii") as procs:
                found = [int(line) for line in procs if line.strip()]
        except OSError:
            found = []
        if not found and not container.init.exited.is_set():
            found = [container.init.pid]
        return found

    def processes(self, container_id: str, pids: list[int]) -> list[proctable.Entry]:
        """The process table (see :mod:`agent.proctable`) of ``pids`` (from :meth:`pids`)."""
        container = self.get(container_id)
        with self._lock:
            execs = {proc.pid: exec_id for exec_id, proc in container.execs.items()}
        return proctable.table(pids, container.init.pid, execs)

    def _freeze(self, container_id: str, frozen: bool) -> None:
        """Freeze or thaw the container's cgroup and wait until the kernel reports it.

        Allowed while running or paused (both directions are idempotent).
        """
        container = self.get(container_id)
        if container.status not in ("running", "paused"):
            raise ContainerError(
                "FAILED_PRECONDITION",
                f"container {container_id} is {container.status}, not running",
            )
        with open(f"{container.cgroup}/cgroup.freeze", "w", encoding="ascii") as freeze:
            freeze.write("1" if frozen else "0")
        container.paused = frozen
        for _ in range(500):  # the kernel freezes asynchronously; wait for it, bounded
            with open(f"{container.cgroup}/cgroup.events", encoding="ascii") as events:
                if f"frozen {int(frozen)}" in events.read():
                    return
            time.sleep(0.01)
        verb = "freeze" if frozen else "thaw"
        raise ContainerError("DEADLINE_EXCEEDED", f"container {container_id} did not {verb}")

    def pause(self, container_id: str) -> None:
        self._freeze(container_id, True)

    def resume(self, container_id: str) -> None:
        self._freeze(container_id, False)

    def update(self, container_id: str, resources_json: bytes) -> None:
        from agent.oci import cgroups
        from agent.oci.errors import OciError
        from agent.oci.syscalls import LinuxSyscalls
        from ocispec.errors import SpecError
        from ocispec.spec import parse_resources

        container = self.get(container_id)
        if len(resources_json) > 64 * 1024:
            raise ContainerError("INVALID_ARGUMENT", "resources larger than 64 KiB")
        try:
            resources = parse_resources(json.loads(resources_json), "resources")
            if resources is not None:
                own = cgroups.Cgroup(container.cgroup, container.cgroup_v1)
                cgroups.set_limits(LinuxSyscalls(), own, resources)
        except (ValueError, RecursionError) as exc:
            raise ContainerError("INVALID_ARGUMENT", f"malformed resources: {exc}") from exc
        except (OciError, SpecError) as exc:
            raise ContainerError("INVALID_ARGUMENT", str(exc)) from exc

    def stats(self, container_id: str) -> dict[str, int]:
        container = self.get(container_id)
        return cgroup_layout.read_counters(container.cgroup, container.cgroup_v1)

    def remove(self, container_id: str) -> None:
        container = self.get(container_id)
        with (
            contextlib.suppress(OSError),
            open(f"{container.cgroup}/cgroup.kill", "w", encoding="ascii") as kill,
        ):
            kill.write("1")
        for proc in (container.init, *container.execs.values()):
            if not proc.exited.is_set():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
        container.init.exited.wait(10)
        for proc in (container.init, *container.execs.values()):
            proc.release_all()
        if container.control is not None:
            container.control.close()
        for fd in container.namespaces:
            _close(fd)
        container.namespaces.clear()
        _remove_cgroup(container.cgroup, container.cgroup_v1)
        self._drop_overlay(container_id)
        with self._lock:
            self._containers.pop(container_id, None)
            self._removed[container_id] = None
            while len(self._removed) > MAX_REMEMBERED_IDS:
                del self._removed[next(iter(self._removed))]
