"""The VM and the container of one run: boot the pod, share the image, create the container.

Shared by the foreground (:mod:`sandbox.run.foreground`) and detached
(:mod:`sandbox.run.detached`) runs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypervisor.process import ProcessHandle
from sandbox.errors import EXIT_RUNTIME, AgentError, CommandError, RunError, SandboxError
from sandbox.image import store as images
from sandbox.pod import guest_cgroup, host_cgroup
from sandbox.pod.lifecycle import Pod
from sandbox.pod.record import PodStatus
from sandbox.pod.sharing import HeldSources, is_bind, share_container_files
from sandbox.run import etc_files, pool
from sandbox.run.spec import vm_cpus, vm_memory_mib

if TYPE_CHECKING:  # grpc: imported while the pod boots (run.foreground)
    from sandbox.pod.agent_client import ContainerClient

#: The container id of a foreground run inside its pod.
CONTAINER_ID = "main"
#: How long a run waits for the teardown of a finished run of the same name (seconds).
TEARDOWN_WAIT = 30.0


def boot_pod(
    root: Path,
    pod_id: str,
    args: argparse.Namespace,
    spec: dict[str, Any],
    image: images.Image,
    owner: ProcessHandle | None = None,
) -> Pod:
    """Boot the VM of a run: memory sized for the spec's limit, the run's network and
    hostname, files powerless on the host unless ``--privileged-files``; its host cgroup is
    the spec's ``linux.cgroupsPath`` or, as runc's default, the pod id below this process's
    cgroup, limited to the container's limits plus the VM's overhead. The guest keeps file
    data cached across opens when only the guest can change what it shares: an image of
    the store and no host volume (:func:`cacheable`). ``owner`` is recorded (see
    :func:`watch_owner`). On failure nothing is left running (Pod.boot's contract)."""
    memory = spec["linux"]["resources"].get("memory")
    _wait_for_teardown(root, pod_id)
    req = host_cgroup.request(
        spec["linux"].get("cgroupsPath") or default_cgroup(root, pod_id), False, pod_id
    )
    placement = host_cgroup.plan(req)
    placement.containers[CONTAINER_ID] = host_cgroup.container_limits(spec["linux"]["resources"])
    return Pod.boot(
        root,
        pod_id,
        memory_mib=vm_memory_mib(None if memory is None else memory["limit"]),
        cpus=vm_cpus(spec["linux"]["resources"].get("cpu")),
        user_network=args.network == "user",
        hostname=str(spec.get("hostname") or ""),
        privileged_files=args.privileged_files,
        cgroup=(req, placement),
        cached_files=cacheable(spec, image),
        owner=owner,
        keep_client=True,  # the run's container is created next, through it
        cgroup_layout=guest_cgroup.layout_for(spec),  # set up in the guest ahead
    )


def cacheable(spec: dict[str, Any], image: images.Image) -> bool:
    """Whether nothing but the guest changes the files a run shares: its image is a store
    entry (a directory of the user's, used in place, may change under it) and no mount
    binds a host path (``-v``). The image is shared read-only and the container writes to
    an overlay in guest memory."""
    return image.stored and not any(is_bind(m) for m in spec.get("mounts") or ())


class OwnerWatch:
    """The watcher :func:`watch_owner` started: :attr:`owner` is this process's handle, the
    pod's owner to record (:func:`boot_pod`)."""

    def __init__(self, owner: ProcessHandle, process: subprocess.Popen[bytes]) -> None:
        self.owner = owner
        self._process = process
        process.returncode = 0  # never waited for unless dismissed (silences Popen.__del__)

    def dismiss(self) -> None:
        """Stop the watcher, reaped: this process undid what it started itself (a boot that
        failed and was rolled back, a run torn down in place), so nothing is left for it and
        nothing of the run outlives the command. Idempotent."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._process.pid, signal.SIGKILL)  # Popen.kill: no-op, returncode is set
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self._process.pid, 0)


def run_kind(
    args: argparse.Namespace, spec: dict[str, Any], image: images.Image
) -> pool.Kind | None:
    """The kind of VM this run boots (:mod:`sandbox.run.pool`), as :func:`boot_pod` boots
    it; None when the pool is off or cannot serve it (a spec cgroupsPath)."""
    count = pool.wanted()
    pool.idle_seconds()  # both settings are checked before a boot, the pool on or off
    if not count or spec["linux"].get("cgroupsPath"):
        return None
    resources = spec["linux"]["resources"]
    memory = resources.get("memory")
    return pool.kind_for(
        vm_memory_mib(None if memory is None else memory["limit"]),
        vm_cpus(resources.get("cpu")),
        args.network == "user",
        bool(args.privileged_files),
        cacheable(spec, image),
        host_cgroup.container_limits(resources),
        guest_cgroup.layout_for(spec),
    )


def boot_watched(
    root: Path,
    pod_id: str,
    container_id: str,
    args: argparse.Namespace,
    spec: dict[str, Any],
    image: images.Image,
    kind: pool.Kind | None = None,
) -> tuple[Pod, OwnerWatch]:
    """A pod of ``kind`` from the warm pool if one waits (:func:`claim_watched`: its id is
    then the pool's, not ``pod_id``); else :func:`watch_owner`, then :func:`boot_pod` with
    this process as the pod's owner; a boot that fails (and so rolled itself back) dismisses
    the watcher. RunError if the watcher cannot be started; the boot's errors as they are."""
    if kind is not None:
        claimed = claim_watched(root, kind, container_id)
        if claimed is not None:
            return claimed
    try:
        watch = watch_owner(root, pod_id, container_id)
    except OSError as exc:
        raise RunError(f"cannot start the watcher of this run: {exc.strerror}") from None
    try:
        return boot_pod(root, pod_id, args, spec, image, watch.owner), watch
    except BaseException:
        watch.dismiss()  # the boot rolled itself back: nothing is left to tear down
        raise


def claim_watched(root: Path, kind: pool.Kind, container_id: str) -> tuple[Pod, OwnerWatch] | None:
    """Take a waiting pod of ``kind`` (:func:`pool.claim`) and start the watcher of this
    process for it; None when none waits. RunError (the pod removed) if the watcher cannot
    be started. The guest needs no new ``Restored``: its own restore gave it fresh host
    entropy and the time, its clock has run since, and it serves this run only; the
    container has a UTS namespace and hostname of its own (docs/warm-pool.md)."""
    owner = ProcessHandle.of(os.getpid())
    pod = pool.claim(root, kind, owner)
    if pod is None:
        return None
    try:
        watch = watch_owner(root, pod.id, container_id)
    except OSError as exc:
        pod.destroy()
        raise RunError(f"cannot start the watcher of this run: {exc.strerror}") from None
    return pod, watch


def watch_owner(root: Path, pod_id: str, container_id: str) -> OwnerWatch:
    """Start the watcher of this process (:mod:`sandbox.run.owner_watch`): once we are gone,
    however we end, pod ``pod_id`` goes too while we are its recorded owner, and a detached
    run ``container_id`` we had not handed over is removed. OSError if the watcher cannot be
    started."""
    import sys

    from sandbox import IMPORT_ROOT

    owner = ProcessHandle.of(os.getpid())
    pidfd = os.pidfd_open(owner.pid)
    argv = [sys.executable, "-S", "-m", "sandbox.run.owner_watch", str(pidfd), str(root)]
    try:
        process = subprocess.Popen(
            [*argv, pod_id, container_id, f"{owner.pid}:{owner.start}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(pidfd,),
            start_new_session=True,
            cwd="/",
            env={**os.environ, "PYTHONPATH": IMPORT_ROOT},
        )
    finally:
        os.close(pidfd)
    return OwnerWatch(owner, process)


def default_cgroup(root: Path, pod_id: str) -> str:
    """The host cgroup of run ``pod_id`` of ``--root root`` when the spec names none:
    ``pysandbox/NAME-ROOTHASH``, below this process's cgroup. Names are unique within a root
    only: two runs called alike under two roots must not share a cgroup, whose teardown
    SIGKILLs everything in it."""
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
    return f"pysandbox/{pod_id}-{digest}"


def _wait_for_teardown(root: Path, pod_id: str, timeout: float = TEARDOWN_WAIT) -> None:
    """A run's VM is torn down after the run exited (sandbox.run.foreground): a new run of
    the same ``--name`` right after it waits up to ``timeout`` seconds for that teardown
    (then Pod.boot reports the pod as existing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Pod.load(root, pod_id).status is not PodStatus.STOPPING:
                return
        except SandboxError:  # none (or unreadable: Pod.boot reports it)
            return
        time.sleep(0.05)


def _protocol_minor(version: str | None) -> int:
    """The MINOR of the pod's recorded agent protocol (-1: not recorded, or malformed)."""
    minor = (version or "").partition(".")[2]
    return int(minor) if minor.isdigit() and len(minor) < 6 else -1


def create_in_pod(
    pod: Pod,
    container_id: str,
    spec: dict[str, Any],
    image: images.Image,
    held: HeldSources,
    workdir_option: bool = False,
) -> int:
    """Share the image read-only and create the container in the guest on an overlay whose
    upper layer is guest memory; return its guest pid. (With ``--read-only`` the agent makes
    the root read-only once the mountpoints are made, in that upper layer: the image is
    read-only on the host, whatever the guest does.) The sources are
    those ``build_spec`` opened into ``held``.

    Its stdin is /dev/null (a detached run relays nothing to it, as docker's without -i).
    Any failure raises RunError with the agent's message: docker's 127/126 when the command
    is not found / cannot be run (the agent's CommandError), 125 otherwise. The caller undoes
    the share on failure (``unshare_container_files``).
    """
    with pod.client() as client:
        return create_with(
            client,
            pod,
            container_id,
            spec,
            image,
            held,
            stdin_null=True,  # a detached run's: nothing is ever relayed to it
            workdir_option=workdir_option,
            run_name=container_id,  # a detached run's container goes by the run's name
        )


def create_with(
    client: ContainerClient,
    pod: Pod,
    container_id: str,
    spec: dict[str, Any],
    image: images.Image,
    held: HeldSources,
    *,
    start: bool = False,
    stdin_null: bool = False,
    stderr_to_stdout: bool = False,
    workdir_option: bool = False,
    run_name: str | None = None,
) -> int:
    """:func:`create_in_pod` through ``client``. With ``start`` the container is also
    started and its stdin closed in the same call when the agent can (protocol 1.8), else
    with StartContainer and CloseStdin after it (stdin: the foreground run of a
    non-interactive ``pysandbox run``; a terminal gets its ^D). ``stderr_to_stdout``: the
    process's stderr is its stdout pipe (the caller's two are one file, ``2>&1``). The
    container gets its own /etc/hosts, /etc/hostname and (with a network) /etc/resolv.conf
    (:mod:`etc_files`, named after the spec's hostname and ``run_name``, by default the pod
    id: a pooled VM's id is not the run's), written by the CreateContainer call itself when
    the pod's agent said it can (protocol 1.14, recorded at its ``Restored``), else by
    WriteFile calls before it. Errors as create_in_pod's; a working directory that cannot be
    entered is named as the user gave it (``workdir_option``: by ``-w``, else by the
    image)."""
    guest_rootfs, guest_spec = share_container_files(
        pod, container_id, spec, image.rootfs.parent, rootfs_readonly=True, held=held
    )
    user_network = (pod.record.network or {}).get("mode") == "user"
    name = run_name or pod.id
    files = etc_files.contents(str(spec.get("hostname") or ""), name, user_network)
    written: dict[str, bytes] | None = None  # the files, when CreateContainer writes them
    if _protocol_minor(pod.record.agent_protocol) >= 14:  # in the same round trip
        sources = etc_files.guest_sources(container_id, files)
        written = {sources[destination]: data for destination, data in files.items()}
        guest_spec["mounts"] += etc_files.mounts(sources)
    else:
        try:
            guest_spec["mounts"] += etc_files.write(client, container_id, files)
        except AgentError as exc:
            raise RunError(
                f"writing the container's /etc files: {exc.detail}", EXIT_RUNTIME
            ) from exc
    payload = json.dumps(guest_spec).encode()
    try:
        if not start:
            return client.create_container(
                container_id,
                payload,
                guest_rootfs,
                overlay=True,
                stdin_null=stdin_null,
                stderr_to_stdout=stderr_to_stdout,
                files=written,
            )
        pid, started = client.create_and_start(
            container_id,
            payload,
            guest_rootfs,
            overlay=True,
            stderr_to_stdout=stderr_to_stdout,
            files=written,
        )
    except CommandError as exc:
        raise RunError(exc.detail, exc.exit_code) from exc
    except AgentError as exc:
        cwd = str(spec["process"]["cwd"])
        prefix = f"chdir to cwd ({cwd}) set in config.json: "  # agent/oci/process.py's words
        if exc.detail.startswith(prefix):
            reason = exc.detail.removeprefix(prefix).rpartition(": ")[2]
            given = f"-w {cwd}" if workdir_option else f"the image's working directory {cwd}"
            raise RunError(
                f"{given}: cannot enter it in the container ({reason}); give a directory "
                "that exists in the image or a volume",
                EXIT_RUNTIME,
            ) from exc
        raise RunError(exc.detail, EXIT_RUNTIME) from exc
    terminal = bool((spec.get("process") or {}).get("terminal"))
    if not started:  # an agent before protocol 1.8
        client.start_container(container_id)
    if terminal or not started:
        client.close_stdin(container_id)
    return pid
