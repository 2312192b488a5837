"""Putting a container into a pod VM: its files into the pod share, its spec into guest terms.

Host paths never reach the guest: the rootfs is bind-mounted at
``<pod>/shared/<container-id>/rootfs`` and every bind-mount source (a volume) at
``<pod>/shared/_volumes/<key>``, and the spec is rewritten to the guest paths under
``/run/pysandbox/shared``. A volume is shared once per pod, whichever containers use it: the
key is the source's device and inode and the read-only flag, and the containers using it are
recorded in ``<pod dir>/volume-users/<key>/<container-id>`` (host-side, out of the guest's
reach); the last one to go unmounts it. So every container of the pod sees the same guest
inode for a file of the volume, and locks and the page cache are shared between them as with
runc (virtiofsd would give each bind mount its own inodes; docs/file-semantics.md).

Namespace paths are host paths too. A network namespace given by
path is the pod's network, which pod networking carries into the VM and the agent configures
in the guest's root network namespace: the path becomes that of the agent's (PID 1's)
network namespace, so the container joins it (a joined namespace, not the "host's", so
``net.*`` sysctls stay allowed as runc allows them in a pod netns; docs/networking.md). A
network namespace without a path stays a new, empty one (loopback only), as with runc,
except for a pod owner whose network is set up after create (``join_pod_network``): its
namespace is the pod's, which ``start`` carries into the guest's root one. Any
other namespace shared with another container of the pod is rewritten to that container's
guest init process.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sandbox.errors import ConfigError
from sandbox.pod import guest_cgroup, hostfs, pod_shm
from sandbox.pod.lifecycle import GUEST_SHARE, Pod

_BIND_TYPES = {"bind", "rbind"}
#: Mount options asking that host mounts below the source reach the container (runc honours
#: them on the host side of the bind; Kubernetes HostToContainer is rslave, Bidirectional
#: rshared).
_FROM_HOST = frozenset({"slave", "rslave", "shared", "rshared"})
#: The pod network in the guest: the root network namespace, where the agent (PID 1) runs.
GUEST_POD_NETNS = "/proc/1/ns/net"


def is_bind(mount: dict[str, Any]) -> bool:
    """Whether an OCI mount is a bind mount (``type`` or an option ``bind``/``rbind``)."""
    options = mount.get("options") or []
    return mount.get("type") in _BIND_TYPES or "bind" in options or "rbind" in options


def _is_recursive(mount: dict[str, Any]) -> bool:
    """Whether a bind mount takes the source's submounts along: ``rbind`` (an option, or
    the type) does, a plain ``bind`` does not (runc: MS_BIND without MS_REC; mount(8))."""
    options = mount.get("options") or []
    return mount.get("type") == "rbind" or "rbind" in options


class HeldSources:
    """Host sources opened when they were checked, for a share made later (after a boot).

    ``share_container_files`` mounts a path held here from its fd, so a path swapped (for a
    symlink, another directory) between the check and the mount is not followed. A context
    manager: the fds are closed on exit.
    """

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def hold(self, path: Path) -> None:
        """Open ``path`` (``hostfs.open_source``) unless held already; OSError as os.open."""
        if str(path) not in self._fds:
            self._fds[str(path)] = hostfs.open_source(path)

    def fd(self, path: Path) -> int | None:
        """The fd held for exactly ``path``, or None."""
        return self._fds.get(str(path))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> HeldSources:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def share_container_files(
    pod: Pod,
    container_id: str,
    spec: dict[str, Any],
    bundle: Path,
    guest_pids: Callable[[str], int | None] = lambda _path: None,
    rootfs_readonly: bool | None = None,
    held: HeldSources | None = None,
    join_pod_network: bool = False,
    pod_network: str = "",
) -> tuple[str, dict[str, Any]]:
    """Expose the rootfs and bind-mount sources to the guest; return (guest rootfs, spec).

    ``spec`` is not modified; the returned copy carries guest paths. ``guest_pids`` maps a
    host namespace path (``/proc/<pid>/ns/<type>``) of another container of this pod to that
    container's guest pid, or None when it does not belong to the pod.
    ``rootfs_readonly`` overrides root.readonly for the host bind (an overlay in the guest
    wants a read-only lower layer under a writable root). The copy names the VM's cgroup
    layout (:func:`sandbox.pod.guest_cgroup.resolve`). A source in ``held`` is mounted
    from the fd opened when it was checked; any other is opened here, once.
    ``join_pod_network``: a network namespace without a path joins the pod network too (the
    pod owner whose network is carried into the VM after create; docs/networking.md).
    ``pod_network``: the guest path a network namespace given by path becomes (default: the
    guest's root namespace, :data:`GUEST_POD_NETNS`; the owner's own namespace when the pod
    network lives there).
    On failure everything already mounted for this container is unmounted again.
    """
    spec = copy.deepcopy(spec)
    root = spec.get("root")
    if not isinstance(root, dict) or not isinstance(root.get("path"), str):
        raise ConfigError("config.json: root.path is required")
    rootfs = Path(root["path"])
    if not rootfs.is_absolute():
        rootfs = bundle / rootfs
    if rootfs_readonly is None:
        rootfs_readonly = bool(root.get("readonly"))
    guest_base = f"{GUEST_SHARE}/{container_id}"
    fds: list[int] = []  # closed at the end: sources, directories of the share
    try:
        rootfs_fd = _open_source(rootfs, "rootfs", fds, held, missing="is not a directory")
        if not stat.S_ISDIR(os.fstat(rootfs_fd).st_mode):
            raise ConfigError(f"rootfs {rootfs} is not a directory")
        shared_fd = hostfs.open_dir(pod.shared_dir)
        fds.append(shared_fd)
        try:
            base_fd = hostfs.make_dir(shared_fd, container_id)
        except FileExistsError:
            raise ConfigError(
                f"container {container_id} already has files in pod {pod.id}"
            ) from None
        fds.append(base_fd)
        try:
            hostfs.bind_into(base_fd, "rootfs", rootfs_fd, readonly=rootfs_readonly)
            for mount in spec.get("mounts") or []:
                if not isinstance(mount, dict) or not is_bind(mount):
                    continue
                source = Path(str(mount.get("source", "")))
                if not source.is_absolute():
                    source = bundle / source
                source_fd = _open_source(source, "bind mount source", fds, held)
                guest_tmpfs = pod_shm.guest_mount(mount, source_fd)
                if guest_tmpfs is not None:  # an engine's /dev/shm: a tmpfs in the guest
                    mount.clear()
                    mount.update(guest_tmpfs)
                    continue
                options = mount.get("options") or []
                readonly = "ro" in options
                from_host = any(o in _FROM_HOST for o in options if isinstance(o, str))
                mount["source"] = _share_volume(
                    pod,
                    shared_fd,
                    container_id,
                    source_fd,
                    readonly,
                    from_host,
                    recursive=_is_recursive(mount),
                )
            _rewrite_namespaces(spec, guest_pids, join_pod_network, pod_network or GUEST_POD_NETNS)
            guest_cgroup.resolve(spec)
            linux = spec.get("linux")
            if isinstance(linux, dict):
                linux.pop("cgroupsPath", None)  # the agent places the container in the guest
        except BaseException:
            unshare_container_files(pod, container_id)
            raise
    finally:
        for fd in fds:
            os.close(fd)
    return f"{guest_base}/rootfs", spec


def _rewrite_namespaces(
    spec: dict[str, Any],
    guest_pids: Callable[[str], int | None],
    join_pod_network: bool = False,
    pod_network: str = GUEST_POD_NETNS,
) -> None:
    linux = spec.get("linux")
    if not isinstance(linux, dict):
        return
    rewritten = []
    for ns in linux.get("namespaces") or []:
        if not isinstance(ns, dict):
            raise ConfigError("config.json: linux.namespaces entries must be objects")
        path = ns.get("path")
        if not path and join_pod_network and ns.get("type") == "network":
            ns = {"type": "network", "path": GUEST_POD_NETNS}
        elif path:
            if ns.get("type") == "network":
                ns = {"type": "network", "path": pod_network}
            else:
                pid = guest_pids(str(path))
                if pid is None:
                    raise ConfigError(
                        f"namespace path {path} does not belong to a container of this pod"
                    )
                ns = {"type": ns["type"], "path": f"/proc/{pid}/ns/{_ns_file(ns['type'])}"}
        rewritten.append(ns)
    linux["namespaces"] = rewritten


def _ns_file(kind: str) -> str:
    return {"network": "net", "mount": "mnt"}.get(kind, kind)


def _open_source(
    path: Path, what: str, fds: list[int], held: HeldSources | None, missing: str = "does not exist"
) -> int:
    """A new fd (appended to ``fds``) of the source ``path``: a copy of the one ``held``
    for it, else ``hostfs.open_source``; ConfigError "``what`` ``path`` ``missing``" when
    it does not exist, naming ``what`` when it cannot be opened."""
    held_fd = held.fd(path) if held is not None else None
    try:
        fd = os.dup(held_fd) if held_fd is not None else hostfs.open_source(path)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} {missing}") from None
    except OSError as exc:
        raise ConfigError(f"cannot open {what} {path}: {exc.strerror}") from None
    fds.append(fd)
    return fd


#: Directory of the share holding the volumes: not a valid container id (those start with a
#: letter or digit), so it never collides with a container's directory.
VOLUMES = "_volumes"


@contextlib.contextmanager
def _volume_lock(pod: Pod) -> Iterator[None]:
    """Serialise the volume bookkeeping of ``pod`` (CLI calls run in separate processes).
    The lock file lives in the pod's host directory and goes with it."""
    fd = os.open(pod.dir / "volumes.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _share_volume(
    pod: Pod,
    shared_fd: int,
    container_id: str,
    source_fd: int,
    readonly: bool,
    from_host: bool = False,
    recursive: bool = True,
) -> str:
    """Mount ``source_fd`` into the share once per pod and mode (read-only or not, receiving
    host mounts or not, with submounts or not: :func:`hostfs.bind_into`) unless it is
    already; record ``container_id`` as a user; the guest path."""
    info = os.fstat(source_fd)
    key = f"{info.st_dev:x}-{info.st_ino:x}-{'ro' if readonly else 'rw'}"
    if from_host:
        key += "-slave"
    if not recursive:
        key += "-norec"
    users = pod.dir / "volume-users" / key
    volumes = pod.shared_dir / VOLUMES
    with _volume_lock(pod):
        if not hostfs.mounts_below(volumes / key):
            volumes_fd = _volumes_dir(shared_fd)
            try:
                _remove_entry(volumes_fd, key)  # a mountpoint left by an interrupted unshare
                hostfs.bind_into(volumes_fd, key, source_fd, readonly, from_host, recursive)
            finally:
                os.close(volumes_fd)
        users.mkdir(parents=True, exist_ok=True)
        (users / container_id).touch()
    return f"{GUEST_SHARE}/{VOLUMES}/{key}"


