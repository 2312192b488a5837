"""virtiofsd driver: serve one host directory to one VM over a vhost-user socket.

Debian 12 ships the C virtiofsd of QEMU 7.2 at ``/usr/lib/qemu/virtiofsd``. Facts that
shape this driver (measured):

- It must run as root here: it takes a lock/pid file in the fixed directory
  ``/var/run/virtiofsd/`` named after the socket path (``/`` replaced by ``.``), so several
  instances coexist as long as their socket paths differ; a second instance on the same
  socket path fails. The file stays behind after SIGKILL; :meth:`Virtiofsd.stop` removes it.
- ``-o sandbox=namespace`` (default) forks: the pid we hold is the parent, the server runs
  as its child in new mount/pid/net namespaces and dies with it (PR_SET_PDEATHSIG).
- It exits by itself when QEMU disconnects, so after a VM stops it is usually gone already.
- On SIGTERM (or SIGKILL) it leaves its socket and pid file behind; :meth:`Virtiofsd.stop`
  removes them (only those of its own instance).
- It serves exactly one vhost-user connection: one instance per VM and share.

File semantics (docs/file-semantics.md has the measurements):

- Permissions. The guest kernel checks every access itself (virtio-fs mounts always have
  ``default_permissions``), with the caller's full credentials. virtiofsd then creates files
  as the caller's uid/gid (``setresuid``/``setresgid`` per request) but has dropped all
  supplementary groups (CVE-2022-0358), and the FUSE request carries none: a create the guest
  allowed through a supplementary group (Kubernetes ``fsGroup``) failed on the host with
  EACCES. So by default it runs under ``setpriv --securebits +no_setuid_fixup``: its
  effective capabilities survive the uid switch, the host does not re-check what the guest
  checked, and new files still get the caller's uid and gid (or a setgid directory's group).
  The host re-check was no boundary: the guest chooses the uid/gid in each request and every
  other operation (open, setattr, unlink...) already runs as root.
- Locks. With ``locks="local"`` (virtiofsd's default) flock, POSIX and OFD locks live in the
  guest kernel: they exclude within the VM only. ``locks="remote"`` (``-o flock -o
  posix_lock``) takes them on the host file, so they exclude host processes and other VMs too,
  but this virtiofsd refuses every *blocking* request (``flock`` without ``LOCK_NB``,
  ``F_SETLKW``, ``F_OFD_SETLKW``) with EOPNOTSUPP, and the guest kernel returns that to the
  caller (no fallback); and an OFD lock taken in the guest outlives its file on the host.
- Not used, measured: ``-o writeback`` (the guest then ignores file size changes made on the
  host and loses concurrent host appends) and ``-o announce_submounts`` (with the 6.1 guest,
  ACLs fail on the submounts and containers stop sharing inodes).
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from hypervisor import fs_privileges
from hypervisor.errors import VirtiofsdError
from hypervisor.jail import fd_limit
from hypervisor.process import (
    ProcessHandle,
    SpawnedProcess,
    attached,
    log_tail,
    remove_quietly,
    start_time,
)

CacheMode = Literal["auto", "always", "none"]
#: The attribute and entry timeout virtiofsd's ``cache=auto`` gives the guest (seconds).
AUTO_TIMEOUT = 1.0
SandboxMode = Literal["namespace", "chroot"]
LockMode = Literal["local", "remote"]

#: Where the binary is looked for, in order, before PATH.
CANDIDATES = (Path("/usr/lib/qemu/virtiofsd"), Path("/usr/libexec/virtiofsd"))
#: The extended attributes a container may use (virtiofsd ``xattrmap`` rules, first match
#: wins): ``user.*``, file capabilities and POSIX ACLs pass; every other name (``trusted.*``,
#: ``security.*`` labels...) is refused to the guest with EPERM (as for a runc container
#: without CAP_SYS_ADMIN) and hidden from its listings, so a guest cannot plant xattrs the
#: host interprets (overlayfs' ``trusted.overlay.*``, SELinux labels).
CONTAINER_XATTR_MAP = (
    ":ok:all:user.::"
    ":ok:all:security.capability::"
    ":ok:all:system.posix_acl_access::"
    ":ok:all:system.posix_acl_default::"
    ":bad:all:::"
)
#: setpriv's arguments before virtiofsd's command line: keep capabilities across setresuid.
SETPRIV_ARGS = ("--securebits", "+no_setuid_fixup", "--")
#: Environment override for the binary.
ENV_VIRTIOFSD = "PYSANDBOX_VIRTIOFSD"
#: virtiofsd's fixed lock/pid directory.
PID_DIR = Path("/var/run/virtiofsd")
#: util-linux's setpriv, which starts virtiofsd with the no_setuid_fixup securebit.
SETPRIV = Path("/usr/bin/setpriv")
#: RLIMIT_NOFILE (soft = hard) each virtiofsd starts with: it holds an O_PATH fd per inode
#: the guest keeps looked up, plus its open files, so this bounds what one guest can pin on
#: the host; past it the guest's lookups and opens fail (docs/trust-boundaries.md). Set
#: before exec: Debian's virtiofsd 7.2 leaves the limit it inherits as it is, also with
#: ``--rlimit-nofile`` (measured with strace: it only reads it). Lowered to the hard limit
#: pysandbox itself has when that is lower (:func:`fd_limit`).
DEFAULT_MAX_FDS = 65536
DEFAULT_START_TIMEOUT = 5.0
DEFAULT_STOP_TIMEOUT = 1.0


def find_virtiofsd() -> Path:
    """Locate virtiofsd ($PYSANDBOX_VIRTIOFSD, the Debian/Fedora paths, then PATH).

    Raises VirtiofsdError naming the package to install.
    """
    override = os.environ.get(ENV_VIRTIOFSD)
    if override:
        found = shutil.which(override)
        if found is None:
            raise VirtiofsdError(f"{ENV_VIRTIOFSD}={override} is not an executable")
        return Path(found)
    for candidate in CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("virtiofsd")
    if found is None:
        raise VirtiofsdError(
            "virtiofsd not found; install it with 'apt-get install qemu-system-common'"
        )
    return Path(found)


def pid_file_for(socket_path: Path) -> Path:
    """The lock/pid file virtiofsd creates for ``socket_path`` under :data:`PID_DIR`."""
    return PID_DIR / (str(socket_path).replace("/", ".") + ".pid")


class Virtiofsd(SpawnedProcess):
    """One virtiofsd process sharing ``shared_dir`` on ``socket_path``.

    ``start`` returns once the socket exists (QEMU can connect); ``stop`` is idempotent.
    ``xattr`` enables extended attributes (needed for file capabilities and SELinux labels
    in container images; off by default, as in virtiofsd); ``xattr_map`` restricts them
    (virtiofsd's ``xattrmap``, e.g. :data:`CONTAINER_XATTR_MAP`) and ``posix_acl`` makes the
    guest kernel enforce POSIX ACLs (needs xattrs). ``direct_io`` keeps the guest's O_DIRECT
    on the host file (``-o allow_direct_io``; virtiofsd drops it by default, so the host page
    cache served such I/O and misaligned O_DIRECT I/O succeeded). ``locks`` chooses where flock,
    POSIX and OFD locks are held (module docstring). ``recheck_permissions`` keeps
    virtiofsd's own host-side permission check on creation (without supplementary groups);
    by default it is left to the guest kernel. ``options`` are extra ``-o`` values passed as
    is. ``privileged_files=False`` keeps what the guest writes powerless on the host: no
    device nodes, no setuid/setgid bits, no file capabilities (:mod:`hypervisor.fs_privileges`:
    capabilities dropped, a seccomp filter). ``max_fds`` bounds its open files
    (:data:`DEFAULT_MAX_FDS`). ``cache`` is virtiofsd's policy: ``auto`` drops a file's
    guest page cache on each open, ``always`` keeps it (FOPEN_KEEP_CACHE) and the guest
    kernel drops it when a refreshed mtime or size differs (FUSE_AUTO_INVAL_DATA, which
    this virtiofsd asks for); ``attr_timeout`` (seconds, virtiofsd's ``-o timeout``)
    replaces the policy's attribute and entry timeout (auto: 1 s, always: 86400 s).

    Its confinement (measured; docs/trust-boundaries.md): virtiofsd itself unshares mount,
    pid and net namespaces and pivots into the shared directory (``sandbox=namespace``), keeps
    only CHOWN, DAC_OVERRIDE, FOWNER, SETGID, SETUID (plus FSETID, MKNOD, SETFCAP with
    ``privileged_files``) with an empty bounding set and ``no_new_privs``, and installs its
    syscall allow-list (seccomp mode 2), under :mod:`hypervisor.fs_privileges`' filter.
    """

    def __init__(
        self,
        socket_path: Path,
        shared_dir: Path,
        *,
        log_path: Path | None = None,
        cache: CacheMode = "auto",
        attr_timeout: float | None = None,
        sandbox: SandboxMode = "namespace",
        xattr: bool = False,
        xattr_map: str = "",
        posix_acl: bool = False,
        direct_io: bool = False,
        locks: LockMode = "local",
        recheck_permissions: bool = False,
        options: Sequence[str] = (),
        binary: Path | None = None,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        privileged_files: bool = True,
        max_fds: int = DEFAULT_MAX_FDS,
    ) -> None:
        self.socket_path = socket_path
        self.shared_dir = shared_dir
        self.log_path = log_path
        self.cache = cache
        self.attr_timeout = attr_timeout
        self.sandbox = sandbox
        self.xattr = xattr
        self.xattr_map = xattr_map
        self.posix_acl = posix_acl
        self.direct_io = direct_io
        self.locks: LockMode = locks
        self.recheck_permissions = recheck_permissions
        self.options = tuple(options)
        self.binary = binary
        self.start_timeout = start_timeout
        self.privileged_files = privileged_files
        self.max_fds = max_fds
        self._handle: ProcessHandle | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        # Only files created by our instance are removed: a failed start must not delete
        # the socket or pid file of another virtiofsd serving the same path.
        self._owns_files = False

    @classmethod
    def attach(
        cls, socket_path: Path, shared_dir: Path, pid: int, start: int | None = None
    ) -> Virtiofsd:
        """Re-attach to a virtiofsd started earlier (possibly by another process).

        Without ``start`` the pid is trusted only if its command line names
        ``socket_path``. A gone or reused pid makes :meth:`stop` only clean up.
        """
        fs = cls(socket_path, shared_dir)
        fs._handle = attached(pid, start, str(socket_path).encode())
        fs._owns_files = True
        return fs

    def owner(self) -> int | None:
        """Pid of a live virtiofsd already serving :attr:`socket_path` (from its pid file)."""
        try:
            pid = int(pid_file_for(self.socket_path).read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        if start_time(pid) is None or str(self.socket_path).encode() not in cmdline:
            return None
        return pid

    def argv(self, binary: Path, setpriv: Path = SETPRIV) -> list[str]:
        """The virtiofsd command line (prefixed by ``setpriv`` unless recheck_permissions)."""
        prefix = [] if self.recheck_permissions else [str(setpriv), *SETPRIV_ARGS]
        lock_options = (
            ["flock", "posix_lock"] if self.locks == "remote" else ["no_flock", "no_posix_lock"]
        )
        args = [
            *prefix,
            str(binary),
            f"--socket-path={self.socket_path}",
            "-o",
            f"source={self.shared_dir}",
            "-o",
            f"cache={self.cache}",
            *(() if self.attr_timeout is None else ("-o", f"timeout={self.attr_timeout:g}")),
            "-o",
            f"sandbox={self.sandbox}",
        ]
        for option in lock_options:
            args += ["-o", option]
        if self.xattr:
            args += ["-o", "xattr"]
            if self.xattr_map:
                args += ["-o", f"xattrmap={self.xattr_map}"]
            if self.posix_acl:
                args += ["-o", "posix_acl"]
        if self.direct_io:
            args += ["-o", "allow_direct_io"]
        for option in self.options:
            args += ["-o", option]
        if not self.privileged_files:
            for option in fs_privileges.CAPABILITY_OPTIONS:
                args += ["-o", option]
        return args

    def _not_started(self) -> Exception:
        return VirtiofsdError(f"virtiofsd for {self.socket_path} was not started")

    def alive(self) -> bool:
        """True while this virtiofsd runs."""
        return self._running()

    def start(self) -> None:
        """Spawn virtiofsd and wait (bounded) until its socket exists.

        Raises VirtiofsdError if the binary is missing, the directory does not exist, or
        virtiofsd exits or does not create the socket in time (nothing left running then).
        """
        if self._handle is not None:
            raise VirtiofsdError(f"virtiofsd for {self.socket_path} was already started")
        if not self.shared_dir.is_dir():
            raise VirtiofsdError(f"cannot share {self.shared_dir}: not a directory")
        binary = self.binary or find_virtiofsd()
        if not self.recheck_permissions and not os.access(SETPRIV, os.X_OK):
            raise VirtiofsdError(
                f"{SETPRIV} not found; install it with 'apt-get install util-linux'"
            )
        argv = self.argv(binary)
        other = self.owner()
        if other is not None:
            raise VirtiofsdError(
                f"{self.socket_path} is already served by virtiofsd pid {other}; "
                "stop it or use another socket path"
            )
        remove_quietly(self.socket_path)  # stale from a crash: virtiofsd would fail to bind
        try:
            seccomp = None if self.privileged_files else fs_privileges.Filter()
        except ValueError as exc:
            raise VirtiofsdError(f"cannot keep guest files powerless: {exc}") from exc
        try:
            log = self.log_path.open("wb") if self.log_path is not None else None
            with log if log is not None else contextlib.nullcontext():
                self._popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log if log is not None else subprocess.DEVNULL,
                    stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL,
                    start_new_session=True,
                    close_fds=True,
                    cwd="/",
                    preexec_fn=_Preexec(self.max_fds, seccomp),
                )
        except OSError as exc:
            raise VirtiofsdError(
                f"cannot start virtiofsd for {self.shared_dir}: {exc.strerror or exc}: "
                f"{exc.filename or binary}"
            ) from exc
        except subprocess.SubprocessError as exc:  # the filter could not be installed
            raise VirtiofsdError(
                f"cannot start virtiofsd for {self.shared_dir}: its seccomp filter: {exc}"
            ) from exc
        started = start_time(self._popen.pid)
        self._handle = ProcessHandle(self._popen.pid, started if started is not None else -1)
        try:
            self._wait_for_socket()
        except BaseException:
            self._owns_files = self.owner() in (None, self.pid)
            self.stop()
            raise

    def _failure(self, what: str) -> VirtiofsdError:
        where = f" (see {self.log_path})" if self.log_path is not None else ""
        tail = ""
        if self.log_path is not None:
            last = log_tail(self.log_path, lines=1)
            tail = f": {last}" if last else ""
        return VirtiofsdError(f"virtiofsd for {self.shared_dir} {what}{tail}{where}")

    def _wait_for_socket(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not self.socket_path.exists():
            if not self.alive():
                code = self._popen.poll() if self._popen is not None else None
                raise self._failure(f"exited with status {code} during startup")
            if time.monotonic() >= deadline:
                raise self._failure(
                    f"did not create {self.socket_path} within {self.start_timeout:g}s"
                )
            time.sleep(0.005)
        self._owns_files = True

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for virtiofsd to exit; True if it has."""
        if self._popen is not None:
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        return self._handle is None or self._handle.wait(timeout)

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """SIGTERM, wait ``timeout``, then SIGKILL; remove the socket and pid file it made.

        Idempotent; never raises for a process that is already gone.
        """
        try:
            if self._handle is not None and self.alive():
                self._handle.terminate(timeout)
                self.wait(1.0)
        finally:
            if self._owns_files and not self.alive():
                remove_quietly(self.socket_path, pid_file_for(self.socket_path))


class _Preexec:
    """Between fork and exec: bound the fds (RLIMIT_NOFILE), then install ``seccomp``."""

    def __init__(self, max_fds: int, seccomp: fs_privileges.Filter | None) -> None:
        self.max_fds = fd_limit(max_fds)
        self.seccomp = seccomp

    def __call__(self) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.max_fds, self.max_fds))
        if self.seccomp is not None:
            self.seccomp.install()
