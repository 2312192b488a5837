"""QEMU driver: spawn, control over QMP, stop, and re-attach from another process.

Lifecycle of :class:`QemuVM`::

    start(paused=True)  Popen(new session) -> wait for QMP (bounded; fail fast if QEMU
                        exits: LaunchError with exit code and log tail) -> query-status
    resume()            QMP cont
    status()            QMP query-status while the process lives, else "shutdown"
    stop(timeout)       QMP quit -> wait -> SIGTERM -> wait -> SIGKILL; then cleanup
    kill()              SIGKILL; then cleanup
    cleanup             remove the QMP socket, agent socket and pidfile (only once QEMU
                        is gone; idempotent)

QEMU runs in its own session and outlives the Python process that started it (the CLI
exits after ``create``). A later process re-attaches with :meth:`QemuVM.attach` using the
same :class:`VMConfig` and the recorded pid (and start time, to survive pid reuse).
QMP is opened per operation: QEMU's monitor serves one client at a time, so holding a
connection would lock out every other process.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from hypervisor.base import SHUTDOWN, Hypervisor
from hypervisor.errors import HypervisorError, HypervisorTimeout, LaunchError, QMPError
from hypervisor.process import (
    ProcessHandle,
    SpawnedProcess,
    attached,
    log_tail,
    remove_quietly,
    start_time,
)
from hypervisor.qemu_args import NicConfig, VirtioFsShare, VMConfig, build_argv, bus_of
from hypervisor.qmp import QMP

if TYPE_CHECKING:
    from hypervisor.jail_ids import Settings
    from hypervisor.qemu_jail import JailedLaunch
    from hypervisor.zeropages import ZeroMap

QEMU_BINARY = "qemu-system-x86_64"
#: Environment override for the QEMU binary (absolute path or name on PATH).
ENV_QEMU = "PYSANDBOX_QEMU"
DEFAULT_LAUNCH_TIMEOUT = 10.0
DEFAULT_QMP_TIMEOUT = 5.0


def find_qemu() -> Path:
    """Locate ``qemu-system-x86_64`` ($PYSANDBOX_QEMU, then PATH).

    Raises LaunchError naming the package to install.
    """
    wanted = os.environ.get(ENV_QEMU) or QEMU_BINARY
    found = shutil.which(wanted)
    if found is None:
        raise LaunchError(f"{wanted} not found; install it with 'apt-get install qemu-system-x86'")
    return Path(found)


class QemuVM(SpawnedProcess, Hypervisor):
    """One QEMU process running the VM described by ``config``.

    Not started by the constructor. Use :meth:`start` (this process spawns QEMU) or
    :meth:`attach` (QEMU was spawned by another process). ``pid``/``handle`` identify the
    process for persistence. With ``jail`` (enabled settings) :meth:`start` runs QEMU jailed
    (hypervisor/qemu_jail.py): an unprivileged id of its own, its own namespaces and root,
    every file passed as an fd; QEMU is then not this process's child (:attr:`exitcode`
    stays None).
    """

    def __init__(
        self,
        config: VMConfig,
        *,
        qemu_binary: str | Path | None = None,
        launch_timeout: float = DEFAULT_LAUNCH_TIMEOUT,
        qmp_timeout: float = DEFAULT_QMP_TIMEOUT,
        jail: Settings | None = None,
    ) -> None:
        self.config = config
        self.jail = jail if jail is not None and jail.enabled else None
        self._launch: JailedLaunch | None = None
        self.qemu_binary = qemu_binary
        self.launch_timeout = launch_timeout
        self.qmp_timeout = qmp_timeout
        self.argv: list[str] = []
        self._handle: ProcessHandle | None = None
        self._popen: subprocess.Popen[bytes] | None = None

    # -- identity ------------------------------------------------------------------------

    @classmethod
    def attach(
        cls,
        config: VMConfig,
        pid: int,
        start: int | None = None,
        *,
        qmp_timeout: float = DEFAULT_QMP_TIMEOUT,
        jail: Settings | None = None,
    ) -> QemuVM:
        """Re-attach to a QEMU spawned earlier (possibly by another process).

        ``start`` is the start time recorded at spawn (:attr:`handle`); without it the pid is
        trusted only if its command line names ``config.console_log`` (jailed or not, it
        does). If the process is gone or the pid was reused, the VM reports ``shutdown`` and
        :meth:`stop` only cleans up.
        """
        vm = cls(config, qmp_timeout=qmp_timeout, jail=jail)
        # QEMU doubles the commas of option values on its command line.
        vm._handle = attached(pid, start, str(config.console_log).replace(",", ",,").encode())
        return vm

    def _not_started(self) -> Exception:
        return HypervisorError(f"vm {self.config.name} was not started")

    @property
    def console_log(self) -> Path:
        return self.config.console_log

    @property
    def log_path(self) -> Path:
        """QEMU's own stdout/stderr log."""
        return self.config.stderr_log

    def pids(self) -> list[int]:
        return [self._handle.pid] if self._handle is not None and self._alive() else []

    def _alive(self) -> bool:
        return self._running()

    @property
    def exitcode(self) -> int | None:
        """QEMU's exit status when this process spawned it and it has exited; else None."""
        return None if self._popen is None else self._popen.poll()

    # -- start ---------------------------------------------------------------------------

    def start(self, *, paused: bool = True) -> None:
        """Spawn QEMU and return once QMP answers ``query-status``.

        With ``paused`` (default) the guest stays in ``prelaunch`` until :meth:`resume`.
        Raises LaunchError (exit code, argv, log tail) if QEMU is missing, exits early or
        QMP is not reachable within ``launch_timeout``; nothing is left running then.
        The tap fds of ``config.nics`` are inherited by QEMU; the caller still owns (and
        closes) its own copies.
        """
        if self._handle is not None:
            raise HypervisorError(f"vm {self.config.name} was already started")
        binary = Path(self.qemu_binary) if self.qemu_binary else find_qemu()
        for path in (self.config.kernel, self.config.initrd, self.config.rootfs):
            if path is not None and not path.is_file():
                raise LaunchError(f"cannot start vm {self.config.name}: {path} does not exist")
        if self.jail is not None:
            self._start_jailed(binary, paused)
            return
        self.argv = build_argv(self.config, binary, paused=paused)
        # Stale sockets from a crashed run would make QEMU's listen() fail.
        # The console log too: QEMU appends to it (ConsoleLog), so a new boot starts it empty.
        remove_quietly(*self.config.sockets(), self.config.pidfile, self.config.console_log)
        log = self.log_path
        try:
            with log.open("wb") as log_file:
                self._popen = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=self.config.pass_fds(),
                    cwd="/",
                )
        except OSError as exc:
            raise LaunchError(
                f"cannot start qemu for vm {self.config.name}: {exc.strerror or exc}: "
                f"{exc.filename or binary}",
                argv=self.argv,
                log=log,
            ) from exc
        started = start_time(self._popen.pid)
        self._handle = ProcessHandle(self._popen.pid, started if started is not None else -1)
        try:
            self._wait_for_qmp()
        except BaseException:
            self.kill()
            raise

    def _start_jailed(self, binary: Path, paused: bool) -> None:
        """:meth:`start` in a jail: JailError if it cannot be set up (nothing left)."""
        from hypervisor import jail, jail_ids, qemu_jail

        assert self.jail is not None
        remove_quietly(self.config.pidfile)
        launch = qemu_jail.prepare(self.config, binary, self.jail)
        self.argv = build_argv(launch.config, binary, paused=paused)
        try:
            with self.log_path.open("wb") as log_file:
                self._handle = jail.spawn(
                    self.argv,
                    launch.spec,
                    stdout=log_file,
                    pass_fds=launch.config.pass_fds(),
                    what=f"qemu of vm {self.config.name}",
                )
        except BaseException:
            launch.abandon()
            raise
        launch.close_fds()
        self._launch = launch
        jail_ids.record(launch.identity, launch.owner, self._handle.pid, self._handle.start)
        try:
            self._wait_for_qmp()
        except BaseException:
            self.kill()
            raise

    @property
    def identity(self) -> tuple[int, int] | None:
        """(uid, gid) of a QEMU this object started jailed; None otherwise."""
        if self._launch is None:
            return None
        return self._launch.identity.uid, self._launch.identity.gid

    def _launch_failure(self, what: str, *, wrong_state: bool = False) -> LaunchError:
        """The LaunchError of a QEMU that failed ``what``, with the last line of its log.

        ``what`` "exited ``<when>``" says how it ended instead: its exit status, or the
        signal that killed it ("was killed by SIGKILL ``<when>``"). ``reported`` (see
        LaunchError) when ``wrong_state`` or QEMU, gone, said why: an error status, or, for
        a jailed QEMU whose status we cannot read, an error line last on its log that is
        neither a warning nor QEMU's own "terminating on signal N".
        """
        code = self.exitcode
        tail = log_tail(self.log_path)
        last = tail.splitlines()[-1] if tail else ""
        gone = not self._alive()
        killed = _killed_by(code, last) if gone else None
        if what.startswith("exited "):
            when = what.removeprefix("exited ")
            if killed is not None:
                what = f"was killed by {killed} {when}"
            elif code is not None:
                what = f"exited with status {code} {when}"
        detail = f": {last}" if last and killed is None else ""
        said = gone and ": " in last and ": warning:" not in last
        return LaunchError(
            f"qemu for vm {self.config.name} {what}{detail} (see {self.log_path})",
            exitcode=code,
            argv=self.argv,
            log=self.log_path,
            log_tail=tail,
            reported=killed is None
            and (wrong_state or (code is not None and code > 0) or (code is None and said)),
        )

    def _wait_for_qmp(self) -> None:
        deadline = time.monotonic() + self.launch_timeout
        last: Exception | None = None
        while True:
            if not self._alive():
                raise self._launch_failure("exited during startup")
            if self.config.qmp_socket.exists():
                try:
                    with self._qmp(timeout=min(self.qmp_timeout, 2.0)) as qmp:
                        qmp.execute("query-status")
                    return
                except HypervisorError as exc:
                    last = exc
            if time.monotonic() >= deadline:
                error = self._launch_failure(f"did not answer qmp within {self.launch_timeout:g}s")
                raise error from last
            time.sleep(0.01)

    # -- control -------------------------------------------------------------------------

    def _qmp(self, timeout: float | None = None) -> QMP:
        return QMP.connect(
            self.config.qmp_socket, timeout=self.qmp_timeout if timeout is None else timeout
        )

    def qmp_execute(self, command: str, arguments: dict[str, object] | None = None) -> object:
        """Run one QMP command on a fresh connection (QMPError/HypervisorTimeout on failure)."""
        if not self._alive():
            raise QMPError(
                f"qmp {command} impossible: vm {self.config.name} is not running",
                command=command,
            )
        with self._qmp() as qmp:
            return qmp.execute(command, arguments)

    def wait_incoming(self, timeout: float) -> None:
        """Wait until a VM started with ``incoming_fd`` has loaded its state (``paused``).

        LaunchError if QEMU exits or ends in another state (an incompatible or corrupt
        state file), HypervisorTimeout after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        try:
            with self._qmp() as qmp:  # one connection for the whole poll
                while True:
                    reply = qmp.execute("query-status")
                    status = reply.get("status") if isinstance(reply, dict) else None
                    if status == "paused":
                        return
                    if status not in ("inmigrate", "prelaunch"):
                        raise self._launch_failure(
                            f"loading the saved state ended in {status!r}", wrong_state=True
                        )
                    if time.monotonic() >= deadline:
                        raise HypervisorTimeout(
                            f"vm {self.config.name} did not load its saved state in {timeout:g}s"
                        )
                    time.sleep(0.01)
        except QMPError:
            if not self._alive():
                raise self._launch_failure("exited while loading its saved state") from None
            raise

    def save_state(self, fd: int, timeout: float) -> None:
        """Pause the guest and write its whole state to ``fd`` (QMP ``migrate`` to an fd).

        The VM stays paused afterwards. QMPError if the migration fails (e.g. a device that
        cannot be migrated), HypervisorTimeout after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._qmp() as qmp:
            qmp.execute("stop")
            qmp.execute("getfd", {"fdname": "pysandbox-state"}, fd=fd)
            qmp.execute("migrate", {"uri": "fd:pysandbox-state"})
            while True:
                reply = qmp.execute("query-migrate")
                status = reply.get("status") if isinstance(reply, dict) else None
                if status == "completed":
                    return
                if status in ("failed", "cancelled", None):
                    detail = reply.get("error-desc", status) if isinstance(reply, dict) else reply
                    raise QMPError(
                        f"saving vm {self.config.name} failed: {detail}", command="migrate"
                    )
                if time.monotonic() >= deadline:
                    raise HypervisorTimeout(
                        f"saving vm {self.config.name} took more than {timeout:g}s"
                    )
                time.sleep(0.02)

    def release_zero_pages(self, known: ZeroMap | None = None) -> int:
        """Free the guest-RAM pages that hold only zeros (hypervisor/zeropages.py); bytes freed.

        Only while the VM is paused (after :meth:`wait_incoming`, before :meth:`resume`).
        ``known``: where the zero runs of the loaded state are kept (used and filled).
        0 if its RAM is not a memfd; OSError if the memfd cannot be punched.
        """
        from hypervisor import zeropages

        if self.status() != "paused":
            raise HypervisorError(f"vm {self.config.name} must be paused to release zero pages")
        memfd = zeropages.find_ram_memfd(self.pid)
        return 0 if memfd is None else zeropages.punch_zero_pages(memfd, known)

    def hotplug_share(self, tag: str, socket: Path, index: int = 0) -> None:
        """Add a virtio-fs share served on ``socket`` to the VM (QMPError on failure)."""
        share = VirtioFsShare(tag, socket, index, bus_of(self.config.machine))
        if self.jail is None:
            with self._qmp() as qmp:
                for command, arguments in share.hotplug():
                    qmp.execute(command, arguments)
            return
        # A jailed QEMU cannot reach the socket's path: pass it a connected socket.
        from hypervisor.qemu_jail import connect_share

        fdname = f"fs{index}-socket"
        try:
            fd = connect_share(socket)
        except OSError as exc:
            raise QMPError(
                f"cannot connect to virtiofsd at {socket}: {exc.strerror or exc}",
                command="chardev-add",
            ) from exc
        try:
            with self._qmp() as qmp:
                qmp.execute("getfd", {"fdname": fdname}, fd=fd)
                for command, arguments in share.hotplug(fdname):
                    qmp.execute(command, arguments)
        finally:
            os.close(fd)

    def hotplug_nic(self, nic: NicConfig, index: int) -> None:
        """Add network card ``index`` to the VM (its tap fd is passed over QMP); QMPError."""
        with self._qmp() as qmp:
            for command, arguments, fd in nic.hotplug(index, bus_of(self.config.machine)):
                qmp.execute(command, arguments, fd=fd)

    def resume(self) -> None:
        """QMP ``cont``: run a guest that is in ``prelaunch`` or ``paused``."""
        self.qmp_execute("cont")

    def pause(self) -> None:
        """QMP ``stop``: freeze the vCPUs (status becomes ``paused``)."""
        self.qmp_execute("stop")

    def status(self) -> str:
        """QEMU's run state, or ``shutdown`` once the process is gone (never raises then)."""
        if not self._alive():
            return SHUTDOWN
        try:
            reply = self.qmp_execute("query-status")
        except HypervisorError:
            if not self._alive():
                return SHUTDOWN
            raise
        if not isinstance(reply, dict) or not isinstance(reply.get("status"), str):
            raise QMPError(f"qmp query-status gave {reply!r}", command="query-status")
        return str(reply["status"])

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for QEMU to exit; True if it has."""
        if self._popen is not None:
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        if self._handle is None:
            return True
        return self._handle.wait(timeout)

    # -- stop ----------------------------------------------------------------------------

    def stop(self, timeout: float = 10.0) -> None:
        """QMP ``quit``, wait ``timeout``; then SIGTERM (3 s), then SIGKILL; then cleanup.

        ``quit`` stops QEMU at once (the guest is not asked to shut down; power it off
        through the agent first for a clean guest shutdown). Idempotent.
        """
        try:
            if self._alive():
                with (
                    contextlib.suppress(HypervisorError),
                    self._qmp(timeout=min(timeout, self.qmp_timeout)) as qmp,
                ):
                    qmp.quit()
                if not self.wait(timeout):
                    self._signal(signal.SIGTERM)
                    if not self.wait(3.0):
                        self._signal(signal.SIGKILL)
                        self.wait(5.0)
        finally:
            self._cleanup()

    def kill(self) -> None:
        """SIGKILL QEMU (if it is still this process) and clean up. Idempotent."""
        try:
            if self._alive():
                self._signal(signal.SIGKILL)
                self.wait(5.0)
        finally:
            self._cleanup()

    def _signal(self, signum: int) -> None:
        # Signals only the recorded process (pid + start time); waiting goes through
        # wait() so that Popen, not a stray waitpid, collects our child's exit status.
        if self._handle is not None:
            self._handle.signal(signum)

    def _cleanup(self) -> None:
        if self._alive():
            return  # never pull sockets from under a live QEMU
        if _listening(self.config.qmp_socket):
            return  # another QEMU serves these paths (our pid was stale or reused)
        # The console log too: QEMU appends to it (ConsoleLog), so a new boot starts it empty.
        remove_quietly(*self.config.sockets(), self.config.pidfile, self.config.console_log)
        if self._launch is not None:
            from hypervisor import jail_ids

            jail_ids.release(self._launch.identity, self._launch.owner)


def _killed_by(code: int | None, last: str) -> str | None:
    """The name of the signal that ended QEMU (``SIGKILL``) when its exit status ``code``
    says so (negative), or, status unknown, the ``last`` line of its log is QEMU's own
    "terminating on signal N"; else None."""
    number: int | None = -code if code is not None and code < 0 else None
    if code is None:
        match = re.search(r"terminating on signal (\d+)", last)
        number = int(match.group(1)) if match else None
    if number is None:
        return None
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _listening(path: Path) -> bool:
    """True if something accepts connections on unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True
