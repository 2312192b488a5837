"""The OCI spec of a ``pysandbox run``: the default spec, the image's defaults, the options.

Every option is checked here, on the host, before a VM boots -- those that need no image by
:func:`check_options`, before the image is even unpacked -- and the spec built from them is
validated as ``create`` validates a bundle's (:mod:`ocispec`); a bad one raises
:class:`~sandbox.errors.RunError` (exit 125) naming the option and what to use instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ocispec.document import MAX_DOCUMENT_BYTES
from ocispec.errors import SpecError
from ocispec.spec import MAX_HOSTNAME, MIN_MEMORY_LIMIT, RLIMITS, UINT64_MAX, parse_spec
from sandbox import store as state
from sandbox.errors import EXIT_NOT_FOUND, ConfigError, NotFoundError, RunError
from sandbox.image import store as images
from sandbox.run.default_spec import RUN_SYSCTLS, default_spec

if TYPE_CHECKING:
    from sandbox.pod.sharing import HeldSources

_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)([kmg]?)(?:i?b)?$", re.IGNORECASE)
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: A hostname ``--hostname`` takes: letters, digits, ``-``, ``_`` and ``.``, a letter or digit
#: first (it goes into /etc/hosts and /etc/hostname as one word).
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: The prefix of a run's generated name; the hex digits after it are its default hostname.
RUN_PREFIX = "run-"

#: A run's VM memory beyond the container's limit (guest kernel, agent, runtime), MiB.
VM_OVERHEAD_MIB = 256
#: The smallest --cpus: cpu.max takes a quota of at least 1 ms per 100 ms period.
MIN_CPUS = 0.01
#: The largest VM a run boots, MiB (Pod.boot's limit); a larger limit gets this VM.
MAX_VM_MIB = 65536


def _host_cpus() -> int:
    """:func:`hypervisor.qemu_args.host_cpus`, imported when used: the module (its 31
    dataclasses, ~18 ms) is not needed by a run that takes a VM of the warm pool."""
    from hypervisor.qemu_args import host_cpus

    return host_cpus()


def check_options(args: argparse.Namespace) -> None:
    """Refuse options of ``run`` that need no image to be judged (RunError/ConfigError):
    the name, runc-only flags, --memory (its minimum, and a VM this host can give),
    --cpus, --pids-limit and --timeout."""
    if args.name is not None:
        state.validate_id(args.name, "name")
        if len(args.name) > MAX_HOSTNAME:
            raise RunError(
                f"invalid --name {args.name[:40]!r}...: it is also the hostname, which holds at "
                f"most {MAX_HOSTNAME} characters"
            )
    if args.hostname and not (
        _HOSTNAME_RE.match(args.hostname) and len(args.hostname) <= MAX_HOSTNAME
    ):
        raise RunError(
            f"invalid --hostname {args.hostname[:40]!r}: use at most {MAX_HOSTNAME} letters, "
            "digits, '-', '_' or '.', starting with a letter or digit"
        )
    for flag, value in (("--pid-file", args.pid_file), ("--console-socket", args.console_socket)):
        if value is not None:
            raise RunError(f"{flag} is a runc flag: it needs --bundle DIR (an OCI bundle)")
    if args.memory is not None:
        _check_memory(args.memory)
    memory_swap(args)
    ulimits(getattr(args, "ulimit", []))
    if args.cpus is not None and not MIN_CPUS <= args.cpus <= _host_cpus():
        # cpu.max's quota is at least 1 ms per 100 ms period (the kernel refuses less); the
        # VM gets ceil(--cpus) vCPUs, at most the host's CPUs (docker refuses more too).
        raise RunError(
            f"invalid --cpus {args.cpus:g}: must be in [{MIN_CPUS:g}, {_host_cpus()}] "
            f"(this host has {_host_cpus()} CPUs)"
        )
    if args.pids_limit < -1:
        raise RunError(f"invalid --pids-limit {args.pids_limit}: a number, or -1 for unlimited")
    if args.pids_limit == 1:
        # The in-guest runtime forks the process inside the container's cgroup: for a moment
        # both count (agent/oci/init.py, step 6), so the kernel refuses that fork at 1.
        raise RunError(
            "invalid --pids-limit 1: too low to start the process (starting it takes 2 for a "
            "moment): use at least 2, or -1 for unlimited"
        )
    if args.timeout is not None and not 0 < args.timeout < float("inf"):
        raise RunError(f"invalid --timeout {args.timeout:g}: must be a positive number of seconds")


def vm_cpus(cpu: dict[str, Any] | None) -> int:
    """The vCPUs of a run's VM for the spec's ``linux.resources.cpu``: enough for its
    quota (``ceil(quota / period)``; 1 without one), at most the host's CPUs. The quota
    itself still applies in the guest (``cpu.max``), as ``docker run --cpus`` gives it."""
    quota, period = (cpu or {}).get("quota"), (cpu or {}).get("period") or 100000
    if not isinstance(quota, int) or quota <= 0 or not isinstance(period, int) or period <= 0:
        return 1
    return max(1, min(_host_cpus(), -(-quota // period)))


def run_name(args: argparse.Namespace) -> str:
    """The name of a run: ``--name``, else ``run-`` and 12 random hex digits (docker's short
    container id)."""
    return str(args.name) if args.name else f"{RUN_PREFIX}{secrets.token_hex(6)}"


def check_name_free(root: Path, name: str) -> None:
    """RunError (docker's "name is already in use", status 125) when a run or a runtime
    container of ``root`` is named ``name``, naming the command that removes it: its VM is
    that run's, so the message must not point at ``pod stop``."""
    from sandbox.runtime.record import ContainerRecord

    try:
        record = ContainerRecord.load(root, name)
    except (NotFoundError, ConfigError, OSError):
        return
    if isinstance(record.data.get("run"), dict):
        remove = f"remove it first (pysandbox rm -f {name})"
    else:
        remove = f"delete it first (pysandbox delete --force {name})"
    raise RunError(
        f'the name "{name}" is already in use by a container: {remove} or choose another --name'
    )


def hostname(args: argparse.Namespace, name: str) -> str:
    """The container's hostname (``hostname``, /etc/hostname, $HOSTNAME): ``--hostname``,
    else ``--name``, else the 12 hex digits of the generated name (docker's default, the
    short container id; docker keeps that id for a named container too: a named run has no
    other id, and its name was its hostname before /etc/hostname was written)."""
    if args.hostname:
        return str(args.hostname)
    return name if args.name else name.removeprefix(RUN_PREFIX)


def vm_memory_mib(limit: int | None) -> int:
    """Memory of a run's VM, MiB, for a container memory limit in bytes (None: no limit):
    the limit plus :data:`VM_OVERHEAD_MIB`, at least the pod default, at most
    :data:`MAX_VM_MIB`."""
    from sandbox.pod.lifecycle import DEFAULT_MEMORY_MIB

    wanted = DEFAULT_MEMORY_MIB if limit is None else limit // 2**20 + VM_OVERHEAD_MIB
    return min(max(DEFAULT_MEMORY_MIB, wanted), MAX_VM_MIB)


def host_memory_mib() -> tuple[int, int]:
    """(MemAvailable, MemTotal) of this host in MiB, from /proc/meminfo."""
    found: dict[str, int] = {}
    with open("/proc/meminfo", encoding="ascii") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("MemAvailable", "MemTotal"):
                found[key] = int(rest.split()[0]) // 1024  # kB
    return found["MemAvailable"], found["MemTotal"]


#: A run's rlimits unless ``--ulimit`` says otherwise (docker's, since 25).
RUN_RLIMITS = {"RLIMIT_NOFILE": (1024, 524288)}


def ulimits(items: list[str]) -> dict[str, tuple[int, int]]:
    """``--ulimit NAME=SOFT[:HARD]`` (docker-run(1)): ``RLIMIT_<NAME>`` -> (soft, hard); HARD
    defaults to SOFT, -1 is unlimited; a later one of a name wins. RunError naming the item
    for an unknown name, a malformed number or a soft limit above the hard one."""
    found: dict[str, tuple[int, int]] = {}
    for item in items:
        name, _, value = item.partition("=")
        key = f"RLIMIT_{name.strip().upper()}"
        soft_text, _, hard_text = value.partition(":")
        try:
            soft, hard = (
                UINT64_MAX if text.strip() == "-1" else int(text)  # RLIM_INFINITY
                for text in (soft_text, hard_text or soft_text)
            )
        except ValueError:
            soft = hard = -1
        if key not in RLIMITS or min(soft, hard) < 0 or soft > hard or not value:
            names = ", ".join(sorted(k[7:].lower() for k in RLIMITS))
            raise RunError(
                f"invalid --ulimit {item!r}: give NAME=SOFT[:HARD] with SOFT <= HARD (numbers, "
                f"-1 unlimited), NAME one of {names}"
            )
        found[key] = (soft, hard)
    return found


def memory_swap(args: argparse.Namespace) -> int | None:
    """The spec's ``linux.resources.memory.swap`` (memory and swap together, bytes; -1
    unlimited) of ``--memory`` and ``--memory-swap``, as docker sets it (docker-run(1),
    "--memory-swap"): twice --memory when only --memory is given; None without --memory.
    RunError for a --memory-swap without --memory or below it."""
    given = getattr(args, "memory_swap", None)
    if args.memory is None:
        if given is not None:
            raise RunError(f"invalid --memory-swap {given}: it needs --memory (docker's rule)")
        return None
    limit = parse_size(args.memory)
    if given is None:
        return 2 * limit
    if given.strip() == "-1":
        return -1
    total = parse_size(given)
    if total < limit:
        raise RunError(
            f"invalid --memory-swap {given}: below --memory {args.memory}; it is memory and "
            "swap together (-1: unlimited swap)"
        )
    return total


def _check_memory(text: str) -> None:
    """Refuse a --memory below what the runtime needs, or whose VM this host cannot give now
    (guest RAM is touched lazily, but a limit says the container may use all of it)."""
    limit = parse_size(text)
    if limit < MIN_MEMORY_LIMIT:
        raise RunError(
            f"invalid --memory {text}: below the minimum of 6m ({MIN_MEMORY_LIMIT} bytes) that "
            "the runtime needs to start a process"
        )
    needed = limit // 2**20 + VM_OVERHEAD_MIB  # what the limit asks for, before the VM cap
    try:
        available, total = host_memory_mib()
    except (OSError, KeyError, ValueError):
        return  # no /proc/meminfo to judge by: QEMU will say
    if needed > available:
        raise RunError(
            f"invalid --memory {text}: its VM needs {needed} MiB, more than the {available} MiB "
            f"this host has available (MemAvailable; MemTotal {total} MiB): use a smaller --memory"
        )


def parse_size(text: str) -> int:
    """Bytes of a docker-style size ('256m', '1.5g', '1048576', '512mb', '2GiB'): a number,
    fractions allowed, with an optional unit k, m or g (powers of 1024), each optionally
    followed by b or ib, or b alone for bytes; rounded down to whole bytes."""
    from decimal import Decimal

    match = _SIZE_RE.match(text.strip())
    if not match:
        raise RunError(
            f"invalid size {text!r}: use a number (e.g. 1.5) with an optional b, k, m or g"
        )
    scale = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match.group(2).lower()]
    return int(Decimal(match.group(1)) * scale)


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
        # docker's reading (its opts/file.go): leading blanks dropped, then blank lines and
        # "#" comments skipped; the rest is NAME=VALUE (value as is) or NAME alone.
        lines = [line.lstrip() for line in lines]
        entries += [line for line in lines if line and not line.startswith("#")]
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


