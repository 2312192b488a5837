"""A new, empty network namespace for a container's ``--pid-file`` stand-in.

Clients treat the pid of ``--pid-file`` as the container's process, and some configure its
network namespace: podman with a user namespace (and containerd 1.7 for user-namespaced
pods) runs the runtime's ``create`` first and then CNI/netavark in ``/proc/<pid>/ns/net``
(docs/networking.md, "Network set up after create"). That pid is our host-side stand-in
(:mod:`sandbox.runtime.shim`); left in the host's network namespace, a client would
configure the *host's*. So a stand-in whose container asks for a network namespace of its
own without a path, or for a user namespace, is moved into a new, empty one before it
reports ready; if that fails, so does ``create``.

With a user namespace in the spec, the new network namespace is owned by a new user
namespace mapped as the spec's ``linux.uidMappings``/``gidMappings`` (runc's container
namespace is owned by the container's user namespace, and clients expect that owner). The
stand-in itself stays in the host's user namespace (it must reach the pod's sockets and
state as root): a helper child creates the user namespace, the stand-in (root, so capable in
every child user namespace) writes its maps from outside, the helper creates the network
namespace and the stand-in joins it with setns(2); then the helper exits. The namespaces
live on as long as the stand-in (or a client's bind mount of its ``ns/net``) holds them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hypervisor import syscalls
from hypervisor.syscalls import CLONE_NEWNET, CLONE_NEWUSER
from sandbox.errors import ConfigError, NetworkError

if TYPE_CHECKING:
    from ocispec.spec import IdMapping, Spec

#: Lines in a uid_map/gid_map at most (user_namespaces(7), since Linux 4.15).
MAX_MAP_LINES = 340


@dataclass(frozen=True)
class StandinNetns:
    """How the stand-in's network namespace is made: ``uid_map``/``gid_map`` are the
    contents of /proc/PID/uid_map and gid_map (lines ``inside outside count``) of the user
    namespace owning it, both empty for a namespace owned by the host's user namespace."""

    uid_map: str = ""
    gid_map: str = ""

    def argv(self) -> list[str]:
        """The shim options that ask for this namespace (parsed by :func:`from_options`)."""
        return ["--new-netns", _compact(self.uid_map), _compact(self.gid_map)]


def for_spec(spec: Spec) -> StandinNetns | None:
    """The namespace ``spec``'s stand-in needs, or None when it may stay where it is (the
    spec names its network namespace by path, or has no network namespace, and has no user
    namespace)."""
    network = spec.namespace("network")
    user = spec.namespace("user")
    if user is None and (network is None or network.path):
        return None
    if user is None or user.path:
        return StandinNetns()
    return StandinNetns(_map_text(spec.uid_mappings), _map_text(spec.gid_mappings))


def from_options(uid_map: str, gid_map: str) -> StandinNetns:
    """The inverse of :meth:`StandinNetns.argv`; ConfigError for a malformed map."""
    return StandinNetns(_expand(uid_map), _expand(gid_map))


def _map_text(mappings: tuple[IdMapping, ...]) -> str:
    return "".join(m.line() for m in mappings)


def _compact(text: str) -> str:
    """``0 100000 65536\\n...`` as ``0:100000:65536,...`` (one argv word; "-" for none)."""
    return ",".join(":".join(line.split()) for line in text.splitlines()) or "-"


def _expand(word: str) -> str:
    if word == "-":
        return ""
    lines = []
    for part in word.split(","):
        fields = part.split(":")
        if len(fields) != 3 or not all(f.isdigit() for f in fields):
            raise ConfigError(f"id map {word!r}: expected inside:outside:count[,...]")
        lines.append(" ".join(fields) + "\n")
    if len(lines) > MAX_MAP_LINES:
        raise ConfigError(f"id map {word!r}: more than {MAX_MAP_LINES} lines")
    return "".join(lines)


def identity(path: str) -> str:
    """``dev:inode`` of namespace file ``path`` (equal iff the same namespace)."""
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def enter(netns: StandinNetns) -> None:
    """Move the calling process into a new, empty network namespace as ``netns`` says.

    Call it while the process has a single thread (unshare(CLONE_NEWNET) of a process
    applies to the calling thread only; the shim calls it first thing). NetworkError naming
    the step that failed; the process is then still where it was, and must not go on as a
    stand-in.
    """
    before = identity("/proc/self/ns/net")
    if netns.uid_map:
        _enter_owned(netns.uid_map, netns.gid_map)
    else:
        _unshare(CLONE_NEWNET, "a network namespace")
    if identity("/proc/self/ns/net") == before:
        raise NetworkError("the container's stand-in is still in its caller's network namespace")


def _unshare(flags: int, what: str) -> None:
    try:
        syscalls.unshare(flags)
    except OSError as exc:
        raise NetworkError(f"cannot create {what} for the stand-in: {exc.strerror}") from None


def _enter_owned(uid_map: str, gid_map: str) -> None:
    """A network namespace owned by a new user namespace with these maps, joined."""
    to_helper_r, to_helper_w = os.pipe()
    to_me_r, to_me_w = os.pipe()
    helper = os.fork()
    if helper == 0:  # pragma: no cover - runs in the forked helper
        status = 1
        try:
            os.close(to_helper_w)
            os.close(to_me_r)
            if syscalls.LIBC.unshare(CLONE_NEWUSER) == 0:
                os.write(to_me_w, b"u")
                if os.read(to_helper_r, 1) == b"m" and syscalls.LIBC.unshare(CLONE_NEWNET) == 0:
                    os.write(to_me_w, b"n")
                    os.read(to_helper_r, 1)  # EOF once the stand-in has joined
                    status = 0
        finally:
            os._exit(status)
    os.close(to_helper_r)
    os.close(to_me_w)
    try:
        _expect(to_me_r, b"u", "a user namespace")
        _write_map(helper, "uid_map", uid_map)
        _write_map(helper, "gid_map", gid_map)
        os.write(to_helper_w, b"m")
        _expect(to_me_r, b"n", "a network namespace in the user namespace")
        fd = os.open(f"/proc/{helper}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            syscalls.setns(fd, CLONE_NEWNET)
        except OSError as exc:
            raise NetworkError(
                f"cannot join the stand-in's network namespace: {exc.strerror}"
            ) from None
        finally:
            os.close(fd)
    finally:
        os.close(to_helper_w)
        os.close(to_me_r)
        os.waitpid(helper, 0)


def _expect(fd: int, token: bytes, what: str) -> None:
    if os.read(fd, 1) != token:
        raise NetworkError(f"cannot create {what} for the stand-in")


def _write_map(pid: int, name: str, text: str) -> None:
    """One write(2), as the kernel requires for an id map."""
    try:
        fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise NetworkError(
            f"cannot write the {name} of the stand-in's user namespace: {exc.strerror}"
        ) from exc
