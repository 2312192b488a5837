"""The seam: every side effect of the runtime goes through a :class:`Syscalls` object.

:class:`LinuxSyscalls` does the real thing (``os`` where the stdlib has it, ctypes on libc for
the rest). :class:`RecordingSyscalls` records every call that changes something as a readable
tuple and answers queries from a small in-memory file system, so unit tests assert the exact
order of mounts, setuid, capset, seccomp... without root.

Queries (``kind``, ``readlink``, ``mount_flags``, ``fs_magic``, ``read_text``, ``access_x``,
``getpid``) are not recorded: the tests are about what the runtime *does*.

Every real wrapper raises :class:`OSError` whose ``strerror`` reads
``<what was attempted>: <errno text>``, so a :class:`~agent.oci.errors.SetupError` built from
it says what failed.

The module-level :func:`mount`, :func:`umount2` and :func:`power_off` are the same wrappers for
the agent itself (PID 1: early mounts, shares, overlays, power-off): the guest's one ctypes
binding of libc.
"""

from __future__ import annotations

import abc
import ctypes
import os
import struct
import time

from ocispec.linux import (
    MS_BIND,
    MS_DIRSYNC,
    MS_I_VERSION,
    MS_LAZYTIME,
    MS_MANDLOCK,
    MS_MOVE,
    MS_NOATIME,
    MS_NODEV,
    MS_NODIRATIME,
    MS_NOEXEC,
    MS_NOSUID,
    MS_NOSYMFOLLOW,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_RELATIME,
    MS_REMOUNT,
    MS_SHARED,
    MS_SILENT,
    MS_SLAVE,
    MS_STRICTATIME,
    MS_SYNCHRONOUS,
    MS_UNBINDABLE,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

#: signal.SIGKILL (the signal module costs an enum build at start-up).
_SIGKILL = 9
MNT_DETACH = 0x2
RB_POWER_OFF = 0x4321FEDC
#: Writing a command letter here runs that sysrq action (whatever kernel.sysrq allows).
SYSRQ_TRIGGER = "/proc/sysrq-trigger"

#: statvfs f_flag bits that a bind remount must keep (they may be locked in a user namespace).
_ST_TO_MS = (
    (0x1, MS_RDONLY),
    (0x2, MS_NOSUID),
    (0x4, MS_NODEV),
    (0x8, MS_NOEXEC),
    (0x400, MS_NOATIME),
    (0x800, MS_NODIRATIME),
    (0x1000, MS_RELATIME),
)

_FLAG_NAMES = (
    (MS_RDONLY, "ro"),
    (MS_NOSUID, "nosuid"),
    (MS_NODEV, "nodev"),
    (MS_NOEXEC, "noexec"),
    (MS_SYNCHRONOUS, "sync"),
    (MS_REMOUNT, "remount"),
    (MS_MANDLOCK, "mand"),
    (MS_DIRSYNC, "dirsync"),
    (MS_NOSYMFOLLOW, "nosymfollow"),
    (MS_NOATIME, "noatime"),
    (MS_NODIRATIME, "nodiratime"),
    (MS_BIND, "bind"),
    (MS_MOVE, "move"),
    (MS_REC, "rec"),
    (MS_SILENT, "silent"),
    (MS_UNBINDABLE, "unbindable"),
    (MS_PRIVATE, "private"),
    (MS_SLAVE, "slave"),
    (MS_SHARED, "shared"),
    (MS_RELATIME, "relatime"),
    (MS_I_VERSION, "iversion"),
    (MS_STRICTATIME, "strictatime"),
    (MS_LAZYTIME, "lazytime"),
)

CGROUP2_SUPER_MAGIC = 0x63677270

PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4
TIOCSCTTY = 0x540E
#: ioctls of a pty master (asm-generic/ioctls.h): its number, unlock, open the peer, size.
TIOCGPTN = 0x80045430
TIOCSPTLCK = 0x40045431
TIOCGPTPEER = 0x5441
TIOCSWINSZ = 0x5414
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SECCOMP_SET_MODE_FILTER = 1
_CLOSE_RANGE_CLOEXEC = 1 << 2

#: Raw syscall numbers glibc has no wrapper for, per ``os.uname().machine``.
_RAW_SYSCALLS = {
    "x86_64": {"pivot_root": 155, "rt_sigaction": 13, "seccomp": 317, "bpf": 321},
    "aarch64": {"pivot_root": 41, "rt_sigaction": 134, "seccomp": 277, "bpf": 280},
}

#: bpf(2) commands, program and attach types, flags (linux/bpf.h).
_BPF_PROG_LOAD = 5
_BPF_PROG_ATTACH = 8
_BPF_PROG_TYPE_CGROUP_DEVICE = 15
_BPF_CGROUP_DEVICE = 6
_BPF_F_ALLOW_MULTI = 2
#: Verifier log kept when a program is refused (only then is it asked for).
_BPF_LOG_SIZE = 16 * 1024


def mount_flags_str(flags: int) -> str:
    """``MS_BIND|MS_REC`` -> ``"bind|rec"`` (for recordings and messages)."""
    names = [name for bit, name in _FLAG_NAMES if flags & bit]
    rest = flags & ~sum(bit for bit, _ in _FLAG_NAMES)
    if rest:
        names.append(hex(rest))
    return "|".join(names) or "0"


_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """The C library, loaded once. CDLL(None): the symbols already loaded in the interpreter,
    libc among them; unlike ctypes.util.find_library it forks no ldconfig (there is none in
    the guest)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


#: The C functions the runtimes call through ctypes. ctypes looks a name up (dlsym) and builds
#: its function object on first use, then keeps it on the CDLL: :func:`preload_libc`, in the
#: zygote, does that once for every runtime it forks.
RUNTIME_FUNCTIONS = (
    "capset",
    "close_range",
    "ioctl",
    "mount",
    "prctl",
    "sethostname",
    "setdomainname",
    "setns",
    "setrlimit",
    "sigprocmask",
    "signal",
    "syscall",
    "umount2",
    "unshare",
)


def preload_libc() -> None:
    """Resolve :data:`RUNTIME_FUNCTIONS` in :func:`libc` now (those this libc lacks are left
    to the callers' own fallbacks)."""
    lib = libc()
    for name in RUNTIME_FUNCTIONS:
        getattr(lib, name, None)


#: The signals :meth:`LinuxSyscalls.reset_signals` sets to SIG_DFL: all but SIGKILL and SIGSTOP.
_SIGNALS = tuple(signum for signum in range(1, 65) if signum not in (9, 19))
_SA_NOCLDSTOP, _SA_NOCLDWAIT = 0x1, 0x2
#: The signals not at their default action in this process, as :func:`preload_signals` found
#: them (None: not looked; every signal is reset).
_not_default: tuple[int, ...] | None = None


def preload_signals() -> None:
    """Note which signals are not at their default action now (in the zygote): the runtimes
    forked from it afterwards inherit exactly these and change none, so their
    :meth:`~LinuxSyscalls.reset_signals` resets only them (a few calls instead of 62, each
    a ctypes call of ~0.1 ms under TCG). Left as it was when the kernel refuses the query."""
    global _not_default
    try:
        _not_default = LinuxSyscalls().signals_not_default()
    except OSError:
        _not_default = None


def check(result: int, what: str) -> None:
    """OSError(errno, ``<what>: <errno text>``) when a libc call returned -1."""
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    """mount(2); ``None`` passes NULL (a remount or propagation change has no source)."""
    result = libc().mount(
        source.encode() if source is not None else None,
        target.encode(),
        fstype.encode() if fstype is not None else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    check(
        result,
        f"mount {source or 'none'} on {target}"
        + (f" type {fstype}" if fstype else "")
        + f" ({mount_flags_str(flags)}{',' + data if data else ''})",
    )


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2)."""
    check(libc().umount2(target.encode(), flags), f"umount {target}")


def power_off(sysrq_trigger: str = SYSRQ_TRIGGER) -> None:
    """End the VM at once: an immediate reset (sysrq ``b``: the kernel's emergency restart,
    which QEMU, run with ``-no-reboot``, turns into its exit); reboot(RB_POWER_OFF) only if
    ``sysrq_trigger`` cannot be written. Only returns on failure (raises OSError). The caller
    syncs first: nothing else is flushed.

    Not reboot(RB_POWER_OFF) first: its device shutdown flushes the virtio-pmem root through
    the device's virtqueue, which QEMU does not carry over a template restore (no migration
    state for virtio-pmem), so in a restored VM the flush is never answered and the power-off
    hung for ever (docs/root-device.md, "Templates").
    """
    try:
        fd = os.open(sysrq_trigger, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        pass
    else:
        try:
            os.write(fd, b"b")  # returns only if the reset did not happen
        except OSError:
            pass
        finally:
            os.close(fd)
    check(libc().reboot(RB_POWER_OFF), "reboot(RB_POWER_OFF)")


class Syscalls(abc.ABC):
    """Everything the runtime does to the system. Paths are absolute."""

    # -- mounts and files -----------------------------------------------------------------
    @abc.abstractmethod
    def mount(
        self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None
    ) -> None: ...

    @abc.abstractmethod
    def umount2(self, target: str, flags: int) -> None: ...

    @abc.abstractmethod
    def pivot_root(self, new_root: str, put_old: str) -> None: ...

    @abc.abstractmethod
    def chroot(self, path: str) -> None: ...

    @abc.abstractmethod
    def chdir(self, path: str) -> None: ...

    @abc.abstractmethod
    def fchdir(self, fd: int) -> None: ...

    @abc.abstractmethod
    def open(self, path: str, flags: int) -> int: ...

    @abc.abstractmethod
    def close(self, fd: int) -> None: ...

    @abc.abstractmethod
    def mkdir(self, path: str, mode: int) -> None: ...

    @abc.abstractmethod
    def create_file(self, path: str, mode: int) -> None:
        """Create ``path`` as an empty regular file if it does not exist (never truncates)."""

    @abc.abstractmethod
    def mknod(self, path: str, mode: int, major: int, minor: int) -> None: ...

    @abc.abstractmethod
    def chown(self, path: str, uid: int, gid: int) -> None: ...

    @abc.abstractmethod
    def fstat_owner(self, fd: int) -> tuple[int, int]:
        """(st_uid, st_rdev) of open descriptor ``fd``."""

    @abc.abstractmethod
    def fchown(self, fd: int, uid: int, gid: int) -> None:
        """fchown(2); -1 keeps that id."""

    @abc.abstractmethod
    def symlink(self, target: str, path: str) -> None: ...

    @abc.abstractmethod
    def copy_up(self, source_fd: int, target: str) -> None:
        """Copy directory ``source_fd``'s content into ``target`` (agent.oci.copy_up)."""

    @abc.abstractmethod
    def unlink(self, path: str) -> None: ...

    @abc.abstractmethod
    def write_file(self, path: str, data: str) -> None:
        """Write ``data`` to an existing file (proc, sysfs and cgroup files)."""

    # -- namespaces and processes ---------------------------------------------------------
    @abc.abstractmethod
    def unshare(self, flags: int) -> None: ...

    @abc.abstractmethod
    def setns(self, fd: int, nstype: int) -> None: ...

    @abc.abstractmethod
    def loopback_up(self) -> None:
        """Bring ``lo`` of the current network namespace up (SIOCSIFFLAGS IFF_UP)."""

    @abc.abstractmethod
    def fork(self) -> int: ...

    @abc.abstractmethod
    def pipe(self) -> tuple[int, int]:
        """A close-on-exec pipe (read end, write end)."""

    @abc.abstractmethod
    def read(self, fd: int, size: int) -> bytes: ...

    @abc.abstractmethod
    def write(self, fd: int, data: bytes) -> None:
        """Write all of ``data``."""

    @abc.abstractmethod
    def waitpid(self, pid: int) -> int:
        """Block until ``pid`` exits; return its raw wait status."""

    @abc.abstractmethod
    def sethostname(self, name: str) -> None: ...

    @abc.abstractmethod
    def setdomainname(self, name: str) -> None: ...

    @abc.abstractmethod
    def setsid(self) -> None: ...

    @abc.abstractmethod
    def set_controlling_tty(self, fd: int) -> None: ...

    @abc.abstractmethod
    def open_pty(self) -> tuple[int, int, str]:
        """A new pty from ``/dev/ptmx`` as this process resolves it (the container's devpts
        instance once inside its mount namespace): ``(master, peer, peer's path)``, both fds
        close-on-exec and opened O_NOCTTY, the path ``/dev/pts/N``. OSError on failure."""

    @abc.abstractmethod
    def set_window_size(self, fd: int, rows: int, cols: int) -> None:
        """TIOCSWINSZ on terminal ``fd`` (tty_ioctl(4))."""

    @abc.abstractmethod
    def dup2(self, fd: int, target: int) -> None:
        """``target`` becomes a copy of ``fd``, inherited across execve."""

    @abc.abstractmethod
    def send_fds(self, sock: int, data: bytes, fds: list[int]) -> None:
        """Send ``data`` with ``fds`` attached (SCM_RIGHTS) on the Unix socket ``sock``."""

    # -- credentials ----------------------------------------------------------------------
    @abc.abstractmethod
    def setgroups(self, gids: list[int]) -> None: ...

    @abc.abstractmethod
    def setresgid(self, gid: int) -> None: ...

    @abc.abstractmethod
    def setresuid(self, uid: int) -> None: ...

    @abc.abstractmethod
    def set_keepcaps(self, keep: bool) -> None: ...

    @abc.abstractmethod
    def capbset_drop(self, cap: int) -> None: ...

    @abc.abstractmethod
    def capset(self, effective: int, permitted: int, inheritable: int) -> None: ...

    @abc.abstractmethod
    def ambient_clear(self) -> None: ...

    @abc.abstractmethod
    def ambient_raise(self, cap: int) -> None: ...

    @abc.abstractmethod
    def set_no_new_privs(self) -> None: ...

    @abc.abstractmethod
    def setrlimit(self, resource: int, soft: int, hard: int) -> None: ...

    @abc.abstractmethod
    def umask(self, mask: int) -> None: ...

    @abc.abstractmethod
    def seccomp_load(self, program: bytes, flags: int) -> None:
        """Install a classic BPF program (``struct sock_filter`` array) as a seccomp filter."""

    # -- device cgroup (cgroup v2) ---------------------------------------------------------
    @abc.abstractmethod
    def load_device_program(self, insns: bytes, license: str) -> int:
        """bpf(BPF_PROG_LOAD) of a ``BPF_PROG_TYPE_CGROUP_DEVICE`` program (``insns``: struct
        bpf_insn, 8 bytes each); its descriptor (close-on-exec). OSError when the kernel
        refuses it, with the verifier's last log line in the message when it gave one."""

    @abc.abstractmethod
    def attach_device_program(self, cgroup: str, program_fd: int) -> None:
        """bpf(BPF_PROG_ATTACH) of a device program to the cgroup2 directory ``cgroup``,
        type ``BPF_CGROUP_DEVICE`` with ``BPF_F_ALLOW_MULTI`` (as runc: a nested runtime may
        attach programs of its own below, all of which must allow an access)."""

    # -- the end --------------------------------------------------------------------------
    @abc.abstractmethod
    def cloexec_from(self, fd: int) -> None:
        """Mark every descriptor >= ``fd`` close-on-exec."""

    @abc.abstractmethod
    def reset_signals(self) -> None:
        """Default dispositions for every signal and an empty mask, as a process under runc
        starts (Python ignores SIGPIPE and SIGXFSZ; glibc's internal 32 and 33 need the raw
        call). After :func:`preload_signals` (in the zygote) only the signals it found not at
        their default are set: the others are at it already."""

    @abc.abstractmethod
    def execve(self, path: str, argv: list[str], env: list[str]) -> NoReturn: ...

    @abc.abstractmethod
    def exit_now(self, code: int) -> NoReturn:
        """_exit(2): leave a forked helper without running the parent's cleanup."""

    # -- queries (not recorded) -----------------------------------------------------------
    @abc.abstractmethod
    def kind(self, path: str, follow: bool = False) -> str | None:
        """(l)stat: "dir", "file", "link", "chr", "blk", "fifo", "sock", or None if absent."""

    @abc.abstractmethod
    def readlink(self, path: str) -> str: ...

    @abc.abstractmethod
    def mount_flags(self, path: str) -> int:
        """The MS_* flags (ro, nosuid, nodev, noexec, atime) of the mount holding ``path``."""

    @abc.abstractmethod
    def fs_magic(self, path: str) -> int:
        """statfs f_type of ``path``."""

    @abc.abstractmethod
    def read_text(self, path: str) -> str: ...

    @abc.abstractmethod
    def listdir(self, path: str) -> list[str]:
        """Names in directory ``path`` (OSError if it cannot be read)."""

    @abc.abstractmethod
    def access_x(self, path: str) -> bool:
        """Whether the current credentials may execute ``path``."""

    @abc.abstractmethod
    def getpid(self) -> int: ...

    @abc.abstractmethod
    def run_hook(
        self, path: str, argv: list[str], env: list[str], stdin: bytes, timeout: float
    ) -> tuple[int | None, bytes, bytes]:
        """Run program ``path`` (argv ``argv``, environment ``env``) with ``stdin`` as its
        standard input, in a process group of its own; wait at most ``timeout`` seconds, then
        kill the group. Returns (raw wait status, or None when it was killed for its timeout;
        the start of its stdout; of its stderr). A program that cannot be executed exits 127
        with the reason on its stderr."""


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


class _Rlimit(ctypes.Structure):
    _fields_ = (("cur", ctypes.c_uint64), ("max", ctypes.c_uint64))


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


_KINDS = {
    0o040000: "dir",
    0o100000: "file",
    0o120000: "link",
    0o020000: "chr",
    0o060000: "blk",
    0o010000: "fifo",
    0o140000: "sock",
}


class LinuxSyscalls(Syscalls):
    """The real system calls."""

    def __init__(self) -> None:
        self._libc = libc()
        self._raw = _RAW_SYSCALLS.get(os.uname().machine, {})

    def _check(self, result: int, what: str) -> None:
        check(result, what)

    @staticmethod
    def _wrap(exc: OSError, what: str) -> OSError:
        return OSError(exc.errno, f"{what}: {os.strerror(exc.errno or 0)}")

    def _rawcall(self, name: str, *args: object) -> int:
        number = self._raw.get(name)
        if number is None:
            raise OSError(38, f"{name}: no syscall number for {os.uname().machine}")
        return int(self._libc.syscall(ctypes.c_long(number), *args))

    def mount(
        self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None
    ) -> None:
        mount(source, target, fstype, flags, data)

    def umount2(self, target: str, flags: int) -> None:
        umount2(target, flags)

    def pivot_root(self, new_root: str, put_old: str) -> None:
        result = self._rawcall("pivot_root", new_root.encode(), put_old.encode())
        self._check(result, f"pivot_root {new_root}")

    def chroot(self, path: str) -> None:
        try:
            os.chroot(path)
        except OSError as exc:
            raise self._wrap(exc, f"chroot {path}") from exc

    def chdir(self, path: str) -> None:
        try:
            os.chdir(path)
        except OSError as exc:
            raise self._wrap(exc, f"chdir to {path}") from exc

    def fchdir(self, fd: int) -> None:
        os.fchdir(fd)

    def open(self, path: str, flags: int) -> int:
        try:
            return os.open(path, flags | os.O_CLOEXEC)
        except OSError as exc:
            raise self._wrap(exc, f"open {path}") from exc

    def close(self, fd: int) -> None:
        os.close(fd)

    def mkdir(self, path: str, mode: int) -> None:
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            pass
        except OSError as exc:
            raise self._wrap(exc, f"mkdir {path}") from exc

    def create_file(self, path: str, mode: int) -> None:
        try:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW, mode))
        except OSError as exc:
            raise self._wrap(exc, f"create {path}") from exc

    def mknod(self, path: str, mode: int, major: int, minor: int) -> None:
        try:
            os.mknod(path, mode, os.makedev(major, minor))
        except OSError as exc:
            raise self._wrap(exc, f"mknod {path}") from exc

    def chown(self, path: str, uid: int, gid: int) -> None:
        try:
            os.chown(path, uid, gid, follow_symlinks=False)
        except OSError as exc:
            raise self._wrap(exc, f"chown {path}") from exc

    def fstat_owner(self, fd: int) -> tuple[int, int]:
        try:
            found = os.fstat(fd)
        except OSError as exc:
            raise self._wrap(exc, f"fstat fd {fd}") from exc
        return found.st_uid, found.st_rdev

    def fchown(self, fd: int, uid: int, gid: int) -> None:
        try:
            os.fchown(fd, uid, gid)
        except OSError as exc:
            raise self._wrap(exc, f"fchown fd {fd}") from exc

    def symlink(self, target: str, path: str) -> None:
        try:
            os.symlink(target, path)
        except OSError as exc:
            raise self._wrap(exc, f"symlink {path} -> {target}") from exc

    def copy_up(self, source_fd: int, target: str) -> None:
        from agent.oci import copy_up

        try:
            copy_up.copy_tree(source_fd, target)
        except OSError as exc:
            raise self._wrap(exc, f"copying the image's content into the tmpfs {target}") from exc

    def unlink(self, path: str) -> None:
        try:
            os.unlink(path)
        except OSError as exc:
            raise self._wrap(exc, f"unlink {path}") from exc

    def write_file(self, path: str, data: str) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise self._wrap(exc, f"open {path}") from exc
        try:
            os.write(fd, data.encode())
        except OSError as exc:
            raise self._wrap(exc, f"write {data!r} to {path}") from exc
        finally:
            os.close(fd)

    def unshare(self, flags: int) -> None:
        self._check(self._libc.unshare(flags), f"unshare({flags:#x})")

    def setns(self, fd: int, nstype: int) -> None:
        self._check(self._libc.setns(fd, nstype), f"setns({nstype:#x})")

    def loopback_up(self) -> None:
        import fcntl
        import socket
        import struct

        siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                ifreq = fcntl.ioctl(sock, siocgifflags, struct.pack("16sH22x", b"lo", 0))
                flags = struct.unpack("16sH22x", ifreq)[1]
                fcntl.ioctl(sock, siocsifflags, struct.pack("16sH22x", b"lo", flags | iff_up))
        except OSError as exc:
            raise self._wrap(exc, "bringing up lo") from None

    def fork(self) -> int:
        return os.fork()

    def pipe(self) -> tuple[int, int]:
        return os.pipe2(os.O_CLOEXEC)

    def read(self, fd: int, size: int) -> bytes:
        return os.read(fd, size)

    def write(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def waitpid(self, pid: int) -> int:
        while True:
            try:
                return os.waitpid(pid, 0)[1]
            except InterruptedError:
                continue

    def sethostname(self, name: str) -> None:
        raw = name.encode()
        self._check(self._libc.sethostname(raw, len(raw)), f"sethostname {name}")

    def setdomainname(self, name: str) -> None:
        raw = name.encode()
        self._check(self._libc.setdomainname(raw, len(raw)), f"setdomainname {name}")

    def setsid(self) -> None:
        try:
            os.setsid()
        except OSError as exc:
            raise self._wrap(exc, "setsid") from exc

    def open_pty(self) -> tuple[int, int, str]:
        import fcntl
        import struct

        try:
            master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as exc:
            raise self._wrap(exc, "open /dev/ptmx") from exc
        try:
            fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))  # unlockpt
            number = struct.unpack("I", fcntl.ioctl(master, TIOCGPTN, b"\0" * 4))[0]
            # The peer through the master, not by path: no name lookup to race with.
            peer = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as exc:
            os.close(master)
            raise self._wrap(exc, "allocating a pty from /dev/ptmx") from exc
        return master, peer, f"/dev/pts/{number}"

    def set_window_size(self, fd: int, rows: int, cols: int) -> None:
        import fcntl
        import struct

        try:
            fcntl.ioctl(fd, TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        except OSError as exc:
            raise self._wrap(exc, "setting the terminal's size") from exc

    def dup2(self, fd: int, target: int) -> None:
        os.dup2(fd, target, inheritable=True)

    def send_fds(self, sock: int, data: bytes, fds: list[int]) -> None:
        import array
        import socket

        with socket.socket(fileno=os.dup(sock)) as conn:
            conn.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])

    def set_controlling_tty(self, fd: int) -> None:
        if self._libc.ioctl(fd, ctypes.c_ulong(TIOCSCTTY), 0) == 0:
            return
        # EPERM: the tty is still the controlling terminal of another session (a spawner
        # that opened it without O_NOCTTY). Steal it: we still have CAP_SYS_ADMIN here.
        self._check(
            self._libc.ioctl(fd, ctypes.c_ulong(TIOCSCTTY), 1), f"ioctl(TIOCSCTTY) on fd {fd}"
        )

    def setgroups(self, gids: list[int]) -> None:
        try:
            os.setgroups(gids)
        except OSError as exc:
            raise self._wrap(exc, f"setgroups {gids}") from exc

    def setresgid(self, gid: int) -> None:
        try:
            os.setresgid(gid, gid, gid)
        except OSError as exc:
            raise self._wrap(exc, f"setgid {gid}") from exc

    def setresuid(self, uid: int) -> None:
        try:
            os.setresuid(uid, uid, uid)
        except OSError as exc:
            raise self._wrap(exc, f"setuid {uid}") from exc

    def _prctl(self, what: str, option: int, arg2: int = 0, arg3: int = 0) -> None:
        result = self._libc.prctl(
            option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(0), ctypes.c_ulong(0)
        )
        self._check(result, what)

    def set_keepcaps(self, keep: bool) -> None:
        self._prctl("prctl(PR_SET_KEEPCAPS)", PR_SET_KEEPCAPS, int(keep))

    def capbset_drop(self, cap: int) -> None:
        self._prctl(f"prctl(PR_CAPBSET_DROP, {cap})", PR_CAPBSET_DROP, cap)

    def capset(self, effective: int, permitted: int, inheritable: int) -> None:
        header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)()
        for index in (0, 1):
            shift = 32 * index
            data[index].effective = (effective >> shift) & 0xFFFFFFFF
            data[index].permitted = (permitted >> shift) & 0xFFFFFFFF
            data[index].inheritable = (inheritable >> shift) & 0xFFFFFFFF
        self._check(self._libc.capset(ctypes.byref(header), data), "capset")

    def ambient_clear(self) -> None:
        self._prctl("prctl(PR_CAP_AMBIENT_CLEAR_ALL)", PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)

    def ambient_raise(self, cap: int) -> None:
        self._prctl(
            f"prctl(PR_CAP_AMBIENT_RAISE, {cap})", PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap
        )

    def set_no_new_privs(self) -> None:
        self._prctl("prctl(PR_SET_NO_NEW_PRIVS)", PR_SET_NO_NEW_PRIVS, 1)

    def setrlimit(self, resource: int, soft: int, hard: int) -> None:
        limit = _Rlimit(soft, hard)
        self._check(
            self._libc.setrlimit(resource, ctypes.byref(limit)),
            f"setrlimit({resource}, {soft}, {hard})",
        )

    def umask(self, mask: int) -> None:
        os.umask(mask)

    def seccomp_load(self, program: bytes, flags: int) -> None:
        buffer = ctypes.create_string_buffer(program, len(program))
        prog = _SockFprog(len(program) // 8, ctypes.addressof(buffer))
        result = self._rawcall(
            "seccomp",
            ctypes.c_uint(_SECCOMP_SET_MODE_FILTER),
            ctypes.c_uint(flags),
            ctypes.byref(prog),
        )
        self._check(result, "seccomp(SECCOMP_SET_MODE_FILTER)")

    def _bpf(self, command: int, attr: bytes) -> int:
        """bpf(2) with ``attr`` as the start of union bpf_attr (the kernel takes a shorter
        union as zero-filled)."""
        buffer = ctypes.create_string_buffer(attr, len(attr))
        return self._rawcall("bpf", ctypes.c_int(command), buffer, ctypes.c_uint(len(attr)))

    def _prog_load_attr(
        self,
        code: ctypes.Array[ctypes.c_char],
        license: ctypes.Array[ctypes.c_char],
        log: ctypes.Array[ctypes.c_char] | None,
    ) -> bytes:
        return struct.pack(
            "<IIQQIIQII16sII",
            _BPF_PROG_TYPE_CGROUP_DEVICE,
            len(code) // 8,
            ctypes.addressof(code),
            ctypes.addressof(license),
            1 if log is not None else 0,
            len(log) if log is not None else 0,
            ctypes.addressof(log) if log is not None else 0,
            0,
            0,
            b"pysandbox_dev",
            0,
            0,
        )

    def load_device_program(self, insns: bytes, license: str) -> int:
        code = ctypes.create_string_buffer(insns, len(insns))
        text = ctypes.create_string_buffer(license.encode())
        fd = self._bpf(_BPF_PROG_LOAD, self._prog_load_attr(code, text, None))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        # Ask again with the verifier's log, only now: logging costs on every load.
        log = ctypes.create_string_buffer(_BPF_LOG_SIZE)
        if self._bpf(_BPF_PROG_LOAD, self._prog_load_attr(code, text, log)) >= 0:
            raise OSError(err, f"bpf(BPF_PROG_LOAD): {os.strerror(err)}")  # not again: odd
        lines = [line for line in log.value.decode(errors="replace").splitlines() if line.strip()]
        detail = f" ({lines[-1].strip()[:200]})" if lines else ""
        raise OSError(err, f"bpf(BPF_PROG_LOAD): {os.strerror(err)}{detail}")

    def attach_device_program(self, cgroup: str, program_fd: int) -> None:
        try:
            cgroup_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise self._wrap(exc, f"open {cgroup}") from exc
        try:
            attr = struct.pack(
                "<IIIII", cgroup_fd, program_fd, _BPF_CGROUP_DEVICE, _BPF_F_ALLOW_MULTI, 0
            )
            self._check(self._bpf(_BPF_PROG_ATTACH, attr), "bpf(BPF_PROG_ATTACH)")
        finally:
            os.close(cgroup_fd)

    def cloexec_from(self, fd: int) -> None:
        close_range = getattr(self._libc, "close_range", None)
        if close_range is not None and (
            close_range(ctypes.c_uint(fd), ctypes.c_uint(0xFFFFFFFF), _CLOSE_RANGE_CLOEXEC) == 0
        ):
            return
        # Older kernel or libc: walk the descriptor table.
        for name in os.listdir("/proc/self/fd"):
            number = int(name)
            if number >= fd:
                try:  # noqa: SIM105 - contextlib is one more import at start
                    os.set_inheritable(number, False)
                except OSError:
                    pass

    def reset_signals(self) -> None:
        signals = _SIGNALS if _not_default is None else _not_default
        default = ctypes.create_string_buffer(32)
        for signum in signals:
            if signum in (32, 33):
                # glibc refuses its two internal signals (SIGCANCEL, SIGSETXID) to sigaction(),
                # yet the guest's processes inherit them ignored, and an ignored disposition
                # survives execve: the kernel's call, with a zeroed struct sigaction (SIG_DFL,
                # no flags, empty mask).
                self._rawcall(
                    "rt_sigaction", ctypes.c_int(signum), default, None, ctypes.c_size_t(8)
                )
            else:
                self._libc.signal(signum, ctypes.c_void_p(0))  # SIG_DFL
        empty = ctypes.create_string_buffer(128)
        self._libc.sigprocmask(2, empty, None)  # SIG_SETMASK

    def signals_not_default(self) -> tuple[int, ...]:
        """The signals whose action is not the default one: a handler, SIG_IGN, or (SIGCHLD)
        SA_NOCLDSTOP/SA_NOCLDWAIT, which a reset to SIG_DFL clears too (the kernel's
        rt_sigaction, read only). OSError when the kernel refuses the query."""
        found = []
        old = ctypes.create_string_buffer(32)  # struct kernel_sigaction: handler, flags, ...
        for signum in _SIGNALS:
            result = self._rawcall(
                "rt_sigaction", ctypes.c_int(signum), None, old, ctypes.c_size_t(8)
            )
            self._check(result, f"rt_sigaction({signum})")
            handler, flags = struct.unpack_from("=QQ", old.raw)
            if handler != 0 or (signum == 17 and flags & (_SA_NOCLDSTOP | _SA_NOCLDWAIT)):
                found.append(signum)
        return tuple(found)

    def execve(self, path: str, argv: list[str], env: list[str]) -> NoReturn:
        environ = {}
        for entry in env:
            key, _, value = entry.partition("=")
            environ[key] = value
        try:
            os.execve(path, argv, environ)
        except OSError as exc:
            raise self._wrap(exc, f"exec {path}") from exc

    def exit_now(self, code: int) -> NoReturn:
        os._exit(code)

    def kind(self, path: str, follow: bool = False) -> str | None:
        try:
            mode = os.stat(path, follow_symlinks=follow).st_mode
        except OSError:
            return None
        return _KINDS.get(mode & 0o170000, "other")

    def readlink(self, path: str) -> str:
        return os.readlink(path)

    def mount_flags(self, path: str) -> int:
        flags = os.statvfs(path).f_flag
        return sum(ms for st, ms in _ST_TO_MS if flags & st)

    def fs_magic(self, path: str) -> int:
        buffer = ctypes.create_string_buffer(256)
        self._check(self._libc.statfs(path.encode(), buffer), f"statfs {path}")
        return ctypes.c_long.from_buffer(buffer).value

    def read_text(self, path: str) -> str:
        # os-level calls, not open(): its text layer adds an fstat, an isatty ioctl and a
        # seek, each a round trip to virtiofsd for a container's file (/etc/passwd per exec).
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        finally:
            os.close(fd)
        text = b"".join(chunks).decode("utf-8")  # strict, as open()'s
        return text.replace("\r\n", "\n").replace("\r", "\n")  # open()'s universal newlines

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def access_x(self, path: str) -> bool:
        return os.access(path, os.X_OK)

    def getpid(self) -> int:
        return os.getpid()

    def run_hook(
        self, path: str, argv: list[str], env: list[str], stdin: bytes, timeout: float
    ) -> tuple[int | None, bytes, bytes]:
        # memfds, not pipes: nothing blocks on a hook that does not read its input, writes a
        # lot, or leaves a child holding its output; and no file system is needed.
        fds = [os.memfd_create(name) for name in ("hook-stdin", "hook-stdout", "hook-stderr")]
        try:
            self.write(fds[0], stdin)
            os.lseek(fds[0], 0, os.SEEK_SET)
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child execs or exits
                try:
                    os.setpgid(0, 0)
                    for target, fd in enumerate(fds):
                        os.dup2(fd, target)
                    self.execve(path, argv, env)
                except BaseException as exc:  # the child must never return
                    try:  # noqa: SIM105 - contextlib is one more import at start
                        os.write(2, f"{getattr(exc, 'strerror', None) or exc}\n".encode())
                    except OSError:
                        pass
                os._exit(127)
            deadline = time.monotonic() + timeout
            status: int | None = None
            while True:
                done, raw = os.waitpid(pid, os.WNOHANG)
                if done:
                    status = raw
                    break
                if time.monotonic() >= deadline:
                    for target in (-pid, pid):  # the group; the hook itself if it left it
                        try:  # noqa: SIM105
                            os.kill(target, _SIGKILL)
                        except OSError:
                            pass
                    self.waitpid(pid)
                    break
                time.sleep(0.01)
            return status, os.pread(fds[1], 800, 0), os.pread(fds[2], 800, 0)
        finally:
            for fd in fds:
                os.close(fd)


class FakeExec(BaseException):
    """Raised by :meth:`RecordingSyscalls.execve` in place of replacing the process."""

    def __init__(self, path: str, argv: list[str], env: list[str]) -> None:
        super().__init__(path)
        self.path = path
        self.argv = argv
        self.env = env


class FakeExit(BaseException):
    """Raised by :meth:`RecordingSyscalls.exit_now`."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


#: The descriptor :meth:`RecordingSyscalls.load_device_program` hands out.
DEVICE_PROGRAM_FD = 99


class RecordingSyscalls(Syscalls):
    """A fake that records side effects as tuples and keeps a tiny in-memory file system.

    ``fs`` maps absolute paths to kinds (``"dir"``, ``"file"``, ``"chr"``...) or, for symlinks,
    ``"link:<target>"``; calls that create files update it. ``reads`` maps a descriptor to the
    bytes later ``read`` calls return (empty once consumed: end of file). ``fail`` maps a call
    name to an errno: that call raises. ``forks`` are what successive ``fork`` calls return,
    0 once exhausted (0: we are the child, so the recording follows the container's process);
    ``statuses`` the raw wait status ``waitpid`` returns per pid (default 0).
    """

    def __init__(
        self,
        fs: dict[str, str] | None = None,
        reads: dict[int, bytes] | None = None,
        forks: list[int] | None = None,
        pid: int = 1,
    ) -> None:
        self.calls: list[tuple[object, ...]] = []
        self.fs: dict[str, str] = {"/": "dir"}
        self.fs.update(fs or {})
        self.reads = dict(reads or {})
        self.texts: dict[str, str] = {}
        self.flags: dict[str, int] = {}
        self.magic: dict[str, int] = {}
        self.not_executable: set[str] = set()
        self.fail: dict[str, int] = {}
        self.forks = list(forks or [])
        self.statuses: dict[int, int] = {}
        #: (st_uid, st_rdev) ``fstat_owner`` reports per descriptor (default root's pipe).
        self.stdio_owners: dict[int, tuple[int, int]] = {}
        #: What successive ``run_hook`` calls return (default: exit 0, no output).
        self.hook_results: list[tuple[int | None, bytes, bytes]] = []
        self.pid = pid
        self._next_fd = 10
        #: The instructions of every device program loaded, in order.
        self.device_programs: list[bytes] = []

    def _record(self, *call: object) -> None:
        self.calls.append(call)
        error = self.fail.get(str(call[0]))
        if error is not None:
            raise OSError(error, f"{call[0]}: {os.strerror(error)}")

    def _fd(self) -> int:
        self._next_fd += 1
        return self._next_fd

    def names(self) -> list[str]:
        """Just the call names, in order."""
        return [str(call[0]) for call in self.calls]

    def mount(
        self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None
    ) -> None:
        self._record("mount", source, target, fstype, mount_flags_str(flags), data or "")

    def umount2(self, target: str, flags: int) -> None:
        self._record("umount2", target, flags)

    def pivot_root(self, new_root: str, put_old: str) -> None:
        self._record("pivot_root", new_root, put_old)

    def chroot(self, path: str) -> None:
        self._record("chroot", path)

    def chdir(self, path: str) -> None:
        self._record("chdir", path)

    def fchdir(self, fd: int) -> None:
        self._record("fchdir", fd)

    def open(self, path: str, flags: int) -> int:
        self._record("open", path)
        return self._fd()

    def close(self, fd: int) -> None:
        self._record("close", fd)

    def mkdir(self, path: str, mode: int) -> None:
        self._record("mkdir", path, oct(mode))
        self.fs.setdefault(path, "dir")

    def create_file(self, path: str, mode: int) -> None:
        self._record("create_file", path)
        self.fs.setdefault(path, "file")

    def mknod(self, path: str, mode: int, major: int, minor: int) -> None:
        self._record("mknod", path, oct(mode), major, minor)
        self.fs[path] = "chr"

    def chown(self, path: str, uid: int, gid: int) -> None:
        self._record("chown", path, uid, gid)

    def fstat_owner(self, fd: int) -> tuple[int, int]:
        return self.stdio_owners.get(fd, (0, 0))

    def fchown(self, fd: int, uid: int, gid: int) -> None:
        self._record("fchown", fd, uid, gid)

    def symlink(self, target: str, path: str) -> None:
        self._record("symlink", target, path)
        self.fs[path] = f"link:{target}"

    def copy_up(self, source_fd: int, target: str) -> None:
        self._record("copy_up", source_fd, target)

    def unlink(self, path: str) -> None:
        self._record("unlink", path)
        self.fs.pop(path, None)

    def write_file(self, path: str, data: str) -> None:
        self._record("write_file", path, data)

    def unshare(self, flags: int) -> None:
        self._record("unshare", flags)

    def setns(self, fd: int, nstype: int) -> None:
        self._record("setns", fd, nstype)

    def loopback_up(self) -> None:
        self._record("loopback_up")

    def fork(self) -> int:
        self._record("fork")
        return self.forks.pop(0) if self.forks else 0

    def pipe(self) -> tuple[int, int]:
        self._record("pipe")
        return self._fd(), self._fd()

    def read(self, fd: int, size: int) -> bytes:
        self._record("read", fd)
        data = self.reads.get(fd, b"")
        self.reads[fd] = data[size:]
        return data[:size]

    def write(self, fd: int, data: bytes) -> None:
        self._record("write", fd, data)

    def waitpid(self, pid: int) -> int:
        self._record("waitpid", pid)
        return self.statuses.get(pid, 0)

    def sethostname(self, name: str) -> None:
        self._record("sethostname", name)

    def setdomainname(self, name: str) -> None:
        self._record("setdomainname", name)

    def setsid(self) -> None:
        self._record("setsid")

    def set_controlling_tty(self, fd: int) -> None:
        self._record("set_controlling_tty", fd)

    def open_pty(self) -> tuple[int, int, str]:
        master, peer = self._fd(), self._fd()
        self._record("open_pty", master, peer)
        return master, peer, "/dev/pts/3"

    def set_window_size(self, fd: int, rows: int, cols: int) -> None:
        self._record("set_window_size", fd, rows, cols)

    def dup2(self, fd: int, target: int) -> None:
        self._record("dup2", fd, target)

    def send_fds(self, sock: int, data: bytes, fds: list[int]) -> None:
        self._record("send_fds", sock, data, list(fds))

    def setgroups(self, gids: list[int]) -> None:
        self._record("setgroups", list(gids))

    def setresgid(self, gid: int) -> None:
        self._record("setresgid", gid)

    def setresuid(self, uid: int) -> None:
        self._record("setresuid", uid)

    def set_keepcaps(self, keep: bool) -> None:
        self._record("set_keepcaps", keep)

    def capbset_drop(self, cap: int) -> None:
        self._record("capbset_drop", cap)

    def capset(self, effective: int, permitted: int, inheritable: int) -> None:
        self._record("capset", hex(effective), hex(permitted), hex(inheritable))

    def ambient_clear(self) -> None:
        self._record("ambient_clear")

    def ambient_raise(self, cap: int) -> None:
        self._record("ambient_raise", cap)

    def set_no_new_privs(self) -> None:
        self._record("set_no_new_privs")

    def setrlimit(self, resource: int, soft: int, hard: int) -> None:
        self._record("setrlimit", resource, soft, hard)

    def umask(self, mask: int) -> None:
        self._record("umask", oct(mask))

    def seccomp_load(self, program: bytes, flags: int) -> None:
        self._record("seccomp_load", len(program) // 8, flags)

    def load_device_program(self, insns: bytes, license: str) -> int:
        self._record("load_device_program", len(insns) // 8)
        self.device_programs.append(insns)
        return DEVICE_PROGRAM_FD  # not from the counter: the fds tests know stay the same

    def attach_device_program(self, cgroup: str, program_fd: int) -> None:
        self._record("attach_device_program", cgroup, program_fd)

    def cloexec_from(self, fd: int) -> None:
        self._record("cloexec_from", fd)

    def reset_signals(self) -> None:
        self._record("reset_signals")

    def execve(self, path: str, argv: list[str], env: list[str]) -> NoReturn:
        self._record("execve", path, list(argv))
        raise FakeExec(path, list(argv), list(env))

    def exit_now(self, code: int) -> NoReturn:
        self._record("exit_now", code)
        raise FakeExit(code)

    def kind(self, path: str, follow: bool = False) -> str | None:
        value = self.fs.get(path)
        for _ in range(40):
            if value is None or not value.startswith("link:"):
                return value
            if not follow:
                return "link"
            target = value[len("link:") :]
            if not target.startswith("/"):
                target = os.path.join(os.path.dirname(path), target)
            path = os.path.normpath(target)
            value = self.fs.get(path)
        return None

    def readlink(self, path: str) -> str:
        value = self.fs.get(path, "")
        if not value.startswith("link:"):
            raise OSError(22, f"readlink {path}: {os.strerror(22)}")
        return value[len("link:") :]

    def mount_flags(self, path: str) -> int:
        return self.flags.get(path, 0)

    def fs_magic(self, path: str) -> int:
        return self.magic.get(path, 0)

    def read_text(self, path: str) -> str:
        text = self.texts.get(path)
        if text is None:
            raise FileNotFoundError(2, f"open {path}: {os.strerror(2)}")
        return text

    def listdir(self, path: str) -> list[str]:
        if self.fs.get(path) != "dir":
            raise FileNotFoundError(2, f"open {path}: {os.strerror(2)}")
        return sorted(
            p[len(path) + 1 :] for p in self.fs if os.path.dirname(p) == path and p != path
        )

    def access_x(self, path: str) -> bool:
        return self.fs.get(path) == "file" and path not in self.not_executable

    def getpid(self) -> int:
        return self.pid

    def run_hook(
        self, path: str, argv: list[str], env: list[str], stdin: bytes, timeout: float
    ) -> tuple[int | None, bytes, bytes]:
        self._record("run_hook", path, list(argv), list(env), stdin, timeout)
        if self.hook_results:
            return self.hook_results.pop(0)
        return 0, b"", b""
