"""``pysandbox run``: one command, one fresh VM, one container, secure defaults.

Shares the runtime's code path (pod boot, file sharing, agent container RPCs); only the
image resolution and the spec built from command-line options are specific to it.
Exit status: the container's (128+N when killed by signal N); 125 when pysandbox itself
fails, 126 when the command cannot be run, 127 when it is not found, 124 on --timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import signal
import sys
import termios
import threading
import tty
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sandbox import images, state
from sandbox.agent_client import ContainerClient
from sandbox.container import StdioRelay, share_container_files, unshare_container_files
from sandbox.errors import AgentError, ConfigError, SandboxError
from sandbox.pod import DEFAULT_MEMORY_MIB, Pod
from sandbox.spec import default_spec

EXIT_RUNTIME, EXIT_CANNOT_INVOKE, EXIT_NOT_FOUND, EXIT_TIMEOUT = 125, 126, 127, 124
_SIZE_RE = re.compile(r"^(\d+)([bkmg]?)$", re.IGNORECASE)
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
CONTAINER_ID = "main"


class RunError(SandboxError):
    """A failure of ``run`` with the exit status docker would use."""

    def __init__(self, message: str, exit_code: int = EXIT_RUNTIME) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def parse_size(text: str) -> int:
    """Bytes of a docker-style size ('256m', '1g', '1048576')."""
    match = _SIZE_RE.match(text.strip())
    if not match:
        raise RunError(f"invalid size {text!r}: use a number with an optional b, k, m or g")
    scale = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match.group(2).lower()]
    return int(match.group(1)) * scale


def _env(args: argparse.Namespace, base: list[str]) -> list[str]:
    merged: dict[str, str] = {}
    for item in base:
        key, _, value = item.partition("=")
        merged[key] = value
    entries: list[str] = []
    for env_file in args.env_file:
        try:
            lines = env_file.read_text().splitlines()
        except OSError as exc:
            raise RunError(f"cannot read env file {env_file}: {exc.strerror}") from exc
        entries += [line for line in lines if line.strip() and not line.startswith("#")]
    entries += args.env
    for item in entries:
        key, sep, value = item.partition("=")
        if not _ENV_NAME_RE.match(key):
            raise RunError(f"invalid environment variable {item!r}: use NAME=VALUE")
        if not sep:
            if key not in os.environ:
                continue
            value = os.environ[key]
        merged[key] = value
    return [f"{k}={v}" for k, v in merged.items()]


def _user(rootfs: Path, spec_user: str) -> dict[str, Any]:
    """The spec's ``process.user`` for ``-u``/the image's ``User``: names resolved in the image."""
    try:
        uid, gid = images.resolve_user(rootfs, spec_user)
    except ConfigError as exc:
        raise RunError(str(exc)) from None
    return {"uid": uid, "gid": gid}


def _volumes(args: argparse.Namespace) -> list[dict[str, Any]]:
    mounts = []
    for item in args.volume:
        parts = item.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise RunError(f"invalid volume {item!r}: use HOST:GUEST or HOST:GUEST:ro")
        host, guest = Path(parts[0]), parts[1]
        if not host.is_absolute() or not guest.startswith("/"):
            raise RunError(f"invalid volume {item!r}: both paths must be absolute")
        if not host.exists():
            raise RunError(f"invalid volume {item!r}: {host} does not exist")
        options = ["rbind", "ro" if len(parts) == 3 and parts[2] == "ro" else "rw"]
        mounts.append(
            {"destination": guest, "type": "bind", "source": str(host), "options": options}
        )
    return mounts


def build_spec(args: argparse.Namespace, image: images.Image) -> dict[str, Any]:
    """The OCI spec for a run: image defaults, then options, then hardened defaults."""
    argv = list(args.command) or [*image.entrypoint, *image.cmd]
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise RunError("no command given and the image has none")
    spec = default_spec(argv, rootfs=str(image.rootfs), terminal=args.tty)
    process = spec["process"]
    process["env"] = _env(args, [*image.env, "TERM=xterm"] if args.tty else image.env)
    process["cwd"] = args.workdir or image.cwd
    if not process["cwd"].startswith("/"):
        raise RunError(f"invalid working directory {process['cwd']!r}: must be absolute")
    if args.user or image.user:
        process["user"] = _user(image.rootfs, args.user or image.user)
    spec["root"]["readonly"] = args.read_only
    spec["hostname"] = args.name or "pysandbox"
    spec["mounts"] += _volumes(args)
    resources: dict[str, Any] = spec["linux"]["resources"]
    if args.memory:
        resources["memory"] = {"limit": parse_size(args.memory)}
    if args.cpus is not None:
        if not 0 < args.cpus <= 64:
            raise RunError(f"invalid --cpus {args.cpus}: must be in (0, 64]")
        resources["cpu"] = {"period": 100000, "quota": int(args.cpus * 100000)}
    if args.pids_limit <= 0:
        raise RunError(f"invalid --pids-limit {args.pids_limit}: must be positive")
    resources["pids"] = {"limit": args.pids_limit}
    if args.network == "user":
        # Share the guest's root network namespace, where the agent configures the NIC.
        linux = spec["linux"]
        linux["namespaces"] = [ns for ns in linux["namespaces"] if ns.get("type") != "network"]
    return spec


@contextlib.contextmanager
def _raw_terminal(active: bool) -> Iterator[None]:
    if not active:
        yield
        return
    saved = termios.tcgetattr(sys.stdin.fileno())
    tty.setraw(sys.stdin.fileno())
    try:
        yield
    finally:
        termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)


def _exit_code_for(error: AgentError) -> int:
    text = str(error)
    if "executable file not found" in text or "no such file or directory" in text.lower():
        return EXIT_NOT_FOUND
    if "permission denied" in text.lower():
        return EXIT_CANNOT_INVOKE
    return EXIT_RUNTIME


def run(args: argparse.Namespace, root: Path) -> int:
    """Run one container in a fresh VM; return its exit status.

    With ``-d`` the run is detached instead (see :mod:`sandbox.detached`): its name is
    printed and 0 returned once the process started.
    """
    if args.name is not None:
        state.validate_id(args.name, "name")
    for flag, value in (("--pid-file", args.pid_file), ("--console-socket", args.console_socket)):
        if value is not None:
            raise RunError(f"{flag} is a runc flag: it needs --bundle DIR (an OCI bundle)")
    if args.detach:
        from sandbox import detached

        return detached.run_detached(args, root)
    image = images.resolve(args.image, progress=True)
    spec = build_spec(args, image)
    pod = boot_pod(root, args.name or f"run-{secrets.token_hex(6)}", args, spec)
    try:
        return _run_in_pod(args, pod, spec, image)
    finally:
        with contextlib.suppress(SandboxError):
            unshare_container_files(pod, CONTAINER_ID)
        pod.stop()


def boot_pod(root: Path, pod_id: str, args: argparse.Namespace, spec: dict[str, Any]) -> Pod:
    """Boot the VM of a run: memory sized for the spec's limit, the run's network and
    hostname. On failure nothing is left running (Pod.boot's contract)."""
    memory_mib = DEFAULT_MEMORY_MIB
    if "memory" in spec["linux"]["resources"]:
        memory_mib = max(memory_mib, spec["linux"]["resources"]["memory"]["limit"] // 2**20 + 256)
    return Pod.boot(
        root,
        pod_id,
        memory_mib=min(memory_mib, 65536),
        user_network=args.network == "user",
        hostname=str(spec.get("hostname") or ""),
    )


def create_in_pod(
    pod: Pod, container_id: str, spec: dict[str, Any], image: images.Image, read_only: bool
) -> int:
    """Share the image read-only and create the container in the guest (an overlay with a
    guest-memory upper layer unless ``read_only``); return its guest pid.

    A command that cannot be run raises RunError with docker's 126/127. The caller undoes
    the share on failure (``unshare_container_files``).
    """
    guest_rootfs, guest_spec = share_container_files(
        pod, container_id, spec, image.rootfs.parent, rootfs_readonly=True
    )
    guest_spec["mounts"] += _network_file_mounts(pod)
    with pod.client() as client:
        try:
            return client.create_container(
                container_id, json.dumps(guest_spec).encode(), guest_rootfs, overlay=not read_only
            )
        except AgentError as exc:
            raise RunError(
                str(exc).removeprefix("agent CreateContainer failed: "), _exit_code_for(exc)
            ) from exc


def _run_in_pod(
    args: argparse.Namespace, pod: Pod, spec: dict[str, Any], image: images.Image
) -> int:
    create_in_pod(pod, CONTAINER_ID, spec, image, args.read_only)
    with pod.client() as client:
        stdin = sys.stdin.fileno() if args.interactive else None
        relay = StdioRelay(
            client, CONTAINER_ID, "", stdin, sys.stdout.fileno(), sys.stderr.fileno(), args.tty
        )
        terminal = args.tty and sys.stdin.isatty()
        with _raw_terminal(terminal), _forward_signals(client, terminal):
            relay.start()
            client.start_container(CONTAINER_ID)
            if terminal:
                _resize(client)
            if not args.interactive:
                client.close_stdin(CONTAINER_ID)
            try:
                status, _sig, oom = client.wait_process(CONTAINER_ID, "", args.timeout)
            except AgentError:
                if args.timeout is None:
                    raise
                client.signal(CONTAINER_ID, "", signal.SIGKILL, all=True)
                relay.join(10)
                print(f"pysandbox: timed out after {args.timeout:g}s; killed", file=sys.stderr)
                return EXIT_TIMEOUT
            relay.join(30)
        if oom:
            print("pysandbox: the container was killed: out of memory", file=sys.stderr)
        with contextlib.suppress(AgentError):
            client.remove_container(CONTAINER_ID)
        return status


def _network_file_mounts(pod: Pod) -> list[dict[str, Any]]:
    """Bind mounts of the resolv.conf and hosts the agent wrote (guest paths: added to the
    spec after its host paths were rewritten)."""
    files = (pod.record.get("network") or {}).get("guest_files") or {}
    mounts = []
    for destination, key in (("/etc/resolv.conf", "resolv_conf"), ("/etc/hosts", "hosts")):
        if files.get(key):
            mounts.append(
                {
                    "destination": destination,
                    "type": "bind",
                    "source": files[key],
                    "options": ["rbind", "ro", "nosuid", "nodev", "noexec"],
                }
            )
    return mounts


def _resize(client: ContainerClient) -> None:
    with contextlib.suppress(OSError, AgentError):
        cols, rows = os.get_terminal_size(sys.stdin.fileno())
        client.resize(CONTAINER_ID, "", rows, cols)


@contextlib.contextmanager
def _forward_signals(client: ContainerClient, terminal: bool) -> Iterator[None]:
    """Forward SIGINT/SIGTERM/SIGHUP to the container (and window size changes)."""

    def forward(signum: int, _frame: object) -> None:
        threading.Thread(target=_signal_quietly, args=(client, signum), daemon=True).start()

    wanted = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
    previous = {sig: signal.signal(sig, forward) for sig in wanted}
    if terminal:
        previous[signal.SIGWINCH] = signal.signal(
            signal.SIGWINCH, lambda *_: threading.Thread(target=_resize, args=(client,)).start()
        )
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _signal_quietly(client: ContainerClient, signum: int) -> None:
    with contextlib.suppress(AgentError):
        client.signal(CONTAINER_ID, "", signum)
