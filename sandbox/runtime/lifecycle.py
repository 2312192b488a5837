"""The runc-compatible container lifecycle: create, start, state, kill, delete, exec, pause,
resume, update, ps, list. CLI verbs call these; see ../shared/cli-contract.md for the calls
containerd, CRI and podman make.

Pods (design decision 1): a container whose annotations mark it as a CRI sandbox boots the
pod VM under the pod id from its sandbox-id annotation; containers naming that sandbox id join
it; a container without annotations is a pod of its own (pod id = container id). The VM goes
away with the pod's sandbox container, or with the last container of the pod.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal as signals
import struct
import termios
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox import store as state
from sandbox.errors import AgentError, ConfigError, NotFoundError, SandboxError, StateError
from sandbox.runtime.record import ContainerRecord, Status

if TYPE_CHECKING:
    from sandbox.pod.agent_client import ContainerClient
    from sandbox.pod.lifecycle import Pod

MAX_CONFIG_BYTES = 4 * 1024 * 1024
SANDBOX_TYPE_KEYS = ("io.kubernetes.cri.container-type", "io.kubernetes.cri-o.ContainerType")
SANDBOX_ID_KEYS = ("io.kubernetes.cri.sandbox-id", "io.kubernetes.cri-o.SandboxID")


def load_bundle(bundle: Path) -> dict[str, Any]:
    """config.json of ``bundle``, parsed and minimally checked; ConfigError when unusable."""
    path = bundle / "config.json"
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"bundle {bundle} has no config.json") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        spec = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(spec, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    if not isinstance(spec.get("process"), dict) or not spec["process"].get("args"):
        raise ConfigError(f"{path}: process.args is required")
    return spec


def pod_of(container_id: str, spec: dict[str, Any]) -> tuple[str, bool]:
    """(pod id, whether this container owns the pod) from the CRI annotations."""
    annotations = spec.get("annotations") or {}
    kind = next((annotations[k] for k in SANDBOX_TYPE_KEYS if k in annotations), None)
    sandbox_id = next((annotations[k] for k in SANDBOX_ID_KEYS if k in annotations), None)
    if kind == "sandbox" or sandbox_id is None:
        return container_id if sandbox_id is None else str(sandbox_id), True
    return str(sandbox_id), False


def _load_pod(root: Path, pod_id: str) -> Pod:
    """The recorded pod (imported here: verbs that never reach a pod, e.g. for an unknown
    id, do not pay for the gRPC client, QEMU and network modules)."""
    from sandbox.pod.lifecycle import Pod

    return Pod.load(root, pod_id)


def _pod_lock(root: Path, pod_id: str) -> contextlib.AbstractContextManager[None]:
    return state.locked(root, f"pod-{state.pod_dir_name(pod_id)}")


def _guest_pid_lookup(root: Path, pod: Pod) -> Any:
    def lookup(path: str) -> int | None:
        parts = path.split("/")  # /proc/<pid>/ns/<type>
        if len(parts) != 5 or parts[1] != "proc" or not parts[2].isdigit():
            return None
        for cid in pod.record.get("containers", []):
            with contextlib.suppress(SandboxError):
                record = ContainerRecord.load(root, cid)
                shim_ref = record.shim
                if shim_ref is not None and shim_ref.pid == int(parts[2]):
                    return int(record.data["guest_pid"])
        return None

    return lookup


def _run_hooks(spec: dict[str, Any], name: str, record: ContainerRecord) -> None:
    """Run the OCI hooks ``name`` on the host with the state on stdin (runtime spec)."""
    import subprocess

    for hook in (spec.get("hooks") or {}).get(name) or []:
        path = hook.get("path")
        if not isinstance(path, str) or not os.path.isabs(path):
            raise ConfigError(f"hooks.{name}: path must be absolute")
        env = dict(item.split("=", 1) for item in hook.get("env") or [] if "=" in item)
        try:
            done = subprocess.run(
                hook.get("args") or [path],
                executable=path,
                env=env,
                capture_output=True,
                input=json.dumps(record.oci_state()).encode(),
                timeout=hook.get("timeout") or 30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"{name} hook {path} failed: {exc}") from exc
        if done.returncode != 0:
            detail = done.stderr.decode(errors="replace").strip()[:200]
            raise ConfigError(f"{name} hook {path} exited {done.returncode}: {detail}")


def create(
    root: Path,
    container_id: str,
    bundle: Path,
    pid_file: Path | None = None,
    console_socket: Path | None = None,
) -> ContainerRecord:
    """Create a container (booting or joining its pod VM); leave it ``created``.

    On any failure everything this call started is undone and the id is free again.
    """
    from sandbox.pod.lifecycle import Pod
    from sandbox.pod.network import netns_path_of
    from sandbox.pod.sharing import share_container_files
    from sandbox.runtime import shim

    state.validate_id(container_id)
    bundle = bundle.resolve()
    spec = load_bundle(bundle)
    terminal = bool(spec["process"].get("terminal"))
    if terminal and console_socket is None:
        raise ConfigError("process.terminal is true: --console-socket is required")
    pod_id, owns_pod = pod_of(container_id, spec)
    record = ContainerRecord.new(
        root,
        container_id,
        {
            "bundle": str(bundle),
            "pod_id": pod_id,
            "owns_pod": owns_pod,
            "terminal": terminal,
            "annotations": spec.get("annotations") or {},
            "rootfs": str((bundle / spec.get("root", {}).get("path", "rootfs")).resolve()),
        },
    )
    pod: Pod | None = None
    try:
        with _pod_lock(root, pod_id):
            if owns_pod:
                # The pod's network namespace (CNI, podman) is carried into the VM.
                pod = Pod.boot(root, pod_id, netns=netns_path_of(spec))
            else:
                try:
                    pod = Pod.load(root, pod_id)
                except NotFoundError:
                    raise NotFoundError(
                        f"pod sandbox {pod_id} of container {container_id} does not exist"
                    ) from None
            pod.record.setdefault("containers", []).append(container_id)
            pod.save()
        rootfs, guest_spec = share_container_files(
            pod, container_id, spec, bundle, guest_pids=_guest_pid_lookup(root, pod)
        )
        with pod.client() as client:
            record.data["guest_pid"] = client.create_container(
                container_id, json.dumps(guest_spec).encode(), rootfs
            )
        handle = shim.spawn(
            root, container_id, pod.agent_address, terminal=terminal, console_socket=console_socket
        )
        record.data["shim"] = handle.to_json()
        record.set_status(Status.CREATED)
        _run_hooks(spec, "createRuntime", record)
        if pid_file is not None:
            _write_pid_file(pid_file, handle.pid)
    except BaseException:
        _teardown(root, record, pod)
        raise
    return record


def _write_pid_file(path: Path, pid: int) -> None:
    import secrets

    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    tmp.write_text(str(pid))
    os.replace(tmp, path)


def start(root: Path, container_id: str) -> None:
    """Let a created container run its process."""
    record = ContainerRecord.load(root, container_id)
    if not record.status.can_start():
        raise StateError(f"cannot start container {container_id}: it is {record.status}")
    pod = _load_pod(root, record.pod_id)
    with pod.client() as client:
        if record.data.get("terminal"):
            _sync_terminal_size(record, client)
        client.start_container(container_id)
    record.set_status(Status.RUNNING)
    with contextlib.suppress(SandboxError):
        _run_hooks(load_bundle(Path(record.data["bundle"])), "poststart", record)


def _sync_terminal_size(record: ContainerRecord, client: ContainerClient) -> None:
    """Give the guest terminal the size the caller set on its pty master, before start.

    The shim relays later changes on SIGWINCH, asynchronously; this makes the first size
    certain when the process starts (``stty size`` as the first command sees it). The
    shim's pty slave is its fd :data:`shim.TERMINAL_FD`; a shim that is gone or not this
    one (pid reuse) is left alone.
    """
    from sandbox.runtime import shim

    handle = record.shim
    if handle is None or not handle.alive():
        return
    try:
        fd = os.open(
            f"/proc/{handle.pid}/fd/{shim.TERMINAL_FD}", os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK
        )
    except OSError:
        return
    try:
        if not os.isatty(fd) or not handle.alive():
            return
        rows, cols = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))[:2]
    except OSError:
        return
    finally:
        os.close(fd)
    if rows and cols:
        client.resize(record.id, "", rows, cols)


def parse_signal(text: str) -> int:
    """A signal number from '9', 'KILL' or 'SIGKILL'; ConfigError otherwise."""
    if text.isdigit():
        number = int(text)
        if 0 < number < 65:
            return number
    else:
        name = text.upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        with contextlib.suppress(AttributeError):
            return int(getattr(signals, name))
    raise ConfigError(f"invalid signal {text!r}")


def kill(root: Path, container_id: str, signum: int, all_processes: bool = False) -> None:
    """Send ``signum`` to the container's init (or, with ``all_processes``, to all of it)."""
    record = ContainerRecord.load(root, container_id)
    if not record.status.can_kill():
        if all_processes:
            return
        raise StateError(f"container {container_id} is not running")
    with _load_pod(root, record.pod_id).client() as client:
        client.signal(container_id, "", signum, all_processes)


