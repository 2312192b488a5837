"""CLI verb handlers: each loads, delegates to the library, prints, returns an exit status."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox import store as state
from sandbox import text_table
from sandbox.cli import log, termination
from sandbox.errors import ConfigError, SandboxError

if TYPE_CHECKING:
    from sandbox.runtime.console_relay import ConsoleRelay


def _root(args: argparse.Namespace) -> Path:
    """The state root (``--root``), made (0700) if missing; ConfigError naming it when it
    cannot be a directory (runc: ``mkdir ROOT: not a directory``)."""
    root: Path = args.root or state.DEFAULT_ROOT
    try:
        return state.ensure_dir(root)
    except OSError as exc:
        from sandbox.errors import ConfigError

        exists_as_file = isinstance(exc, FileExistsError) and not root.is_dir()
        reason = "it is not a directory" if exists_as_file else exc.strerror or str(exc)
        raise ConfigError(
            f"cannot use {root} as the state root (--root): {reason}; give a directory "
            "(made if missing)"
        ) from None


def cmd_check(args: argparse.Namespace) -> int:
    from sandbox.check import run_checks

    report = run_checks(boot=args.boot, root=_root(args) if args.boot else None)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.render())
    return 0 if report.ok else 1


def cmd_pool(args: argparse.Namespace) -> int:
    """``pool ls``: the VMs waiting for a run (id, status, seconds waited, vCPUs, MiB);
    ``pool drain``: remove them (their ids)."""
    import time

    from sandbox.run import pool

    root = _root(args)
    if args.pool_verb == "drain":
        for pod_id in pool.drain(root):
            print(pod_id)
        return 0
    table = [["POD", "STATUS", "WAITING", "CPUS", "MEMORY"]]
    for pod in pool.waiting(root):
        waited = f"{time.time() - pod.record.created:.0f}s"
        memory = f"{pod.record.memory_mib} MiB"
        table.append([pod.id, str(pod.observed_status()), waited, str(pod.record.cpus), memory])
    for line in text_table.render(table):
        print(line)
    return 0


def cmd_pod(args: argparse.Namespace) -> int:
    from sandbox.pod.lifecycle import DEFAULT_MEMORY_MIB, Pod

    root = _root(args)
    if args.pod_verb == "boot":
        pod = Pod.boot(root, args.pod_id, memory_mib=args.memory or DEFAULT_MEMORY_MIB)
        with pod.client() as agent:
            uptime = agent.health()
        print(f"pod {pod.id} running (guest up {uptime:.2f}s, accel {pod.record.accel})")
    elif args.pod_verb == "info":
        pod = Pod.load(root, args.pod_id)
        with pod.client() as agent:
            info = agent.info()
            uptime = agent.health()
        print(
            json.dumps(
                {
                    "id": pod.id,
                    "status": pod.status,
                    "boot": pod.record.boot,
                    "accel": pod.record.accel,
                    "agent_version": info.agent_version,
                    "protocol_version": info.protocol_version,
                    "kernel": info.kernel_release,
                    "memory_bytes": info.mem_total_bytes,
                    "cpus": info.cpus,
                    "transport": info.transport,
                    "shares": [{"tag": t, "path": p} for t, p in info.shares],
                    "privileged_files": pod.record.privileged_files,
                    "python": info.python_version,
                    "uptime_seconds": round(uptime, 3),
                },
                indent=2,
            )
        )
    elif args.pod_verb == "stop":
        _stop_pod(root, args.pod_id)
    elif args.pod_verb == "list":
        for pod in Pod.list(root):
            print(f"{pod.id}\t{pod.observed_status()}\t{pod.record.accel or '?'}")
    return 0


def _stop_pod(root: Path, pod_id: str) -> None:
    """``pod stop``: under the pod's lock (as a container's delete stops its pod), and the
    lock file goes with the pod (discarded by its holder, sandbox.store.locked); a pod that
    does not exist leaves none either. Pod.stop takes no pod lock itself (no proxy
    restart), so holding it here cannot deadlock."""
    from sandbox.errors import NotFoundError
    from sandbox.pod import record as pod_record
    from sandbox.pod.lifecycle import Pod

    with pod_record.lock(root, pod_id) as lock:
        try:
            pod = Pod.load(root, pod_id)
        except NotFoundError:
            lock.discard()
            raise
        # A waiting pool VM's owner is its timer (``sleep``): it goes too, and so its watcher
        # (they stayed for the rest of the idle time; a run's own process is left alone).
        timer = pod.record.owner if pod.record.pool is not None else None
        pod.stop()
        lock.discard()
    if timer is not None:
        timer.signal(signal.SIGKILL)


def cmd_run(args: argparse.Namespace) -> int:
    """``run`` reports its own failures with docker's 125 (126/127 for the command)."""
    from sandbox.errors import EXIT_RUNTIME, RunError, describe

    # SIGTERM/SIGHUP while the VM boots undo the boot (the default action would leave QEMU,
    # virtiofsd and the proxy running); a foreground run forwards them to its container
    # once that is started.
    termination.undo_on_termination()
    if args.bundle is not None:
        return _run_bundle(args)
    try:
        if args.detach:
            from sandbox.run import detached

            code = detached.run_detached(args, _root(args))
            termination.finished()
            return code
        from sandbox.run import foreground

        return foreground.run(args, _root(args))
    except RunError:
        raise
    except Exception as exc:
        message, _ = describe(exc)
        raise RunError(message, EXIT_RUNTIME) from exc


