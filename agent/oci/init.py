"""``python3 -m agent.oci.init``: create a container from an OCI spec and run its process.

Usage::

    python3 -m agent.oci.init --bundle-fd SPECFD --sync-fd SYNCFD [--cgroup DIR]
                              [--cgroup-v1 ROOT]

SPECFD carries config.json (``root.path`` absolute); SYNCFD is a socket on which the runtime
writes one line, ``ready <pid>`` or ``error <message>``, and then waits for ``start``; after
``start`` it runs the startContainer hooks and execs (EOF on SYNCFD), or reports a failed hook
as an ``error`` line. fds 0-2 are the container's stdio. The full contract is in
docs/oci-in-guest.md.

Processes: the runtime (A) forks the container's process (B) after unsharing the namespaces,
because a new pid namespace applies to children only. B reports ``ready <B's pid as the agent
sees it>``, A exits (0, or B's status if B failed before ready) and the agent, as PID 1 or a
subreaper, inherits B. B becomes the user's program through execve, so the pid in ``ready``
is the program's, signals sent to it reach the program, and its wait status is the container's.
"""

from __future__ import annotations

import contextlib
import os

from agent.oci import cgroups, device_filter, rootfs
from agent.oci import hooks as hooks_mod
from agent.oci import process as proc_steps
from agent.oci import syscalls as sc
from agent.oci.errors import INVALID_SPEC, SETUP_FAILED, OciError, SetupError, SpecError
from ocispec import document, linux
from ocispec import spec as spec_mod
from ocispec.capabilities import DEFAULT_LAST_CAP

TYPE_CHECKING = False
if TYPE_CHECKING:
    from agent.oci.hooks import StartHooks
    from agent.oci.syscalls import Syscalls
    from ocispec.spec import IdMapping, Spec

USAGE = (
    "usage: python3 -m agent.oci.init --bundle-fd SPECFD --sync-fd SYNCFD [--cgroup DIR] "
    "[--cgroup-v1 ROOT]"
)

#: The order runc (nsexec) joins namespaces given by path: user first, mount last.
JOIN_ORDER = ("user", "ipc", "uts", "network", "pid", "cgroup", "time", "mount")


#: The kernel's last capability, when :func:`preload_last_cap` read it (in the zygote).
_known_last_cap: int | None = None


def preload_last_cap(sys: Syscalls) -> None:
    """Read :func:`last_cap` once, for every runtime forked from this process afterwards: it
    is the running kernel's constant (a VM restored from a template runs the template's)."""
    global _known_last_cap
    _known_last_cap = None
    _known_last_cap = last_cap(sys)


def last_cap(sys: Syscalls) -> int:
    """The highest capability number this kernel knows."""
    if _known_last_cap is not None:
        return _known_last_cap
    try:
        return int(sys.read_text("/proc/sys/kernel/cap_last_cap").strip())
    except (OSError, ValueError):
        return DEFAULT_LAST_CAP