def delete(root: Path, container_id: str, force: bool = False) -> None:
    """Remove a stopped (or, with ``force``, any) container and everything it started."""
    try:
        record = ContainerRecord.load(root, container_id)
    except NotFoundError:
        if force:
            return
        raise
    status = record.status
    if not force and not status.can_delete():
        raise StateError(
            f"cannot delete container {container_id}: it is {status}; stop it first or use --force"
        )
    pod: Pod | None = None
    with contextlib.suppress(NotFoundError):
        pod = _load_pod(root, record.pod_id)
    _teardown(root, record, pod)
    with contextlib.suppress(SandboxError, OSError, KeyError):
        _run_hooks(load_bundle(Path(record.data["bundle"])), "poststop", record)


def _teardown(root: Path, record: ContainerRecord, pod: Pod | None) -> None:
    """Undo everything a container has: guest state, mounts, shim, pod membership, record.

    The container that owns its pod takes the VM with it, and with the VM everything of the
    container in the guest: no guest call is made first (in a broken pod, e.g. virtiofsd
    killed, it would only wait out its deadline). A member of a pod that lives on is
    removed from the guest and the pod share.
    """
    from sandbox.pod.sharing import unshare_container_files

    owner = bool(record.data.get("owns_pod"))
    if pod is not None and not owner:
        qemu = pod.process("qemu")
        if qemu is not None and qemu.alive():
            with contextlib.suppress(SandboxError), pod.client(timeout=10.0) as client:
                client.remove_container(record.id)
        unshare_container_files(pod, record.id)
    if pod is not None:
        with _pod_lock(root, pod.id):
            with contextlib.suppress(SandboxError, OSError):
                pod = _load_pod(root, pod.id)
            members = [c for c in pod.record.get("containers", []) if c != record.id]
            pod.record["containers"] = members
            if owner or not members:
                _stop_pod(pod)
            else:
                pod.save()
    shim_ref = record.shim
    if shim_ref is not None:
        shim_ref.terminate(timeout=2.0)  # after its VM is gone it has exited already
    import shutil

    shutil.rmtree(record.dir, ignore_errors=True)


