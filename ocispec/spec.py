"""Typed parsing and validation of the OCI runtime-spec subset pysandbox applies.

:func:`parse_spec` turns a decoded config.json (:func:`ocispec.document.decode`) into a
:class:`Spec`; :func:`parse_process` and :func:`parse_resources` do the same for the ``process``
object of ``exec`` and the ``linux.resources`` of ``update``. Everything that can be checked
without touching the system is checked here -- types and ranges of every field read, names of
namespaces, capabilities, rlimits, mount options, sysctls, cgroup files, hooks, the seccomp
profile (compiled to BPF now) and what the in-guest runtime needs to start a process (the
memory limit's minimum) -- so an invalid spec fails before a VM boots (the host parses it)
and again before anything was mounted (the guest parses what it receives). Errors are
:class:`~ocispec.errors.SpecError` whose message starts with the field's path
(``process.user.uid: expected an integer, got "x"``) and repeats runc's wording where runc has
one (``linux.namespaces[1].type: unknown namespace type "bogus"``).

Paths that the spec allows relative to the bundle (``root.path``, bind mount sources) are kept
as written: the host resolves them against the bundle and hands the guest absolute ones; the
guest's runtime refuses relative ones (``agent.oci.init``).

Records are plain classes with ``__slots__`` rather than dataclasses: importing dataclasses
costs more than the whole parse under TCG emulation.

Read but not applied by the in-guest runtime's steps: hooks (validated here; startContainer
hooks run by :mod:`agent.oci.hooks`, the others on the host) and annotations (the host reads
the CRI ones). Ignored, on purpose: apparmor/selinux labels (the guest kernel has no LSM
policy), linux.cgroupsPath (the agent chooses the cgroup), intelRdt, personality, network
resources, blockIO per-device weights and throttles (they name host block devices, which do
not exist in the guest).
"""

from __future__ import annotations

from ocispec import capabilities, device_rules
from ocispec import linux as sc
from ocispec.capabilities import Capabilities
from ocispec.errors import SpecError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from ocispec.seccomp import Filter as SeccompFilter

UINT64_MAX = (1 << 64) - 1

#: Smallest ``linux.resources.memory.limit`` accepted, in bytes (6 MiB, docker's and podman's
#: minimum too). The in-guest runtime runs inside the container's cgroup from before its
#: namespaces are made until it execs the process, and is charged about 2.3 MiB there
#: (measured: memory.peak of a busybox ``sh -c cat``); at 2 MiB and below it is OOM-killed
#: before the process exists.
MIN_MEMORY_LIMIT = 6 * 1024 * 1024

#: Longest hostname or domainname the kernel takes, in bytes (__NEW_UTS_LEN).
MAX_HOSTNAME = 64

#: The OCI hook points (config.json ``hooks``); other names are ignored, as runc does.
HOOK_NAMES = (
    "prestart",
    "createRuntime",
    "createContainer",
    "startContainer",
    "poststart",
    "poststop",
)

#: Largest CPU or memory node number accepted in a cpuset list (the kernel's NR_CPUS limit).
MAX_CPUSET_ID = 8191

#: OCI namespace type -> clone flag.
NAMESPACES = {
    "pid": sc.CLONE_NEWPID,
    "network": sc.CLONE_NEWNET,
    "mount": sc.CLONE_NEWNS,
    "ipc": sc.CLONE_NEWIPC,
    "uts": sc.CLONE_NEWUTS,
    "user": sc.CLONE_NEWUSER,
    "cgroup": sc.CLONE_NEWCGROUP,
    "time": sc.CLONE_NEWTIME,  # offsets are not supported
}

RLIMITS = {
    "RLIMIT_CPU": 0,
    "RLIMIT_FSIZE": 1,
    "RLIMIT_DATA": 2,
    "RLIMIT_STACK": 3,
    "RLIMIT_CORE": 4,
    "RLIMIT_RSS": 5,
    "RLIMIT_NPROC": 6,
    "RLIMIT_NOFILE": 7,
    "RLIMIT_MEMLOCK": 8,
    "RLIMIT_AS": 9,
    "RLIMIT_LOCKS": 10,
    "RLIMIT_SIGPENDING": 11,
    "RLIMIT_MSGQUEUE": 12,
    "RLIMIT_NICE": 13,
    "RLIMIT_RTPRIO": 14,
    "RLIMIT_RTTIME": 15,
}