def create_container(
    sys: Syscalls,
    spec: Spec,
    sync: proc_steps.Sync,
    cgroup: str | None,
    cgroup_v1: str | None = None,
    hooks: StartHooks | None = None,
) -> int:
    """Apply ``spec``, in order. Returns an exit code (real runs end in execve instead).

    ``cgroup``/``cgroup_v1``: the container's cgroup and the guest's v1 root, as in
    :func:`agent.oci.cgroups.locate`.

    The spec was validated as a whole before this is called, so an error here is a failure of
    the system, not of the spec.
    """
    cap_last = last_cap(sys)  # read now: after pivot_root the guest's /proc is gone
    process = spec.process
    # 0. What the host resolves against the bundle must arrive absolute (the agent sets
    #    root.path, the host rewrites bind sources); then the one check of the spec that
    #    needs the file system, before any side effect.
    if not spec.root_path.startswith("/"):
        raise SpecError(f'root.path: "{spec.root_path}" is not an absolute path')
    for i, mount in enumerate(spec.mounts):
        if mount.bind and not mount.source.startswith("/"):
            raise SpecError(f'mounts[{i}].source: "{mount.source}" is not an absolute path')
    if sys.kind(spec.root_path, follow=True) != "dir":
        raise SpecError(f"root.path: {spec.root_path} is not a directory")

    # ---- in the runtime process (A) --------------------------------------------------------
    # 1. oom_score_adj first: every process forked below inherits it, and lowering it needs
    #    CAP_SYS_RESOURCE in the guest's user namespace, which we only have out here.
    if process.oom_score_adj is not None:
        _write(sys, "/proc/self/oom_score_adj", str(process.oom_score_adj), "oom_score_adj")
    # 2. cgroup before any namespace: the path is in the agent's view of the hierarchy (a
    #    cgroup namespace would hide it) and so the container starts inside its limits.
    #    Limits and the device filter (the spec's device rules and runc's defaults) are set
    #    before joining, so it is never inside without them.
    own = cgroups.locate(sys, cgroup, cgroup_v1) if cgroup is not None else None
    if own is not None:
        cgroups.create(sys, own)
        if spec.resources is not None:
            cgroups.set_limits(sys, own, spec.resources)
        device_filter.apply(sys, own, spec.device_policy)
        cgroups.join(sys, own)
    # 3. Join namespaces given by path, user namespace first: the others are owned by it and
    #    setns into them needs its capabilities (the order of runc's nsexec).
    _join_namespaces(sys, spec)
    user_ns = spec.namespace("user")
    if user_ns is not None and user_ns.path is not None:
        # 3a. Root of the joined user namespace, as runc's nsexec becomes it: the guest's
        #     root is not mapped there, and files it created (the mounts' targets) would
        #     fail with EOVERFLOW.
        try:
            sys.setresgid(0)
            sys.setresuid(0)
        except OSError as exc:
            raise SetupError.from_os("joined user namespace: becoming its root", exc) from exc
    # 4. A new user namespace, mapped by a helper that stays outside: only a process with
    #    CAP_SETUID in the parent namespace may write a uid_map with more than its own id.
    if user_ns is not None and user_ns.path is None:
        # 4a. Mount targets the namespace's root could not create through virtio-fs.
        owner = _host_id(spec.uid_mappings, 0)
        group = _host_id(spec.gid_mappings, 0)
        if owner is not None and group is not None:
            rootfs.precreate_targets(sys, spec.root_path, spec.mounts, owner, group)
        _unshare_user_namespace(sys, spec)
    # 5. The other new namespaces (owned by the new user namespace, if any). The pid
    #    namespace only applies to children: hence the fork.
    flags = 0
    for ns in spec.namespaces:
        if ns.path is None and ns.type != "user":
            flags |= ns.flag
    # 5a. A cgroup namespace even when the spec has none: the guest's hierarchy means nothing
    #     to the client, and every runtime shows a container its own cgroup at /sys/fs/cgroup
    #     (runc on v1 hosts by binding it, on v2 hosts through a private cgroup namespace).
    #     Rooted at the cgroup joined in step 2. A cgroup namespace given by path is joined.
    if own is not None and spec.namespace("cgroup") is None:
        flags |= linux.CLONE_NEWCGROUP
    if flags:
        try:
            sys.unshare(flags)
        except OSError as exc:
            raise SetupError.from_os("unsharing namespaces", exc) from exc
    # 5b. A new network namespace has its loopback up, as runc sets it up ("loopback only").
    if flags & linux.CLONE_NEWNET:
        try:
            sys.loopback_up()
        except OSError as exc:
            raise SetupError.from_os("bringing up loopback", exc) from exc
    # 6. Fork B, the container's process. A tells B its pid as the agent sees it, then waits
    #    until B has reported and exits, so that the agent inherits B.
    pid_r, pid_w = sys.pipe()
    done_r, done_w = sys.pipe()
    child = sys.fork()
    if child != 0:
        return supervise(sys, child, pid_r, pid_w, done_r, done_w)

    # ---- in the container's process (B) ----------------------------------------------------
    sys.close(pid_w)
    sys.close(done_r)
    # 7. Our pid in the agent's pid namespace (getpid() says 1 in a new pid namespace).
    my_pid = int(sys.read(pid_r, 32).decode() or "0")
    sys.close(pid_r)
    # 8. A session of our own (its controlling terminal comes in step 16a).
    try:
        sys.setsid()
    except OSError as exc:
        raise SetupError.from_os("setting up the session", exc) from exc
    # 9. umask 0 while building the rootfs, so the modes in the spec are the modes we get.
    sys.umask(0)
    root = spec.root_path
    try:
        # 10. No mount event of ours may reach the guest: make every mount a slave (or what
        #     rootfsPropagation says) before mounting anything.
        sys.mount(None, "/", None, linux.MS_REC | (spec.rootfs_propagation or linux.MS_SLAVE), None)
        # 11. pivot_root refuses a new root whose parent mount is shared.
        rootfs.make_parent_private(sys, root)
        # 12. pivot_root also needs the new root to be a mount point: bind it onto itself.
        sys.mount(root, root, None, linux.MS_BIND | linux.MS_REC, None)
    except OSError as exc:
        raise SetupError.from_os("preparing the rootfs", exc) from exc
    # 13. The spec's mounts, in order: later ones may sit on earlier ones (/dev, /dev/pts).
    for mount in spec.mounts:
        rootfs.mount_entry(sys, root, mount, own)
    # 14. Device nodes, into the /dev the mounts built (unless /dev is a bind of the guest's
    #     /dev). mknod is not allowed in a user namespace: bind the guest's nodes there.
    dev_is_bind = any(m.destination == "/dev" and m.bind for m in spec.mounts)
    if not dev_is_bind:
        in_userns = user_ns is not None
        for device in _devices(spec):
            rootfs.create_device(sys, root, device, bind=in_userns)
        # 15. /dev/fd, /dev/std*, /dev/ptmx -> pts/ptmx.
        rootfs.dev_symlinks(sys, root)
    # 16. Switch root. From here on every path is inside the container.
    rootfs.pivot_root(sys, root)
    # 16a. With a terminal: a pty from the container's own /dev/ptmx on fds 0-2, our
    #      controlling terminal (so ^C and job control reach the container), bound to
    #      /dev/console; its master goes to the agent with ``ready``. After the user's
    #      mounts (its devpts), before the root turns read-only: runc's order.
    if process.terminal:
        pty = proc_steps.attach_terminal(sys, sync, process.console_size)
        if not dev_is_bind:
            rootfs.bind_console(sys, "", pty)
    # 16b. The working directory, made if missing (mkdir -p, mode 0755, as root: runc's
    #      prepareRootfs does so after pivot_root, so the path resolves inside the container;
    #      before the root turns read-only). docker's and runc's ``-w`` to a new directory.
    #      What cannot be made (a read-only share, a file in the way) is left for chdir
    #      (step 23) to report: its message names the cwd as the spec gave it.
    with contextlib.suppress(OSError):
        rootfs.mkdir_all(sys, os.path.normpath(process.cwd))
    # 17. An explicit rootfsPropagation (e.g. shared) applies to the new / as well.
    if spec.rootfs_propagation is not None:
        try:
            sys.mount(None, "/", None, spec.rootfs_propagation, None)
        except OSError as exc:
            raise SetupError.from_os("setting rootfs propagation", exc) from exc
    # 18. Names of the private UTS namespace (validated to exist).
    try:
        if spec.hostname:
            sys.sethostname(spec.hostname)
        if spec.domainname:
            sys.setdomainname(spec.domainname)
    except OSError as exc:
        raise SetupError.from_os("setting the hostname", exc) from exc
    # 19. sysctls through the container's /proc, before readonlyPaths make /proc/sys read-only.
    for key, value in spec.sysctls:
        _write(sys, "/proc/sys/" + key.replace(".", "/"), value, f"sysctl {key}")
    # 20. readonlyPaths, then 21. maskedPaths (masks may sit inside read-only paths).
    for path in spec.readonly_paths:
        rootfs.readonly_path(sys, path)
    for path in spec.masked_paths:
        rootfs.mask_path(sys, path)
    # 22. Root read-only last: the steps above may create mount points and device nodes in it.
    if spec.root_readonly:
        rootfs.remount_root_readonly(sys)
    # 23. The process itself: rlimits, no_new_privs, capabilities, user, umask, cwd, lookup.
    #     (apparmorProfile and selinuxLabel are ignored: the guest kernel enforces no LSM.)
    executable, env = proc_steps.finalize(sys, process, cap_last)
    # 24. Tell A we are fine (it may exit now), then ready / start / startContainer hooks /
    #     execve.
    sys.write(done_w, b"k")
    sys.close(done_w)
    return proc_steps.run_after_start(sys, sync, process, my_pid, executable, env, hooks)


