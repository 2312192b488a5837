"""Pod tmpfs: one guest tmpfs per engine ``shm`` tmpfs the host named (agentapi/pod_tmpfs.py).

:func:`materialize` turns each ``tmpfs`` mount of a container's spec whose source is a pod
tmpfs key into a bind of that key's tmpfs under :data:`~agentapi.pod_tmpfs.GUEST_DIR`, mounting
it first if no container did yet (size, mode and flags from the first spec that names the
key). It stays mounted as long as the VM: a pod's containers come and go, its shm stays, as
the engine's host tmpfs lives as long as the pod sandbox.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from agentapi import pod_tmpfs
from ocispec import linux
from ocispec.spec import MOUNT_OPTIONS

#: The flag options a pod tmpfs takes from the spec, read as every mount's (MOUNT_OPTIONS: a
#: later one wins); any other option is refused.
_FLAG_OPTIONS = frozenset({"ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec"})
_lock = threading.Lock()


def _options(options: list[Any]) -> tuple[list[str], int, str]:
    """(flag options, mount flags, tmpfs data ``size=…,mode=…``); ValueError for others."""
    flags: list[str] = []
    bits = 0
    data: list[str] = []
    for option in options:
        if not isinstance(option, str):
            raise ValueError(f"invalid pod tmpfs option {option!r}")
        name, _, value = option.partition("=")
        if option in _FLAG_OPTIONS:
            flags.append(option)
            clear, flag = MOUNT_OPTIONS[option]
            bits = bits & ~flag if clear else bits | flag
        elif name in ("size", "mode") and value.isdigit() and len(value) <= 20:
            data.append(option)
        else:
            raise ValueError(f"invalid pod tmpfs option {option[:40]!r}")
    return flags, bits, ",".join(data)


def materialize(spec: dict[str, Any], guest_dir: str = pod_tmpfs.GUEST_DIR) -> None:
    """Rewrite ``spec``'s pod tmpfs mounts in place (module docstring). ValueError for a
    malformed one; OSError when a tmpfs cannot be mounted."""
    from agent.oci import syscalls

    mounts = spec.get("mounts")
    for mount in mounts if isinstance(mounts, list) else []:
        if not isinstance(mount, dict) or mount.get("type") != "tmpfs":
            continue
        key = pod_tmpfs.parse_source(str(mount.get("source", "")))
        if key is None:
            continue
        options = mount.get("options")
        flags, bits, data = _options(options if isinstance(options, list) else [])
        path = f"{guest_dir}/{key}"
        with _lock:
            if not os.path.ismount(path):
                os.makedirs(path, mode=0o700, exist_ok=True)
                syscalls.mount(pod_tmpfs.FS_NAME, path, "tmpfs", bits & ~linux.MS_RDONLY, data)
        mount["type"] = "bind"
        mount["source"] = path
        mount["options"] = ["rbind", "rprivate", *flags]