#: Mount option -> (clears the flag?, flag). Options not listed here go to the data string.
MOUNT_OPTIONS = {
    "async": (True, sc.MS_SYNCHRONOUS),
    "atime": (True, sc.MS_NOATIME),
    "bind": (False, sc.MS_BIND),
    "defaults": (False, 0),
    "dev": (True, sc.MS_NODEV),
    "diratime": (True, sc.MS_NODIRATIME),
    "dirsync": (False, sc.MS_DIRSYNC),
    "exec": (True, sc.MS_NOEXEC),
    "iversion": (False, sc.MS_I_VERSION),
    "lazytime": (False, sc.MS_LAZYTIME),
    "loud": (True, sc.MS_SILENT),
    "mand": (False, sc.MS_MANDLOCK),
    "noatime": (False, sc.MS_NOATIME),
    "nodev": (False, sc.MS_NODEV),
    "nodiratime": (False, sc.MS_NODIRATIME),
    "noexec": (False, sc.MS_NOEXEC),
    "noiversion": (True, sc.MS_I_VERSION),
    "nolazytime": (True, sc.MS_LAZYTIME),
    "nomand": (True, sc.MS_MANDLOCK),
    "norelatime": (True, sc.MS_RELATIME),
    "nostrictatime": (True, sc.MS_STRICTATIME),
    "nosuid": (False, sc.MS_NOSUID),
    "nosymfollow": (False, sc.MS_NOSYMFOLLOW),
    "rbind": (False, sc.MS_BIND | sc.MS_REC),
    "relatime": (False, sc.MS_RELATIME),
    "remount": (False, sc.MS_REMOUNT),
    "ro": (False, sc.MS_RDONLY),
    "rw": (True, sc.MS_RDONLY),
    "silent": (False, sc.MS_SILENT),
    "strictatime": (False, sc.MS_STRICTATIME),
    "suid": (True, sc.MS_NOSUID),
    "sync": (False, sc.MS_SYNCHRONOUS),
}

PROPAGATION = {
    "private": sc.MS_PRIVATE,
    "rprivate": sc.MS_PRIVATE | sc.MS_REC,
    "shared": sc.MS_SHARED,
    "rshared": sc.MS_SHARED | sc.MS_REC,
    "slave": sc.MS_SLAVE,
    "rslave": sc.MS_SLAVE | sc.MS_REC,
    "unbindable": sc.MS_UNBINDABLE,
    "runbindable": sc.MS_UNBINDABLE | sc.MS_REC,
}

#: runc's extension options: a tmpfs that starts with the content of the directory it
#: covers (runc's and crun's ``tmpcopyup``; ``notmpcopyup`` undoes it).
_COPY_UP_OPTIONS = {"tmpcopyup": True, "notmpcopyup": False}
_UNSUPPORTED_OPTIONS = frozenset({"idmap", "ridmap"})

#: sysctl prefix -> namespace that must be private for the container to set it (as runc).
_SYSCTL_NAMESPACES = (
    ("kernel.msgmax", "ipc"),
    ("kernel.msgmnb", "ipc"),
    ("kernel.msgmni", "ipc"),
    ("kernel.sem", "ipc"),
    ("kernel.shmall", "ipc"),
    ("kernel.shmmax", "ipc"),
    ("kernel.shmmni", "ipc"),
    ("kernel.shm_rmid_forced", "ipc"),
    ("fs.mqueue.", "ipc"),
    ("net.", "network"),
    ("kernel.hostname", "uts"),
    ("kernel.domainname", "uts"),
)

#: Devices every container gets (runc's defaults), (path, major, minor).
DEFAULT_DEVICES = (
    ("/dev/null", 1, 3),
    ("/dev/zero", 1, 5),
    ("/dev/full", 1, 7),
    ("/dev/random", 1, 8),
    ("/dev/urandom", 1, 9),
    ("/dev/tty", 5, 0),
)


class Namespace:
    """One entry of linux.namespaces: create (``path is None``) or join."""

    __slots__ = ("flag", "path", "type")

    def __init__(self, type: str, flag: int, path: str | None) -> None:
        self.type = type
        self.flag = flag
        self.path = path


class IdMapping:
    __slots__ = ("container_id", "host_id", "size")

    def __init__(self, container_id: int, host_id: int, size: int) -> None:
        self.container_id = container_id
        self.host_id = host_id
        self.size = size

    def line(self) -> str:
        return f"{self.container_id} {self.host_id} {self.size}\n"


class Mount:
    """One entry of ``mounts`` with its options split into flags, propagation and data.
    ``copy_up``: a tmpfs with runc's ``tmpcopyup`` extension (it starts with the content of
    the directory it is mounted over)."""

    __slots__ = (
        "bind",
        "copy_up",
        "data",
        "destination",
        "flags",
        "propagation",
        "source",
        "type",
    )

    def __init__(
        self,
        destination: str,
        type: str,
        source: str,
        flags: int,
        propagation: tuple[int, ...],
        data: str,
        bind: bool,
        copy_up: bool = False,
    ) -> None:
        self.copy_up = copy_up
        self.destination = destination
        self.type = type
        self.source = source
        self.flags = flags
        self.propagation = propagation
        self.data = data
        self.bind = bind


class Device:
    __slots__ = ("gid", "major", "minor", "mode", "path", "type", "uid")

    def __init__(
        self, path: str, type: str, major: int, minor: int, mode: int, uid: int, gid: int
    ) -> None:
        self.path = path
        self.type = type
        self.major = major
        self.minor = minor
        self.mode = mode
        self.uid = uid
        self.gid = gid


class Rlimit:
    __slots__ = ("hard", "name", "resource", "soft")

    def __init__(self, name: str, resource: int, soft: int, hard: int) -> None:
        self.name = name
        self.resource = resource
        self.soft = soft
        self.hard = hard


class User:
    __slots__ = ("additional_gids", "gid", "uid", "umask")

    def __init__(
        self, uid: int, gid: int, umask: int | None, additional_gids: tuple[int, ...]
    ) -> None:
        self.uid = uid
        self.gid = gid
        self.umask = umask
        self.additional_gids = additional_gids


