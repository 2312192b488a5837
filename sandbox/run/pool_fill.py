"""The filler of ``run``'s warm pool (:mod:`sandbox.run.pool`), a program of its own.

``python -m sandbox.run.pool_fill fill ROOT IDLE KIND_JSON``, spawned detached by
:func:`sandbox.run.pool.refill`: sets its CPU priority to SCHED_IDLE, starts a run's owner
watcher for itself (:func:`sandbox.run.launch.watch_owner`), boots one pod of the kind with
itself as the owner, marks it waiting, prints one line (to ``ROOT/logs/pool.log``) and
becomes ``sleep IDLE``, the pod's timer. When the timer ends (its time is up, or it is
killed) the watcher tears the pod down, unless a run took it (the run is then the owner).
Exit status 1 when the boot failed (its error on stderr; the boot rolled itself back), 2
for a wrong command line.
"""

from __future__ import annotations

import os

# Before the imports: everything the filler does, its children included, runs only when
# the host's CPUs have nothing else to do.
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from sandbox.errors import SandboxError  # noqa: E402
from sandbox.pod import host_cgroup  # noqa: E402
from sandbox.pod.lifecycle import Pod  # noqa: E402
from sandbox.run import pool  # noqa: E402
from sandbox.run.launch import CONTAINER_ID, default_cgroup, watch_owner  # noqa: E402


def fill(root: Path, kind: pool.Kind) -> Pod:
    """Boot one pod of ``kind`` (the filler's work; this process is its owner, and a run's
    owner watcher watches it: if the filler or its timer is killed while the pod still
    waits, the pod goes) and mark it waiting. The boot's errors as they are (it rolls itself
    back); OSError if the watcher cannot be started."""
    pod_id = f"{pool.PREFIX}{os.urandom(6).hex()}"
    req = host_cgroup.request(default_cgroup(root, pod_id), False, pod_id)
    placement = host_cgroup.plan(req)
    placement.containers[CONTAINER_ID] = dict(kind.limits)
    watch = watch_owner(root, pod_id, CONTAINER_ID)
    try:
        pod = Pod.boot(
            root,
            pod_id,
            memory_mib=kind.memory_mib,
            cpus=kind.cpus,
            user_network=kind.user_network,
            privileged_files=kind.privileged_files,
            cgroup=(req, placement),
            cached_files=kind.cached_files,
            owner=watch.owner,
            cgroup_layout=kind.cgroup_layout,
        )
    except BaseException:
        watch.dismiss()
        raise
    with pod.locked():
        pod.record.pool = kind.key()
        pod.save()
    return pod


def _main(argv: list[str]) -> int:
    """``fill ROOT IDLE KIND_JSON``, then become the pod's timer (see the module docstring)."""
    if len(argv) != 4 or argv[0] != "fill":
        print("usage: python -m sandbox.run.pool_fill fill ROOT IDLE KIND", file=sys.stderr)
        return 2
    root, idle = Path(argv[1]), float(argv[2])
    started = time.monotonic()
    try:
        pod = fill(root, pool.Kind.from_json(json.loads(argv[3])))
    except (SandboxError, ValueError, OSError) as exc:
        print(f"pysandbox pool: filling failed: {exc}", file=sys.stderr)
        return 1
    print(f"pysandbox pool: {pod.id} ready in {time.monotonic() - started:.2f}s", flush=True)
    # The pod's owner (this pid, this start time) becomes a sleep: when it ends, however it
    # ends, the owner watcher tears the pod down unless a run has taken it (then the owner
    # it checks is the run's).
    os.execvp("sleep", ["sleep", f"{idle:.3f}"])


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
