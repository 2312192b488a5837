"""What init and exec share: the sync protocol, the process's credentials, the final exec.

:func:`finalize` applies the OCI ``process`` object to the calling process in one ordered
sequence; :func:`run_after_start` is the end of both runtimes (ready, start, execve).
"""

from __future__ import annotations

import errno
import os

from agent.oci import capabilities
from agent.oci.errors import (
    EXECUTABLE_NOT_FOUND,
    NOT_EXECUTABLE,
    UNSPECIFIED,
    ExecError,
    HookError,
    SetupError,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

    from agent.oci.hooks import StartHooks
    from agent.oci.syscalls import Syscalls
    from ocispec.spec import Process

#: PATH used for the lookup when process.env has none (runc's default container PATH).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: The container's process keeps only stdio; everything else closes at execve.
FIRST_STRAY_FD = 3


class Sync:
    """The agent's side of the protocol, seen from the runtime (docs/oci-in-guest.md).

    The runtime writes exactly one line, ``ready <pid>`` or ``error <REASON> <message>``
    (REASON one of :data:`agent.oci.errors.REASONS`); after ``ready`` it reads one line and
    runs the process only if that line is ``start``. A process with a terminal sends its pty
    master attached to the ``ready`` line.
    """

    def __init__(self, sys: Syscalls, fd: int) -> None:
        self.sys = sys
        self.fd = fd
        self.reported = False
        #: The master of the process's pty (process.terminal), sent with ``ready``.
        self.console: int | None = None

    def ready(self, pid: int) -> None:
        """``ready <pid>``; with a :attr:`console`, the master travels with the line
        (SCM_RIGHTS, one fd) and our copy is closed."""
        line = f"ready {pid}\n".encode()
        if self.console is None:
            self.sys.write(self.fd, line)
        else:
            self.sys.send_fds(self.fd, line, [self.console])
            self.sys.close(self.console)
            self.console = None
        self.reported = True

    def error(self, message: str, reason: str = UNSPECIFIED) -> None:
        """Report a failure and its reason; never raises (the agent may be gone)."""
        if self.reported:
            return
        self.reported = True
        line = f"error {reason} {' '.join(message.split())}\n"
        try:  # noqa: SIM105 - contextlib is one more import at start
            self.sys.write(self.fd, line.encode())
        except OSError:
            pass

    def start_failed(self, message: str, reason: str) -> None:
        """After ``start``: report that the program will not run (a startContainer hook
        failed) as one ``error <REASON> <message>`` line; never raises."""
        line = f"error {reason} {' '.join(message.split())}\n"
        try:  # noqa: SIM105 - contextlib is one more import at start
            self.sys.write(self.fd, line.encode())
        except OSError:
            pass

    def wait_start(self) -> str:
        """The line the agent sent after ``ready`` ("" when it closed the socket instead)."""
        line = b""
        while not line.endswith(b"\n") and len(line) < 64:
            try:
                chunk = self.sys.read(self.fd, 64 - len(line))
            except InterruptedError:
                continue
            if not chunk:
                return ""
            line += chunk
        return line.decode(errors="replace").strip()


def environment(sys: Syscalls, proc: Process) -> list[str]:
    """process.env plus HOME from the container's /etc/passwd when it is missing (as runc)."""
    env = list(proc.env)
    if any(entry.startswith("HOME=") for entry in env):
        return env
    home = "/"
    try:
        for line in sys.read_text("/etc/passwd").splitlines():
            fields = line.split(":")
            if len(fields) >= 6 and fields[2] == str(proc.user.uid):
                home = fields[5] or "/"
                break
    except (OSError, UnicodeDecodeError):
        pass
    env.append(f"HOME={home}")
    return env


def lookup(sys: Syscalls, name: str, env: list[str]) -> str:
    """Resolve args[0] like runc (Go's exec.LookPath) against the container's PATH."""
    if "/" in name:
        kind = sys.kind(name, follow=True)
        if kind is None:
            raise ExecError(
                f'exec: "{name}": stat {name}: no such file or directory',
                EXECUTABLE_NOT_FOUND,
            )
        if kind == "dir":
            raise ExecError(f'exec: "{name}": is a directory', NOT_EXECUTABLE)
        if not sys.access_x(name):
            raise ExecError(f'exec: "{name}": permission denied', NOT_EXECUTABLE)
        return name
    path = next((e[len("PATH=") :] for e in env if e.startswith("PATH=")), DEFAULT_PATH)
    for directory in path.split(":"):
        candidate = f"{directory or '.'}/{name}"
        kind = sys.kind(candidate, follow=True)
        if kind is not None and kind != "dir" and sys.access_x(candidate):
            return candidate
    raise ExecError(f'exec: "{name}": executable file not found in $PATH', EXECUTABLE_NOT_FOUND)


def finalize(sys: Syscalls, proc: Process, last_cap: int) -> tuple[str, list[str]]:
    """Turn the calling (root) process into the container's process, short of execve.

    Returns the resolved executable and the environment. The order is forced by privilege:
    everything that needs root or a capability comes before the uid change and the capset
    that drops them; what should be checked as the container's user comes after.
    """
    caps = proc.capabilities
    user = proc.user
    # 1. rlimits: raising a hard limit needs CAP_SYS_RESOURCE, which may be dropped below.
    for limit in proc.rlimits:
        try:
            sys.setrlimit(limit.resource, limit.soft, limit.hard)
        except OSError as exc:
            raise SetupError.from_os(f"setting rlimit type {limit.name}", exc) from exc
    # 2. HOME from the container's /etc/passwd, read while still root.
    env = environment(sys, proc)
    # 3. no_new_privs before seccomp: with it, installing a filter needs no capability.
    if proc.no_new_privileges:
        sys.set_no_new_privs()
    # 4. Without no_new_privs, seccomp needs CAP_SYS_ADMIN: install it now, while we have it
    #    (the profile must then allow the few syscalls left before execve, as with runc).
    if proc.seccomp is not None and not proc.no_new_privileges:
        _load_seccomp(sys, proc)
    try:
        # 5. Bounding set first: PR_CAPBSET_DROP needs CAP_SETPCAP, which setuid may remove.
        if caps is not None:
            capabilities.drop_bounding(sys, caps, last_cap)
            # 6. Keep the permitted set across the uid change; capset trims it afterwards.
            sys.set_keepcaps(True)
        # 7. The stdio becomes the user's (while we may still chown), then groups, then gid,
        #    then uid: each needs the privilege the last one gives up.
        give_stdio(sys, user.uid)
        try:
            sys.setgroups(list(user.additional_gids))
        except PermissionError:
            # A joined user namespace may deny setgroups (/proc/self/setgroups is "deny");
            # with no groups asked for there is nothing to lose, as with runc.
            if user.additional_gids:
                raise
        sys.setresgid(user.gid)
        sys.setresuid(user.uid)
        if caps is not None:
            sys.set_keepcaps(False)
            # 8. The final sets; ambient last, it needs caps both permitted and inheritable.
            capabilities.set_process_caps(sys, caps, last_cap)
    except OSError as exc:
        raise SetupError.from_os("setting up the user and capabilities", exc) from exc
    # 9. umask for the process (runc's default 0022 when the spec has none).
    sys.umask(0o022 if user.umask is None else user.umask)
    # 10. cwd as the container's user, so its permissions apply.
    try:
        sys.chdir(proc.cwd)
    except OSError as exc:
        raise SetupError.from_os(f"chdir to cwd ({proc.cwd}) set in config.json", exc) from exc
    # 11. Find the program now, as that user, so "not found" is an error of create, not a
    #     silent exit 127 after start.
    return lookup(sys, proc.args[0], env), env


#: st_rdev of /dev/null (1:3 on every Linux): stdio redirected there is left alone.
_DEV_NULL = os.makedev(1, 3)


def give_stdio(sys: Syscalls, uid: int) -> None:
    """Make descriptors 0, 1 and 2 owned by ``uid`` (the process's, in its user namespace), as runc
    does before it drops root: a pipe or pty the runtime made is root's with mode 0600/0620,
    so a non-root process could not reopen it (``echo > /dev/stdout``, a log file symlinked
    there, ``tty`` ownership). Only the owner changes (the gid stays, e.g. devpts' ``tty``);
    /dev/null and descriptors the user owns already are skipped; EINVAL (an id not mapped in
    the user namespace), EPERM (an owner not mapped) and EROFS are ignored, as runc ignores
    them. Other errors raise OSError."""
    for fd in (0, 1, 2):
        try:
            owner, rdev = sys.fstat_owner(fd)
        except OSError as exc:
            if exc.errno == errno.EBADF:
                continue
            raise
        if owner == uid or rdev == _DEV_NULL:
            continue
        try:
            sys.fchown(fd, uid, -1)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EPERM, errno.EROFS):
                raise