def _write(sys: Syscalls, path: str, value: str, what: str) -> None:
    try:
        sys.write_file(path, value)
    except OSError as exc:
        raise SetupError.from_os(f"setting {what}", exc) from exc


def _devices(spec: Spec) -> list[spec_mod.Device]:
    """runc's default devices, then linux.devices (which win on the same path)."""
    wanted = {d.path for d in spec.devices}
    result = [
        spec_mod.Device(path, "c", major, minor, 0o666, 0, 0)
        for path, major, minor in spec_mod.DEFAULT_DEVICES
        if path not in wanted
    ]
    result.extend(spec.devices)
    return result


def _join_namespaces(sys: Syscalls, spec: Spec) -> None:
    # Open every file first: joining the mount namespace changes what the paths mean.
    opened: list[tuple[int, int, str]] = []
    try:
        for kind in JOIN_ORDER:
            ns = spec.namespace(kind)
            if ns is not None and ns.path is not None:
                opened.append((sys.open(ns.path, os.O_RDONLY), ns.flag, ns.path))
        for fd, flag, _path in opened:
            sys.setns(fd, flag)
    except OSError as exc:
        raise SetupError.from_os("joining namespace", exc) from exc
    finally:
        for fd, _flag, _path in opened:
            sys.close(fd)


