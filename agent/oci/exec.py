"""``python3 -m agent.oci.exec``: run one more process inside a running container.

Usage::

    python3 -m agent.oci.exec --target-pid PID --process-fd FD --sync-fd SYNCFD [--cgroup DIR]
                              [--cgroup-v1 ROOT]

PID is the container's process (as the agent sees it), FD carries an OCI ``process`` object as
JSON (with the pysandbox extension ``seccomp``: an OCI linux.seccomp object to apply, since a
filter is per process and is not inherited through setns), SYNCFD speaks the same protocol as
``agent.oci.init``. As there, the runtime forks (the pid namespace applies to children only)
and the pid in ``ready`` is the exec'd program's.
"""

from __future__ import annotations

import os

from agent.oci import cgroups, seccomp_cache
from agent.oci import init as init_mod
from agent.oci import process as proc_steps
from agent.oci import syscalls as sc
from agent.oci.errors import SETUP_FAILED, SetupError
from ocispec import document, linux
from ocispec import spec as spec_mod

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from agent.oci.syscalls import Syscalls
    from ocispec.seccomp import Filter as SeccompFilter
    from ocispec.spec import Process

USAGE = (
    "usage: python3 -m agent.oci.exec --target-pid PID --process-fd FD --sync-fd SYNCFD "
    "[--cgroup DIR] [--cgroup-v1 ROOT]"
)

#: /proc/PID/ns entries in the order nsenter joins them: user first (it owns the others),
#: mount last (after it /proc/PID paths would resolve inside the container).
NAMESPACES = (
    ("user", linux.CLONE_NEWUSER),
    ("ipc", linux.CLONE_NEWIPC),
    ("uts", linux.CLONE_NEWUTS),
    ("net", linux.CLONE_NEWNET),
    ("pid", linux.CLONE_NEWPID),
    ("cgroup", linux.CLONE_NEWCGROUP),
    ("time", 0x80),
    ("mnt", linux.CLONE_NEWNS),
)

#: Our own namespaces (``/proc/self/ns/<name>`` link texts, None where the kernel has no such
#: type), read once by :func:`preload` in the zygote: every runtime it forks is in the same
#: ones when it compares them with the container's (joining the cgroup changes none).
_own_namespaces: dict[str, str | None] | None = None


def preload(sys: Syscalls) -> None:
    """Read once, in the zygote, what every exec runtime it forks would read the same: our
    namespaces (see :data:`_own_namespaces`) and the kernel's last capability."""
    global _own_namespaces
    _own_namespaces = {name: _link(sys, f"/proc/self/ns/{name}") for name, _flag in NAMESPACES}
    init_mod.preload_last_cap(sys)


def _link(sys: Syscalls, path: str) -> str | None:
    """readlink(path); None when it cannot be read (a namespace type the kernel lacks)."""
    try:
        return sys.readlink(path)
    except OSError:
        return None


def _own_namespace(sys: Syscalls, name: str) -> str | None:
    if _own_namespaces is not None:
        return _own_namespaces[name]
    return _link(sys, f"/proc/self/ns/{name}")


