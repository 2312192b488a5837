"""A pod network set up after ``create``: carried into the running VM at ``start``.

With a user namespace, podman (and containerd 1.7 for user-namespaced pods) creates no
network namespace up front: it runs the runtime's ``create``, then CNI/netavark in the
network namespace of the ``--pid-file`` process, then ``start``. That process is the pod
owner's host stand-in, which ``create`` put in a new, empty network namespace
(:mod:`sandbox.runtime.standin_netns`), so by ``start`` that namespace holds the pod's
interfaces. :func:`attach_after_create` carries them into the VM exactly as a namespace
given by path is carried at boot (:func:`sandbox.pod.network.attach`: recorded first, taps
and tc redirects), except that the NICs are hot-plugged into the running guest over QMP
(the same ``netdev_add``/``device_add`` as for a VM restored from a template) and the agent
then configures them (``ConfigureNetwork``; it waits for each hot-plugged NIC).

A namespace still empty at ``start`` (``--network none``, a runtime-CLI user) changes
nothing: the pod keeps loopback only.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sandbox.errors import NetworkError, StateError

if TYPE_CHECKING:
    from hypervisor.process import ProcessHandle
    from sandbox.pod.lifecycle import Pod
    from sandbox.pod.network import NetworkConfig


def standin_netns(standin: ProcessHandle) -> tuple[Path, str]:
    """The network namespace of ``standin`` (a live stand-in): its ``/proc/<pid>/ns/net``
    path and :func:`sandbox.pod.network.identity`, read while the process is known to be
    that stand-in (pid and start time), so a reused pid is never taken for it.

    StateError if the stand-in is gone; ConfigError (from ``open_netns``) if it is in the
    host's network namespace, which is never carried into a VM.
    """
    from sandbox.pod import network

    path = Path(f"/proc/{standin.pid}/ns/net")
    if not standin.alive():
        raise StateError("the container's stand-in process is gone")
    nsfd = network.open_netns(path)
    try:
        if not standin.alive():
            raise StateError("the container's stand-in process is gone")
        return path, network.identity(nsfd)
    finally:
        os.close(nsfd)


def attach_after_create(
    pod: Pod, netns: Path, expect: str, container_id: str = ""
) -> NetworkConfig | None:
    """Carry the interfaces of ``netns`` (identity ``expect``) into ``pod``'s running VM;
    the guest's network configuration, or None when the namespace has no interface to carry.
    ``container_id``: configured in that container's network namespace in the guest (a
    container with a user namespace: its netns is owned by it, as under runc), else in the
    guest's root one.

    Call it with the pod's lock held. Only for a pod that has no network yet (StateError
    otherwise). NetworkError/ConfigError for an unusable namespace, QMPError when a NIC
    cannot be hot-plugged, AgentError when the guest cannot configure it; whatever was
    made is in the pod record, which ``Pod.destroy`` cleans up from.
    """
    from hypervisor.qemu_args import NicConfig
    from sandbox.pod import network

    if pod.record.network:
        raise StateError(f"pod {pod.id} already has a network")
    nsfd = network.open_netns(netns)
    try:
        if network.identity(nsfd) != expect:
            raise NetworkError(f"{netns} no longer names the pod's network namespace")
        if not network.read_config(nsfd).interfaces:
            return None
    finally:
        os.close(nsfd)
    if container_id:
        with pod.client() as agent:  # before anything is made for it
            agent.require_protocol(6, "a container's own pod network")
    began = time.monotonic()
    attached = network.attach(netns, pod.remember_network, expect=expect)
    attached_at = time.monotonic()
    try:
        vm = pod.running_vm()
        for index, (nic, fd) in enumerate(
            zip(attached.config.interfaces, attached.tap_fds, strict=True)
        ):
            vm.hotplug_nic(NicConfig(nic.mac, "tap", fd, nic.mtu), index)
    finally:
        for fd in attached.tap_fds:
            os.close(fd)  # QEMU holds the taps now; they vanish when it exits
    plugged_at = time.monotonic()
    with pod.client() as agent:
        files = agent.configure_network(attached.config, container_id)
    pod.note(
        f"network after create: {len(attached.config.interfaces)} interface(s) of {netns};"
        f" taps {attached_at - began:.3f}s, hot-plug {plugged_at - attached_at:.3f}s,"
        f" guest configured {time.monotonic() - plugged_at:.3f}s"
    )
    pod.record.network = {
        **(pod.record.network or {}),
        "after_create": True,
        "container": container_id,
        "guest_files": {"resolv_conf": files.resolv_conf, "hosts": files.hosts},
    }
    pod.save()
    return attached.config