class Process:
    """The OCI ``process`` object (plus the pysandbox ``seccomp`` extension for exec)."""

    __slots__ = (
        "args",
        "capabilities",
        "console_size",
        "cwd",
        "env",
        "no_new_privileges",
        "oom_score_adj",
        "rlimits",
        "seccomp",
        "terminal",
        "user",
    )

    def __init__(
        self,
        args: list[str],
        env: list[str],
        cwd: str,
        user: User,
        terminal: bool = False,
        capabilities: Capabilities | None = None,
        rlimits: tuple[Rlimit, ...] = (),
        no_new_privileges: bool = False,
        oom_score_adj: int | None = None,
        seccomp: SeccompFilter | None = None,
        console_size: tuple[int, int] | None = None,
    ) -> None:
        self.args = args
        self.env = env
        self.cwd = cwd
        self.user = user
        self.terminal = terminal
        self.capabilities = capabilities
        self.rlimits = rlimits
        self.no_new_privileges = no_new_privileges
        self.oom_score_adj = oom_score_adj
        self.seccomp = seccomp
        #: (rows, columns) of the terminal from its first moment (``consoleSize``; None
        #: without a terminal or a size), each at most 65535 (struct winsize).
        self.console_size = console_size


class Resources:
    """linux.resources as cgroup files to write, for either cgroup version.

    ``files``: cgroup v2 file name -> value, in write order, with runc's conversions (shares ->
    ``cpu.weight``, memory+swap -> ``memory.swap.max``, blkio weight -> ``io.weight``).
    ``v1_files``: the same limits as cgroup v1 files (``memory.limit_in_bytes``,
    ``cpu.cfs_quota_us``...); the part of a name before its first dot is its controller.
    ``unified``: True when ``linux.resources.unified`` was given: it has no v1 form.
    ``cpus`` and ``mems``: the highest CPU and memory node numbers that ``cpu.cpus`` and
    ``cpu.mems`` name (None when unset), for the host to compare with what the VM has.
    ``devices``: the device cgroup rules (``devices``), in order; they become the
    container's :attr:`Spec.device_policy` (``update`` ignores them, as ``runc update`` does).
    """

    __slots__ = ("cpus", "devices", "files", "mems", "unified", "v1_files")

    def __init__(
        self,
        files: list[tuple[str, str]],
        v1_files: list[tuple[str, str]] | None = None,
        unified: bool = False,
        cpus: int | None = None,
        mems: int | None = None,
        devices: tuple[device_rules.Rule, ...] = (),
    ) -> None:
        self.files = files
        self.v1_files = v1_files if v1_files is not None else []
        self.unified = unified
        self.devices = devices
        self.cpus = cpus
        self.mems = mems


class Hook:
    """One OCI hook: run ``path`` with ``args`` and ``env``; ``timeout`` seconds or None."""

    __slots__ = ("args", "env", "path", "timeout")

    def __init__(self, path: str, args: list[str], env: list[str], timeout: int | None) -> None:
        self.path = path
        self.args = args
        self.env = env
        self.timeout = timeout


class Spec:
    """A whole config.json. ``root_path`` is as written (relative to the bundle or absolute);
    ``hooks`` maps a hook point of :data:`HOOK_NAMES` to its hooks (points not given absent);
    ``device_policy`` is what the container may do with devices: ``linux.resources.devices``
    then runc's default rules (:func:`ocispec.device_rules.policy`)."""

    __slots__ = (
        "annotations",
        "device_policy",
        "devices",
        "domainname",
        "gid_mappings",
        "hooks",
        "hostname",
        "masked_paths",
        "mounts",
        "namespaces",
        "process",
        "readonly_paths",
        "resources",
        "root_path",
        "root_readonly",
        "rootfs_propagation",
        "sysctls",
        "uid_mappings",
    )

    def __init__(
        self,
        root_path: str,
        process: Process,
        *,
        root_readonly: bool = False,
        hostname: str = "",
        domainname: str = "",
        mounts: tuple[Mount, ...] = (),
        namespaces: tuple[Namespace, ...] = (),
        uid_mappings: tuple[IdMapping, ...] = (),
        gid_mappings: tuple[IdMapping, ...] = (),
        devices: tuple[Device, ...] = (),
        masked_paths: tuple[str, ...] = (),
        readonly_paths: tuple[str, ...] = (),
        sysctls: tuple[tuple[str, str], ...] = (),
        resources: Resources | None = None,
        rootfs_propagation: int | None = None,
        annotations: dict[str, str] | None = None,
        hooks: dict[str, tuple[Hook, ...]] | None = None,
    ) -> None:
        self.root_path = root_path
        self.process = process
        self.root_readonly = root_readonly
        self.hostname = hostname
        self.domainname = domainname
        self.mounts = mounts
        self.namespaces = namespaces
        self.uid_mappings = uid_mappings
        self.gid_mappings = gid_mappings
        self.devices = devices
        self.masked_paths = masked_paths
        self.readonly_paths = readonly_paths
        self.sysctls = sysctls
        self.resources = resources
        self.rootfs_propagation = rootfs_propagation
        self.annotations = annotations or {}
        self.hooks = hooks or {}
        self.device_policy = device_rules.policy(resources.devices if resources else ())

    def namespace(self, type: str) -> Namespace | None:
        for entry in self.namespaces:
            if entry.type == type:
                return entry
        return None


# -- JSON access with the field path in every message ------------------------------------


