"""The wire form of a pod tmpfs: a container engine's ``shm`` tmpfs made again in the guest.

podman, docker, containerd's CRI plugin and CRI-O mount a tmpfs named ``shm`` on the host for
a container (or for all containers of a pod) and bind it at ``/dev/shm``. The host runtime
(sandbox/pod/pod_shm.py) does not share it over virtio-fs: it rewrites that mount in the spec
it sends to the agent into a ``tmpfs`` mount whose source is :data:`SOURCE_PREFIX` + a key
naming the host tmpfs (its device and inode), and the agent (agent/pod_tmpfs.py) mounts one
guest tmpfs per key under :data:`GUEST_DIR` and binds it into every container that names the
key, so the containers of a pod share it as they share the host's. An agent without that
module mounts the rewritten entry as a plain tmpfs of the container's own.
"""

from __future__ import annotations

import re

#: Source of a rewritten mount: this prefix, then the key.
SOURCE_PREFIX = "pysandbox-pod-tmpfs:"
#: Where the agent mounts each key's tmpfs in the guest (out of every container's view).
GUEST_DIR = "/run/pysandbox/pod-tmpfs"
#: The tmpfs's own name in /proc/mounts, as the engines name theirs.
FS_NAME = "shm"

_KEY = re.compile(r"[0-9a-f]{1,16}-[0-9a-f]{1,16}")


def key(st_dev: int, st_ino: int) -> str:
    """The key of the host tmpfs whose root has this device and inode number."""
    return f"{st_dev:x}-{st_ino:x}"


def parse_source(source: str) -> str | None:
    """The key of a rewritten mount's ``source``; None for any other source; ValueError when
    it has the prefix but not a key's form (which could name a path)."""
    if not source.startswith(SOURCE_PREFIX):
        return None
    value = source[len(SOURCE_PREFIX) :]
    if _KEY.fullmatch(value) is None:
        raise ValueError(f"invalid pod tmpfs key {value[:40]!r}")
    return value