def _user(image: images.Image, spec_user: str) -> dict[str, Any]:
    """The spec's ``process.user`` for ``-u``/the image's ``User`` (``""``: root): names
    resolved in the image, with the supplementary groups docker gives
    (:func:`images.supplementary_gids`). Messages name a stored image's files by the image's
    name (``default:/etc/passwd``), a root filesystem directory's by its path."""
    where = f"{image.name}:" if image.stored else str(image.rootfs)
    try:
        uid, gid = images.resolve_user(image.rootfs, spec_user, where)
        groups = images.supplementary_gids(image.rootfs, spec_user, where)
    except ConfigError as exc:
        if not spec_user:  # root by default: an unreadable group file costs only the groups
            return {"uid": 0, "gid": 0}
        raise RunError(str(exc)) from None
    user: dict[str, Any] = {"uid": uid, "gid": gid}
    if groups:
        user["additionalGids"] = groups
    return user


def _volumes(args: argparse.Namespace, held: HeldSources) -> list[dict[str, Any]]:
    mounts = []
    for item in args.volume:
        parts = item.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise RunError(f"invalid volume {item!r}: use HOST:GUEST or HOST:GUEST:ro")
        host, guest = Path(parts[0]), parts[1]
        if not host.is_absolute() or not guest.startswith("/"):
            raise RunError(f"invalid volume {item!r}: both paths must be absolute")
        if os.path.normpath(guest) in ("/", "//"):  # docker refuses it too
            raise RunError(f"invalid volume {item!r}: the container's / cannot be a volume")
        if _below(guest, "/proc"):  # runc refuses mounts over procfs (checkProcMount)
            raise RunError(
                f"invalid volume {item!r}: {guest} is in /proc, which the container's procfs "
                "holds; mount it elsewhere"
            )
        try:
            held.hold(host)  # what is checked now is what is mounted after the boot
        except FileNotFoundError:
            raise RunError(f"invalid volume {item!r}: {host} does not exist") from None
        except OSError as exc:
            raise RunError(f"invalid volume {item!r}: cannot open {host}: {exc.strerror}") from None
        _refuse_pseudo(item, guest, host, held)
        options = ["rbind", "ro" if len(parts) == 3 and parts[2] == "ro" else "rw"]
        mounts.append(
            {"destination": guest, "type": "bind", "source": str(host), "options": options}
        )
    return mounts