def _stop_pod(pod: Pod) -> None:
    """Stop a pod's VM: cleanly through its agent, or at once when its virtiofsd or agent
    proxy is gone. Without virtiofsd the guest hangs on the share until the deadline; without
    the proxy the agent cannot be asked (and ``stop`` runs under the pod lock, which a new
    proxy needs). Nothing is lost either way: the share is not write-back cached, so what the
    guest wrote is on the host already."""
    processes = [pod.process(name) for name in ("virtiofsd", "proxy")]
    if any(ref is not None and not ref.alive() for ref in processes):
        pod.destroy()
    else:
        pod.stop()


def exec_process(
    root: Path,
    container_id: str,
    process: dict[str, Any],
    detach: bool,
    pid_file: Path | None = None,
    console_socket: Path | None = None,
) -> int:
    """Run ``process`` in a running container. Detached: spawn a shim, write its pid, return
    0. Attached: relay stdio here and return the process's exit status."""
    record = ContainerRecord.load(root, container_id)
    if not record.status.can_exec():
        raise StateError(f"cannot exec in container {container_id}: it is {record.status}")
    terminal = bool(process.get("terminal"))
    if terminal and detach and console_socket is None:
        raise ConfigError("exec with a terminal needs --console-socket")
    pod = _load_pod(root, record.pod_id)
    import secrets

    from sandbox.runtime import shim

    exec_id = f"exec-{secrets.token_hex(8)}"
    with pod.client() as client:
        client.exec_process(container_id, exec_id, json.dumps(process).encode())
        if detach:
            handle = shim.spawn(
                root,
                container_id,
                pod.agent_address,
                exec_id=exec_id,
                terminal=terminal,
                console_socket=console_socket,
            )
            if pid_file is not None:
                _write_pid_file(pid_file, handle.pid)
            return 0
        from sandbox.pod.sharing import StdioRelay

        relay = StdioRelay(client, container_id, exec_id, 0, 1, 2, terminal)
        relay.start()
        _forward_signals(client, container_id, exec_id)
        status, _sig, _oom = client.wait_process(container_id, exec_id)
        relay.join(30)
        return status


