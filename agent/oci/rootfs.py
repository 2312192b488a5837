"""Single steps of building the container's file system view.

The order in which they are applied lives in :func:`agent.oci.init.create_container`; each
function here does one thing through the :class:`~agent.oci.syscalls.Syscalls` seam.

Paths inside the rootfs are resolved with :func:`secure_join`, which follows symlinks as if the
rootfs were ``/``, so an image cannot point a mount target at the guest's own files. It is not
race-free against a process changing the rootfs concurrently; nothing runs in the rootfs while
the container is being set up.
"""

from __future__ import annotations

import errno
import os

from agent.oci import syscalls as sc
from agent.oci.errors import SetupError
from ocispec import linux

TYPE_CHECKING = False
if TYPE_CHECKING:
    from agent.oci.cgroups import Cgroup
    from agent.oci.syscalls import Syscalls
    from ocispec.spec import Device, Mount

#: Filesystems a user namespace may not be allowed to mount, and what to bind instead (runc).
#: A cgroup mount binds the container's own cgroup instead (:func:`cgroup_view`).
_BIND_FALLBACK = {"sysfs": "/sys", "mqueue": "/dev/mqueue"}

_S_IFCHR = 0o020000
_S_IFBLK = 0o060000
_S_IFIFO = 0o010000

#: Links runc creates in every /dev it sets up.
DEV_SYMLINKS = (
    ("/proc/self/fd", "/dev/fd"),
    ("/proc/self/fd/0", "/dev/stdin"),
    ("/proc/self/fd/1", "/dev/stdout"),
    ("/proc/self/fd/2", "/dev/stderr"),
)


def secure_join(sys: Syscalls, root: str, unsafe: str) -> str:
    """``root`` + ``unsafe`` with every symlink resolved inside ``root`` (like securejoin)."""
    pending = [part for part in unsafe.split("/") if part]
    pending.reverse()
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop()
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root + "/" + "/".join([*resolved, part])
        if sys.kind(candidate) == "link":
            links += 1
            if links > 255:
                raise SetupError(f"resolving {unsafe} in the rootfs: too many levels of symlinks")
            target = sys.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            more = [p for p in target.split("/") if p]
            pending.extend(reversed(more))
            continue
        resolved.append(part)
    return root + ("/" + "/".join(resolved) if resolved else "")


def mkdir_all(sys: Syscalls, path: str, mode: int = 0o755) -> None:
    """mkdir -p for an already resolved absolute path."""
    missing: list[str] = []
    current = path
    while current not in ("", "/") and sys.kind(current, follow=True) is None:
        missing.append(current)
        current = os.path.dirname(current)
    for directory in reversed(missing):
        sys.mkdir(directory, mode)


def precreate_targets(
    sys: Syscalls, root: str, mounts: tuple[Mount, ...], owner: int, group: int
) -> None:
    """Create the missing targets of ``mounts`` in ``root``, owned by ``owner``:``group``.

    For a container with a user namespace, called before the namespace exists (as the guest's
    root). Its root would create the targets itself (step 13), as runc's does, and in a
    directory its ids own but may not write (a ``0555`` ``/``, as podman's rootfs has) its
    CAP_DAC_OVERRIDE lets it. Through virtio-fs it does not: virtiofsd creates a file with
    the caller's fsuid, and the host kernel drops a process's DAC capabilities when its fsuid
    is not 0 (capabilities(7)). So the targets are made here and handed to the namespace's
    root (``owner``, ``group``: the guest ids its uid and gid 0 map to), which leaves them as
    runc would. Targets below an earlier mount's destination are left to step 13 (they live
    on that mount). Best effort: an error here is left for step 13 to report.
    """
    earlier: list[str] = []
    for mount in mounts:
        destination = "/" + "/".join(p for p in mount.destination.split("/") if p)
        below = any(
            destination == d or destination.startswith(d.rstrip("/") + "/") for d in earlier
        )
        earlier.append(destination)
        if below:
            continue
        try:
            target = secure_join(sys, root, destination)
            if sys.kind(target, follow=True) is not None:
                continue
            is_file = mount.bind and sys.kind(mount.source, follow=True) not in (None, "dir")
            directory = os.path.dirname(target) if is_file else target
            missing: list[str] = []
            current = directory
            while current.startswith(root + "/") and sys.kind(current, follow=True) is None:
                missing.append(current)
                current = os.path.dirname(current)
            for path in reversed(missing):
                sys.mkdir(path, 0o755)
                sys.chown(path, owner, group)
            if is_file:
                sys.create_file(target, 0o644)
                sys.chown(target, owner, group)
        except (OSError, SetupError):
            continue


