"""Detached runs: ``pysandbox run -d``, and ``ps``, ``logs``, ``stop``, ``rm`` for them.

A detached run is a runtime container (:mod:`sandbox.runtime`'s record, shim, start, kill
and delete) whose pod, spec and guest container are made the way ``run`` makes them: the
same :func:`sandbox.run.spec.build_spec` (limits, no network, hardened defaults), the same VM
sizing, the image shared read-only under a throwaway writable layer in guest memory. The
run's name is its container id and its pod id. Only the per-container shim differs from a
``create``: its stdin is /dev/null and its stdout and stderr are appended to
``<root>/<name>/run.log``, which ``logs`` prints.

The run's monitor is its shim's watcher (:mod:`sandbox.runtime.shim_watch`, a ``/bin/sh``
reading a pipe only the shim holds the write end of, started by ``shim.spawn(monitor=True)``):
once the shim has exited (the process ended, ``stop``, ``--timeout``: the watcher kills the
run then) it powers the VM off and unmounts everything
(:func:`sandbox.run.monitor.release_after_shim`), keeping the record, the log and the exit
status until ``rm`` (or removing all of it for ``--rm``). It acts only on a run whose start
completed (the ``monitored`` file, written after ``start``); a run that failed to start is
removed by ``run`` itself, and one whose ``run -d`` was killed before by the watcher of that
process (:func:`sandbox.run.launch.watch_owner`). ``stop`` and ``rm`` do the same work
themselves, so nothing depends on the monitor being alive; a per-run lock keeps them from
racing with it.

Files under ``<root>/<name>/``: ``state.json`` (the runtime record, with a ``run`` entry:
image, command, flags), ``config.json`` (the spec, so ``exec`` works too), ``run.log``,
``exit`` (written by the shim), ``monitored``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

from hypervisor.process import ProcessHandle, signals_held
from sandbox import store as state
from sandbox import text_table
from sandbox.errors import (
    EXIT_TIMEOUT,
    ConfigError,
    NotFoundError,
    RunError,
    SandboxError,
    StateError,
)
from sandbox.image import pull as image_pull
from sandbox.image import store as images
from sandbox.pod import host_cgroup
from sandbox.pod.lifecycle import Pod
from sandbox.pod.record import PodStatus
from sandbox.pod.sharing import HeldSources, unshare_container_files
from sandbox.run import pool
from sandbox.run.launch import boot_watched, create_in_pod, run_kind
from sandbox.run.monitor import (
    LOG_NAME,
    MONITORED,
    TIMED_OUT,
    load_run,
    release,
    run_lock,
    wait_shim,
)
from sandbox.run.spec import build_spec, check_name_free, check_options, parse_size, run_name
from sandbox.runtime import control, delete, kill, shim, start
from sandbox.runtime.record import ContainerRecord, Status

DEFAULT_STOP_SECONDS = 10


def run_detached(args: argparse.Namespace, root: Path) -> int:
    """Create and start a detached run; print its name; return 0.

    Failures raise (RunError with docker's 125/126/127, or any SandboxError) after
    everything this call created was removed again, the name included.
    """
    check_options(args)
    if args.interactive or args.tty:
        raise RunError("-d cannot be combined with -i or -t: a detached run has no terminal")
    log_limit = parse_size(args.log_max_size)
    if log_limit < 4096:
        raise RunError(f"invalid --log-max-size {args.log_max_size!r}: at least 4k")
    image = image_pull.resolve_image(args)
    stop_signal = parse_stop_signal(image.stop_signal)  # a bad one refused before a boot
    with HeldSources() as held:  # the sources as checked, until they are shared
        name = _create(args, root, image, log_limit, held, stop_signal)
    print(name, flush=True)
    return 0


def _create(
    args: argparse.Namespace,
    root: Path,
    image: images.Image,
    log_limit: int,
    held: HeldSources,
    stop_signal: int,
) -> str:
    """Create and start the detached run of ``run_detached``; its name."""
    name = run_name(args)
    spec = build_spec(args, image, held, name)
    # The run's lock for the whole start: ``rm -f``/``stop`` of a run being started wait
    # for it (they cut the boot at random points before: the client was SIGKILLed with the
    # pod's cgroup, or failed naming the jail or QEMU instead of the removal).
    with run_lock(root, name) as lock:
        check_name_free(root, name)
        command = [str(a) for a in spec["process"]["args"]]
        record: ContainerRecord | None = None
        try:
            with signals_held():  # made and known to be: a signal lands after both
                record = ContainerRecord.new(
                    root,
                    name,
                    {
                        "bundle": str(root / name),
                        "pod_id": name,
                        "owns_pod": True,
                        "terminal": False,
                        "annotations": {},
                        "rootfs": str(image.rootfs),
                        "run": {
                            "image": args.image,
                            "command": command,
                            "remove": bool(args.rm),
                            "timeout": args.timeout,
                            "stop_signal": stop_signal,
                        },
                    },
                )
            state.write_json_atomic(record.dir / "config.json", spec)
            kind = run_kind(args, spec, image)
            pod, watch = boot_watched(root, name, name, args, spec, image, kind)
            if pod.id != name:  # a VM of the warm pool: the record names its pod
                record.data["pod_id"] = pod.id
                record.save()
        except BaseException:
            # No VM of ours exists: the pod id may even be another run's, so no delete.delete.
            if record is not None:
                shutil.rmtree(record.dir, ignore_errors=True)
            lock.discard()  # safe even for another run's name: only a holder unlinks it
            raise
        try:
            pod.record.containers = [name]
            pod.save()
            try:
                record.data["guest_pid"] = create_in_pod(
                    pod, name, spec, image, held, workdir_option=bool(args.workdir)
                )
            except BaseException:
                unshare_container_files(pod, name)
                raise
            with host_cgroup.inside(pod.host_cgroup()):
                handle = _spawn_logging_shim(
                    root, name, pod, record.dir / LOG_NAME, args.timeout, log_limit
                )
            record.data["shim"] = handle.to_json()
            record.set_status(Status.CREATED)
            start.start(root, name)
            (record.dir / MONITORED).touch()
        except BaseException:
            try:
                delete.delete(root, name, force=True)
            except Exception:  # the watcher tears down what is left once we have exited
                pass
            else:
                # Undone in place: nothing is left for the watcher, and nothing of the run
                # outlives the command (its teardown process lingered a moment after exit).
                watch.dismiss()
                lock.discard()
            raise
        pool.refill(root, kind)
        return name


def _spawn_logging_shim(
    root: Path, name: str, pod: Pod, log: Path, timeout: float | None, log_limit: int
) -> ProcessHandle:
    """``shim.spawn`` (as the run's monitor, see the module docstring; the watcher also
    watches ``pod``'s virtiofsd) with stdin from
    /dev/null and stdout+stderr appended to ``log``, which it keeps within ``log_limit``
    bytes (output beyond is dropped: EFBIG, not a kill).

    The shim inherits this process's fds 0-2, so they are pointed at the log for the
    duration of the spawn and restored afterwards (even on failure).
    """
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    null_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in (0, 1, 2)]
    try:
        os.dup2(null_fd, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        return shim.spawn(
            root,
            name,
            pod.agent_address,
            monitor=True,
            timeout=timeout,
            output_limit=log_limit,
            pod_process=pod.process("virtiofsd"),
        )
    finally:
        for fd, copy in zip((0, 1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(log_fd)
        os.close(null_fd)


def parse_stop_signal(text: str) -> int:
    """The signal ``stop`` sends first, from an image's STOPSIGNAL as docker reads it: a
    number or a name, with or without ``SIG``, any case ("SIGQUIT", "quit", "3");
    SIGTERM when the image names none. RunError for one that names no signal."""
    if not text:
        return int(signal.SIGTERM)
    word = text.strip().upper()
    try:
        number = (
            int(word)
            if word.isdigit()
            else int(signal.Signals[word if word.startswith("SIG") else f"SIG{word}"])
        )
    except KeyError:
        number = 0
    if not 0 < number < signal.NSIG:
        raise RunError(f"invalid STOPSIGNAL {text[:40]!r} in the image: name a signal (SIGQUIT, 3)")
    return number


def stop(root: Path, name: str, seconds: float = DEFAULT_STOP_SECONDS) -> None:
    """docker's stop: the image's STOPSIGNAL (SIGTERM if it has none) to the run's process,
    SIGKILL to all of it after ``seconds``;
    then release the VM (see :func:`_release`). A stopped run is left as it is. When the
    run's pod lost its virtiofsd, the container's processes cannot end (they wait for their
    files), so the shim is killed after ``seconds`` instead of waiting for them."""
    record = load_run(root, name)
    if record.status in (Status.CREATED, Status.RUNNING, Status.PAUSED):
        with contextlib.suppress(SandboxError):  # it may be ending meanwhile
            if record.status is Status.PAUSED:
                control.set_paused(root, name, paused=False)
            kill.kill(root, name, record.data["run"].get("stop_signal") or signal.SIGTERM)
        if not wait_shim(record, seconds):
            broken = _pod_broken(root, record)
            if not broken:
                with contextlib.suppress(SandboxError):
                    kill.kill(root, name, signal.SIGKILL, all_processes=True)
            if broken or not wait_shim(record, 15.0):
                handle = record.shim
                if handle is not None:
                    handle.kill()
    release(root, name)


def _pod_broken(root: Path, record: ContainerRecord) -> bool:
    """Whether the run's pod lost QEMU or virtiofsd (:meth:`Pod.observed_status`)."""
    try:
        return Pod.load(root, record.pod_id).observed_status() is PodStatus.BROKEN
    except SandboxError:
        return False


def remove(root: Path, name: str, force: bool = False) -> None:
    """docker's rm: remove a stopped run (with ``force``, a running one: killed first) and
    everything it has: VM, mounts, record, log. With ``force``, also the pod a foreground
    run of that name left behind when its process and that process's watcher were both
    killed (:func:`_remove_orphan_pod`)."""
    with run_lock(root, name) as lock:
        try:
            record = load_run(root, name)
        except (NotFoundError, ConfigError):
            lock.discard()  # no run (or no valid name): no lock file left for it either
            if force and _remove_orphan_pod(root, name):
                return
            raise
        if not force and record.status is not Status.STOPPED:
            raise StateError(f"run {name} is {record.status}: stop it first or use rm -f")
        watcher = _watcher(record)
        delete.delete(root, name, force=True)
        lock.discard()
    # Its watcher, become its monitor, was waiting for this lock: it finds the run gone and
    # exits; rm returns after it, so nothing of the run outlives the command.
    if watcher is not None:
        watcher.wait(10.0)


def _watcher(record: ContainerRecord) -> ProcessHandle | None:
    """The run's watcher as :func:`shim.spawn` recorded it (None if it did not)."""
    try:
        pid, _, start = (record.dir / shim.WATCHER_FILE).read_text().strip().partition(":")
    except OSError:
        return None
    return ProcessHandle(int(pid), int(start)) if pid.isdigit() and start.isdigit() else None


def _remove_orphan_pod(root: Path, name: str) -> bool:
    """Stop pod ``name`` if it belongs to a run whose process is gone (its recorded owner,
    :attr:`sandbox.pod.record.PodRecord.owner`) and has no container record of that name;
    whether it did. Pods of live runs and of runtime containers are left alone."""
    from sandbox.run.launch import CONTAINER_ID

    try:
        pod = Pod.load(root, name)
    except (NotFoundError, ConfigError, StateError):
        return False
    owner = pod.record.owner
    if owner is None or owner.alive() or (root / name / "state.json").exists():
        return False
    with contextlib.suppress(SandboxError):
        unshare_container_files(pod, CONTAINER_ID)
    pod.stop()
    return True


def list_runs(root: Path, all_runs: bool) -> list[dict[str, Any]]:
    """Detached runs (only running ones unless ``all_runs``), oldest first."""
    runs: list[dict[str, Any]] = []
    for record in ContainerRecord.all(root):
        info = record.data.get("run")
        if not isinstance(info, dict):
            continue
        status = record.status
        if not all_runs and status is Status.STOPPED:
            continue
        code = record.exit_status() if status is Status.STOPPED else None
        timed_out = code is not None and (record.dir / TIMED_OUT).exists()
        runs.append(
            {
                "name": record.id,
                "status": status.value,
                "exit_code": EXIT_TIMEOUT if timed_out else code,
                "timed_out": timed_out,
                "image": str(info.get("image", "")),
                "command": [str(a) for a in info.get("command") or []],
                "created": str(record.data.get("created", "")),
            }
        )
    runs.sort(key=lambda item: str(item["created"]))
    return runs


def dumps_runs(runs: list[dict[str, Any]]) -> str:
    """``ps --format json``: the list of :func:`list_runs`."""
    return json.dumps(runs)


def render_runs(runs: list[dict[str, Any]]) -> str:
    """The ``ps`` table of :func:`list_runs`."""
    rows = [["NAME", "STATUS", "CREATED", "IMAGE", "COMMAND"]]
    for item in runs:
        status = item["status"]
        if status == Status.STOPPED.value:
            code = item["exit_code"]
            status = "exited" if code is None else f"exited ({code})"
            if item["timed_out"]:
                status = f"timed out ({code})"
        command = " ".join(item["command"])
        if len(command) > 40:
            command = command[:37] + "..."
        created = item["created"][:19].replace("T", " ")
        rows.append([item["name"], status, created, item["image"], command])
    return "\n".join(text_table.render(rows))


def print_logs(root: Path, name: str, follow: bool = False, tail: int | None = None) -> None:
    """Copy the run's log to stdout (only its last ``tail`` lines when given, as docker's
    ``logs --tail``); with ``follow``, keep copying until the run stopped."""
    record = load_run(root, name)
    out = sys.stdout.buffer
    try:
        log = open(record.dir / LOG_NAME, "rb")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        return
    with log:
        if tail is not None:
            log.seek(_tail_offset(log, tail))
        while True:
            # Checked before draining: once stopped, everything is in the file.
            last = not follow or record.status is Status.STOPPED
            while chunk := log.read(1 << 20):
                out.write(chunk)
            out.flush()
            if last:
                return
            time.sleep(0.2)


def _tail_offset(log: BinaryIO, lines: int, block: int = 1 << 16) -> int:
    """Where the last ``lines`` lines of ``log`` begin (a last line without its newline
    counts), read backwards ``block`` bytes at a time; the file's end for 0."""
    end = log.seek(0, os.SEEK_END)
    if lines == 0:
        return end
    position, seen = end, 0
    skip_last = True  # the newline that ends the last line does not start another
    while position > 0:
        size = min(block, position)
        position -= size
        log.seek(position)
        chunk = log.read(size)
        index = len(chunk)
        while (index := chunk.rfind(b"\n", 0, index)) >= 0:
            if skip_last and position + index == end - 1:
                skip_last = False
                continue
            skip_last = False
            seen += 1
            if seen == lines:
                return position + index + 1
        skip_last = False
    return 0
