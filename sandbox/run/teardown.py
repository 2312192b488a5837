"""``python -m sandbox.run.teardown ROOT POD CONTAINER --owner PID:START``: the end of a run's VM.

Exec'd by the watcher of the run's process (:mod:`sandbox.run.owner_watch`) once that
process is gone, so that the agent's Shutdown round trip and the wait for QEMU are off the
command's path, and so that a run killed with SIGKILL leaves nothing running either.

A foreground run (:mod:`sandbox.run.foreground`) marks its pod ``stopping``, prints the
container's status and exits; a killed one leaves its pod ``booting`` or ``running``. Either
way this asks the agent to power the VM off (the guest syncs its file systems first: what the
container wrote to volumes is on the host), undoes the container's file sharing, waits for
QEMU to exit (then stops it the hard way) and removes everything the run started
(:meth:`sandbox.pod.lifecycle.Pod.destroy`) — only while the pod's recorded owner is still
``PID:START``: a later pod of the same name is another run's. A ``run -d`` hands its pod over
to its monitor once the run has started (its ``monitored`` file): then nothing is done here;
one that died before leaves a record it created (``creator`` ``PID:START``), removed here
with its pod, as a failed ``run -d`` removes it itself.

Exit status 0 once the pod is gone (or was not ours), 1 if the teardown failed (what is left
is recorded: ``pysandbox rm -f NAME`` / ``pod stop NAME`` removes it), 2 for bad arguments.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path

from hypervisor.process import ProcessHandle

USAGE = "usage: python -m sandbox.run.teardown ROOT POD CONTAINER --owner PID:START"


def tear_down_orphan(root: Path, pod_id: str, container_id: str, owner: ProcessHandle) -> None:
    """What the watcher of ``owner`` does once it is gone (see the module's docstring);
    SandboxError on failure."""
    from sandbox.errors import NotFoundError, SandboxError
    from sandbox.pod.lifecycle import Pod
    from sandbox.pod.record import PodStatus
    from sandbox.pod.sharing import unshare_container_files
    from sandbox.run.monitor import MONITORED
    from sandbox.runtime.record import ContainerRecord

    record: ContainerRecord | None = None
    with contextlib.suppress(SandboxError, OSError):
        record = ContainerRecord.load(root, container_id)
    if record is not None and ProcessHandle.from_json(record.data.get("creator")) != owner:
        record = None  # not one this process was creating
    if record is not None and (record.dir / MONITORED).exists():
        return  # a detached run handed over to its monitor
    try:
        pod = Pod.load(root, pod_id)
    except NotFoundError:
        pod = None
        _remove_unrecorded(root, pod_id)
    if pod is not None and pod.record.owner == owner:
        if pod.status is PodStatus.RUNNING:
            pod.mark_stopping()  # the run was killed before it could
        pod.request_power_off()
        with contextlib.suppress(SandboxError):
            unshare_container_files(pod, container_id)
        pod.finish_stop()
    if record is not None:
        shutil.rmtree(record.dir, ignore_errors=True)


def _remove_unrecorded(root: Path, pod_id: str) -> None:
    """A pod whose record is gone: usually removed already (nothing is found then); or its
    ``--root`` was deleted while the VM was still being torn down (``rm -rf ROOT`` right after
    a foreground run returned; breaker4). Whatever of it is left is ended from the places a
    run's pod always has: its host cgroup (``pysandbox/POD-ROOTHASH`` below this process's
    cgroup, the run's: every process of the pod runs in it; SIGKILLed, the directory
    removed) and its share's mount point (detached); then its empty directories go."""
    from sandbox.errors import SandboxError
    from sandbox.pod import host_cgroup, hostfs
    from sandbox.pod import record as pod_record
    from sandbox.run.launch import default_cgroup

    directory = pod_record.directory(root, pod_id)
    if (directory / pod_record.RECORD_FILE).exists():
        return  # a new pod of that name (it records itself before it makes its cgroup)
    with contextlib.suppress(SandboxError, OSError):
        req = host_cgroup.request(default_cgroup(root, pod_id), False, pod_id)
        placement = host_cgroup.plan(req)
        placement.created = list(placement.dirs)  # the leaves: their parents are shared
        host_cgroup.remove(placement, wait=0)
    with contextlib.suppress(OSError):
        hostfs.unmount_tree(directory)
        if not hostfs.mounts_below(directory):
            shutil.rmtree(directory, ignore_errors=True)


def _owner(text: str) -> ProcessHandle | None:
    pid, _, start = text.partition(":")
    if not (pid.isdigit() and start.isdigit()):
        return None
    return ProcessHandle.from_json({"pid": int(pid), "start": int(start)})


def main(argv: list[str]) -> int:
    owner = _owner(argv[4]) if len(argv) == 5 and argv[3] == "--owner" else None
    if owner is None:
        print(USAGE, file=sys.stderr)
        return 2
    from sandbox.errors import SandboxError

    try:
        tear_down_orphan(Path(argv[0]), argv[1], argv[2], owner)
    except SandboxError as exc:
        print(f"pysandbox teardown: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