def _locked_remount(sys: Syscalls, target: str, flags: int) -> None:
    """Bind-remount ``target`` with ``flags``; keep flags the kernel may refuse to clear.

    In a user namespace nosuid/nodev/noexec/ro/atime flags inherited from the parent are
    locked and a remount without them fails with EPERM: retry with them added (as runc).
    """
    try:
        sys.mount(None, target, None, linux.MS_BIND | linux.MS_REMOUNT | flags, None)
    except OSError as exc:
        if exc.errno != errno.EPERM:
            raise
        locked = sys.mount_flags(target)
        sys.mount(None, target, None, linux.MS_BIND | linux.MS_REMOUNT | flags | locked, None)


def make_parent_private(sys: Syscalls, root: str) -> None:
    """pivot_root refuses a new root whose parent mount is shared: make that mount private."""
    try:
        mountinfo = sys.read_text("/proc/self/mountinfo")
    except OSError:
        return
    best = ""
    shared = False
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 7:
            continue
        mount_point = fields[4]
        inside = root == mount_point or root.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best = mount_point
            optional = fields[6 : fields.index("-")] if "-" in fields else []
            shared = any(tag.startswith("shared:") for tag in optional)
    if best and shared:
        sys.mount(None, best, None, linux.MS_PRIVATE, None)


def mount_entry(sys: Syscalls, root: str, mount: Mount, cgroup: Cgroup | None = None) -> None:
    """Create the target inside ``root`` and mount one ``mounts[]`` entry there.

    A ``cgroup``/``cgroup2`` entry shows the container's own ``cgroup`` (:func:`cgroup_view`);
    without one (no usable cgroup) it is a plain cgroup2 mount.
    """
    target = secure_join(sys, root, mount.destination)
    where = f"mount {mount.source or mount.type} on {mount.destination}"
    try:
        if mount.bind:
            source_kind = sys.kind(mount.source, follow=True)
            if source_kind is None:
                raise SetupError(f"{where}: source {mount.source} does not exist")
            if source_kind == "dir":
                mkdir_all(sys, target)
            else:
                mkdir_all(sys, os.path.dirname(target))
                if sys.kind(target, follow=True) is None:
                    sys.create_file(target, 0o644)
            sys.mount(
                mount.source, target, None, linux.MS_BIND | (mount.flags & linux.MS_REC), None
            )
            # A bind mount ignores every other flag: they take a remount.
            extra = mount.flags & ~(linux.MS_BIND | linux.MS_REC | linux.MS_REMOUNT)
            if extra:
                _locked_remount(sys, target, extra)
        elif mount.type in ("cgroup", "cgroup2") and cgroup is not None:
            mkdir_all(sys, target)
            cgroup_view(sys, cgroup, target, mount.flags)
        elif mount.copy_up:
            mkdir_all(sys, target)
            # The directory the tmpfs will hide, held open: its content is copied in after.
            covered = sys.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                writable = mount.flags & ~linux.MS_RDONLY
                sys.mount(mount.source or "tmpfs", target, "tmpfs", writable, mount.data or None)
                sys.copy_up(covered, target)
            finally:
                sys.close(covered)
            if mount.flags & linux.MS_RDONLY:  # read-only once filled
                sys.mount(None, target, None, linux.MS_REMOUNT | mount.flags, mount.data or None)
        else:
            mkdir_all(sys, target)
            fstype = "cgroup2" if mount.type in ("cgroup", "cgroup2") else mount.type
            source = mount.source or fstype
            try:
                sys.mount(source, target, fstype, mount.flags, mount.data or None)
            except OSError as exc:
                fallback = _BIND_FALLBACK.get(fstype)
                if exc.errno not in (errno.EPERM, errno.EBUSY) or fallback is None:
                    raise
                # A user namespace without its own net/ipc namespace may not mount
                # sysfs/mqueue: show the guest's instead, with the same flags.
                sys.mount(fallback, target, None, linux.MS_BIND | linux.MS_REC, None)
                if mount.flags:
                    _locked_remount(sys, target, mount.flags)
        for propagation in mount.propagation:
            sys.mount(None, target, None, propagation, None)
    except OSError as exc:
        raise SetupError.from_os(where, exc) from exc


