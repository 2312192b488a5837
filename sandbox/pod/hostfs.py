"""Host mounts that put container root filesystems and volumes into a pod's shared directory.

The shared directory is exported to the guest by virtiofsd, so the guest can create, rename
and symlink anything inside it. Host code therefore never resolves a path inside it that the
guest could have changed: directories are created and opened relative to a directory fd with
O_NOFOLLOW, one component at a time, mounts are attached to that very inode (``move_mount``
onto an fd) and detached through an fd whose mount id was checked (docs/security.md).

A source (rootfs, volume) is resolved once, into an ``O_PATH`` fd: the object that was
checked is the object that is mounted, whatever happens to its path meanwhile (a symlink
swapped in between is never followed). Its tree is cloned detached (``open_tree``), made
private, ``nosuid,nodev`` and, when asked, read-only -- recursively and *before* it is
attached below the shared directory. Mount flags never propagate, but new mounts do: the
clone reaches virtiofsd's mount namespace with the flags it had when attached, so a
read-only share is read-only where virtiofsd writes, whatever the guest remounts (the class
of Kata's CVE-2020-28914).

The shared directory is bind-mounted onto itself and marked shared before virtiofsd starts,
so that mounts attached later below it propagate into virtiofsd's mount namespace.
"""

from __future__ import annotations

import ctypes
import os
import re
import stat
from pathlib import Path

from hypervisor import syscalls

MS_BIND = 0x1000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MNT_DETACH = 0x2

# The new mount API (Linux >= 5.12 for mount_setattr); same numbers on x86_64 and arm64.
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_OPEN_TREE_CLONE = 0x1
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _mount(source: str | None, target: str, flags: int) -> None:
    src = source.encode() if source is not None else None
    syscalls.mount(src, target.encode(), None, flags, None, f"mount {source} on {target}")


def make_shared_mountpoint(path: Path) -> None:
    """Bind ``path`` onto itself and mark it MS_SHARED (idempotent enough for a fresh dir)."""
    _mount(str(path), str(path), MS_BIND)
    _mount(None, str(path), MS_SHARED)


def open_source(path: Path) -> int:
    """An ``O_PATH`` fd of what ``path`` names now (symlinks followed, as runc does).

    Everything later -- the type check, the mount -- goes through this fd, so the source
    cannot be swapped between check and mount. OSError as ``os.open`` raises it.
    """
    return os.open(path, os.O_PATH | os.O_CLOEXEC)


#: statfs(2) ``f_type`` of the host's pseudo filesystems (linux/magic.h) -> their name. Their
#: files are the host kernel's own views (its processes, devices, cgroups): through virtio-fs
#: they read half-working (empty files, the host's pids, virtiofsd as ``self``).
PSEUDO_FILESYSTEMS = {
    0x9FA0: "proc",
    0x62656572: "sysfs",
    0x64626720: "debugfs",
    0x74726163: "tracefs",
    0x73636673: "securityfs",
    0x27E0EB: "cgroup",
    0x63677270: "cgroup2",
    0xCAFE4A11: "bpf",
    0x6165676C: "pstore",
    0xDE5E81E4: "efivarfs",
    0x62656570: "configfs",
    0x65735543: "fusectl",
    0x1CD1: "devpts",
    0x19800202: "mqueue",
    0x42494E4D: "binfmt_misc",
}


def pseudo_filesystem(fd: int) -> str | None:
    """The name of the pseudo filesystem (:data:`PSEUDO_FILESYSTEMS`) the object of ``fd``
    (an ``O_PATH`` fd is enough) is on; None for any other filesystem. Decided by
    ``fstatfs(2)``'s ``f_type``, not by path. OSError if fstatfs fails."""
    buf = ctypes.create_string_buffer(256)  # struct statfs: f_type is its first word
    if syscalls.LIBC.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    f_type = int.from_bytes(buf.raw[: ctypes.sizeof(ctypes.c_long)], "little", signed=False)
    return PSEUDO_FILESYSTEMS.get(f_type & 0xFFFFFFFF)


def refuse_pseudo(fd: int, source: str | Path) -> str | None:
    """Why the source ``source`` (held as ``fd``) cannot be shared into a VM, in words (its
    pseudo filesystem, what to do instead); None when it can."""
    kind = pseudo_filesystem(fd)
    if kind is None:
        return None
    return (
        f"{source} is a {kind} filesystem on the host; it cannot be shared into the VM "
        f"(mount {kind} inside the container instead)"
    )


def open_dir(path: Path) -> int:
    """An ``O_PATH`` fd of the host-controlled directory ``path`` (its last component is
    not followed if it is a symlink)."""
    return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def make_dir(parent_fd: int, name: str, mode: int = 0o755) -> int:
    """Create the directory ``name`` (which must not exist) in ``parent_fd``; its ``O_PATH``
    fd. The name is one component; nothing is followed. FileExistsError if it exists."""
    _check_name(name)
    os.mkdir(name, mode, dir_fd=parent_fd)
    return os.open(
        name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd
    )


def _check_name(name: str) -> None:
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"invalid mountpoint name {name!r}")


