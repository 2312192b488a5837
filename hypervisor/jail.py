"""Spawning a process in a jail: own namespaces, a minimal root, no privileges.

:func:`spawn` starts a program (QEMU, see :mod:`hypervisor.qemu_jail`) so that, from its
first instruction:

* it runs as :class:`~hypervisor.jail_ids.Identity` ``uid``/``gid`` (supplementary groups
  only those named), with no capabilities (effective, permitted, inheritable, ambient and
  bounding sets empty), ``no_new_privs`` set, core dumps off;
* in new mount, pid, ipc and uts namespaces, and a new network namespace unless
  ``host_network`` (QEMU's user-mode network needs the host's);
* it is pid 1 of its pid namespace: nothing else is visible or signalable there;
* its root is a small read-only tmpfs holding only :attr:`JailSpec.binds` (read-only bind
  mounts of host files and directories, at the same paths as on the host) and the symbolic
  links of a merged-``/usr`` host (``/lib -> usr/lib``...). No ``/proc``, ``/sys``, ``/tmp``,
  ``/etc``, no pod directory: whatever else it needs arrives as inherited fds.

How (Linux, as root): ``subprocess.Popen`` forks a child that ``unshare(2)``\\ s the
namespaces, makes every mount private, mounts the tmpfs on :data:`ROOT_MOUNTPOINT` (which
only becomes a mount in the new mount namespace), binds what is listed, ``pivot_root(2)``\\ s
into it and detaches the old root; then it forks once more (the first process of a new pid
namespace is its child), reports the grandchild's host pid on a pipe and exits. The
grandchild drops its credentials and returns to ``Popen``, which closes every fd but
``pass_fds`` and execs the program. The program is therefore not our child: it is
reparented to init (or the nearest subreaper), and followed by pid + start time
(:class:`~hypervisor.process.ProcessHandle`).

Errors: JailError naming the step that failed (``unshare``, ``mount``, ``pivot_root``,
``setresuid``...) and the errno text; nothing is left running then.
"""

from __future__ import annotations

import os
import platform
import resource
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from hypervisor import syscalls
from hypervisor.errors import JailError
from hypervisor.jail_ids import Identity
from hypervisor.process import ProcessHandle, start_time

#: Empty directory the jail's tmpfs root is mounted on (inside the new mount namespace only).
ROOT_MOUNTPOINT = Path("/run/pysandbox/jail/root")
#: Device nodes a jailed program may open (bound read-write from the host's /dev).
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
#: Top-level symbolic links of a merged-/usr host that are recreated in the jail's root.
USR_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: Size options of the jail's tmpfs root (directories and mount points only).
_TMPFS_OPTIONS = b"mode=0755,size=256k,nr_inodes=256"

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MNT_DETACH = 2
_PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS, _PR_CAP_AMBIENT = 24, 38, 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_SYS_PIVOT_ROOT = 155  # x86_64
_SYS_PIVOT_ROOT_BY_MACHINE = {"x86_64": 155, "aarch64": 41}


@dataclass(frozen=True)
class Bind:
    """``source`` (a host file or directory) visible read-only at the same path in the jail.

    ``writable`` keeps it writable (device nodes such as ``/dev/null``)."""

    source: Path
    writable: bool = False


@dataclass(frozen=True)
class JailSpec:
    """Everything :func:`spawn` needs to confine one program."""

    identity: Identity
    binds: tuple[Bind, ...]
    host_network: bool = False
    #: RLIMIT_NOFILE of the jailed program (soft = hard), at most the caller's hard limit.
    max_fds: int = 4096
    extra_symlinks: tuple[str, ...] = field(default=USR_LINKS)


def default_binds(program: Path) -> list[Bind]:
    """What any dynamically linked program of the distribution needs: ``/usr`` (its code
    and data, world-readable anyway), the program itself if it lives elsewhere, the
    non-merged ``/lib*`` directories of an older host, and :data:`DEVICES`."""
    binds = [Bind(Path("/usr"))]
    for link in USR_LINKS:
        if os.path.isdir(link) and not os.path.islink(link):
            binds.append(Bind(Path(link)))
    resolved = program.resolve()
    if not resolved.is_relative_to("/usr"):
        binds.append(Bind(resolved))
    binds += [Bind(Path(device), writable=True) for device in DEVICES]
    return binds