def _mapped(mappings: tuple[IdMapping, ...], container_id: int) -> bool:
    return any(m.container_id <= container_id < m.container_id + m.size for m in mappings)


def _host_id(mappings: tuple[IdMapping, ...], container_id: int) -> int | None:
    """The id ``container_id`` maps to outside the namespace, or None if unmapped."""
    for m in mappings:
        if m.container_id <= container_id < m.container_id + m.size:
            return m.host_id + container_id - m.container_id
    return None


def _unshare_user_namespace(sys: Syscalls, spec: Spec) -> None:
    """unshare(CLONE_NEWUSER), with a helper child writing our maps from outside."""
    go_r, go_w = sys.pipe()
    target = sys.getpid()
    helper = sys.fork()
    if helper == 0:
        # The helper: wait for the unshare, write the maps, report through the exit status
        # (errno for uid_map, 128 + errno for gid_map).
        sys.close(go_w)
        sys.read(go_r, 1)
        code = 0
        try:
            sys.write_file(f"/proc/{target}/uid_map", "".join(m.line() for m in spec.uid_mappings))
        except OSError as exc:
            code = exc.errno or 1
        if not code:
            try:
                sys.write_file(
                    f"/proc/{target}/gid_map", "".join(m.line() for m in spec.gid_mappings)
                )
            except OSError as exc:
                code = 128 + (exc.errno or 1)
        sys.exit_now(code)
    sys.close(go_r)
    try:
        sys.unshare(linux.CLONE_NEWUSER)
    except OSError as exc:
        sys.close(go_w)
        sys.waitpid(helper)
        raise SetupError.from_os("unsharing the user namespace", exc) from exc
    sys.write(go_w, b"g")
    sys.close(go_w)
    status = sys.waitpid(helper)
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 255
    if code:
        which = "gid_map" if code > 128 else "uid_map"
        reason = os.strerror(code - 128 if code > 128 else code)
        raise SetupError(f"user namespace: writing {which}: {reason}")
    # Become the namespace's root when it has one, so files we create are owned by it.
    try:
        if _mapped(spec.gid_mappings, 0):
            sys.setresgid(0)
        if _mapped(spec.uid_mappings, 0):
            sys.setresuid(0)
    except OSError as exc:
        raise SetupError.from_os("user namespace: becoming its root", exc) from exc