def _volumes_dir(shared_fd: int) -> int:
    """An O_PATH fd of the share's volume directory, made if missing. The guest may have
    replaced it (a symlink, a file): that entry is removed, never followed, and a new
    directory made (volumes it moved away stay where they are until the pod goes)."""
    for _attempt in range(3):
        try:
            return _open_volumes(shared_fd)
        except FileNotFoundError:
            pass
        except OSError:  # ELOOP, ENOTDIR: not a directory of ours
            _remove_entry(shared_fd, VOLUMES)
        with contextlib.suppress(FileExistsError):
            os.close(hostfs.make_dir(shared_fd, VOLUMES))
    raise ConfigError(
        f"cannot make {VOLUMES} in the share of this pod: the guest keeps replacing it"
    )


def _open_volumes(shared_fd: int) -> int:
    """An O_PATH fd of the share's volume directory, which the guest can replace: opened
    below the (host-controlled) shared directory without following a symlink."""
    return os.open(
        VOLUMES, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=shared_fd
    )


def _remove_entry(parent_fd: int, name: str) -> None:
    """Remove ``name`` (an empty directory or a file) from ``parent_fd``, not following it."""
    try:
        try:
            os.rmdir(name, dir_fd=parent_fd)
        except NotADirectoryError:
            os.unlink(name, dir_fd=parent_fd)
    except OSError:
        pass


