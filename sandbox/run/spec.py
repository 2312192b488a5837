"""The OCI spec of a ``pysandbox run``: the default spec, the image's defaults, the options.

Every option is checked here, on the host, before a VM boots; a bad one raises
:class:`~sandbox.errors.RunError` (exit 125) naming the option and what to use instead.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox import store as state
from sandbox.errors import ConfigError, RunError
from sandbox.image import store as images
from sandbox.run.default_spec import default_spec

if TYPE_CHECKING:
    from sandbox.pod.sharing import HeldSources

_SIZE_RE = re.compile(r"^(\d+)([bkmg]?)$", re.IGNORECASE)
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_options(args: argparse.Namespace) -> None:
    """Refuse options of ``run`` that need no image to be judged (RunError/ConfigError)."""
    if args.name is not None:
        state.validate_id(args.name, "name")
    for flag, value in (("--pid-file", args.pid_file), ("--console-socket", args.console_socket)):
        if value is not None:
            raise RunError(f"{flag} is a runc flag: it needs --bundle DIR (an OCI bundle)")


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


def _volumes(args: argparse.Namespace, held: HeldSources) -> list[dict[str, Any]]:
    mounts = []
    for item in args.volume:
        parts = item.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise RunError(f"invalid volume {item!r}: use HOST:GUEST or HOST:GUEST:ro")
        host, guest = Path(parts[0]), parts[1]
        if not host.is_absolute() or not guest.startswith("/"):
            raise RunError(f"invalid volume {item!r}: both paths must be absolute")
        try:
            held.hold(host)  # what is checked now is what is mounted after the boot
        except FileNotFoundError:
            raise RunError(f"invalid volume {item!r}: {host} does not exist") from None
        except OSError as exc:
            raise RunError(f"invalid volume {item!r}: cannot open {host}: {exc.strerror}") from None
        options = ["rbind", "ro" if len(parts) == 3 and parts[2] == "ro" else "rw"]
        mounts.append(
            {"destination": guest, "type": "bind", "source": str(host), "options": options}
        )
    return mounts


def build_spec(args: argparse.Namespace, image: images.Image, held: HeldSources) -> dict[str, Any]:
    """The OCI spec for a run: image defaults, then options, then hardened defaults.

    The image's root filesystem and the volume sources are opened into ``held``: the share
    made after the VM booted mounts these very objects (docs/security.md)."""
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
    spec["mounts"] += _volumes(args, held)
    try:
        held.hold(image.rootfs)
    except OSError as exc:
        raise RunError(f"cannot open the image root {image.rootfs}: {exc.strerror}") from None
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
