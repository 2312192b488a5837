"""A container engine's ``/dev/shm`` tmpfs becomes a tmpfs in the guest, not a virtio-fs share.

podman and docker (per container), containerd's CRI plugin and CRI-O (per pod sandbox) mount
a tmpfs named ``shm`` on the host, of the size the user asked for (``--shm-size``; 64000k by
default), and bind it at the container's ``/dev/shm``. Under runc the workload sees that
tmpfs. Shared into the VM over virtio-fs it would see a FUSE file system instead (``stat -f``
type, ``df``), its shared-memory mappings would go through virtiofsd, and its pages would
live in host memory outside the VM's limits. So, as Kata Containers does, such a mount becomes
a tmpfs in the guest of the same size, flags and mode, one per host tmpfs: containers binding
the same host tmpfs (a pod's) share one guest tmpfs (agentapi/pod_tmpfs.py has the wire form).

What the host no longer sees: files a workload writes in /dev/shm stay in the VM (under runc
they are also in the engine's host directory; no engine reads them there). A bind at /dev/shm
of any other source (``--ipc host``'s host /dev/shm, a volume) stays a share as before.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from agentapi import pod_tmpfs

#: Where a tmpfs must be bound to be an engine's shm.
DESTINATION = "/dev/shm"
#: Bind options that carry over to the guest tmpfs's bind.
_FLAGS = ("ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec")
#: Flags of the host tmpfs's own mount that a bind of it keeps.
_KEPT = ("ro", "nosuid", "nodev", "noexec")
MOUNTINFO = "/proc/self/mountinfo"


def _mount_id(fd: int) -> int | None:
    """The mount id of the mount ``fd`` lies on (``mnt_id`` in /proc/self/fdinfo, proc(5))."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as info:
            for line in info:
                if line.startswith("mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _mountinfo_entry(mount_id: int, mountinfo: str) -> tuple[str, str, str, list[str]] | None:
    """(root, fstype, source, mount options) of mount ``mount_id`` in a mountinfo file
    (proc(5))."""
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as lines:
            for line in lines:
                fields = line.split()
                if not fields or fields[0] != str(mount_id) or "-" not in fields[6:]:
                    continue
                rest = fields[fields.index("-", 6) + 1 :]
                if len(rest) < 2:
                    return None
                return fields[3], rest[0], rest[1], fields[5].split(",")
    except OSError:
        return None
    return None


def _is_mount_root(fd: int, st: os.stat_result) -> bool:
    """Whether ``fd`` is the root directory of the mount it lies on: its parent (``..``
    crosses to the mount below) is on another device."""
    try:
        parent = os.stat("..", dir_fd=fd, follow_symlinks=False)
    except OSError:
        return False
    return parent.st_dev != st.st_dev


def guest_mount(
    mount: dict[str, Any], source_fd: int, mountinfo: str = MOUNTINFO
) -> dict[str, Any] | None:
    """The guest form of bind ``mount`` (its source opened as ``source_fd``) when it binds an
    engine's ``shm`` tmpfs at /dev/shm: a ``tmpfs`` mount of the same size (bytes), mode and
    flags whose source names the host tmpfs (:func:`agentapi.pod_tmpfs.key`); else None."""
    if os.path.normpath(str(mount.get("destination", ""))) != DESTINATION:
        return None
    st = os.fstat(source_fd)
    if not stat.S_ISDIR(st.st_mode) or not _is_mount_root(source_fd, st):
        return None
    mount_id = _mount_id(source_fd)
    entry = _mountinfo_entry(mount_id, mountinfo) if mount_id is not None else None
    if entry is None or entry[:3] != ("/", "tmpfs", pod_tmpfs.FS_NAME):
        return None
    vfs = os.fstatvfs(source_fd)
    size = vfs.f_blocks * vfs.f_frsize
    # The bind keeps the host mount's flags (the engines mount it nosuid,nodev,noexec), and
    # the spec's options add to them, as a bind with runc does.
    options = [o for o in entry[3] if o in _KEPT]
    options += [o for o in mount.get("options") or [] if o in _FLAGS and o not in options]
    options += [f"size={size}", f"mode={stat.S_IMODE(st.st_mode):o}"]
    return {
        "destination": mount["destination"],
        "type": "tmpfs",
        "source": pod_tmpfs.SOURCE_PREFIX + pod_tmpfs.key(st.st_dev, st.st_ino),
        "options": options,
    }
