"""``exec``: another process in a running container, attached or detached (runc exec)."""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agentapi.limits import MAX_READ_BYTES
from sandbox.errors import AgentError, CommandError, ConfigError, StateError
from sandbox.runtime.bundle import guest_document, read_config
from sandbox.runtime.record import ContainerRecord

#: Where the guest's agent mounts the root of a container created on an overlay (``run``'s):
#: ``<this>/<container id>/rootfs`` (agent.containers.OVERLAY_ROOT).
GUEST_OVERLAY = "/run/pysandbox-overlay"


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
    ``--env``/``--cwd``/``--user``/``--tty`` (with ``--tty`` in a container of
    ``pysandbox run``, TERM=xterm when the env has no TERM, as docker exec -t). ``--user`` is
    runc's UID[:GID], or docker's USER[:GROUP] with names (:func:`_user`). NotFoundError
    for an unknown id (checked first, as runc), ConfigError for unusable input.
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
        if (
            tty
            and "run" in record.data
            and not any(str(entry).startswith("TERM=") for entry in process["env"])
        ):
            # A container of ``pysandbox run`` gets docker's ``exec -t`` habit (and what
            # ``run -t`` gives): TERM=xterm unless set. runc exec invents no TERM.
            process["env"].append("TERM=xterm")
        if cwd:
            process["cwd"] = cwd
        if user:
            process["user"] = _user(root, record, container_id, user)
    if tty:
        process["terminal"] = True
    return process


def _user(root: Path, record: ContainerRecord, container_id: str, user: str) -> dict[str, Any]:
    """``process.user`` for ``exec --user``: numeric ``UID[:GID]`` as runc takes it (gid 0
    when none is given); with a name, ``USER[:GROUP]`` resolved as docker exec resolves it,
    in the container's own /etc/passwd and /etc/group (:func:`images.resolve_user_with`):
    for a container of ``pysandbox run``, read through the guest's agent in its root as the
    container sees it (what the container changed there counts); otherwise in its rootfs on
    the host. ConfigError for an unknown name or a malformed user."""
    uid, _, gid = user.partition(":")
    if uid.isdigit() and (not gid or gid.isdigit()):
        return {"uid": int(uid), "gid": int(gid or 0)}
    from sandbox.image import store as images

    # With the supplementary groups docker exec gives a user named so (its /etc/group).
    if "run" in record.data:
        # Cached: the user and its groups read the same two files, each an RPC to the guest.
        read = functools.cache(
            _guest_reader(root, record.pod_id, f"{GUEST_OVERLAY}/{container_id}/rootfs")
        )
        ids = images.resolve_user_with(read, user, f"{container_id}:", "the container")
        groups = images.supplementary_gids_with(read, user, f"{container_id}:")
    else:
        rootfs = Path(str(record.data.get("rootfs", "")))
        ids = images.resolve_user(rootfs, user)
        groups = images.supplementary_gids(rootfs, user)
    result: dict[str, Any] = {"uid": ids[0], "gid": ids[1]}
    if groups:
        result["additionalGids"] = groups
    return result


def _guest_reader(root: Path, pod_id: str, guest_root: str) -> Callable[[str], bytes | None]:
    """A reader of files below ``guest_root`` in pod ``pod_id``'s guest (ReadFile, at most
    :data:`MAX_READ_BYTES`): a missing file is None, another failure OSError."""
    from sandbox.runtime.pods import load_pod

    pod = load_pod(root, pod_id)

    def read(path: str) -> bytes | None:
        try:
            with pod.client() as client:
                return client.read_file(f"{guest_root}/{path}", MAX_READ_BYTES)
        except AgentError as exc:
            if exc.code == "NOT_FOUND":
                return None
            raise OSError(errno.EIO, exc.detail) from None

    return read


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
    the exec's host stand-in, listed by ``ps --format json``; the pod's agent proxy does the
    calls: :mod:`sandbox.runtime.exec_attach`, no gRPC here). ``process`` is validated here
    first (:func:`ocispec.spec.parse_process`), as the guest will. A program that cannot be
    run is a CommandError (127 or 126) whose message is the guest runtime's reason only."""
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
    if terminal and not detach and "consoleSize" not in process:
        # The process's terminal has ours size from its first moment (docker exec -t; runc
        # sizes it only after the start, so a quick ``stty size`` may read 0 x 0).
        from sandbox import terminal_size

        size = terminal_size.console_size(terminal_size.of_caller())
        if size is not None:
            process = {**process, "consoleSize": size}
    exec_id = f"exec-{os.urandom(8).hex()}"  # not secrets: its import costs 3-5 ms here
    document = guest_document(process, "process")
    try:
        if not detach:
            from sandbox.runtime import exec_attach

            return exec_attach.run(root, record.pod_id, container_id, exec_id, document, terminal)
        return _detached(root, record, exec_id, document, terminal, pid_file, console_socket)
    except CommandError as exc:
        # The program cannot be run: the reason alone, in runc's and docker's words
        # (exec: "x": executable file not found in $PATH), not which RPC carried it.
        raise CommandError(
            exc.detail, reason=exc.reason, rpc=exc.rpc, code=exc.code, exec_id=exc.exec_id
        ) from None


def _detached(
    root: Path,
    record: ContainerRecord,
    exec_id: str,
    document: bytes,
    terminal: bool,
    pid_file: Path | None,
    console_socket: Path | None,
) -> int:
    """Start the exec and its shim (which stands for it from then on); write its pid."""
    from agentapi import lazy_import

    lazy_import.install()  # asyncio, grpc.aio, ...: loaded only if used (sandbox/cli/main.py)
    from sandbox.pod import host_cgroup
    from sandbox.runtime import shim
    from sandbox.runtime.create import write_pid_file
    from sandbox.runtime.pods import load_pod

    container_id = record.id
    pod = load_pod(root, record.pod_id)
    with pod.client() as client:
        client.exec_process(container_id, exec_id, document)
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
