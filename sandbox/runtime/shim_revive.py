"""A shim's helper after its pod's agent proxy died: have a new proxy started.

The shim (:mod:`sandbox.runtime.shim`) runs ``python -S`` without the pod machinery; when
its connection to the proxy breaks before the exit status came, it runs this module in a
short-lived full interpreter: ``main([ROOT, CONTAINER_ID])`` returns 0 once the pod's agent
answers again (through a new proxy if the old one died, as any verb would start one), 1 if
the container or its VM is gone.
"""

from __future__ import annotations

import time
from pathlib import Path


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
        with pod.client(timeout=10.0) as agent:
            agent.health()
    except (SandboxError, OSError):
        return 1
    return 0
