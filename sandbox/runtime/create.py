"""``create``: a container in its pod VM (booted or joined), left ``created`` (runc create).

The bundle is judged first (:mod:`sandbox.runtime.bundle`): an invalid one is refused before
anything is created, booted or joined. On any later failure everything the call started is
undone and the id is free again. The order (runtime.md "Lifecycle"): the container is set up
in the guest (namespaces, mounts, pivot_root; its process waits for ``start``) and its shim
started, then the prestart, createRuntime and createContainer hooks run on the host
(docs/hooks.md), then it is ``created`` and the pid file is written.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox import same_file
from sandbox import store as state
from sandbox.errors import ConfigError, NotFoundError, StateError
from sandbox.pod import host_cgroup
from sandbox.runtime import bundle as bundles
from sandbox.runtime import hooks as oci_hooks
from sandbox.runtime.delete import teardown
from sandbox.runtime.pods import guest_pid_lookup, pod_lock
from sandbox.runtime.record import ContainerRecord, Status
from sandbox.runtime.vm_limits import propagation_warnings, refuse_host_namespaces

if TYPE_CHECKING:
    from sandbox.pod.lifecycle import Pod


def create(
    root: Path,
    container_id: str,
    bundle: Path,
    pid_file: Path | None = None,
    console_socket: Path | None = None,
    warn: Callable[[str], None] | None = None,
    systemd_cgroup: bool = False,
    stdin_null: bool | None = None,
    stderr_to_stdout: bool | None = None,
) -> ContainerRecord:
    """Create a container (booting or joining its pod VM); leave it ``created``.

    The container's stdin is /dev/null when ``stdin_null``; by default (None) when this
    process's own is (runc's ``create`` passes its stdio on: podman's conmon gives
    /dev/null without -i), else the pipe its host stand-in relays this stdin to (runc's
    foreground ``run`` makes pipes whatever its stdin is: its caller passes False).
    Likewise its stdout and stderr are one pipe when this process's are one open file
    (``2>&1``: runc's process inherits the one file) unless ``stderr_to_stdout`` is False
    (runc's foreground ``run`` makes two pipes whatever they are).

    The bundle is judged before anything is created, booted or joined, and so is what a VM
    cannot give it (:mod:`sandbox.runtime.vm_limits`): host namespaces are refused; a mount
    whose propagation cannot reach the host gets a ``warn``. On any later failure everything
    this call started is undone and the id is free again.

    Host cgroup (docs/cgroups.md "Host cgroups"): the sandbox container's
    ``linux.cgroupsPath`` (the systemd form with ``systemd_cgroup``, runc's
    ``--systemd-cgroup``) is judged before the VM boots and made with the pod; every host
    process of the pod starts in it. Its limits are the pod's containers' plus the VM's
    overhead, raised as containers join.
    """
    state.validate_id(container_id)
    loaded = bundles.load(bundle.resolve())
    spec = loaded.spec
    hooks = oci_hooks.parse_hooks(spec.hooks)
    terminal = spec.process.terminal
    if terminal and console_socket is None:
        raise ConfigError("process.terminal is true: --console-socket is required")
    pod_id, owns_pod = bundles.pod_of(container_id, spec.annotations)
    state.validate_id(pod_id, "pod")
    privileged = bundles.privileged_files(spec.annotations)
    bundles.check_on_host(loaded, owns_pod=owns_pod)
    refuse_host_namespaces(loaded.config)
    cgroup = _host_cgroup(loaded.config, container_id, owns_pod, systemd_cgroup)
    limits = host_cgroup.container_limits(loaded.config.get("linux", {}).get("resources"))
    for message in propagation_warnings(loaded.config):
        if warn is not None:
            warn(message)
    # Only now the pod machinery (gRPC, QEMU): a refusal above costs a CLI start, no more.
    from hypervisor.process import signals_held
    from sandbox.pod.lifecycle import Pod
    from sandbox.pod.record import PodStatus
    from sandbox.pod.sharing import share_container_files
    from sandbox.runtime import shim, standin_netns

    network_ns = spec.namespace("network")
    netns = Path(network_ns.path) if network_ns is not None and network_ns.path else None
    # A pod owner asking for a network namespace without a path: the namespace of its
    # stand-in is the pod's, which a client may configure before start (podman and
    # containerd 1.7 with a user namespace); start carries it into the VM.
    network_after_create = owns_pod and network_ns is not None and netns is None
    # With a new user namespace the container keeps its own network namespace in the guest
    # (owned by its user namespace, as runc's), and the pod network is configured in it.
    user_ns = spec.namespace("user")
    network_in_container = network_after_create and user_ns is not None and not user_ns.path
    pod: Pod | None = None
    record: ContainerRecord | None = None
    try:
        with signals_held():  # made and known to be: a signal lands after both
            record = ContainerRecord.new(
                root,
                container_id,
                {
                    "bundle": str(loaded.path),
                    "pod_id": pod_id,
                    "owns_pod": owns_pod,
                    "terminal": terminal,
                    "annotations": spec.annotations,
                    "rootfs": str(loaded.rootfs.resolve()),
                    # What later verbs run (runc too keeps the config of create): the bundle may
                    # change or be gone by then.
                    "hooks": hooks,
                    "network_after_create": network_after_create,
                    "network_in_container": network_in_container,
                },
            )
        with pod_lock(root, pod_id):
            if owns_pod:
                # The pod's network namespace (CNI, podman) is carried into the VM.
                if cgroup is not None and not bundles.is_cri_sandbox(spec.annotations):
                    cgroup[1].containers[container_id] = limits
                pod = Pod.boot(
                    root, pod_id, netns=netns, privileged_files=privileged, cgroup=cgroup
                )
            else:
                try:
                    pod = Pod.load(root, pod_id)
                except NotFoundError:
                    raise NotFoundError(
                        f"pod sandbox {pod_id} of container {container_id} does not exist"
                    ) from None
                if pod.status is not PodStatus.RUNNING:
                    raise StateError(
                        f"pod sandbox {pod_id} of container {container_id} is {pod.status}"
                    )
            pod.record.containers.append(container_id)
            pod.save()
            placement = pod.host_cgroup()
            if placement is not None and not owns_pod:
                host_cgroup.set_container(placement, container_id, limits)
                pod.save_host_cgroup(placement)
        rootfs, guest_spec = share_container_files(
            pod,
            container_id,
            loaded.config,
            loaded.path,
            guest_pids=guest_pid_lookup(root, pod),
            join_pod_network=network_after_create and not network_in_container,
            pod_network="" if owns_pod or netns is None else _owners_network(root, pod_id, netns),
        )
        oci_hooks.for_guest(guest_spec, hooks, oci_hooks.state(record, "created", None))
        with pod.client() as client:
            # A read-only rootfs is read-only on the host too: the mountpoints the spec needs
            # are made in an overlay whose upper layer is guest memory, then the agent makes
            # the root read-only (runc makes them in the rootfs before its remount).
            record.data["guest_pid"] = client.create_container(
                container_id,
                bundles.guest_document(guest_spec, "config.json"),
                rootfs,
                overlay=spec.root_readonly,
                stdin_null=_stdin_is_null() if stdin_null is None else stdin_null,
                stderr_to_stdout=not terminal and _one_output(stderr_to_stdout),
            )
        # A SIGTERM now is handled once the shim is recorded.
        with host_cgroup.inside(pod.host_cgroup()), signals_held():
            handle = shim.spawn(
                root,
                container_id,
                pod.agent_address,
                terminal=terminal,
                console_socket=console_socket,
                netns=standin_netns.for_spec(spec),
            )
            record.data["shim"] = handle.to_json()
            record.save()
        run_create_hooks(record, hooks, handle.pid, spec.process.env)
        record.set_status(Status.CREATED)
        if pid_file is not None:
            write_pid_file(pid_file, handle.pid)
    except BaseException:
        if record is not None:
            teardown(root, record, pod)
        raise
    return record


def _owners_network(root: Path, pod_id: str, netns: Path) -> str:
    """Where a member joining network namespace ``netns`` goes in the guest: the pod owner's
    own namespace when the pod network lives there (set up after create with a user
    namespace, docs/networking.md) and ``netns`` is its stand-in's namespace (by identity:
    ``/proc/<pid>/ns/net`` or a client's bind mount of it); else "" (the guest's root one)."""
    from sandbox.errors import SandboxError

    try:
        owner = ContainerRecord.load(root, pod_id)
        standin = owner.shim
        if not owner.data.get("network_in_container") or standin is None:
            return ""
        mine, theirs = os.stat(netns), os.stat(f"/proc/{standin.pid}/ns/net")
        if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino) or not standin.alive():
            return ""
        return f"/proc/{int(owner.data['guest_pid'])}/ns/net"
    except (SandboxError, OSError, KeyError, ValueError):
        return ""


def _host_cgroup(
    config: dict[str, Any], container_id: str, owns_pod: bool, systemd: bool
) -> tuple[host_cgroup.Request, host_cgroup.Placement] | None:
    """The pod's host cgroup, judged on this host (ConfigError, before any VM boots); None
    for a container joining a pod (it lives in its pod's)."""
    if not owns_pod:
        return None
    linux = config.get("linux")
    raw = linux.get("cgroupsPath") if isinstance(linux, dict) else None
    if raw is not None and not isinstance(raw, str):
        raise ConfigError("linux.cgroupsPath must be a string")
    req = host_cgroup.request(raw, systemd, container_id)
    return req, host_cgroup.plan(req)


def run_create_hooks(
    record: ContainerRecord, hooks: oci_hooks.Hooks, pid: int, process_env: list[str]
) -> None:
    """prestart, createRuntime, createContainer, in that order, on the host (docs/hooks.md).

    Status ``creating``; ``pid`` is the container's pid as clients know it (the shim's, what
    ``state`` reports). createContainer runs as runc runs it, in the rootfs directory with the
    process's environment when it has no ``env``; the others in the bundle directory with
    this process's environment. The first failure raises HookError.
    """
    doc = oci_hooks.state(record, "creating", pid)
    bundle = str(record.data["bundle"])
    oci_hooks.run_hooks(hooks, "prestart", doc, cwd=bundle)
    oci_hooks.run_hooks(hooks, "createRuntime", doc, cwd=bundle)
    oci_hooks.run_hooks(
        hooks,
        "createContainer",
        doc,
        cwd=str(record.data["rootfs"]),
        inherited_env=[e for e in process_env if isinstance(e, str)],
    )


def write_pid_file(path: Path, pid: int) -> None:
    import secrets

    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    tmp.write_text(str(pid))
    os.replace(tmp, path)


def _one_output(wanted: bool | None) -> bool:
    """Whether the process gets one pipe for stdout and stderr: ``wanted``, or by default
    (None) when this process's are one open file (``2>&1``), which runc's create passes on
    to its process (both streams then land in the order written)."""
    return same_file.one_description(1, 2) if wanted is None else wanted


def _stdin_is_null() -> bool:
    """Whether this process's stdin (which the container's host stand-in inherits and
    relays) is /dev/null, or closed: the container's is then /dev/null too, as runc passes
    its own on (podman without -i, conmon's /dev/null), not an empty pipe."""
    try:
        ours = os.fstat(0)
    except OSError:
        return True
    null = os.stat(os.devnull)
    return stat.S_ISCHR(ours.st_mode) and ours.st_rdev == null.st_rdev