def bind_into(
    parent_fd: int,
    name: str,
    source_fd: int,
    readonly: bool,
    from_host: bool = False,
    recursive: bool = True,
) -> None:
    """Mount the tree of ``source_fd`` (a directory or file) at ``name`` in ``parent_fd``.

    ``name`` is created (it must not exist) without following symlinks. The tree (with its
    submounts when ``recursive``, as ``rbind``; the source's own mount alone otherwise, as
    ``bind``: mount(8)) is cloned detached, made private, ``nosuid,nodev`` and read-only if
    ``readonly`` -- all before it is attached, so every copy the attach propagates (into
    virtiofsd's namespace) carries those flags. With ``from_host`` (a spec mount asking for
    ``rslave``/``rshared``: Kubernetes HostToContainer, Bidirectional) the clone is a slave
    instead of private: mounts the host makes below the source later reach the guest, with
    the flags the host gave them, as under runc; nothing goes back (a slave never propagates
    to its master, so clean-up cannot unmount the host's mounts). OSError on failure
    (nothing left mounted).
    """
    _check_name(name)
    if stat.S_ISDIR(os.fstat(source_fd).st_mode):
        os.mkdir(name, 0o755, dir_fd=parent_fd)
    else:
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        os.close(os.open(name, flags, 0o644, dir_fd=parent_fd))
    target_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    try:
        _attach(source_fd, target_fd, readonly, MS_SLAVE if from_host else MS_PRIVATE, recursive)
    finally:
        os.close(target_fd)


def _attach(
    source_fd: int, target_fd: int, readonly: bool, propagation: int, recursive: bool = True
) -> None:
    """Clone the tree at ``source_fd`` (with its submounts if ``recursive``), flag it
    (``propagation``: MS_PRIVATE or MS_SLAVE), attach it onto ``target_fd``'s inode."""
    depth = _AT_RECURSIVE if recursive else 0
    tree_fd = syscalls.check(
        syscalls.LIBC.syscall(
            _SYS_OPEN_TREE,
            ctypes.c_int(source_fd),
            b"",
            ctypes.c_uint(_OPEN_TREE_CLONE | os.O_CLOEXEC | _AT_EMPTY_PATH | depth),
        ),
        "open_tree",
    )
    try:
        attr = _MountAttr(
            MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | (MOUNT_ATTR_RDONLY if readonly else 0),
            0,
            propagation,
            0,
        )
        syscalls.check(
            syscalls.LIBC.syscall(
                _SYS_MOUNT_SETATTR,
                ctypes.c_int(tree_fd),
                b"",
                ctypes.c_uint(_AT_EMPTY_PATH | _AT_RECURSIVE),
                ctypes.byref(attr),
                ctypes.c_size_t(ctypes.sizeof(attr)),
            ),
            "mount_setattr",
        )
        syscalls.check(
            syscalls.LIBC.syscall(
                _SYS_MOVE_MOUNT,
                ctypes.c_int(tree_fd),
                b"",
                ctypes.c_int(target_fd),
                b"",
                ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH | _MOVE_MOUNT_T_EMPTY_PATH),
            ),
            "move_mount",
        )
    finally:
        os.close(tree_fd)  # a clone never attached is freed with its last fd


_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """A mountinfo path field decoded (the kernel writes space, tab, newline and backslash
    as octal escapes)."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def _mounts(prefix: str) -> list[tuple[int, str]]:
    """(mount id, mount point) of every mount at or below ``prefix``."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            point = _unescape(fields[4])
            if point == prefix or point.startswith(prefix + "/"):
                found.append((int(fields[0]), point))
    return found


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below ``path`` (from /proc/self/mountinfo), deepest first (siblings
    in reverse path order, so the order never depends on hashing)."""
    points = {point for _id, point in _mounts(str(path).rstrip("/"))}
    return sorted(points, key=lambda p: (p.count("/"), p), reverse=True)


def _mount_id(fd: int) -> int | None:
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as info:
        for line in info:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    return None


def _umount_fd(fd: int) -> None:
    """Detach (lazily) the mount whose root ``fd`` is; OSError on failure."""
    syscalls.umount2(f"/proc/self/fd/{fd}".encode(), MNT_DETACH, "umount")


def _open_beneath(top_fd: int, parts: list[str]) -> int:
    """Walk ``parts`` from ``top_fd``, one ``O_NOFOLLOW`` component at a time; an O_PATH fd.

    Mounts are crossed (that is not following a link); a symlink anywhere fails (ELOOP or
    ENOTDIR), so the walk never leaves the tree below ``top_fd``.
    """
    fd = os.dup(top_fd)
    try:
        for part in parts:
            _check_name(part)
            child = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def unmount_tree(path: Path, trusted: Path | None = None) -> None:
    """Detach every mount at or below ``path``; idempotent, never raises for a gone mount.

    ``trusted`` (default ``path`` itself) is an ancestor whose own path the guest cannot
    change; every component below it is opened without following symlinks, and a mount is
    detached only through an fd whose mount id is the one mountinfo listed for that path,
    so a symlink or a rename planted by the guest cannot redirect an unmount to a host mount
    (the class of Kata's CVE-2020-2024). Mounts that cannot be reached that way stay (see
    :func:`mounts_below`; callers never delete a directory that still has mounts below it).
    """
    top = trusted if trusted is not None else path
    prefix = str(path).rstrip("/")
    try:
        top_fd = open_dir(top)
    except OSError:
        return
    try:
        for _round in range(8):  # deepest first; a mount stacked below another comes next
            progress = False
            for mount_id, point in sorted(_mounts(prefix), key=lambda m: -m[1].count("/")):
                relative = os.path.relpath(point, top)
                if relative.startswith(".."):
                    continue
                try:
                    fd = _open_beneath(top_fd, [] if relative == "." else relative.split("/"))
                except (OSError, ValueError):
                    continue
                try:
                    if _mount_id(fd) == mount_id:
                        _umount_fd(fd)
                        progress = True
                except OSError:
                    pass
                finally:
                    os.close(fd)
            if not progress:
                return
    finally:
        os.close(top_fd)
