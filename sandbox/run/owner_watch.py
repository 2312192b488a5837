"""The watcher of a run's own process: its VM goes when the run does, however it ends.

``python -S -m sandbox.run.owner_watch PIDFD ROOT POD CONTAINER PID:START``, started by
:func:`sandbox.run.launch.watch_owner` before the run boots its pod, with ``PIDFD`` a pidfd
of the run's process (``PID``, started at ``START`` clock ticks after boot: the pod's
recorded :attr:`~sandbox.pod.record.PodRecord.owner`). It waits until that process is gone
— an exit, a crash, SIGKILL — then becomes ``python -m sandbox.run.teardown ROOT POD
CONTAINER --owner PID:START`` (exec), which tears down the pod if that process still owns
it and removes the record of a detached run it left half-created
(:func:`sandbox.run.teardown.tear_down_orphan`).

It runs in a session of its own with stdio on /dev/null (Ctrl-C and a closed terminal do
not reach it) and keeps root's capabilities (tearing a pod down kills its jailed QEMU and
unmounts its files). Until the exec it is a bare interpreter importing nothing but ``os``,
``select`` and ``sys`` (the packages' ``__init__`` included), so that a run costs little
memory for it.
"""

import os
import select
import sys


def main(argv: list[str]) -> None:
    """See the module docstring; exit status 2 for a wrong command line."""
    if len(argv) != 5:
        sys.exit(2)
    pidfd, root, pod, container, owner = int(argv[0]), argv[1], argv[2], argv[3], argv[4]
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    while not poller.poll():
        pass
    os.close(pidfd)
    teardown = [sys.executable, "-m", "sandbox.run.teardown", root, pod, container]
    os.execv(sys.executable, [*teardown, "--owner", owner])


if __name__ == "__main__":
    main(sys.argv[1:])