def _run_bundle(args: argparse.Namespace) -> int:
    """runc's ``run``: create + start, then (unless --detach) wait for the container; a
    terminal process without --console-socket gets this process's terminal (runc's way)."""
    from sandbox.runtime.bundle import PRIVILEGED_FILES_KEY

    if args.privileged_files:
        raise ConfigError(
            "--privileged-files is for images; a bundle's config.json sets the annotation "
            f"{PRIVILEGED_FILES_KEY}"
        )
    root = _root(args)
    if args.console_socket is None and not args.detach and _wants_terminal(args.bundle):
        # runc relays a foreground terminal itself; it needs a console socket only detached.
        from sandbox.runtime.console_relay import ConsoleRelay

        with ConsoleRelay() as console:
            return _run_bundle_with(args, root, console.path, console)
    return _run_bundle_with(args, root, args.console_socket, None)


def _wants_terminal(bundle: str) -> bool:
    """Whether the bundle's process asks for a terminal (False when config.json cannot be
    read: ``create`` then says what is wrong with it)."""
    try:
        config = json.loads((Path(bundle) / "config.json").read_bytes())
        return config["process"]["terminal"] is True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _run_bundle_with(
    args: argparse.Namespace, root: Path, console_socket: Path | None, console: ConsoleRelay | None
) -> int:
    from sandbox.runtime import create, delete, start
    from sandbox.runtime.record import ContainerRecord

    record = create.create(
        root,
        args.image,
        args.bundle,
        args.pid_file,
        console_socket,
        log.warner(args),
        systemd_cgroup=args.systemd_cgroup,
        # runc run in the foreground relays its stdin through pipes it makes; -d passes it on
        stdin_null=None if args.detach else False,
        stderr_to_stdout=None if args.detach else False,  # as for stdin
    )
    try:
        if console is not None:
            console.receive()  # before start: the process starts with the caller's size
        start.start(root, args.image, warn=log.warner(args))
        # From here on the container runs: a signal ends this call only (one kept from the
        # start's last clean-up ends it now, and the container is deleted as above).
        termination.default_termination()
    except BaseException:  # a failed or interrupted start: runc run destroys the container
        with contextlib.suppress(SandboxError):
            delete.delete(root, args.image, force=True, warn=log.warner(args))
        raise
    if args.detach:
        return 0
    if console is not None:
        console.relay()
    shim = record.shim
    if shim is not None:
        shim.wait(float("inf"))
    code = ContainerRecord.load(root, args.image).exit_status()
    code = 255 if code is None else code
    delete.delete(root, args.image, force=True, warn=log.warner(args))
    return code