#: ``--tmpfs`` options taken as they are (flags) or with a value (``size=``, ``mode=``...).
_TMPFS_FLAGS = frozenset({"ro", "rw", "exec", "noexec", "suid", "nosuid", "dev", "nodev"})
_TMPFS_VALUES = re.compile(
    r"^(size=\d+[kmgKMG%]?|nr_inodes=\d+[kmgKMG]?|mode=[0-7]{3,4}|[ug]id=\d+)$"
)
#: docker's options for a ``--tmpfs`` mount before the user's (moby: daemon/oci_linux.go).
_TMPFS_DEFAULTS = ("rw", "nosuid", "nodev", "noexec")


def _image_volumes(image: images.Image, user_mounts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A writable directory at each of the image's VOLUME paths that no ``-v``/``--tmpfs``
    takes: a tmpfs in the guest that starts with the image's content there (runc's
    ``tmpcopyup``), as docker mounts an anonymous volume seeded from the image; it goes with
    the run's VM (docker's go with ``--rm``). Writable under ``--read-only`` too, as docker's.
    RunError for a VOLUME at / or in /proc (a hostile image)."""
    taken = {os.path.normpath(str(m["destination"])) for m in user_mounts}
    mounts = []
    for path in image.volumes:
        if path == "/" or _below(path, "/proc"):
            raise RunError(
                f"image {image.name}: its VOLUME {path} cannot be mounted: it is / or in /proc"
            )
        if path not in taken:
            options = ["rw", "tmpcopyup"]  # as a docker volume: no nosuid, nodev, noexec
            mounts.append(
                {"destination": path, "type": "tmpfs", "source": "tmpfs", "options": options}
            )
    return mounts


def _tmpfs_mounts(items: list[str]) -> list[dict[str, Any]]:
    """The spec's mounts for ``--tmpfs PATH[:OPTIONS]`` (docker's flag): docker's defaults
    first, then OPTIONS (comma-separated; a later flag wins: ``exec`` after ``noexec``).
    RunError naming the item for a relative or /proc path, or an option tmpfs does not
    take here."""
    mounts = []
    for item in items:
        path, _, given = item.partition(":")
        if not path.startswith("/") or os.path.normpath(path) in ("/", "//"):
            raise RunError(f"invalid --tmpfs {item!r}: PATH must be absolute and not /")
        if _below(path, "/proc"):
            raise RunError(f"invalid --tmpfs {item!r}: {path} is in /proc; mount it elsewhere")
        options = [o for o in given.split(",") if o] if given else []
        bad = [o for o in options if o not in _TMPFS_FLAGS and not _TMPFS_VALUES.match(o)]
        if bad:
            raise RunError(
                f"invalid --tmpfs {item!r}: option {bad[0]!r} is not one of ro, rw, exec, "
                "noexec, suid, nosuid, dev, nodev, size=, nr_inodes=, mode=, uid=, gid="
            )
        mounts.append(
            {
                "destination": path,
                "type": "tmpfs",
                "source": "tmpfs",
                "options": [*_TMPFS_DEFAULTS, *options],
            }
        )
    return mounts


def _refuse_pseudo(item: str, guest: str, host: Path, held: HeldSources) -> None:
    """RunError if the held volume source ``host`` is on a host pseudo filesystem (/proc,
    /sys...: hostfs.refuse_pseudo): virtio-fs would share it half-working."""
    from sandbox.pod import hostfs

    fd = held.fd(host)
    try:
        why = hostfs.refuse_pseudo(fd, host) if fd is not None else None
    except OSError:
        why = None
    if why is not None:
        raise RunError(f"invalid volume {item!r}: mount {guest}: source {why}")


def process_args(
    command: list[str], entrypoint: str | None, image_entrypoint: list[str], image_cmd: list[str]
) -> list[str]:
    """``process.args`` of a run, by docker's rules (docker run reference, "ENTRYPOINT";
    Dockerfile reference, "Understand how CMD and ENTRYPOINT interact"): the entrypoint, then
    ``command`` (the words after IMAGE, a leading ``--`` dropped) or else the image's ``Cmd``.

    ``entrypoint`` is ``--entrypoint``: None keeps the image's ``Entrypoint``; a string
    replaces it by that one word (not split) and drops the image's ``Cmd``, as docker and
    podman do; ``""`` clears it (then only ``command`` runs). RunError when nothing is left;
    when the program is ``""`` (``run IMAGE ''``), RunError with exit status 127 and the
    words docker and podman (runc) use for a program not found, before any VM boots."""
    words = list(command)
    if words and words[0] == "--":
        words = words[1:]
    if entrypoint is None:
        argv = [*image_entrypoint, *(words or image_cmd)]
    else:
        argv = [entrypoint, *words] if entrypoint else words
    if not argv:
        raise RunError(
            "no command to run: give one after IMAGE (the image has no Entrypoint or Cmd)"
            if entrypoint is None
            else "no command to run: --entrypoint '' drops the image's Cmd; give one after IMAGE"
        )
    if not argv[0]:
        raise RunError('exec: "": executable file not found in $PATH', EXIT_NOT_FOUND)
    return argv


def build_spec(
    args: argparse.Namespace, image: images.Image, held: HeldSources, name: str
) -> dict[str, Any]:
    """The OCI spec for run ``name`` (:func:`run_name`): image defaults, then options, then
    hardened defaults; validated as the guest will (RunError). Options are
    :func:`check_options`-ed by the caller first. The hostname is :func:`hostname`'s, also in
    ``HOSTNAME`` unless the image or ``-e`` sets it (docker's order).

    The image's root filesystem and the volume sources are opened into ``held``: the share
    made after the VM booted mounts these very objects (docs/security.md)."""
    argv = process_args(args.command, args.entrypoint, image.entrypoint, image.cmd)
    spec = default_spec(argv, rootfs=str(image.rootfs), terminal=args.tty)
    process = spec["process"]
    host = hostname(args, name)
    base_env = [f"HOSTNAME={host}", *image.env, *(["TERM=xterm"] if args.tty else [])]
    process["env"] = _env(args, base_env)
    process["cwd"] = args.workdir or image.cwd
    if not process["cwd"].startswith("/"):
        raise RunError(f"invalid working directory {process['cwd']!r}: must be absolute")
    process["user"] = _user(image, args.user or image.user)
    spec["root"]["readonly"] = args.read_only
    spec["hostname"] = host
    user_mounts = _volumes(args, held) + _tmpfs_mounts(args.tmpfs)
    spec["mounts"] += _image_volumes(image, user_mounts)  # before: a -v below one stays seen
    spec["mounts"] += user_mounts
    try:
        held.hold(image.rootfs)
    except OSError as exc:
        raise RunError(f"cannot open the image root {image.rootfs}: {exc.strerror}") from None
    # docker's (>= 25) default fd limit, soft 1024 and hard 524288, so that a program may
    # raise its own (Go, Java, nginx do; a hard 1024 stopped them: breaker5); --ulimit wins.
    given = {**RUN_RLIMITS, **ulimits(getattr(args, "ulimit", []))}
    kept = [r for r in spec["process"]["rlimits"] if r["type"] not in given]
    spec["process"]["rlimits"] = kept + [
        {"type": name, "soft": soft, "hard": hard} for name, (soft, hard) in given.items()
    ]
    resources: dict[str, Any] = spec["linux"]["resources"]
    if args.memory is not None:
        resources["memory"] = {"limit": parse_size(args.memory), "swap": memory_swap(args)}
    if args.cpus is not None:
        resources["cpu"] = {"period": 100000, "quota": int(args.cpus * 100000)}
    if args.pids_limit > 0:  # docker's 0 and -1: unlimited
        resources["pids"] = {"limit": args.pids_limit}
    else:
        resources.pop("pids", None)
    if args.network == "user":
        # Share the guest's root network namespace, where the agent configures the NIC.
        linux = spec["linux"]
        linux["namespaces"] = [ns for ns in linux["namespaces"] if ns.get("type") != "network"]
    else:
        # The network namespace is the container's own: docker's defaults for it.
        spec["linux"]["sysctl"] = dict(RUN_SYSCTLS)
    try:
        parse_spec(spec)  # what the guest's runtime will check: never first to refuse
    except SpecError as exc:
        raise RunError(f"invalid options: the spec they make is refused: {exc.message}") from None
    size = len(json.dumps(spec).encode())
    if size > MAX_DOCUMENT_BYTES:  # what the guest takes: refused before a VM boots
        raise RunError(
            f"the container's spec is {size} bytes, over the {MAX_DOCUMENT_BYTES} a sandbox "
            "takes: pass shorter or fewer arguments, less environment (-e/--env-file) or "
            "fewer volumes"
        )
    return spec


def _below(path: str, top: str) -> bool:
    """``path`` is ``top`` or inside it (lexically, after normalisation)."""
    normal = os.path.normpath("/" + path.lstrip("/"))
    return normal == top or normal.startswith(top + "/")