def cgroup_view(sys: Syscalls, cgroup: Cgroup, target: str, flags: int) -> None:
    """Show the container's own cgroup at ``target``, whatever the spec's cgroup namespace.

    Runs in the container's cgroup namespace (the runtime always has one), so a cgroup file
    system mounted here is rooted at the container's cgroup. v2 layout: cgroup2 at ``target``.
    v1 layout: a tmpfs at ``target`` with one directory per hierarchy, named by its
    controllers, and symlinks from each controller of a shared hierarchy (``cpu`` ->
    ``cpu,cpuacct``), as systemd and runc lay it out; the tmpfs is made read-only last when
    ``flags`` asks for it. A user namespace that may not mount a cgroup file system (EPERM)
    gets a bind of the container's own cgroup directory instead.
    """
    if not cgroup.v1:
        _cgroup_fs(sys, "cgroup2", "", cgroup.path, target, flags)
        return
    sys.mount("tmpfs", target, "tmpfs", flags & ~linux.MS_RDONLY, "mode=755")
    for name, directory in cgroup.v1:
        sys.mkdir(f"{target}/{name}", 0o555)
        _cgroup_fs(sys, "cgroup", name, directory, f"{target}/{name}", flags)
        if "," in name:
            for controller in name.split(","):
                sys.symlink(name, f"{target}/{controller}")
    if flags & linux.MS_RDONLY:
        _locked_remount(sys, target, flags)


def _cgroup_fs(sys: Syscalls, fstype: str, data: str, own: str, target: str, flags: int) -> None:
    try:
        sys.mount(fstype, target, fstype, flags, data or None)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EBUSY):
            raise
        sys.mount(own, target, None, linux.MS_BIND | linux.MS_REC, None)
        if flags:
            _locked_remount(sys, target, flags)


def create_device(sys: Syscalls, root: str, device: Device, bind: bool) -> None:
    """mknod ``device`` in the rootfs, or bind the guest's node when mknod is not allowed."""
    target = secure_join(sys, root, device.path)
    try:
        mkdir_all(sys, os.path.dirname(target))
        if not bind:
            kind = {"c": _S_IFCHR, "b": _S_IFBLK, "p": _S_IFIFO}[device.type]
            try:
                sys.mknod(target, kind | device.mode, device.major, device.minor)
            except FileExistsError:
                return
            except PermissionError:
                bind = True  # no CAP_MKNOD (user namespace): fall through to bind
            else:
                sys.chown(target, device.uid, device.gid)
                return
        if sys.kind(device.path, follow=True) is None:
            raise SetupError(f"device {device.path}: cannot mknod and the guest has no such node")
        if sys.kind(target, follow=True) is None:
            sys.create_file(target, 0o644)
        sys.mount(device.path, target, None, linux.MS_BIND, None)
    except OSError as exc:
        raise SetupError.from_os(f"device {device.path}", exc) from exc