def exec_process(
    sys: Syscalls,
    process: Process,
    target: int,
    sync: proc_steps.Sync,
    cgroup: str | None,
    cgroup_v1: str | None = None,
) -> int:
    """Enter the container of ``target`` and become ``process``, in order."""
    cap_last = init_mod.last_cap(sys)
    if sys.kind(f"/proc/{target}") is None:
        raise SetupError(f"container process {target} does not exist")

    # ---- in the runtime process (A) --------------------------------------------------------
    # 1. oom_score_adj while we still have the guest's privileges; the fork inherits it.
    if process.oom_score_adj is not None:
        try:
            sys.write_file("/proc/self/oom_score_adj", str(process.oom_score_adj))
        except OSError as exc:
            raise SetupError.from_os("setting oom_score_adj", exc) from exc
    # 2. The container's cgroup, by its path in the agent's view, before the cgroup namespace.
    own = cgroups.locate(sys, cgroup, cgroup_v1) if cgroup is not None else None
    if own is not None:
        cgroups.join(sys, own)
    # 3. Open every namespace that differs from ours, and the container's root, before
    #    joining any: each setns changes what /proc/<pid> paths mean.
    opened: list[tuple[int, int]] = []
    try:
        for name, flag in NAMESPACES:
            theirs = f"/proc/{target}/ns/{name}"
            link = _link(sys, theirs)
            if link is None:
                continue  # kernel without this namespace type
            if link == _own_namespace(sys, name):
                continue  # shared with us: setns into our own user namespace is EINVAL
            opened.append((sys.open(theirs, os.O_RDONLY), flag))
        root_fd = sys.open(f"/proc/{target}/root", os.O_DIRECTORY | os.O_RDONLY)
    except OSError as exc:
        for fd, _flag in opened:
            sys.close(fd)
        raise SetupError.from_os(f"opening the namespaces of process {target}", exc) from exc
    try:
        # 4. Join them, user first and mount last.
        for fd, flag in opened:
            sys.setns(fd, flag)
        # 5. The mount namespace puts us at its root; the container's root is the one its
        #    process sees (the same after pivot_root, not after the MS_MOVE fallback).
        sys.fchdir(root_fd)
        sys.chroot(".")
        sys.chdir("/")
    except OSError as exc:
        raise SetupError.from_os(f"entering the container of process {target}", exc) from exc
    finally:
        for fd, _flag in opened:
            sys.close(fd)
        sys.close(root_fd)
    # 6. Fork into the pid namespace; A hands B its pid and exits once B has reported.
    pid_r, pid_w = sys.pipe()
    done_r, done_w = sys.pipe()
    child = sys.fork()
    if child != 0:
        return init_mod.supervise(sys, child, pid_r, pid_w, done_r, done_w)

    # ---- in the exec'd process (B) ---------------------------------------------------------
    sys.close(pid_w)
    sys.close(done_r)
    my_pid = int(sys.read(pid_r, 32).decode() or "0")
    sys.close(pid_r)
    # 7. Own session; with process.terminal a pty of the container's devpts (we are in its
    #    mount namespace and root) as fds 0-2 and controlling terminal, as runc exec -t.
    try:
        sys.setsid()
    except OSError as exc:
        raise SetupError.from_os("setting up the session", exc) from exc
    if process.terminal:
        proc_steps.attach_terminal(sys, sync, process.console_size)
    # 8. rlimits, no_new_privs, seccomp, capabilities, user, umask, cwd, lookup.
    executable, env = proc_steps.finalize(sys, process, cap_last)
    # 9. Release A, then ready / start / execve.
    sys.write(done_w, b"k")
    sys.close(done_w)
    return proc_steps.run_after_start(sys, sync, process, my_pid, executable, env)


def run(
    sys: Syscalls,
    payload: bytes,
    target: int,
    sync_fd: int,
    cgroup: str | None,
    cgroup_v1: str | None = None,
    compile_seccomp: Callable[[object, str], SeccompFilter] | None = None,
) -> int:
    """Parse ``payload`` and run it (:func:`exec_process`); every failure becomes one
    ``error`` line and an exit code. ``compile_seccomp``: see
    :func:`ocispec.spec.parse_process` (:func:`main` passes :mod:`agent.oci.seccomp_cache`'s)."""
    sync = proc_steps.Sync(sys, sync_fd)
    try:
        process = spec_mod.parse_process(
            document.decode(payload, "process json"), compile_seccomp=compile_seccomp
        )
        return exec_process(sys, process, target, sync, cgroup, cgroup_v1)
    except Exception as exc:
        return init_mod.fail(sys, sync, exc)


def main(argv: list[str]) -> int:
    try:
        args = init_mod.parse_args(
            argv, ("target-pid", "process-fd", "sync-fd", "cgroup", "cgroup-v1")
        )
        target = int(args["target-pid"])
        process_fd = int(args["process-fd"])
        sync_fd = int(args["sync-fd"])
        if target <= 0:
            raise ValueError(f"invalid --target-pid {target}")
    except (KeyError, ValueError) as exc:
        os.write(2, f"agent.oci.exec: {exc}\n{USAGE}\n".encode())
        return 2
    try:
        payload = init_mod.read_all(process_fd)
    except OSError as exc:
        proc_steps.Sync(sc.LinuxSyscalls(), sync_fd).error(
            f"reading the process: {exc.strerror}", SETUP_FAILED
        )
        return 1
    return run(
        sc.LinuxSyscalls(),
        payload,
        target,
        sync_fd,
        args.get("cgroup") or None,
        args.get("cgroup-v1") or None,
        seccomp_cache.compiled,
    )


if __name__ == "__main__":
    import sys

    os._exit(main(sys.argv[1:]))
