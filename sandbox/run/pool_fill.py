"""The filler of ``run``'s warm pool (:mod:`sandbox.run.pool`), a program of its own.

``python -m sandbox.run.pool_fill fill ROOT IDLE KIND_JSON``, spawned detached at the idle
CPU priority by :func:`sandbox.run.pool.refill`: boots one pod of the kind (this process its
owner), marks it waiting, prints one line (to ``ROOT/logs/pool.log``), then becomes the
pod's timer, a ``/bin/sh`` that sleeps IDLE seconds and then runs ``python -m
sandbox.run.pool_fill expire ROOT POD KEY`` (the pod goes if it still waits). Exit status 1
when the boot failed (its error on stderr; the boot rolled itself back), 2 for a wrong
command line.
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

from hypervisor.process import ProcessHandle  # noqa: E402
from sandbox.errors import SandboxError  # noqa: E402
from sandbox.pod import host_cgroup  # noqa: E402
from sandbox.pod.lifecycle import Pod  # noqa: E402
from sandbox.run import pool  # noqa: E402
from sandbox.run.launch import CONTAINER_ID, default_cgroup  # noqa: E402


def fill(root: Path, kind: pool.Kind) -> Pod:
    """Boot one pod of ``kind`` (the filler's work; this process is its owner) and mark it
    waiting. The boot's errors as they are (it rolls itself back)."""
    pod_id = f"{pool.PREFIX}{os.urandom(6).hex()}"
    req = host_cgroup.request(default_cgroup(root, pod_id), False, pod_id)
    placement = host_cgroup.plan(req)
    placement.containers[CONTAINER_ID] = dict(kind.limits)
    pod = Pod.boot(
        root,
        pod_id,
        memory_mib=kind.memory_mib,
        cpus=kind.cpus,
        user_network=kind.user_network,
        privileged_files=kind.privileged_files,
        cgroup=(req, placement),
        cached_files=kind.cached_files,
        owner=ProcessHandle.of(os.getpid()),
    )
    with pod.locked():
        pod.record.pool = kind.key()
        pod.save()
    return pod


def _main(argv: list[str]) -> int:
    """``fill ROOT IDLE KIND_JSON`` (then become the timer) or ``expire ROOT POD KEY``."""
    if len(argv) == 4 and argv[0] == "fill":
        root, idle = Path(argv[1]), float(argv[2])
        started = time.monotonic()
        try:
            pod = fill(root, pool.Kind.from_json(json.loads(argv[3])))
        except (SandboxError, ValueError) as exc:
            print(f"pysandbox pool: filling failed: {exc}", file=sys.stderr)
            return 1
        print(f"pysandbox pool: {pod.id} ready in {time.monotonic() - started:.2f}s")
        sys.stdout.flush()
        key = pod.record.pool or ""
        timer = 'sleep "$1"; exec "$2" -m sandbox.run.pool_fill expire "$3" "$4" "$5"'
        os.execv(
            "/bin/sh", ["sh", "-c", timer, "sh", str(idle), sys.executable, str(root), pod.id, key]
        )
    if len(argv) == 4 and argv[0] == "expire":
        pool.expire(Path(argv[1]), argv[2], argv[3])
        return 0
    print(
        "usage: python -m sandbox.run.pool_fill fill ROOT IDLE KIND | expire ROOT POD KEY",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
