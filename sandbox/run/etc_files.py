"""/etc/hosts, /etc/hostname and /etc/resolv.conf of a run's container, as docker gives them.

docker and podman bind-mount these three files of their own over the image's, in every
container: writable by the container's root, owned by root, mode 0644, and private to the
container (a write changes neither the host's files nor another container's). A run does the
same with files in guest memory: the host writes them into the run's VM (WriteFile, under
:data:`GUEST_DIR`, a tmpfs) and the container gets them as read-write bind mounts. A write
stays in that VM, which has no other container; it is charged to the container's memory
cgroup as every tmpfs page it writes.

Contents (docker's ``buildHostsFile``/``BuildHostnameFile`` layout; podman puts the host's
own /etc/hosts first, which a VM-isolated run does not show):

* ``hosts``: the loopback names docker writes, then the container's address with its
  hostname (and ``--name`` when that differs, as podman adds it): 10.0.2.15 with
  ``--network user``, 127.0.0.1 without a network (podman's choice for ``--network none``;
  docker writes no such line there, and the hostname would not resolve);
* ``hostname``: the hostname and a newline;
* ``resolv.conf``: with ``--network user`` only, QEMU's DNS forwarder. Without a network
  podman mounts none (4.3, observed): the image's file, if any, shows through.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from sandbox.pod import network

if TYPE_CHECKING:  # grpc: imported while the pod boots (run.foreground)
    from sandbox.pod.agent_client import ContainerClient

#: The guest directory holding the files (agent.pid1.SHARE_ROOT: a tmpfs directory made at
#: boot, mode 0711), as ``etc-<container id>-<file>``.
GUEST_DIR = "/run/pysandbox"
#: docker's loopback lines of /etc/hosts (moby's libnetwork/etchosts defaults).
LOOPBACK_HOSTS = (
    ("127.0.0.1", "localhost"),
    ("::1", "localhost ip6-localhost ip6-loopback"),
    ("fe00::0", "ip6-localnet"),
    ("ff00::0", "ip6-mcastprefix"),
    ("ff02::1", "ip6-allnodes"),
    ("ff02::2", "ip6-allrouters"),
)
#: Bind-mount options: read-write, as docker's; nothing executable or special through them.
MOUNT_OPTIONS = ("rbind", "rw", "nosuid", "nodev", "noexec")


def contents(hostname: str, name: str, user_network: bool) -> dict[str, bytes]:
    """``{container path: content}`` of a run whose hostname is ``hostname`` and name
    ``name`` (both words of letters, digits and ``_.+-``, checked by the caller), with
    ``--network user`` or without a network."""
    address = network.USER_ADDRESS.partition("/")[0] if user_network else "127.0.0.1"
    names = hostname if name == hostname else f"{hostname} {name}"
    hosts = [*LOOPBACK_HOSTS, (address, names)]
    files = {
        "/etc/hosts": "".join(f"{addr}\t{words}\n" for addr, words in hosts),
        "/etc/hostname": f"{hostname}\n",
    }
    if user_network:
        files["/etc/resolv.conf"] = f"nameserver {network.USER_DNS}\n"
    return {path: text.encode() for path, text in files.items()}


def write(
    client: ContainerClient, container_id: str, files: dict[str, bytes]
) -> list[dict[str, Any]]:
    """Write ``files`` (:func:`contents`) into the guest through ``client``; the spec
    mounts that bind them into container ``container_id`` (guest paths: add them after the
    spec's host paths were rewritten). AgentError as the agent's WriteFile fails (the
    first file's, in ``files``' order, when several do).

    The files are written at once, one call each from a thread of its own (the channel
    carries them side by side): one round trip to the guest instead of one per file."""
    sources = guest_sources(container_id, files)
    failures: dict[str, BaseException] = {}

    def write_one(destination: str) -> None:
        try:
            client.write_file(sources[destination], files[destination])
        except BaseException as exc:  # raised in the caller's thread below
            failures[destination] = exc

    threads = [threading.Thread(target=write_one, args=(d,), daemon=True) for d in files]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for destination in files:
        if destination in failures:
            raise failures[destination]
    return mounts(sources)


def guest_sources(container_id: str, files: dict[str, bytes]) -> dict[str, str]:
    """The guest path each of ``files`` (:func:`contents`) is written to, by destination."""
    return {
        destination: f"{GUEST_DIR}/etc-{container_id}-{destination.rpartition('/')[2]}"
        for destination in files
    }


def mounts(sources: dict[str, str]) -> list[dict[str, Any]]:
    """The spec mounts that bind :func:`guest_sources` into the container."""
    return [
        {
            "destination": destination,
            "type": "bind",
            "source": source,
            "options": list(MOUNT_OPTIONS),
        }
        for destination, source in sources.items()
    ]
