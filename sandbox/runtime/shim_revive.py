"""A shim's helper after its pod's agent proxy died: have a new proxy started.

The shim (:mod:`sandbox.runtime.shim`) runs ``python -S`` without the pod machinery; when
its connection to the proxy breaks before the exit status came, it runs this module in a
short-lived full interpreter: ``main([ROOT, CONTAINER_ID])`` returns 0 once the pod's agent
answers again (through a new proxy if the old one died, as any verb would start one), 1 if
the container or its VM is gone, and 3 (:data:`sandbox.runtime.shim.WAIT_FOR_PROXY`) when
the proxy is gone and this process may not start the next one: the shim runs without
capabilities, and a pod with a port-forward listener needs ``setns`` into its network
namespace (CAP_SYS_ADMIN) to give a new proxy its listener; any pysandbox command reaching
the pod then starts one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sandbox.pod.lifecycle import Pod


def main(argv: list[str]) -> int:
    """See the module docstring."""
    from sandbox.errors import SandboxError
    from sandbox.pod.lifecycle import Pod
    from sandbox.runtime.record import ContainerRecord

    if len(argv) != 2:
        return 2
    root, container_id = Path(argv[0]), argv[1]
    time.sleep(0.2)
    try:
        pod = Pod.load(root, ContainerRecord.load(root, container_id).pod_id)
        qemu = pod.process("qemu")
        if qemu is None or not qemu.alive():
            return 1
        proxy = pod.process("proxy")
        if (proxy is None or not proxy.alive()) and not _may_start_proxy(pod):
            return 3
        with pod.client(timeout=10.0) as agent:
            agent.health()
    except (SandboxError, OSError):
        return 1
    return 0


def _may_start_proxy(pod: Pod) -> bool:
    """Whether this process can start the pod's next proxy as it should be: any process can
    for a pod without a network namespace; one with one needs CAP_SYS_ADMIN (``setns``)."""
    network = pod.record.network
    if not isinstance(network, dict) or network.get("mode") != "netns":
        return True
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) & (1 << 21))  # CAP_SYS_ADMIN
    return False
