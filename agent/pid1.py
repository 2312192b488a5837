"""Duties of the agent as the guest's PID 1: early mounts, reaping orphans, power-off.

The initramfs has already mounted /dev, /proc and /sys and switched to the read-only root.
Everything writable the agent needs lives on tmpfs mounted here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import threading
from collections.abc import Callable

from agent.oci import syscalls
from ocispec import linux

#: Guest directory under which host shares are mounted. Mode 0711: listing is for the agent
#: only, but every guest uid may traverse it. A container with a user namespace builds its
#: rootfs as the namespace's root (a mapped guest uid such as 100000), so the paths of its
#: rootfs and bind-mount sources (``/run/pysandbox/shared/<id>/...``) must be searchable by
#: that uid, as runc needs the bundle's path to be searchable by the mapped root on a host.
SHARE_ROOT = "/run/pysandbox"
SHARE_ROOT_MODE = 0o711


def _is_mountpoint(path: str) -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        return any(line.split()[4] == path for line in mountinfo)


def raise_hard_limits() -> None:
    """Raise PID 1's hard RLIMIT_NOFILE to ``fs.nr_open`` and RLIMIT_NPROC to unlimited.

    Every container inherits them. The kernel starts PID 1 with a hard NOFILE of 4096 and a
    hard NPROC derived from the VM's small memory, while clients write the host's figures into
    ``process.rlimits`` (podman: NOFILE 1048576 and a large NPROC). Outside a user namespace
    the container may raise a hard limit (CAP_SYS_RESOURCE); the root of a user namespace may
    not, so its create failed with EPERM (docs/user-namespaces.md). Soft limits are kept.
    Best effort: a failure leaves the kernel's limits.
    """
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/sys/fs/nr_open", encoding="ascii") as nr_open:
            most = int(nr_open.read().strip())
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, most), most))
    with contextlib.suppress(OSError, ValueError):
        soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
        resource.setrlimit(resource.RLIMIT_NPROC, (soft, resource.RLIM_INFINITY))


#: cgroup2 mount option: cgroup migrations without an RCU grace period (cgroup-v2.rst).
FAVOR_DYNMODS = "favordynmods"


def early_mounts() -> None:
    """Mount the writable and pseudo filesystems the agent and containers rely on.

    Idempotent: a filesystem already mounted at its target is left alone.
    """
    nosuid_nodev = linux.MS_NOSUID | linux.MS_NODEV
    table: list[tuple[str, str, str, int, str]] = [
        ("tmpfs", "/run", "tmpfs", nosuid_nodev, "mode=0755"),
        ("tmpfs", "/tmp", "tmpfs", nosuid_nodev, "mode=1777"),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            linux.MS_NOSUID | linux.MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620",
        ),
        ("tmpfs", "/dev/shm", "tmpfs", nosuid_nodev, "mode=1777"),
        # favordynmods (Linux >= 6.0): moving a process between cgroups no longer waits for
        # an RCU grace period (each container init and exec joins its cgroup, in up to a
        # dozen hierarchies); forks and exits take a plain rwsem instead. Retried without it
        # where the kernel does not know the option.
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid_nodev | linux.MS_NOEXEC, FAVOR_DYNMODS),
        ("mqueue", "/dev/mqueue", "mqueue", nosuid_nodev | linux.MS_NOEXEC, ""),
    ]
    for source, target, fstype, flags, data in table:
        os.makedirs(target, exist_ok=True)
        if not _is_mountpoint(target):
            try:
                syscalls.mount(source, target, fstype, flags, data)
            except OSError as exc:
                if data != FAVOR_DYNMODS or exc.errno != errno.EINVAL:
                    raise
                syscalls.mount(source, target, fstype, flags, "")
    os.makedirs(SHARE_ROOT, exist_ok=True)
    os.chmod(SHARE_ROOT, SHARE_ROOT_MODE)  # makedirs' mode is filtered by the umask
    # No controller is enabled yet: a controller used on cgroup2 can no longer be mounted as
    # cgroup v1, and the layout is chosen with the first container (agent.cgroup_layout).


#: Parent cgroup of every container in the guest (on cgroup2, in both layouts).
CGROUP_PARENT = "/sys/fs/cgroup/pysandbox"


class Reaper:
    """Reaps every child of PID 1 and dispatches exit statuses to registered waiters.

    The agent inherits orphans from every container, so it must wait for *any* child.
    Callers register a callback for a pid with :meth:`watch`. A status that arrives before
    anyone watches its pid (an orphan, or a process that exited before its spawner learnt its
    pid) is kept, up to :data:`MAX_UNCLAIMED` of them, and delivered when the pid is watched.
    """

    MAX_UNCLAIMED = 4096

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._waiters: dict[int, Callable[[int], None]] = {}
        self._unclaimed: dict[int, int] = {}
        self._wakeup = threading.Event()

    def watch(self, pid: int, callback: Callable[[int], None]) -> None:
        """Call ``callback(raw_wait_status)`` once ``pid`` exits (at once if it already has)."""
        with self.lock:
            status = self._unclaimed.pop(pid, None)
            if status is None:
                self._waiters[pid] = callback
                self._wakeup.set()  # a reaper idle for lack of children waits for this one
                return
        callback(status)

    def forget(self, pid: int) -> None:
        """Stop watching ``pid`` and drop any status kept for it."""
        with self.lock:
            self._waiters.pop(pid, None)
            self._unclaimed.pop(pid, None)

    def install(self) -> None:
        """Start reaping in a thread of its own.

        SIGCHLD keeps its default disposition (ignored, children not auto-reaped: wait(2))
        and gets no Python handler. The reaper blocks in waitid(2) instead, which a child's
        exit wakes without a signal. A handler would also be unsafe: Python runs it in the
        main thread between two bytecodes, so one that takes a lock (``Event.set``) and is
        re-entered by the next SIGCHLD of a burst (a container's processes killed at once)
        waits forever for the lock its own first run holds — the agent's main thread, which
        relays the host's bytes, then stops for good.
        """
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        threading.Thread(target=self._loop, name="reaper", daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:  # no child at all: until one is watched (or 1 s)
                self._wakeup.wait(1.0)
                self._wakeup.clear()
            except InterruptedError:
                pass
            self.reap_once()

    def reap_once(self) -> None:
        """Collect every exited child now, without blocking."""
        while True:
            with self.lock:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    return
                if pid == 0:
                    return
                callback = self._waiters.pop(pid, None)
                if callback is None:
                    if len(self._unclaimed) >= self.MAX_UNCLAIMED:
                        self._unclaimed.pop(next(iter(self._unclaimed)))
                    self._unclaimed[pid] = status
            if callback is not None:
                with contextlib.suppress(Exception):
                    callback(status)


def power_off() -> None:
    """Sync, then end the VM (an immediate reset, which QEMU turns into its exit:
    :func:`agent.oci.syscalls.power_off`). Never returns."""
    os.sync()
    syscalls.power_off()
