"""The watcher of a detached run's shim (see :mod:`sandbox.runtime.shim`).

``python -S -m sandbox.runtime.shim_watch PIDFD[,PODFD] ROOT NAME [TIMEOUT]``, started by
:func:`sandbox.runtime.shim.spawn` with ``PIDFD``, a pidfd of the shim, and maybe ``PODFD``, one
of a pod process the container cannot do without (its virtiofsd): it waits until the shim is
gone (``TIMEOUT`` seconds at most), then becomes ``python -m sandbox.run.monitor ROOT NAME``
(with ``--kill`` if the timeout passed, ``--broken`` if the pod process went first: the
container's processes then wait for their files for ever, so the shim would never end on its
own), which releases the run's VM. It keeps root's
capabilities (the shim has none): releasing a run kills its jailed QEMU and unmounts its
files. Until then it is a bare interpreter: it imports nothing but ``os``, ``select`` and
``sys`` (the package's ``__init__`` included), so that a run costs little memory for it.
"""

import os
import select
import sys


def main(argv: list[str]) -> None:
    """See the module docstring; exit status 2 for a wrong command line."""
    if len(argv) not in (3, 4):
        sys.exit(2)
    pidfds, root, name = [int(fd) for fd in argv[0].split(",")], argv[1], argv[2]
    timeout = float(argv[3]) if len(argv) == 4 else None
    poller = select.poll()
    for fd in pidfds:
        poller.register(fd, select.POLLIN)
    ready = {fd for fd, _ in poller.poll(None if timeout is None else int(timeout * 1000) + 1)}
    for fd in pidfds:
        os.close(fd)
    monitor = [sys.executable, "-m", "sandbox.run.monitor", root, name]
    if not ready:
        monitor.append("--kill")
    elif pidfds[0] not in ready:
        monitor.append("--broken")
    os.execv(sys.executable, monitor)


if __name__ == "__main__":
    main(sys.argv[1:])