def _forward_signals(client: ContainerClient, container_id: str, exec_id: str) -> None:
    """Relay the signals an attached ``exec`` gets (Ctrl-C, a supervisor's SIGTERM) to its
    process in the guest, as ``runc exec`` does; the call then returns the process's status."""
    import signal
    import threading

    from sandbox.runtime.shim import FORWARDED_SIGNALS

    def send(signum: int) -> None:
        with contextlib.suppress(AgentError):
            client.signal(container_id, exec_id, signum)

    def handler(signum: int, _frame: object) -> None:
        threading.Thread(target=send, args=(signum,), daemon=True).start()

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, handler)


def set_paused(root: Path, container_id: str, paused: bool) -> None:
    """pause (freeze) or resume (thaw) a container."""
    record = ContainerRecord.load(root, container_id)
    allowed = record.status.can_pause() if paused else record.status.can_resume()
    if not allowed:
        verb = "pause" if paused else "resume"
        raise StateError(f"cannot {verb} container {container_id}: it is {record.status}")
    with _load_pod(root, record.pod_id).client() as client:
        if paused:
            client.pause_container(container_id)
        else:
            client.resume_container(container_id)
    record.set_status(Status.PAUSED if paused else Status.RUNNING)


def update(root: Path, container_id: str, resources: dict[str, Any]) -> None:
    """Apply OCI linux.resources to a live container."""
    record = ContainerRecord.load(root, container_id)
    if record.status is Status.STOPPED:
        raise StateError(f"cannot update container {container_id}: it is stopped")
    with _load_pod(root, record.pod_id).client() as client:
        client.update_container(container_id, json.dumps(resources).encode())


def processes(root: Path, container_id: str) -> list[int]:
    """Pids of the container's processes (as the guest numbers them)."""
    record = ContainerRecord.load(root, container_id)
    if record.status is Status.STOPPED:
        return []
    try:
        with _load_pod(root, record.pod_id).client() as client:
            return client.list_processes(container_id)
    except (AgentError, NotFoundError):
        return []