def supervise(sys: Syscalls, child: int, pid_r: int, pid_w: int, done_r: int, done_w: int) -> int:
    """A after the fork: hand B its pid, wait for its report, exit like B if B failed."""
    sys.close(pid_r)
    sys.close(done_w)
    sys.write(pid_w, str(child).encode())
    sys.close(pid_w)
    ok = sys.read(done_r, 1)
    sys.close(done_r)
    if ok:
        return 0  # B reported ready; the agent inherits it when we exit
    status = sys.waitpid(child)  # B failed and wrote the error line
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else 1


def run(
    sys: Syscalls, config: bytes, sync_fd: int, cgroup: str | None, cgroup_v1: str | None = None
) -> int:
    """Validate, then create. Every failure becomes one ``error`` line and an exit code."""
    sync = proc_steps.Sync(sys, sync_fd)
    try:
        decoded = document.decode(config)
        spec = spec_mod.parse_spec(decoded)
        start_hooks = hooks_mod.parse(
            spec.hooks.get(hooks_mod.KIND, ()), decoded.get(hooks_mod.STATE_KEY)
        )
        return create_container(sys, spec, sync, cgroup, cgroup_v1, start_hooks)
    except Exception as exc:
        return fail(sys, sync, exc)


def fail(sys: Syscalls, sync: proc_steps.Sync, exc: Exception) -> int:
    """Report ``exc`` (message and reason) to the agent; the runtime's exit code.

    An :class:`OciError` keeps its reason and exit code, a SpecError is INVALID_SPEC; an
    OSError that escaped a step is a setup failure; anything else is an internal error
    (UNSPECIFIED). All exit 1 but ExecError.
    """
    if isinstance(exc, SpecError):  # ocispec's: the spec is invalid, nothing was changed
        message, reason, code = exc.message, INVALID_SPEC, exc.exit_code
    else:
        if isinstance(exc, OciError):
            error = exc
        elif isinstance(exc, OSError):
            error = SetupError(exc.strerror or str(exc))
        else:
            error = OciError(f"internal error: {type(exc).__name__}: {exc}")
        message, reason, code = error.message, error.reason, error.exit_code
    if sync.reported:
        # After ready the agent no longer reads the socket: the container's stderr it is.
        try:  # noqa: SIM105 - contextlib is one more import at start
            sys.write(2, f"pysandbox: {message}\n".encode())
        except OSError:
            pass
    sync.error(message, reason)
    return code


def parse_args(argv: list[str], names: tuple[str, ...]) -> dict[str, str]:
    """``--name VALUE`` / ``--name=VALUE`` pairs (argparse costs more than the whole start)."""
    result: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg.partition("=")
        if key[2:] not in names or not key.startswith("--"):
            raise ValueError(f"unknown argument {arg!r}")
        if not eq:
            i += 1
            if i >= len(argv):
                raise ValueError(f"{arg} needs a value")
            value = argv[i]
        result[key[2:]] = value
        i += 1
    return result


def read_all(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv, ("bundle-fd", "sync-fd", "cgroup", "cgroup-v1"))
        spec_fd = int(args["bundle-fd"])
        sync_fd = int(args["sync-fd"])
    except (KeyError, ValueError) as exc:
        os.write(2, f"agent.oci.init: {exc}\n{USAGE}\n".encode())
        return 2
    try:
        config = read_all(spec_fd)
    except OSError as exc:
        proc_steps.Sync(sc.LinuxSyscalls(), sync_fd).error(
            f"reading the spec: {exc.strerror}", SETUP_FAILED
        )
        return 1
    return run(
        sc.LinuxSyscalls(),
        config,
        sync_fd,
        args.get("cgroup") or None,
        args.get("cgroup-v1") or None,
    )


if __name__ == "__main__":
    import sys

    os._exit(main(sys.argv[1:]))