def dev_symlinks(sys: Syscalls, root: str) -> None:
    """/dev/fd, /dev/std{in,out,err} and /dev/ptmx -> pts/ptmx (the devpts instance's ptmx)."""
    try:
        for source, link in DEV_SYMLINKS:
            target = root + link
            if sys.kind(target) is None:
                sys.symlink(source, target)
        ptmx = root + "/dev/ptmx"
        if sys.kind(ptmx) is not None:
            sys.unlink(ptmx)
        sys.symlink("pts/ptmx", ptmx)
    except OSError as exc:
        raise SetupError.from_os("creating /dev links", exc) from exc


def bind_console(sys: Syscalls, root: str, pty: str) -> None:
    """Bind the process's pty (``pty``, its path in our mount namespace: /dev/pts/N of the
    container's devpts) to ``root``/dev/console, as runc does."""
    try:
        target = root + "/dev/console"
        if sys.kind(target, follow=True) is None:
            sys.create_file(target, 0o600)
        sys.mount(pty, target, None, linux.MS_BIND, None)
    except OSError as exc:
        raise SetupError.from_os("binding the terminal to /dev/console", exc) from exc


def pivot_root(sys: Syscalls, root: str) -> None:
    """Make ``root`` the root: pivot_root(".", ".") then detach the old root stacked on it.

    Falls back to MS_MOVE + chroot when pivot_root is refused with EINVAL, which happens
    when the current root is the initramfs (rootfs cannot be pivoted away from).
    """
    try:
        old_root = sys.open("/", os.O_DIRECTORY | os.O_RDONLY)
        new_root = sys.open(root, os.O_DIRECTORY | os.O_RDONLY)
        sys.fchdir(new_root)
        try:
            sys.pivot_root(".", ".")
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            sys.mount(root, "/", None, linux.MS_MOVE, None)
            sys.chroot(".")
        else:
            # The old root is now mounted on top of the new one, at ".". Make it a slave so
            # that unmounting it does not propagate to the guest, then detach it.
            sys.fchdir(old_root)
            sys.mount(None, ".", None, linux.MS_SLAVE | linux.MS_REC, None)
            sys.umount2(".", sc.MNT_DETACH)
        sys.chdir("/")
        sys.close(old_root)
        sys.close(new_root)
    except OSError as exc:
        raise SetupError.from_os("pivot_root", exc) from exc


def readonly_path(sys: Syscalls, path: str) -> None:
    """Bind ``path`` onto itself and remount it read-only (skipped when it does not exist)."""
    if sys.kind(path, follow=True) is None:
        return
    try:
        sys.mount(path, path, None, linux.MS_BIND | linux.MS_REC, None)
        flags = linux.MS_RDONLY | sys.mount_flags(path)
        sys.mount(None, path, None, linux.MS_BIND | linux.MS_REMOUNT | flags, None)
    except OSError as exc:
        raise SetupError.from_os(f"making {path} read-only", exc) from exc


def mask_path(sys: Syscalls, path: str) -> None:
    """Hide ``path``: /dev/null over a file, an empty read-only tmpfs over a directory."""
    kind = sys.kind(path, follow=True)
    if kind is None:
        return
    try:
        if kind == "dir":
            sys.mount("tmpfs", path, "tmpfs", linux.MS_RDONLY, None)
        else:
            sys.mount("/dev/null", path, None, linux.MS_BIND, None)
    except OSError as exc:
        raise SetupError.from_os(f"masking {path}", exc) from exc


def remount_root_readonly(sys: Syscalls) -> None:
    """root.readonly: remount / read-only, keeping its other flags."""
    try:
        flags = linux.MS_RDONLY | sys.mount_flags("/")
        sys.mount(None, "/", None, linux.MS_BIND | linux.MS_REMOUNT | flags, None)
    except OSError as exc:
        raise SetupError.from_os("remounting / read-only", exc) from exc