def cmd_create(args: argparse.Namespace) -> int:
    from sandbox.runtime import create

    termination.undo_on_termination()
    create.create(
        _root(args),
        args.id,
        args.bundle,
        args.pid_file,
        args.console_socket,
        log.warner(args),
        systemd_cgroup=args.systemd_cgroup,
    )
    termination.finished()
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    from sandbox.runtime import start

    start.start(_root(args), args.id, warn=log.warner(args))
    return 0


def cmd_state(args: argparse.Namespace) -> int:
    from sandbox.runtime.record import ContainerRecord

    print(json.dumps(ContainerRecord.load(_root(args), args.id).oci_state(), indent=2))
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    from sandbox.runtime import kill

    root = _root(args)
    try:
        signum = kill.parse_signal(args.signal)
    except ConfigError:
        from sandbox.runtime.record import ContainerRecord

        ContainerRecord.load(root, args.id)  # an unknown id is reported first, as runc does
        raise
    kill.kill(root, args.id, signum, args.all)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from sandbox.runtime import delete

    root = _root(args)
    if not _is_run(root, args.id):
        delete.delete(root, args.id, args.force, warn=log.warner(args))
        return 0
    # A detached run's container deleted with runc's verb (kill, then delete): under the
    # run's lock, which goes with it, as with rm.
    from sandbox.run.monitor import run_lock

    with run_lock(root, args.id) as lock:
        delete.delete(root, args.id, args.force, warn=log.warner(args))
        lock.discard()
    return 0


def _is_run(root: Path, container_id: str) -> bool:
    """Whether ``container_id`` names a detached run's container (False for any other id,
    valid or not: the runtime's delete reports those)."""
    from sandbox.errors import SandboxError
    from sandbox.runtime.record import ContainerRecord

    try:
        return isinstance(ContainerRecord.load(root, container_id).data.get("run"), dict)
    except (SandboxError, OSError):
        return False


def cmd_exec(args: argparse.Namespace) -> int:
    from sandbox.runtime import exec

    process = exec.process_for(
        _root(args),
        args.id,
        process_file=args.process,
        command=list(args.command),
        tty=args.tty,
        env=list(args.env),
        cwd=args.cwd,
        user=args.user,
    )
    return exec.exec_process(
        _root(args), args.id, process, args.detach, args.pid_file, args.console_socket
    )


def cmd_ps(args: argparse.Namespace) -> int:
    from sandbox.runtime import control

    if args.id is None:
        return cmd_run_ps(args)
    if args.format == "json":
        print(json.dumps(control.processes(_root(args), args.id)))
    else:
        print(control.render_table(control.process_table(_root(args), args.id)))
    return 0


def cmd_run_ps(args: argparse.Namespace) -> int:
    """``ps`` without an id: the detached runs (``-a``: stopped ones too)."""
    from sandbox.run import detached

    runs = detached.list_runs(_root(args), args.all)
    if args.quiet:  # docker ps -q: one name a line (a run's name is its id)
        for run in runs:
            print(run["name"])
    else:
        print(detached.dumps_runs(runs) if args.format == "json" else detached.render_runs(runs))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from sandbox.run import detached

    detached.print_logs(_root(args), args.name, args.follow, args.tail)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from sandbox.run import detached

    return _each_name(args.names, lambda name: detached.stop(_root(args), name, args.time))


def cmd_rm(args: argparse.Namespace) -> int:
    from sandbox.run import detached

    return _each_name(args.names, lambda name: detached.remove(_root(args), name, args.force))


def _each_name(names: list[str], act: Callable[[str], None]) -> int:
    """docker's way with several names (``stop``, ``rm``): each is acted on, its name printed
    once done; one that fails gets its error line and the rest still go; the status is that
    of the last failure (0 if none)."""
    from sandbox.errors import describe

    status = 0
    for name in names:
        try:
            act(name)
        except SandboxError as exc:
            message, status = describe(exc)
            print(f"pysandbox: {message}", file=sys.stderr, flush=True)
            continue
        print(name, flush=True)
    return status