def _show(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return str(value)


def _obj(value: object, where: str) -> dict[str, object]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{where}: expected an object, got {_show(value)}")
    return value


def _list(value: object, where: str) -> list[object]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise SpecError(f"{where}: expected an array, got {_show(value)}")
    return value


def _str(value: object, where: str, default: str = "") -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        raise SpecError(f"{where}: expected a string, got {_show(value)}")
    return value


def _bool(value: object, where: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise SpecError(f"{where}: expected true or false, got {_show(value)}")
    return value


def _int(value: object, where: str, low: int, high: int, default: int | None = None) -> int:
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{where}: expected an integer, got {_show(value)}")
    if not low <= value <= high:
        raise SpecError(f"{where}: {value} is out of range [{low}, {high}]")
    return value


def _uint32(value: object, where: str, default: int | None = None) -> int:
    return _int(value, where, 0, 0xFFFFFFFF, default)


def _strings(value: object, where: str) -> list[str]:
    return [_str(item, f"{where}[{i}]") for i, item in enumerate(_list(value, where))]


def _environment(value: object, where: str) -> list[str]:
    """An ``env`` list: strings of the form KEY=value (process.env, a hook's env)."""
    env = _strings(value, where)
    for i, entry in enumerate(env):
        if "=" not in entry or entry.startswith("=") or "\x00" in entry:
            raise SpecError(f'{where}[{i}]: "{entry}" is not of the form KEY=value')
    return env


def _abspath(value: object, where: str) -> str:
    path = _str(value, where)
    if not path.startswith("/"):
        raise SpecError(f"{where}: {_show(path)} is not an absolute path")
    return _path_chars(path, where)


def _path_chars(path: str, where: str) -> str:
    if "\x00" in path:
        raise SpecError(f"{where}: path contains a NUL byte")
    return path


# -- the sections -------------------------------------------------------------------------


def parse_user(value: object, where: str) -> User:
    user = _obj(value, where)
    umask = user.get("umask")
    return User(
        uid=_uint32(user.get("uid"), f"{where}.uid", 0),
        gid=_uint32(user.get("gid"), f"{where}.gid", 0),
        umask=None if umask is None else _int(umask, f"{where}.umask", 0, 0o777),
        additional_gids=tuple(
            _uint32(gid, f"{where}.additionalGids[{i}]")
            for i, gid in enumerate(_list(user.get("additionalGids"), f"{where}.additionalGids"))
        ),
    )


def parse_capabilities(value: object, where: str) -> Capabilities | None:
    if value is None:
        return None
    caps = _obj(value, where)
    sets: dict[str, int] = {}
    for name in ("bounding", "effective", "inheritable", "permitted", "ambient"):
        bits = 0
        for i, cap in enumerate(_strings(caps.get(name), f"{where}.{name}")):
            try:
                bits |= 1 << capabilities.number(cap)
            except SpecError as exc:
                raise SpecError(f"{where}.{name}[{i}]: {exc.message}") from None
        sets[name] = bits
    return Capabilities(**sets)


def parse_rlimits(value: object, where: str) -> tuple[Rlimit, ...]:
    result: list[Rlimit] = []
    seen: set[str] = set()
    for i, item in enumerate(_list(value, where)):
        entry = _obj(item, f"{where}[{i}]")
        name = _str(entry.get("type"), f"{where}[{i}].type")
        resource = RLIMITS.get(name)
        if resource is None:
            raise SpecError(f'{where}[{i}].type: unknown rlimit type "{name}"')
        if name in seen:
            raise SpecError(f'{where}[{i}].type: duplicate rlimit type "{name}"')
        seen.add(name)
        soft = _int(entry.get("soft"), f"{where}[{i}].soft", 0, UINT64_MAX)
        hard = _int(entry.get("hard"), f"{where}[{i}].hard", 0, UINT64_MAX)
        if soft > hard:
            raise SpecError(f"{where}[{i}]: soft limit {soft} of {name} exceeds hard limit {hard}")
        result.append(Rlimit(name, resource, soft, hard))
    return tuple(result)


def parse_process(
    value: object,
    where: str = "process",
    compile_seccomp: Callable[[object, str], SeccompFilter] | None = None,
) -> Process:
    """An OCI ``process`` object; ``seccomp`` (an OCI linux.seccomp object) is an extension.

    ``compile_seccomp(profile, where)``, when given, compiles that profile instead of
    :func:`ocispec.seccomp.compile` (the guest's exec runtime passes one that keeps compiled
    programs, ``agent.oci.seccomp_cache``); it must raise the same SpecError for a bad one."""
    if value is None:
        raise SpecError(f"{where}: missing")
    proc = _obj(value, where)
    args = _strings(proc.get("args"), f"{where}.args")
    if not args or not args[0]:
        raise SpecError(f"{where}.args: must not be empty")
    env = _environment(proc.get("env"), f"{where}.env")
    cwd = _abspath(proc.get("cwd", "/") or "/", f"{where}.cwd")
    oom = proc.get("oomScoreAdj")
    profile = proc.get("seccomp")
    terminal = _bool(proc.get("terminal"), f"{where}.terminal")
    return Process(
        args=args,
        env=env,
        cwd=cwd,
        user=parse_user(proc.get("user"), f"{where}.user"),
        terminal=terminal,
        capabilities=parse_capabilities(proc.get("capabilities"), f"{where}.capabilities"),
        rlimits=parse_rlimits(proc.get("rlimits"), f"{where}.rlimits"),
        no_new_privileges=_bool(proc.get("noNewPrivileges"), f"{where}.noNewPrivileges"),
        oom_score_adj=None if oom is None else _int(oom, f"{where}.oomScoreAdj", -1000, 1000),
        seccomp=None
        if profile is None
        else (compile_seccomp or seccomp_filter)(profile, f"{where}.seccomp"),
        console_size=_console_size(proc.get("consoleSize"), f"{where}.consoleSize")
        if terminal
        else None,
    )


def seccomp_filter(profile: object, where: str) -> SeccompFilter:
    """The filter compiled from the linux.seccomp object ``profile``. Its compiler is
    imported here, not above: a process without a profile (every ``exec`` the host checks)
    does not need it, and it is a fifth of this module's import time (the guest's zygote
    imports it ahead, agent/oci/zygote.py)."""
    from ocispec import seccomp

    return seccomp.compile(_obj(profile, where), at=where)


def _console_size(value: object, where: str) -> tuple[int, int] | None:
    """``consoleSize`` as (rows, columns): runtime-spec config.md, "Process" (height and
    width, uint, both required; ignored without a terminal). A struct winsize holds 16 bits:
    larger values are taken as 65535, as no terminal is that large."""
    if value is None:
        return None
    size = _obj(value, where)
    height = _uint32(size.get("height"), f"{where}.height")
    width = _uint32(size.get("width"), f"{where}.width")
    return min(height, 0xFFFF), min(width, 0xFFFF)


def parse_mount(value: object, where: str) -> Mount:
    entry = _obj(value, where)
    destination = _abspath(entry.get("destination"), f"{where}.destination")
    fstype = _str(entry.get("type"), f"{where}.type")
    source = _str(entry.get("source"), f"{where}.source")
    flags = 0
    propagation: list[int] = []
    data: list[str] = []
    copy_up = False
    for j, option in enumerate(_strings(entry.get("options"), f"{where}.options")):
        if option in _COPY_UP_OPTIONS:
            copy_up = _COPY_UP_OPTIONS[option]
        elif option in MOUNT_OPTIONS:
            clear, flag = MOUNT_OPTIONS[option]
            flags = flags & ~flag if clear else flags | flag
        elif option in PROPAGATION:
            propagation.append(PROPAGATION[option])
        elif option in _UNSUPPORTED_OPTIONS:
            raise SpecError(f'{where}.options[{j}]: mount option "{option}" is not supported')
        else:
            data.append(option)
    bind = fstype == "bind" or bool(flags & sc.MS_BIND)
    if bind:
        flags |= sc.MS_BIND
        # Relative to the bundle on the host; the guest's runtime wants it absolute.
        if not _path_chars(source, f"{where}.source"):
            raise SpecError(f"{where}.source: required for a bind mount")
    elif not fstype:
        raise SpecError(f"{where}.type: required for a mount that is not a bind mount")
    copy_up = copy_up and fstype == "tmpfs" and not bind  # runc: tmpfs only
    return Mount(
        destination, fstype, source, flags, tuple(propagation), ",".join(data), bind, copy_up
    )


def parse_namespaces(value: object, where: str) -> tuple[Namespace, ...]:
    result: list[Namespace] = []
    for i, item in enumerate(_list(value, where)):
        entry = _obj(item, f"{where}[{i}]")
        kind = _str(entry.get("type"), f"{where}[{i}].type")
        flag = NAMESPACES.get(kind)
        if flag is None:
            raise SpecError(f'{where}[{i}].type: unknown namespace type "{kind}"')
        if any(ns.type == kind for ns in result):
            raise SpecError(f'{where}[{i}].type: duplicate namespace type "{kind}"')
        path = entry.get("path")
        result.append(
            Namespace(kind, flag, None if not path else _abspath(path, f"{where}[{i}].path"))
        )
    return tuple(result)


def parse_mappings(value: object, where: str) -> tuple[IdMapping, ...]:
    result = []
    for i, item in enumerate(_list(value, where)):
        entry = _obj(item, f"{where}[{i}]")
        result.append(
            IdMapping(
                _uint32(entry.get("containerID"), f"{where}[{i}].containerID"),
                _uint32(entry.get("hostID"), f"{where}[{i}].hostID"),
                _int(entry.get("size"), f"{where}[{i}].size", 1, 0xFFFFFFFF),
            )
        )
    return tuple(result)


def parse_devices(value: object, where: str) -> tuple[Device, ...]:
    result = []
    for i, item in enumerate(_list(value, where)):
        entry = _obj(item, f"{where}[{i}]")
        at = f"{where}[{i}]"
        path = _abspath(entry.get("path"), f"{at}.path")
        kind = _str(entry.get("type"), f"{at}.type")
        if kind not in ("c", "b", "u", "p"):
            raise SpecError(f'{at}.type: unknown device type "{kind}" (want c, b, u or p)')
        needs_numbers = kind != "p"
        major = _int(entry.get("major"), f"{at}.major", 0, 0xFFFFFFFF, None if needs_numbers else 0)
        minor = _int(entry.get("minor"), f"{at}.minor", 0, 0xFFFFFFFF, None if needs_numbers else 0)
        result.append(
            Device(
                path,
                "c" if kind == "u" else kind,
                major,
                minor,
                _device_mode(entry.get("fileMode"), f"{at}.fileMode"),
                _uint32(entry.get("uid"), f"{at}.uid", 0),
                _uint32(entry.get("gid"), f"{at}.gid", 0),
            )
        )
    return tuple(result)


#: The file-type bits of a mode (``S_IFMT``).
_S_IFMT = 0o170000


def _device_mode(value: object, where: str) -> int:
    """A device's ``fileMode``: its permission bits (default 0666). A whole ``st_mode``,
    file-type bits included, is taken too, as runc takes it (it clears ``S_IFMT``:
    libcontainer/specconv): podman writes ``--device`` and ``--privileged`` devices so
    (8576 = 020600 for a 0600 character device)."""
    return _int(value, where, 0, _S_IFMT | 0o7777, 0o666) & 0o7777


def parse_sysctls(value: object, where: str, private: set[str]) -> tuple[tuple[str, str], ...]:
    result = []
    for key, raw in _obj(value, where).items():
        at = f'{where}["{key}"]'
        setting = _str(raw, at)
        if not key or "/" in key or ".." in key or key.startswith(".") or "\x00" in key:
            raise SpecError(f'{at}: sysctl "{key}" is not a valid name')
        needed = next((ns for prefix, ns in _SYSCTL_NAMESPACES if key.startswith(prefix)), None)
        if needed is None:
            raise SpecError(f'{at}: sysctl "{key}" is not in a separate kernel namespace')
        if needed not in private:
            raise SpecError(
                f'{at}: sysctl "{key}" is not allowed as it conflicts with the host\'s '
                f"{needed} namespace (the container has no private one)"
            )
        result.append((key, setting))
    return tuple(result)


def _cpu_weight(shares: int) -> int:
    # runc's conversion of cgroup v1 shares [2, 262144] to v2 weight [1, 10000].
    return 1 + ((shares - 2) * 9999) // 262142


def _io_weight(blkio_weight: int) -> int:
    # runc's conversion of the v1 blkio weight [10, 1000] to the v2 io.weight [1, 10000].
    return 1 + ((blkio_weight - 10) * 9999) // 990


def _page_size(value: object, where: str) -> str:
    """A hugetlb page size as the kernel names it in file names: "2MB", "1GB", "64KB"."""
    size = _str(value, where)
    number = size[:-2]
    if not (number.isdigit() and size[-2:] in ("KB", "MB", "GB")):
        raise SpecError(f'{where}: invalid hugepage size "{size}" (want e.g. "2MB" or "1GB")')
    return size


def parse_resources(value: object, where: str) -> Resources | None:
    """linux.resources -> the files of both cgroup versions (see :class:`Resources`).

    Conversions and v1 names are runc's (libcontainer/cgroups/fs and fs2). -1 means
    "unlimited" for the memory values and quota, a pids limit <= 0 too.
    """
    if value is None:
        return None
    res = _obj(value, where)
    files: list[tuple[str, str]] = []
    v1: list[tuple[str, str]] = []
    memory = _obj(res.get("memory"), f"{where}.memory")
    if memory.get("reservation") is not None:
        reservation = _int(memory["reservation"], f"{where}.memory.reservation", -1, 1 << 62)
        files.append(("memory.low", "max" if reservation == -1 else str(reservation)))
        v1.append(("memory.soft_limit_in_bytes", str(reservation)))
    limit = None
    if memory.get("limit") is not None:
        limit = _int(memory["limit"], f"{where}.memory.limit", -1, 1 << 62)
        if limit == 0:
            limit = None  # runc: 0 leaves the limit unset
        elif limit != -1 and limit < MIN_MEMORY_LIMIT:
            raise SpecError(
                f"{where}.memory.limit: {limit} is below the minimum of {MIN_MEMORY_LIMIT} "
                "bytes (6 MiB) that the runtime needs to start a process; use -1 for no limit"
            )
        else:
            files.append(("memory.max", "max" if limit == -1 else str(limit)))
            v1.append(("memory.limit_in_bytes", str(limit)))
    if memory.get("swap") is not None:
        # OCI swap is memory+swap (v1 memsw); v2 memory.swap.max is swap alone.
        total = _int(memory["swap"], f"{where}.memory.swap", -1, 1 << 62)
        if total == -1:
            files.append(("memory.swap.max", "max"))
        elif limit is None or limit == -1:
            raise SpecError(f"{where}.memory.swap: set without a memory limit")
        elif total < limit:
            raise SpecError(f"{where}.memory.swap: {total} is less than the memory limit {limit}")
        else:
            files.append(("memory.swap.max", str(total - limit)))
        v1.append(("memory.memsw.limit_in_bytes", str(total)))
    pids = _obj(res.get("pids"), f"{where}.pids")
    if pids.get("limit") is not None:
        pids_limit = _int(pids["limit"], f"{where}.pids.limit", -(1 << 62), 1 << 62)
        files.append(("pids.max", "max" if pids_limit <= 0 else str(pids_limit)))
        v1.append(("pids.max", "max" if pids_limit <= 0 else str(pids_limit)))
    cpu = _obj(res.get("cpu"), f"{where}.cpu")
    if cpu.get("shares") is not None:
        shares = _int(cpu["shares"], f"{where}.cpu.shares", 0, UINT64_MAX)
        if shares:
            files.append(("cpu.weight", str(_cpu_weight(max(2, min(shares, 262144))))))
            v1.append(("cpu.shares", str(shares)))
    if cpu.get("quota") is not None or cpu.get("period") is not None:
        quota = _int(cpu.get("quota"), f"{where}.cpu.quota", -1, 1 << 62, -1)
        period = _int(cpu.get("period"), f"{where}.cpu.period", 0, 1 << 32, 100000) or 100000
        files.append(("cpu.max", f"{'max' if quota <= 0 else quota} {period}"))
        if cpu.get("period") is not None:
            v1.append(("cpu.cfs_period_us", str(period)))
        if cpu.get("quota") is not None:
            v1.append(("cpu.cfs_quota_us", str(quota if quota > 0 else -1)))
    highest: dict[str, int | None] = {"cpus": None, "mems": None}
    for key in ("cpus", "mems"):
        if cpu.get(key):
            setting = _str(cpu[key], f"{where}.cpu.{key}")
            highest[key] = _cpuset_highest(setting, f"{where}.cpu.{key}")
            files.append((f"cpuset.{key}", setting))
            v1.append((f"cpuset.{key}", setting))
    block_io = _obj(res.get("blockIO"), f"{where}.blockIO")
    if block_io.get("weight") is not None:
        weight = _int(block_io["weight"], f"{where}.blockIO.weight", 0, 1000)
        if weight:
            if weight < 10:
                raise SpecError(f"{where}.blockIO.weight: {weight} is not in [10, 1000]")
            files.append(("io.weight", f"default {_io_weight(weight)}"))
            v1.append(("blkio.weight", str(weight)))
    for i, item in enumerate(_list(res.get("hugepageLimits"), f"{where}.hugepageLimits")):
        entry = _obj(item, f"{where}.hugepageLimits[{i}]")
        size = _page_size(entry.get("pageSize"), f"{where}.hugepageLimits[{i}].pageSize")
        bytes_ = _int(entry.get("limit"), f"{where}.hugepageLimits[{i}].limit", 0, UINT64_MAX)
        files.append((f"hugetlb.{size}.max", str(bytes_)))
        v1.append((f"hugetlb.{size}.limit_in_bytes", str(bytes_)))
    unified = _obj(res.get("unified"), f"{where}.unified")
    for key, raw in unified.items():
        setting = _str(raw, f'{where}.unified["{key}"]')
        controller, dot, rest = key.partition(".")
        if not dot or not controller or not rest or "/" in key or controller == "cgroup":
            raise SpecError(f'{where}.unified: invalid cgroup file name "{key}"')
        files.append((key, setting))
    return Resources(
        files,
        v1,
        unified=bool(unified),
        cpus=highest["cpus"],
        mems=highest["mems"],
        devices=parse_device_rules(res.get("devices"), f"{where}.devices"),
    )


def parse_device_rules(value: object, where: str) -> tuple[device_rules.Rule, ...]:
    """``linux.resources.devices``: ``allow`` (default false), ``type`` "a" (default), "b" or
    "c", ``major``/``minor`` (absent or -1: every number), ``access`` letters of "rwm" (runc
    refuses an empty one: ``device access at 0 field cannot be empty``)."""
    rules = []
    for i, item in enumerate(_list(value, where)):
        at = f"{where}[{i}]"
        entry = _obj(item, at)
        kind = _str(entry.get("type"), f"{at}.type", "a") or "a"
        if kind not in ("a", "b", "c"):
            raise SpecError(f'{at}.type: invalid cgroup device type "{kind}" (want a, b or c)')
        numbers = [
            _int(entry.get(name), f"{at}.{name}", -1, 0xFFFFFFFF, -1) for name in ("major", "minor")
        ]
        access = _str(entry.get("access"), f"{at}.access")
        if not access:
            raise SpecError(f'{at}.access: device access cannot be empty (want letters of "rwm")')
        if any(letter not in device_rules.ACCESS for letter in access):
            raise SpecError(
                f'{at}.access: unknown device access "{access}" (want letters of "rwm")'
            )
        allow = _bool(entry.get("allow"), f"{at}.allow")
        rules.append(device_rules.Rule(allow, kind, numbers[0], numbers[1], access, at))
    return tuple(rules)


def _cpuset_highest(text: str, where: str) -> int:
    """The highest number of a cpuset list (``0-3,8``, cpuset(7)); SpecError when malformed."""
    highest = -1
    for item in text.strip().split(","):
        first, dash, last = item.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise SpecError(f'{where}: "{text}" is not a list like 0-3,5 of numbers and ranges')
        low, high = int(first), int(last) if dash else int(first)
        if low > high or high > MAX_CPUSET_ID:
            raise SpecError(f'{where}: "{item}" in "{text}" is not a valid range')
        highest = max(highest, high)
    return highest


def parse_hooks(value: object, where: str) -> dict[str, tuple[Hook, ...]]:
    """config.json ``hooks``: hook point -> hooks. Paths must be absolute (as the spec says
    and runc finds out only when it runs one); ``env`` entries KEY=value; a timeout, when
    given, above zero. Both the host (prestart ... poststop) and the in-guest runtime
    (startContainer) take their hooks from here."""
    result: dict[str, tuple[Hook, ...]] = {}
    hooks = _obj(value, where)
    for point in HOOK_NAMES:
        entries = []
        for i, item in enumerate(_list(hooks.get(point), f"{where}.{point}")):
            at = f"{where}.{point}[{i}]"
            entry = _obj(item, at)
            if entry.get("path") is None:
                raise SpecError(f"{at}.path: missing")
            timeout = entry.get("timeout")
            entries.append(
                Hook(
                    _abspath(entry.get("path"), f"{at}.path"),
                    _strings(entry.get("args"), f"{at}.args"),
                    _environment(entry.get("env"), f"{at}.env"),
                    None if timeout is None else _int(timeout, f"{at}.timeout", 1, 1 << 31),
                )
            )
        if entries:
            result[point] = tuple(entries)
    return result


def parse_annotations(value: object, where: str) -> dict[str, str]:
    """config.json ``annotations``: an object of strings."""
    return {key: _str(raw, f'{where}["{key}"]') for key, raw in _obj(value, where).items()}


def parse_spec(config: object) -> Spec:
    """Validate a decoded config.json. Raises :class:`SpecError`; touches nothing."""
    top = _obj(config, "config")
    if top.get("root") is None:
        raise SpecError("root: missing")
    root = _obj(top.get("root"), "root")
    if root.get("path") is None:
        raise SpecError("root.path: missing")
    root_path = _path_chars(_str(root.get("path"), "root.path"), "root.path")
    if not root_path:
        raise SpecError("root.path: must not be empty")
    root_path = root_path.rstrip("/") or "/"
    linux = _obj(top.get("linux"), "linux")
    namespaces = parse_namespaces(linux.get("namespaces"), "linux.namespaces")
    private = {ns.type for ns in namespaces}
    mount_ns = next((ns for ns in namespaces if ns.type == "mount"), None)
    if mount_ns is None or mount_ns.path is not None:
        # Without a mount namespace of its own, pivot_root would move the guest's root.
        raise SpecError('linux.namespaces: a new "mount" namespace is required')
    uid_mappings = parse_mappings(linux.get("uidMappings"), "linux.uidMappings")
    gid_mappings = parse_mappings(linux.get("gidMappings"), "linux.gidMappings")
    user_ns = next((ns for ns in namespaces if ns.type == "user"), None)
    if user_ns is not None and user_ns.path is None and not (uid_mappings and gid_mappings):
        missing = "linux.gidMappings" if uid_mappings else "linux.uidMappings"
        raise SpecError(f"{missing}: user namespaces enabled, but no uid or gid mappings found")
    # With a user namespace given by path the mappings are those of the joined namespace
    # (runc requires them then too: containerd 1.7 writes both for a pod's members); the
    # joined namespace's own maps apply.
    if (uid_mappings or gid_mappings) and user_ns is None:
        given = "linux.uidMappings" if uid_mappings else "linux.gidMappings"
        raise SpecError(f"{given}: mappings need a user namespace in linux.namespaces")
    hostname = _str(top.get("hostname"), "hostname")
    domainname = _str(top.get("domainname"), "domainname")
    for what, name in (("hostname", hostname), ("domainname", domainname)):
        if len(name.encode()) > MAX_HOSTNAME:
            raise SpecError(
                f"{what}: {len(name.encode())} bytes is longer than the kernel's limit of "
                f"{MAX_HOSTNAME} bytes"
            )
    if (hostname or domainname) and "uts" not in private:
        what = "hostname" if hostname else "domainname"
        raise SpecError(f"{what}: unable to set {what} without a private UTS namespace")
    propagation_name = _str(linux.get("rootfsPropagation"), "linux.rootfsPropagation")
    rootfs_propagation = None
    if propagation_name:
        rootfs_propagation = PROPAGATION.get(propagation_name)
        if rootfs_propagation is None:
            raise SpecError(
                f'linux.rootfsPropagation: unknown rootfs propagation "{propagation_name}"'
            )
    process = parse_process(top.get("process"))
    profile = linux.get("seccomp")
    if profile is not None:
        # A filter belongs to a process: linux.seccomp is applied as the process's.
        process.seccomp = seccomp_filter(profile, "linux.seccomp")
    return Spec(
        root_path,
        process,
        root_readonly=_bool(root.get("readonly"), "root.readonly"),
        hostname=hostname,
        domainname=domainname,
        mounts=tuple(
            parse_mount(item, f"mounts[{i}]")
            for i, item in enumerate(_list(top.get("mounts"), "mounts"))
        ),
        namespaces=namespaces,
        uid_mappings=uid_mappings,
        gid_mappings=gid_mappings,
        devices=parse_devices(linux.get("devices"), "linux.devices"),
        masked_paths=tuple(
            _abspath(p, f"linux.maskedPaths[{i}]")
            for i, p in enumerate(_list(linux.get("maskedPaths"), "linux.maskedPaths"))
        ),
        readonly_paths=tuple(
            _abspath(p, f"linux.readonlyPaths[{i}]")
            for i, p in enumerate(_list(linux.get("readonlyPaths"), "linux.readonlyPaths"))
        ),
        sysctls=parse_sysctls(linux.get("sysctl"), "linux.sysctl", private),
        resources=parse_resources(linux.get("resources"), "linux.resources"),
        rootfs_propagation=rootfs_propagation,
        annotations=parse_annotations(top.get("annotations"), "annotations"),
        hooks=parse_hooks(top.get("hooks"), "hooks"),
    )
