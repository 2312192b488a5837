"""Keep the guest's view of the virtio-fs share in step with what the host just prepared.

The guest kernel caches directory entries of a FUSE/virtio-fs mount for the entry timeout
virtiofsd hands out (1 s with ``--cache=auto``, see virtiofsd(1) and the kernel's
``fuse_dentry_revalidate``). When the host replaces a name the guest has looked up — a
container id reused within a pod, or ``_volumes`` that a hostile workload swapped for a
symlink and the host put back — a lookup within that second still sees the old entry: a
rootfs that is an empty, deleted directory, or a mount source that "does not exist".

Before a container is created the agent therefore checks the paths the host named; when one
is missing, or the id was used before in this guest, it drops the guest's unused dentries and
inodes (``vm.drop_caches = 2``, Documentation/admin-guide/sysctl/vm.rst) so the next lookup
asks virtiofsd. Nothing the host does depends on this: it never follows guest-made entries.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from typing import Any

DROP_CACHES = "/proc/sys/vm/drop_caches"


def host_paths(rootfs: str, spec: dict[str, Any], share_root: str) -> list[str]:
    """The rootfs and every bind-mount source under ``share_root`` that ``spec`` names."""
    paths = [rootfs]
    mounts = spec.get("mounts")
    for mount in mounts if isinstance(mounts, list) else []:
        source = mount.get("source") if isinstance(mount, dict) else None
        if isinstance(source, str) and source.startswith(share_root + "/"):
            paths.append(source)
    return paths


def forget_stale_entries(drop_caches: str = DROP_CACHES) -> None:
    """Drop the guest's unused dentries and inodes (best effort: errors are ignored)."""
    with contextlib.suppress(OSError), open(drop_caches, "w", encoding="ascii") as knob:
        knob.write("2")


def refresh(paths: Iterable[str], reused: bool, drop_caches: str = DROP_CACHES) -> bool:
    """Forget cached entries when ``reused`` or when one of ``paths`` is missing.

    Returns True when the caches were dropped.
    """
    if reused or not all(os.path.exists(path) for path in paths):
        forget_stale_entries(drop_caches)
        return True
    return False
