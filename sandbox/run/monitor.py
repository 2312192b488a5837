"""The end of a detached run (:mod:`sandbox.run.detached`): release its VM once its shim is gone.

Used by ``stop``/``rm`` and by the run's monitor, the watcher of its shim
(``sandbox.runtime.shim_watch``), which becomes ``python -m sandbox.run.monitor ROOT NAME
[--kill]`` once the shim is gone (:func:`main`). Kept apart from
:mod:`sandbox.run.detached` so that the shim needs none of ``run``'s machinery (images,
specs, launching).
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections.abc import Iterator
from pathlib import Path

from sandbox import store as state
from sandbox.errors import NotFoundError, SandboxError
from sandbox.pod.lifecycle import Pod
from sandbox.pod.record import PodStatus
from sandbox.pod.sharing import unshare_container_files
from sandbox.runtime import delete
from sandbox.runtime.record import ContainerRecord

#: Written in the run's directory once the run has started: from then on its shim's watcher
#: releases it when the shim is gone.
MONITORED = "monitored"
#: The run's output file in its directory (``logs`` reads it; the shim appends to it).
LOG_NAME = "run.log"
#: Written in the run's directory by its monitor when the run's ``--timeout`` passed, before
#: it kills the run: ``ps`` then reports exit status 124, as a foreground ``run --timeout``
#: exits (and timeout(1)), not the 137 of the SIGKILL that ended it.
TIMED_OUT = "timed-out"
#: Seconds the watcher of a shim that ended waits for ``run`` to finish starting the run.
ARM_TIMEOUT = 120.0


@contextlib.contextmanager
def run_lock(root: Path, name: str) -> Iterator[state.Lock]:
    """The run's lock; discard it (``Lock.discard``) once the run's record is gone."""
    with state.locked(root, f"run-{state.pod_dir_name(name)}") as lock:
        yield lock


def load_run(root: Path, name: str) -> ContainerRecord:
    """The record of detached run ``name``; NotFoundError when there is no such run."""
    try:
        record = ContainerRecord.load(root, name)
    except NotFoundError:
        raise NotFoundError(f"no such run: {name}") from None
    if not isinstance(record.data.get("run"), dict):
        raise NotFoundError(f"no such run: {name} (a runtime container: use kill/delete)")
    return record


def wait_shim(record: ContainerRecord, timeout: float | None) -> bool:
    """Wait until the run's shim is gone; True if it is. ``None`` waits forever."""
    handle = record.shim
    if handle is None:
        return True
    try:
        pidfd = os.pidfd_open(handle.pid)
    except OSError:  # gone already, or no pidfds (Linux < 5.3): poll
        return handle.wait(float("inf") if timeout is None else timeout)
    try:
        if not handle.alive():  # the pidfd may name a reused pid: check after opening it
            return True
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        deadline = None if timeout is None else time.monotonic() + timeout
        while handle.alive():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if left == 0.0:
                return False
            poller.poll(None if left is None else int(left * 1000) + 1)
        return True
    finally:
        os.close(pidfd)


def release(root: Path, name: str) -> None:
    """Once the run's process is gone: power its VM off and unmount its files, keeping the
    record, log and exit status (or, for ``--rm``, removing everything). Takes the run
    lock; idempotent; a run already removed is left alone."""
    with run_lock(root, name) as lock:
        try:
            record = load_run(root, name)
        except NotFoundError:
            lock.discard()
            return
        if record.data["run"].get("remove"):
            delete.delete(root, name, force=True)
            lock.discard()
            return
        try:
            pod = Pod.load(root, record.pod_id)
        except NotFoundError:
            return
        with contextlib.suppress(SandboxError):
            unshare_container_files(pod, name)
        pod.stop()


def release_after_shim(root: Path, name: str, broken: bool = False) -> None:
    """The monitor's work, run by the watcher of run ``name``'s shim once the shim is done:
    wait until the run had started (its ``monitored`` file) — or give up if the run is
    removed meanwhile or :data:`ARM_TIMEOUT` passes — and until the shim is gone, then
    :func:`release` it.

    ``broken``: the pod lost a process the container needs (its virtiofsd) while the shim
    runs; the container's processes wait for their files for ever, so the shim cannot end on
    its own: the cause goes into the run's log (what ``logs`` shows), the shim is killed
    and the VM released (``ps`` then shows the run exited, with no status)."""
    directory = root / name
    deadline = time.monotonic() + ARM_TIMEOUT
    while not (directory / MONITORED).exists():
        if not directory.exists() or time.monotonic() > deadline:
            return
        time.sleep(0.1)
    try:
        record = load_run(root, name)
    except NotFoundError:
        return
    if broken:
        _stop_broken(root, record)
    wait_shim(record, 15.0)
    release(root, name)


def _stop_broken(root: Path, record: ContainerRecord) -> None:
    """The ``broken`` case of :func:`release_after_shim`: log why, kill the shim. Not for a
    pod already being stopped or removed (``stop``, ``rm -f``: its destroy ends virtiofsd
    after QEMU): nothing died there, and whoever stops it ends the shim."""
    try:
        pod = Pod.load(root, record.pod_id)
    except (SandboxError, OSError):
        return
    if pod.status is not PodStatus.RUNNING:
        return
    with contextlib.suppress(SandboxError, OSError):
        cause = pod.casualty()
        if cause is not None:
            with open(record.dir / LOG_NAME, "a", encoding="utf-8") as log:
                log.write(f"pysandbox: {cause}: run {record.id} stopped\n")
    shim = record.shim
    if shim is not None:
        shim.kill()


def main(argv: list[str]) -> int:
    """``ROOT NAME [--kill|--broken]``: :func:`release_after_shim` (``--broken``: its
    ``broken`` case); with ``--kill`` (the run's ``--timeout`` passed) first
    :data:`TIMED_OUT` in its directory and SIGKILL to every process of the run. Exit status
    0, or 2 for a wrong command line; errors of a run already gone are ignored."""
    import signal

    if len(argv) not in (2, 3) or argv[2:] not in ([], ["--kill"], ["--broken"]):
        return 2
    root, name = Path(argv[0]), argv[1]
    if argv[2:] == ["--kill"]:
        from sandbox.runtime import kill

        with contextlib.suppress(OSError):  # a run removed meanwhile: nothing to report
            (root / name / TIMED_OUT).touch(exist_ok=True)

        with contextlib.suppress(Exception):  # it may be ending meanwhile, or its VM gone
            kill.kill(root, name, signal.SIGKILL, all_processes=True)
    with contextlib.suppress(SandboxError, OSError):
        release_after_shim(root, name, broken=argv[2:] == ["--broken"])
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
