"""Host mounts that put container root filesystems and volumes into a pod's shared directory.

The shared directory is exported to the guest by virtiofsd, so the guest can create, rename
and symlink anything inside it. Host code therefore never resolves a path inside it that the
guest could have changed: mountpoints are created and opened relative to a directory fd with
O_NOFOLLOW, and mounts go onto ``/proc/self/fd/N`` of that very inode.

The shared directory is bind-mounted onto itself and marked shared before virtiofsd starts,
so that bind mounts made later below it propagate into virtiofsd's mount namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path

_libc = ctypes.CDLL("libc.so.6", use_errno=True)

MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SHARED = 1 << 20
MNT_DETACH = 0x2


def _mount(source: str | None, target: str, flags: int) -> None:
    src = source.encode() if source is not None else None
    if _libc.mount(src, target.encode(), None, ctypes.c_ulong(flags), None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def _umount(target: str) -> None:
    if _libc.umount2(target.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def make_shared_mountpoint(path: Path) -> None:
    """Bind ``path`` onto itself and mark it MS_SHARED (idempotent enough for a fresh dir)."""
    _mount(str(path), str(path), MS_BIND)
    _mount(None, str(path), MS_SHARED)


def bind_into(parent: Path, name: str, source: Path, readonly: bool) -> Path:
    """Bind-mount ``source`` (a directory or file) at ``parent/name``; return that path.

    ``name`` is created (it must not exist) without following symlinks. Read-only mounts are
    remounted read-only right after the bind.
    """
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"invalid mountpoint name {name!r}")
    parent_fd = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if source.is_dir():
            os.mkdir(name, 0o755, dir_fd=parent_fd)
        else:
            os.close(
                os.open(
                    name,
                    os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o644,
                    dir_fd=parent_fd,
                )
            )
        target_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    finally:
        os.close(parent_fd)
    try:
        _mount(str(source), f"/proc/self/fd/{target_fd}", MS_BIND | MS_REC)
    finally:
        os.close(target_fd)
    target = parent / name
    if readonly:
        _mount(None, str(target), MS_BIND | MS_REMOUNT | MS_RDONLY)
    return target


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below ``path`` (from /proc/self/mountinfo), deepest first."""
    prefix = str(path).rstrip("/")
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        for line in mountinfo:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


def unmount_tree(path: Path) -> None:
    """Detach every mount at or below ``path``; idempotent, never raises for a gone mount."""
    for point in mounts_below(path):
        with contextlib.suppress(OSError):
            _umount(point)