def _load_seccomp(sys: Syscalls, proc: Process) -> None:
    assert proc.seccomp is not None
    try:
        sys.seccomp_load(proc.seccomp.program, proc.seccomp.flags)
    except OSError as exc:
        raise SetupError.from_os("seccomp: loading the filter", exc) from exc


def attach_terminal(sys: Syscalls, sync: Sync, size: tuple[int, int] | None = None) -> str:
    """Give the process a pty of the container's own, as runc does: a new pty from the
    ``/dev/ptmx`` of the mount namespace we are in (the container's devpts instance), of
    ``size`` (rows, columns: the process's ``consoleSize``) from its first moment, its
    peer on fds 0-2 and our controlling terminal (we must lead a session already), its
    master kept in ``sync`` for the ``ready`` line. Returns the peer's path (``/dev/pts/N``,
    for /dev/console). SetupError on failure."""
    try:
        master, peer, path = sys.open_pty()
    except OSError as exc:
        raise SetupError.from_os("allocating the terminal", exc) from exc
    sync.console = master
    try:
        if size is not None:
            sys.set_window_size(master, *size)
        for target in (0, 1, 2):
            sys.dup2(peer, target)
        sys.close(peer)
        sys.set_controlling_tty(0)
    except OSError as exc:
        raise SetupError.from_os("setting up the terminal", exc) from exc
    return path