def _release_volumes(pod: Pod, container_id: str) -> None:
    """Drop ``container_id`` from every volume's users; unmount volumes nobody uses now."""
    registry = pod.dir / "volume-users"
    if not registry.is_dir():
        return
    volumes = pod.shared_dir / VOLUMES
    with _volume_lock(pod):
        for users in registry.iterdir():
            with contextlib.suppress(FileNotFoundError):
                (users / container_id).unlink()
            if any(users.iterdir()):
                continue
            hostfs.unmount_tree(volumes / users.name, trusted=pod.shared_dir)
            if hostfs.mounts_below(volumes / users.name):
                continue  # never delete through a mount
            with contextlib.suppress(OSError):
                shared_fd = hostfs.open_dir(pod.shared_dir)
                try:
                    volumes_fd = _open_volumes(shared_fd)
                    try:
                        _remove_entry(volumes_fd, users.name)
                    finally:
                        os.close(volumes_fd)
                finally:
                    os.close(shared_fd)
            users.rmdir()


def unshare_container_files(pod: Pod, container_id: str) -> None:
    """Unmount and remove ``<pod>/shared/<container-id>`` and release the container's volumes
    (unmounting those no other container uses); idempotent.

    The guest may have renamed or replaced anything below the shared directory: mounts are
    detached only where they really are (hostfs.unmount_tree) and nothing is removed while
    a mount is left below (``rmtree`` itself never follows a symlink).
    """
    base = pod.shared_dir / container_id
    hostfs.unmount_tree(base, trusted=pod.shared_dir)
    _release_volumes(pod, container_id)
    if hostfs.mounts_below(base):
        return  # never delete through a mount
    import shutil

    shutil.rmtree(base, ignore_errors=True)