def cmd_pull(args: argparse.Namespace) -> int:
    """Pull an image; print ``repository@digest`` (what pulls exactly this image again)."""
    from sandbox.image import pull

    termination.undo_on_termination()  # SIGTERM/SIGHUP: stop skopeo, remove the partial download
    print(pull.pull(args.reference, pull.options_from(args)).pinned)
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    from sandbox.image.catalog import Catalog
    from sandbox.image.store import human_size

    rows = Catalog().rows()
    if args.format == "json":
        print(json.dumps([row.to_json() for row in rows], indent=2))
    elif args.quiet:
        for row in rows:
            print(row.name)
    else:
        table = [["NAME", "DIGEST", "ID", "SIZE", "CREATED"]]
        table += [
            [row.name, row.digest[:19], row.id[:19], human_size(row.size), row.created[:19]]
            for row in rows
        ]
        for line in text_table.render(table, right={3}):
            print(line)
    return 0


def cmd_rmi(args: argparse.Namespace) -> int:
    from sandbox.image.catalog import Catalog
    from sandbox.image.pull import parse_reference

    catalog = Catalog()
    for target in args.targets:
        name = None if target.startswith("sha256:") else parse_reference(target).name
        for line in catalog.remove(target, name, force=args.force):
            print(line)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from sandbox.runtime.record import ContainerRecord

    states = [r.oci_state() for r in ContainerRecord.all(_root(args))]
    if args.format == "json":
        print(json.dumps(states))
    elif args.quiet:
        for item in states:
            print(item["id"])
    else:
        table = [["ID", "PID", "STATUS", "BUNDLE", "CREATED"]]
        table += [
            [item["id"], str(item["pid"]), item["status"], item["bundle"], item["created"]]
            for item in states
        ]
        for line in text_table.render(table):
            print(line)
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    from sandbox.runtime import control

    control.set_paused(_root(args), args.id, paused=args.verb == "pause")
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    import sys

    from sandbox.runtime import control

    resources: dict[str, Any] = {}
    if args.resources:
        try:
            raw = sys.stdin.read() if args.resources == "-" else Path(args.resources).read_text()
            resources = json.loads(raw)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read resources {args.resources}: {exc}") from exc
        if not isinstance(resources, dict):
            raise ConfigError("resources must be a JSON object (OCI linux.resources)")
    if args.memory:
        resources.setdefault("memory", {})["limit"] = _update_size(args.memory)
    if args.pids_limit is not None:
        resources.setdefault("pids", {})["limit"] = args.pids_limit
    if args.cpu_quota is not None:
        resources.setdefault("cpu", {})["quota"] = args.cpu_quota
    if args.cpu_period is not None:
        resources.setdefault("cpu", {})["period"] = args.cpu_period
    control.update(_root(args), args.id, resources)
    return 0


def _update_size(text: str) -> int:
    """Bytes of ``update --memory``: what runc takes there (go-units RAMInBytes: bytes, or
    a number with k, m or g, powers of 1024: ``100m``, ``1.5g``), via run's parse_size.
    ConfigError naming the flag otherwise."""
    from sandbox.errors import RunError
    from sandbox.run.spec import parse_size

    try:
        return parse_size(text)
    except RunError:
        raise ConfigError(
            f"invalid --memory {text!r}: give bytes, or a number with k, m or g (e.g. 100m)"
        ) from None


def cmd_features(args: argparse.Namespace) -> int:
    from sandbox.runtime.features import features

    print(json.dumps(features(), indent=2))
    return 0


def cmd_spec(args: argparse.Namespace) -> int:
    from sandbox.run.default_spec import default_spec

    target = args.bundle / "config.json"
    if target.exists():
        raise ConfigError(f"{target} already exists; remove it first")
    target.write_text(json.dumps(default_spec(), indent=2) + "\n")
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "check": cmd_check,
    "pod": cmd_pod,
    "pool": cmd_pool,
    "run": cmd_run,
    "create": cmd_create,
    "start": cmd_start,
    "state": cmd_state,
    "kill": cmd_kill,
    "delete": cmd_delete,
    "exec": cmd_exec,
    "ps": cmd_ps,
    "logs": cmd_logs,
    "stop": cmd_stop,
    "rm": cmd_rm,
    "list": cmd_list,
    "pull": cmd_pull,
    "images": cmd_images,
    "rmi": cmd_rmi,
    "pause": cmd_pause,
    "resume": cmd_pause,
    "update": cmd_update,
    "features": cmd_features,
    "spec": cmd_spec,
}