def run_after_start(
    sys: Syscalls,
    sync: Sync,
    proc: Process,
    pid: int,
    executable: str,
    env: list[str],
    hooks: StartHooks | None = None,
) -> int:
    """Report ``ready``, wait for ``start``, run the startContainer ``hooks``, exec.
    Returns only to give an exit code.

    After ``start`` the agent reads the sync socket until EOF, which the execve brings (the
    socket is close-on-exec); a failing hook is reported there instead, and nothing runs.
    """
    # 1. Every descriptor but stdio closes at execve (the sync socket included).
    sys.cloexec_from(FIRST_STRAY_FD)
    # 2. Ready: the process exists, runs as its user, and its program was found.
    sync.ready(pid)
    # 3. Block until the agent starts us; EOF means the container was deleted before start.
    line = sync.wait_start()
    if line != "start":
        return 1
    # 4. Dispositions Python changed (SIGPIPE, SIGXFSZ ignored) would survive execve, and
    #    the hooks must not inherit them either.
    sys.reset_signals()
    # 5. With no_new_privs, seccomp goes last, so it filters nothing of ours but the execve
    #    and the hooks (runc too loads it before its startContainer hooks).
    if proc.seccomp is not None and proc.no_new_privileges:
        _load_seccomp(sys, proc)
    # 6. startContainer hooks: in the container, after start, before the program.
    if hooks is not None:
        try:
            hooks.run(sys, env)
        except HookError as exc:
            sync.start_failed(exc.message, exc.reason)
            return exc.exit_code
    return _execve(sys, executable, proc.args, env)


def _execve(sys: Syscalls, executable: str, argv: list[str], env: list[str]) -> NoReturn:
    try:
        sys.execve(executable, argv, env)
    except OSError as exc:
        # Too late for the sync socket (the agent is no longer reading): say it on stderr.
        message = f"pysandbox: exec {executable}: {os.strerror(exc.errno or 0)}\n"
        try:  # noqa: SIM105 - contextlib is one more import at start
            sys.write(2, message.encode())
        except OSError:
            pass
        sys.exit_now(127 if exc.errno == errno.ENOENT else 126)
