"""``python -m sandbox.run.teardown ROOT POD CONTAINER``: the end of a foreground run's VM.

:mod:`sandbox.run.foreground` marks the run's pod ``stopping``, prints the container's
status and exits; a detached child of it (its own session, stdio on /dev/null) execs this,
so that the agent's Shutdown round trip and the wait for QEMU are off the command's path.
A fresh interpreter, because gRPC does not survive a fork: it asks the agent to power the VM
off (the guest syncs its file systems first: what the container wrote to volumes is on the
host), undoes the container's file sharing, waits for QEMU to exit (then stops it the hard
way) and removes everything the run started (:meth:`sandbox.pod.lifecycle.Pod.destroy`).

Exit status 0 once the pod is gone (or was already), 1 if the teardown failed (what is left is
recorded: ``pysandbox rm -f`` / ``delete --force`` removes it), 2 for bad arguments.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

USAGE = "usage: python -m sandbox.run.teardown ROOT POD CONTAINER"


def tear_down(root: Path, pod_id: str, container_id: str) -> None:
    """Power the ``stopping`` pod ``pod_id`` under ``root`` off and remove it (see the
    module's docstring); nothing for a pod that no longer exists. SandboxError on failure."""
    from sandbox.errors import NotFoundError, SandboxError
    from sandbox.pod.lifecycle import Pod
    from sandbox.pod.sharing import unshare_container_files

    try:
        pod = Pod.load(root, pod_id)
    except NotFoundError:
        return
    pod.request_power_off()
    with contextlib.suppress(SandboxError):
        unshare_container_files(pod, container_id)
    pod.finish_stop()


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(USAGE, file=sys.stderr)
        return 2
    from sandbox.errors import SandboxError

    try:
        tear_down(Path(argv[0]), argv[1], argv[2])
    except SandboxError as exc:
        print(f"pysandbox teardown: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