def fd_limit(wanted: int) -> int:
    """``wanted``, or this process's hard RLIMIT_NOFILE if lower (raising it needs
    CAP_SYS_RESOURCE, which root in a container may lack): the RLIMIT_NOFILE a confined
    program (QEMU here, virtiofsd) is given."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)


def _last_cap() -> int:
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return 40


class _Plan:
    """The work done between fork and exec, with everything precomputed in the parent."""

    def __init__(self, spec: JailSpec, report_fd: int) -> None:
        self.spec = spec
        self.report_fd = report_fd
        self.last_cap = _last_cap()
        self.max_fds = fd_limit(spec.max_fds)
        self.pivot_nr = _SYS_PIVOT_ROOT_BY_MACHINE.get(platform.machine(), _SYS_PIVOT_ROOT)
        self.root = str(ROOT_MOUNTPOINT).encode()
        self.links = [
            (link, os.readlink(link))
            for link in spec.extra_symlinks
            if os.path.islink(link) and not any(b.source == Path(link) for b in spec.binds)
        ]
        self.binds = [(str(b.source), b.writable, b.source.is_dir()) for b in spec.binds]
        flags = (
            syscalls.CLONE_NEWNS
            | syscalls.CLONE_NEWPID
            | syscalls.CLONE_NEWIPC
            | syscalls.CLONE_NEWUTS
        )
        self.flags = flags if spec.host_network else flags | syscalls.CLONE_NEWNET

    def _report(self, text: str) -> None:
        os.write(self.report_fd, text.encode() + b"\n")

    def __call__(self) -> None:
        """Runs in Popen's child: build the namespaces and root, fork, drop privileges."""
        try:
            self._enter_namespaces()
            self._build_root()
        except BaseException as exc:
            self._report(f"E {exc.strerror if isinstance(exc, OSError) else exc}")
            os._exit(1)
        child = os.fork()
        if child:
            self._report(f"P {child}")
            os._exit(0)
        try:
            self._drop_privileges()
        except BaseException as exc:
            self._report(f"E {exc.strerror if isinstance(exc, OSError) else exc}")
            os._exit(1)

    def _enter_namespaces(self) -> None:
        syscalls.unshare(self.flags)
        syscalls.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None, "mount --make-rprivate /")
        syscalls.mount(
            b"tmpfs",
            self.root,
            b"tmpfs",
            _MS_NOSUID | _MS_NODEV,
            _TMPFS_OPTIONS,
            "mount the jail's tmpfs root",
        )

    def _build_root(self) -> None:
        root = self.root.decode()
        for source, writable, is_dir in self.binds:
            target = root + source
            if is_dir:
                os.makedirs(target, mode=0o755, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
                os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
            encoded = target.encode()
            syscalls.mount(
                source.encode(), encoded, None, _MS_BIND | _MS_REC, None, f"bind {source}"
            )
            flags = _MS_BIND | _MS_REMOUNT | _MS_NOSUID
            if not writable:
                flags |= _MS_RDONLY | _MS_NODEV
            syscalls.mount(None, encoded, None, flags, None, f"remount {source}")
        for link, target in self.links:
            os.symlink(target, root + link)
        os.chdir(root)
        syscalls.check(syscalls.LIBC.syscall(self.pivot_nr, b".", b"."), "pivot_root")
        syscalls.umount2(b".", _MNT_DETACH, "detach the host's root")
        os.chdir("/")
        syscalls.mount(
            None,
            b"/",
            None,
            _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
            None,
            "remount the jail's root read-only",
        )

    def _drop_privileges(self) -> None:
        # Runs inside the jail: nothing may be imported here (the host's files are gone).
        identity = self.spec.identity
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        # Never above the caller's hard limit (fd_limit: a run under `ulimit -n 512` could not
        # start its VM).
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.max_fds, self.max_fds))
        os.setgroups(list(identity.groups))
        os.setresgid(identity.gid, identity.gid, identity.gid)
        for cap in range(self.last_cap + 1):
            syscalls.prctl(_PR_CAPBSET_DROP, cap, "drop the bounding set")
        syscalls.check(
            syscalls.LIBC.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0),
            "clear ambient caps",
        )
        # From root to another uid without SECBIT_KEEP_CAPS: the kernel clears the
        # permitted and effective sets (and the process becomes non-dumpable).
        os.setresuid(identity.uid, identity.uid, identity.uid)
        syscalls.prctl(_PR_SET_NO_NEW_PRIVS, 1, "set no_new_privs")


def spawn(
    argv: Sequence[str],
    spec: JailSpec,
    *,
    stdout: IO[bytes] | int,
    pass_fds: Sequence[int] = (),
    what: str = "program",
) -> ProcessHandle:
    """Start ``argv`` jailed by ``spec`` (module docstring); its handle once it has exec'd.

    ``stdout`` receives its stdout and stderr; ``pass_fds`` are inherited at their numbers
    (every other fd is closed). JailError (naming ``what`` and the failed step) if the jail
    cannot be built or the program not executed; nothing is left running then.
    """
    ROOT_MOUNTPOINT.mkdir(mode=0o700, parents=True, exist_ok=True)
    read_end, write_end = os.pipe()
    try:
        plan = _Plan(spec, write_end)
        try:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                pass_fds=tuple(pass_fds),
                cwd="/",
                preexec_fn=plan,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise JailError(f"cannot start the jailed {what}: {detail}: {argv[0]}") from exc
        popen.wait()
        os.close(write_end)
        write_end = -1
        report = _read_all(read_end).decode(errors="replace").split("\n")
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    pid = next((int(line[2:]) for line in report if line.startswith("P ")), None)
    error = next((line[2:] for line in report if line.startswith("E ")), None)
    if error is not None or pid is None:
        if pid is not None:
            _kill(pid)
        raise JailError(
            f"cannot set up the jail of {what}: {error or 'its launcher died'}; "
            "see 'pysandbox check' (PYSANDBOX_JAIL=off runs it unjailed, as root)"
        )
    started = start_time(pid)
    return ProcessHandle(pid, started if started is not None else -1)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks)


def _kill(pid: int) -> None:
    started = start_time(pid)
    if started is not None:
        handle = ProcessHandle(pid, started)
        handle.signal(signal.SIGKILL)
        handle.wait(5.0)
