"""``exec``: another process in a running container, attached or detached (runc exec)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox.errors import AgentError, ConfigError, StateError
from sandbox.runtime.bundle import guest_document, read_config
from sandbox.runtime.create import write_pid_file
from sandbox.runtime.pods import load_pod
from sandbox.runtime.record import ContainerRecord

if TYPE_CHECKING:
    from sandbox.pod.agent_client import ContainerClient


def process_for(
    root: Path,
    container_id: str,
    process_file: str | None,
    command: list[str],
    tty: bool,
    env: list[str],
    cwd: str | None,
    user: str | None,
) -> dict[str, Any]:
    """The OCI ``process`` for ``runc exec``: ``--process FILE`` as given, or ``command``
    with the container's env, cwd, user, capabilities, noNewPrivileges and rlimits, then
    ``--env``/``--cwd``/``--user UID[:GID]``/``--tty``. NotFoundError for an unknown id
    (checked first, as runc), ConfigError for unusable input.
    """
    from ocispec.document import MAX_DOCUMENT_BYTES, decode
    from ocispec.errors import SpecError

    record = ContainerRecord.load(root, container_id)
    process: dict[str, Any]
    if process_file is not None:
        try:
            with open(process_file, "rb") as handle:
                raw = handle.read(MAX_DOCUMENT_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"cannot read process file {process_file}: {exc.strerror}") from exc
        try:
            process = decode(raw, f"process file {process_file}")
        except SpecError as exc:
            raise ConfigError(exc.message) from None
    else:
        if not command:
            raise ConfigError("exec needs --process FILE or a command")
        base = read_config(Path(record.data["bundle"])).get("process")
        if not isinstance(base, dict):
            raise ConfigError(f"bundle {record.data['bundle']}: config.json has no process object")
        process = {
            key: base[key]
            for key in ("env", "cwd", "user", "capabilities", "noNewPrivileges", "rlimits")
            if key in base
        }
        process["args"] = command
        process["terminal"] = tty
        process["env"] = [*process.get("env", []), *env]
        if cwd:
            process["cwd"] = cwd
        if user:
            uid, _, gid = user.partition(":")
            if not uid.isdigit() or (gid and not gid.isdigit()):
                raise ConfigError(f"invalid --user {user!r}: use UID[:GID]")
            process["user"] = {"uid": int(uid), "gid": int(gid or 0)}
    if tty:
        process["terminal"] = True
    return process


def exec_process(
    root: Path,
    container_id: str,
    process: dict[str, Any],
    detach: bool,
    pid_file: Path | None = None,
    console_socket: Path | None = None,
) -> int:
    """Run ``process`` in a running container. Detached: spawn a shim, write its pid, return
    0. Attached: relay stdio here and return the process's exit status (this process is then
    the exec's host stand-in, listed by ``ps --format json``). ``process`` is validated here
    first (:func:`ocispec.spec.parse_process`), as the guest will."""
    from ocispec.errors import SpecError
    from ocispec.spec import parse_process

    record = ContainerRecord.load(root, container_id)
    if not record.status.can_exec():
        raise StateError(f"{container_id}: {record.status.refusal('exec')}")
    try:
        terminal = parse_process(process, "process").terminal
    except SpecError as exc:
        raise ConfigError(f"exec: {exc.message}") from None
    if terminal and detach and console_socket is None:
        raise ConfigError("exec with a terminal needs --console-socket")
    pod = load_pod(root, record.pod_id)
    import secrets

    from sandbox.runtime import shim

    exec_id = f"exec-{secrets.token_hex(8)}"
    with pod.client() as client:
        client.exec_process(container_id, exec_id, guest_document(process, "process"))
        if detach:
            from sandbox.pod import host_cgroup

            with host_cgroup.inside(pod.host_cgroup()):
                handle = shim.spawn(
                    root,
                    container_id,
                    pod.agent_address,
                    exec_id=exec_id,
                    terminal=terminal,
                    console_socket=console_socket,
                )
            if pid_file is not None:
                write_pid_file(pid_file, handle.pid)
            return 0
        from sandbox.pod.stdio import StdioRelay

        standin = shim.name_standin(root, container_id, exec_id)  # this call stands for it
        try:
            relay = StdioRelay(client, container_id, exec_id, 0, 1, 2, terminal)
            relay.start()
            _forward_signals(client, container_id, exec_id)
            status, _sig, _oom = client.wait_process(container_id, exec_id)
            relay.join(shim.DRAIN_TIMEOUT)
        finally:
            shim.drop_standin(standin)
        return status


def _forward_signals(client: ContainerClient, container_id: str, exec_id: str) -> None:
    """Relay the signals an attached ``exec`` gets (Ctrl-C, a supervisor's SIGTERM) to its
    process in the guest, as ``runc exec`` does; the call then returns the process's status."""
    from sandbox.runtime.shim import FORWARDED_SIGNALS
    from sandbox.signal_forward import SignalForwarder

    def send(signum: int) -> None:
        with contextlib.suppress(AgentError):
            client.signal(container_id, exec_id, signum)

    SignalForwarder(dict.fromkeys(FORWARDED_SIGNALS, send)).install()
