"""Invalid config.json variants, one fault each, with the field the refusal must name.

Shared by the unit tests of the host validator (tests/unit/ocispec/test_invalid_configs.py)
and the integration test that runs ``pysandbox create`` on them
(tests/integration/test_create_refusals.py). ``runc`` says whether runc 1.1 refuses the same
bundle at ``create`` too (measured on these hosts); where it does not, pysandbox is stricter
on purpose (the guest's runtime always refused these; now the host does, before a VM boots).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sandbox.run.default_spec import default_spec

Config = dict[str, Any]


@dataclass(frozen=True)
class Variant:
    """``change`` applied to a valid config; the refusal starts with ``field`` and says
    ``says``; ``raw`` replaces the whole file instead."""

    name: str
    field: str
    says: str
    change: Callable[[Config], None] | None = None
    raw: bytes | None = None
    runc: bool = True

    def render(self, base: Config) -> bytes:
        if self.raw is not None:
            return self.raw
        config = copy.deepcopy(base)
        assert self.change is not None
        self.change(config)
        return json.dumps(config).encode()


def base_config(rootfs: str = "rootfs") -> Config:
    """What ``pysandbox spec`` writes, running ``true``: valid, and runnable by runc here."""
    config = default_spec(["true"], rootfs=rootfs)
    config["hostname"] = "box"
    return config


def _set(path: str, value: object) -> Callable[[Config], None]:
    """A change setting the dotted ``path`` (list indexes as numbers) to ``value``."""

    def change(config: Config) -> None:
        *parents, last = path.split(".")
        target: Any = config
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target.setdefault(key, {})
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value

    return change


def _delete(path: str) -> Callable[[Config], None]:
    def change(config: Config) -> None:
        *parents, last = path.split(".")
        target: Any = config
        for key in parents:
            target = target[key]
        del target[last]

    return change


def _namespaces(*types: str, **paths: str) -> Callable[[Config], None]:
    def change(config: Config) -> None:
        config["linux"]["namespaces"] = [
            {"type": t, **({"path": paths[t]} if t in paths else {})} for t in types
        ]

    return change


def _both(*changes: Callable[[Config], None]) -> Callable[[Config], None]:
    def change(config: Config) -> None:
        for each in changes:
            each(config)

    return change


_NO_UTS = ("pid", "network", "ipc", "mount")
_BIND = {"destination": "/x", "type": "bind", "options": ["rbind"]}

INVALID: tuple[Variant, ...] = (
    Variant("not json", "config.json", "is not valid JSON", raw=b'{"process": {'),
    Variant("nested too deep", "config.json", "nested too deep", raw=b"[" * 100_000),
    Variant("an array", "config.json", "expected a JSON object, got an array", raw=b"[]"),
    Variant("no process", "process", "missing", _delete("process")),
    Variant("args empty", "process.args", "must not be empty", _set("process.args", [])),
    Variant("args a string", "process.args", "expected an array", _set("process.args", "sh")),
    Variant("arg a number", "process.args[0]", "expected a string", _set("process.args", [1])),
    Variant("env a string", "process.env", "expected an array", _set("process.env", "A=1")),
    Variant("env without =", "process.env[0]", "KEY=value", _set("process.env", ["FOO"])),
    Variant("cwd relative", "process.cwd", "not an absolute path", _set("process.cwd", "tmp")),
    Variant("cwd a number", "process.cwd", "expected a string", _set("process.cwd", 5)),
    Variant("uid -1", "process.user.uid", "out of range", _set("process.user.uid", -1)),
    Variant(
        "uid a string", "process.user.uid", "expected an integer", _set("process.user.uid", "0")
    ),
    Variant("gid 2^33", "process.user.gid", "out of range", _set("process.user.gid", 2**33)),
    Variant(
        "additionalGids a string",
        "process.user.additionalGids",
        "expected an array",
        _set("process.user.additionalGids", "5"),
    ),
    Variant(
        "umask too big",
        "process.user.umask",
        "out of range",
        _set("process.user.umask", 4096),
        runc=False,
    ),
    Variant(
        "unknown capability",
        "process.capabilities.bounding[0]",
        'unknown capability "CAP_BOGUS"',
        _set("process.capabilities.bounding", ["CAP_BOGUS"]),
        runc=False,  # runc warns and goes on
    ),
    Variant(
        "unknown rlimit",
        "process.rlimits[0].type",
        'unknown rlimit type "RLIMIT_BOGUS"',
        _set("process.rlimits", [{"type": "RLIMIT_BOGUS", "soft": 1, "hard": 1}]),
    ),
    Variant(
        "rlimit soft above hard",
        "process.rlimits[0]",
        "exceeds hard limit",
        _set("process.rlimits", [{"type": "RLIMIT_NOFILE", "soft": 10, "hard": 1}]),
    ),
    Variant(
        "rlimit twice",
        "process.rlimits[1].type",
        "duplicate rlimit type",
        _set("process.rlimits", [{"type": "RLIMIT_NOFILE", "soft": 1, "hard": 1}] * 2),
    ),
    Variant(
        "oomScoreAdj 5000",
        "process.oomScoreAdj",
        "out of range",
        _set("process.oomScoreAdj", 5000),
    ),
    Variant(
        "terminal a string",
        "process.terminal",
        "expected true or false",
        _set("process.terminal", "yes"),
    ),
    Variant(
        "noNewPrivileges a string",
        "process.noNewPrivileges",
        "expected true or false",
        _set("process.noNewPrivileges", "true"),
    ),
    Variant("no root", "root", "missing", _delete("root")),
    Variant("no root.path", "root.path", "missing", _delete("root.path")),
    Variant("rootfs missing", "root.path", "is not a directory", _set("root.path", "nope")),
    Variant("rootfs a file", "root.path", "is not a directory", _set("root.path", "config.json")),
    Variant(
        "readonly a string",
        "root.readonly",
        "expected true or false",
        _set("root.readonly", "yes"),
    ),
    Variant("mounts an object", "mounts", "expected an array", _set("mounts", {})),
    Variant(
        "mount destination relative",
        "mounts[0].destination",
        "not an absolute path",
        _set("mounts.0.destination", "proc"),
        runc=False,  # runc 1.1 warns and goes on
    ),
    Variant(
        "mount without type",
        "mounts[0].type",
        "required for a mount that is not a bind mount",
        _set("mounts", [{"destination": "/x", "source": "tmpfs"}]),
    ),
    Variant(
        "bind source missing",
        "mounts[0].source",
        "does not exist",
        _set("mounts", [{**_BIND, "source": "/nonexistent-pysandbox-source"}]),
    ),
    Variant(
        "bind source on the host's procfs",
        "mounts[0].source",
        "mount /hostproc: /proc is a proc filesystem on the host; it cannot be shared",
        _set("mounts", [{**_BIND, "destination": "/hostproc", "source": "/proc"}]),
        runc=False,  # runc binds it (the host's processes then show in the container)
    ),
    Variant(
        "bind source on the host's sysfs",
        "mounts[0].source",
        "/sys/kernel is a sysfs filesystem on the host; it cannot be shared",
        _set("mounts", [{**_BIND, "source": "/sys/kernel"}]),
        runc=False,
    ),
    Variant(
        "mount option idmap",
        "mounts[0].options[0]",
        'mount option "idmap" is not supported',
        _set("mounts", [{"destination": "/x", "type": "tmpfs", "options": ["idmap"]}]),
    ),
    Variant(
        "unknown namespace",
        "linux.namespaces[1].type",
        'unknown namespace type "bogus"',
        _namespaces("mount", "bogus", "uts"),
    ),
    Variant(
        "namespace twice",
        "linux.namespaces[2].type",
        'duplicate namespace type "pid"',
        _namespaces("mount", "pid", "pid", "uts"),
    ),
    Variant(
        "no mount namespace",
        "linux.namespaces",
        'a new "mount" namespace is required',
        _namespaces("pid", "uts"),
    ),
    Variant(
        "user namespace without mappings",
        "linux.uidMappings",
        "no uid or gid mappings found",
        _namespaces("mount", "uts", "user"),
    ),
    Variant(
        "mappings without user namespace",
        "linux.uidMappings",
        "need a user namespace",
        _set("linux.uidMappings", [{"containerID": 0, "hostID": 1000, "size": 1}]),
        runc=False,
    ),
    Variant(
        "hostname without uts namespace",
        "hostname",
        "without a private UTS namespace",
        _namespaces(*_NO_UTS),
    ),
    Variant(
        "namespace of another container",
        "linux.namespaces[2].path",
        "is not a namespace of this pod",
        _namespaces("mount", "uts", "ipc", ipc="/proc/1/ns/ipc"),
        runc=False,  # for runc the host's is fine
    ),
    Variant(
        "unknown rootfs propagation",
        "linux.rootfsPropagation",
        'unknown rootfs propagation "bogus"',
        _set("linux.rootfsPropagation", "bogus"),
    ),
    Variant(
        "sysctl not namespaced",
        'linux.sysctl["vm.swappiness"]',
        "not in a separate kernel namespace",
        _set("linux.sysctl", {"vm.swappiness": "10"}),
    ),
    Variant(
        "net sysctl without network namespace",
        'linux.sysctl["net.ipv4.ip_forward"]',
        "conflicts with the host's network namespace",
        _both(
            _namespaces("pid", "ipc", "uts", "mount"),
            _set("linux.sysctl", {"net.ipv4.ip_forward": "1"}),
        ),
    ),
    Variant(
        "unknown device type",
        "linux.devices[0].type",
        'unknown device type "x"',
        _set("linux.devices", [{"path": "/dev/x", "type": "x", "major": 1, "minor": 3}]),
    ),
    Variant(
        "device path relative",
        "linux.devices[0].path",
        "not an absolute path",
        _set("linux.devices", [{"path": "dev/x", "type": "c", "major": 1, "minor": 3}]),
        runc=False,
    ),
    Variant(
        "masked path relative",
        "linux.maskedPaths[0]",
        "not an absolute path",
        _set("linux.maskedPaths", ["proc/kcore"]),
        runc=False,
    ),
    Variant(
        "memory limit 4096",
        "linux.resources.memory.limit",
        "4096 is below the minimum of 6291456 bytes",
        _set("linux.resources.memory", {"limit": 4096}),
    ),
    Variant(
        "memory limit a string",
        "linux.resources.memory.limit",
        "expected an integer",
        _set("linux.resources.memory", {"limit": "1g"}),
    ),
    Variant(
        "swap below the limit",
        "linux.resources.memory.swap",
        "is less than the memory limit",
        _set("linux.resources.memory", {"limit": 1 << 28, "swap": 1 << 27}),
    ),
    Variant(
        "cpu shares a string",
        "linux.resources.cpu.shares",
        "expected an integer",
        _set("linux.resources.cpu", {"shares": "x"}),
    ),
    Variant(
        "cpuset garbage",
        "linux.resources.cpu.cpus",
        "is not a list like 0-3,5",
        _set("linux.resources.cpu", {"cpus": "abc"}),
    ),
    Variant(
        "cpuset beyond the VM",
        "linux.resources.cpu.cpus",
        "names CPU 99, but a pod VM has 1 CPU",
        _set("linux.resources.cpu", {"cpus": "0-99"}),
    ),
    Variant(
        "cpu quota a string",
        "linux.resources.cpu.quota",
        "expected an integer",
        _set("linux.resources.cpu", {"quota": "x", "period": 100000}),
    ),
    Variant(
        "pids limit a string",
        "linux.resources.pids.limit",
        "expected an integer",
        _set("linux.resources.pids", {"limit": "x"}),
    ),
    Variant(
        "unified file outside a controller",
        "linux.resources.unified",
        'invalid cgroup file name "cgroup.procs"',
        _set("linux.resources.unified", {"cgroup.procs": "1"}),
    ),
    Variant(
        "device rule without access",
        "linux.resources.devices[0].access",
        "device access cannot be empty",
        _set("linux.resources.devices", [{"allow": True, "type": "c"}]),
    ),
    Variant(
        "device rule punching a hole in a wildcard",
        "linux.resources.devices[2]",
        "deny c 4:1 w cannot be applied after the exception c 4:* rw",
        _set(
            "linux.resources.devices",
            [
                {"allow": False, "access": "rwm"},
                {"allow": True, "type": "c", "major": 4, "access": "rw"},
                {"allow": False, "type": "c", "major": 4, "minor": 1, "access": "w"},
            ],
        ),
    ),
    Variant(
        "seccomp unknown action",
        "linux.seccomp.defaultAction",
        'unknown action "SCMP_ACT_BOGUS"',
        _set("linux.seccomp", {"defaultAction": "SCMP_ACT_BOGUS"}),
    ),
    Variant(
        "seccomp syscalls an object",
        "linux.seccomp.syscalls",
        "expected an array",
        _set("linux.seccomp", {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": {}}),
    ),
    Variant(
        "seccomp unknown architecture",
        "linux.seccomp.architectures[0]",
        'unknown architecture "SCMP_ARCH_BOGUS"',
        _set(
            "linux.seccomp",
            {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_BOGUS"]},
        ),
    ),
    Variant(
        "seccomp notify",
        "linux.seccomp.listenerPath",
        "SCMP_ACT_NOTIFY is not supported",
        _set("linux.seccomp", {"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/x.sock"}),
        runc=False,  # runc 1.1 ignores listenerPath without a NOTIFY rule
    ),
    Variant(
        "hook path relative",
        "hooks.prestart[0].path",
        "not an absolute path",
        _set("hooks", {"prestart": [{"path": "true"}]}),
    ),
    Variant(
        "createRuntime hook missing",
        "hooks.createRuntime[0].path",
        "is not an executable",
        _set("hooks", {"createRuntime": [{"path": "/nonexistent-pysandbox-hook"}]}),
    ),
    Variant(
        "createContainer hook missing",
        "hooks.createContainer[0].path",
        "is not an executable",
        _set("hooks", {"createContainer": [{"path": "/nonexistent-pysandbox-hook"}]}),
    ),
    Variant(
        "hooks not a list",
        "hooks.createRuntime",
        "expected an array",
        _set("hooks", {"createRuntime": {}}),
    ),
    Variant(
        "hook timeout 0",
        "hooks.poststop[0].timeout",
        "out of range",
        _set("hooks", {"poststop": [{"path": "/bin/true", "timeout": 0}]}),
        runc=False,  # runc finds out when it runs it
    ),
    Variant(
        "annotations an array", "annotations", "expected an object", _set("annotations", ["a"])
    ),
    Variant(
        "annotation a number",
        'annotations["a"]',
        "expected a string",
        _set("annotations", {"a": 1}),
    ),
    Variant(
        "hostname too long",
        "hostname",
        "longer than the kernel's limit of 64 bytes",
        _set("hostname", "h" * 65),
    ),
)
