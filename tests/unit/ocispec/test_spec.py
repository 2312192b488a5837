"""Parsing and validation of the OCI spec: typed records, precise errors, no side effects."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from ocispec import linux as sc
from ocispec import spec as spec_mod
from ocispec.errors import SpecError

BASE: dict[str, Any] = {
    "ociVersion": "1.0.2",
    "process": {"args": ["sh"], "env": ["PATH=/bin"], "cwd": "/"},
    "root": {"path": "/r"},
    "linux": {"namespaces": [{"type": "mount"}, {"type": "pid"}, {"type": "uts"}]},
}


def parse(**changes: Any) -> spec_mod.Spec:
    config = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        target = config
        *parents, last = dotted.split("__")
        for key in parents:
            target = target.setdefault(key, {})
        target[last] = value
    return spec_mod.parse_spec(config)


def error_of(**changes: Any) -> str:
    with pytest.raises(SpecError) as info:
        parse(**changes)
    return info.value.message


def test_minimal_spec_defaults() -> None:
    spec = parse()
    assert spec.root_path == "/r"
    assert spec.process.args == ["sh"]
    assert spec.process.user.uid == 0 and spec.process.user.additional_gids == ()
    assert spec.process.capabilities is None
    assert spec.process.seccomp is None
    assert [ns.type for ns in spec.namespaces] == ["mount", "pid", "uts"]
    assert spec.resources is None


def test_full_process() -> None:
    spec = parse(
        process={
            "terminal": True,
            "args": ["/bin/app", "x"],
            "env": ["A=1", "B="],
            "cwd": "/srv",
            "user": {"uid": 1000, "gid": 100, "umask": 0o027, "additionalGids": [5, 6]},
            "capabilities": {
                "bounding": ["CAP_KILL", "CAP_CHOWN"],
                "effective": ["CAP_KILL"],
                "ambient": ["cap_kill"],
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 10, "hard": 20}],
            "noNewPrivileges": True,
            "oomScoreAdj": -500,
            "apparmorProfile": "ignored",
        }
    )
    proc = spec.process
    assert proc.terminal and proc.no_new_privileges
    assert proc.env == ["A=1", "B="]
    assert proc.user.umask == 0o027 and proc.user.additional_gids == (5, 6)
    assert proc.capabilities is not None
    assert proc.capabilities.bounding == (1 << 5) | 1
    assert proc.capabilities.effective == 1 << 5
    assert proc.capabilities.ambient == 1 << 5
    assert proc.capabilities.permitted == 0
    assert [(r.resource, r.soft, r.hard) for r in proc.rlimits] == [(7, 10, 20)]
    assert proc.oom_score_adj == -500


def test_mount_options() -> None:
    spec = parse(
        mounts=[
            {
                "destination": "/data",
                "type": "none",
                "source": "/src",
                "options": ["rbind", "ro", "nosuid", "rw", "rslave", "tmpcopyup"],
            },
            {
                "destination": "/tmp",
                "type": "tmpfs",
                "options": ["nodev", "mode=1777", "size=1m", "dev"],
            },
        ]
    )
    bind, tmpfs = spec.mounts
    assert bind.bind and bind.flags == sc.MS_BIND | sc.MS_REC | sc.MS_NOSUID
    assert bind.propagation == (sc.MS_SLAVE | sc.MS_REC,)
    assert bind.data == ""
    assert not tmpfs.bind and tmpfs.flags == 0 and tmpfs.data == "mode=1777,size=1m"
    assert tmpfs.source == ""


def test_resources_in_cgroup_v2_terms() -> None:
    spec = parse(
        linux__resources={
            "memory": {"limit": 100 << 20, "swap": 150 << 20, "reservation": 50},
            "pids": {"limit": -1},
            "cpu": {"shares": 1024, "quota": 50000, "period": 100000, "cpus": "0-1"},
            "unified": {"memory.high": "90"},
        }
    )
    assert spec.resources is not None
    assert spec.resources.files == [
        ("memory.low", "50"),
        ("memory.max", "104857600"),
        ("memory.swap.max", "52428800"),
        ("pids.max", "max"),
        ("cpu.weight", "39"),
        ("cpu.max", "50000 100000"),
        ("cpuset.cpus", "0-1"),
        ("memory.high", "90"),
    ]
    assert spec.resources.unified


def test_resources_in_cgroup_v1_terms_as_runc_writes_them() -> None:
    spec = parse(
        linux__resources={
            "memory": {"limit": 100 << 20, "swap": 150 << 20, "reservation": 50},
            "pids": {"limit": 0},
            "cpu": {"shares": 1024, "quota": 50000, "period": 100000, "cpus": "0", "mems": "0"},
            "blockIO": {"weight": 500},
            "hugepageLimits": [{"pageSize": "2MB", "limit": 4194304}],
        }
    )
    assert spec.resources is not None and not spec.resources.unified
    assert spec.resources.v1_files == [
        ("memory.soft_limit_in_bytes", "50"),
        ("memory.limit_in_bytes", str(100 << 20)),
        ("memory.memsw.limit_in_bytes", str(150 << 20)),
        ("pids.max", "max"),
        ("cpu.shares", "1024"),
        ("cpu.cfs_period_us", "100000"),
        ("cpu.cfs_quota_us", "50000"),
        ("cpuset.cpus", "0"),
        ("cpuset.mems", "0"),
        ("blkio.weight", "500"),
        ("hugetlb.2MB.limit_in_bytes", "4194304"),
    ]
    # ... and their v2 forms: blkio weight 500 is io.weight 4950 (runc's conversion).
    assert spec.resources.files[-3:] == [
        ("cpuset.mems", "0"),
        ("io.weight", "default 4950"),
        ("hugetlb.2MB.max", "4194304"),
    ]


def test_linux_seccomp_becomes_the_process_filter() -> None:
    spec = parse(linux__seccomp={"defaultAction": "SCMP_ACT_ALLOW"})
    assert spec.process.seccomp is not None and len(spec.process.seccomp) > 0


def test_user_namespace_with_mappings() -> None:
    spec = parse(
        linux__namespaces=[{"type": "mount"}, {"type": "user"}],
        linux__uidMappings=[{"containerID": 0, "hostID": 1000, "size": 1}],
        linux__gidMappings=[{"containerID": 0, "hostID": 1000, "size": 1}],
    )
    assert spec.uid_mappings[0].line() == "0 1000 1\n"


def test_a_joined_user_namespace_may_carry_its_mappings() -> None:
    """runc requires the mappings with a user namespace given by path too (containerd 1.7
    writes both for a pod's members); they describe the joined namespace."""
    spec = parse(
        linux__namespaces=[{"type": "mount"}, {"type": "user", "path": "/proc/9/ns/user"}],
        linux__uidMappings=[{"containerID": 0, "hostID": 1000, "size": 1}],
        linux__gidMappings=[{"containerID": 0, "hostID": 1000, "size": 1}],
    )
    user = spec.namespace("user")
    assert user is not None and user.path == "/proc/9/ns/user"


def test_namespace_paths() -> None:
    spec = parse(
        linux__namespaces=[{"type": "mount"}, {"type": "network", "path": "/proc/9/ns/net"}]
    )
    net = spec.namespace("network")
    assert net is not None and net.path == "/proc/9/ns/net" and net.flag == sc.CLONE_NEWNET


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"linux__namespaces": [{"type": "mount"}, {"type": "bogus"}]},
            'linux.namespaces[1].type: unknown namespace type "bogus"',
        ),
        (
            {"linux__namespaces": [{"type": "mount"}, {"type": "pid"}, {"type": "pid"}]},
            'linux.namespaces[2].type: duplicate namespace type "pid"',
        ),
        (
            {"linux__namespaces": [{"type": "pid"}]},
            'linux.namespaces: a new "mount" namespace is required',
        ),
        (
            {"linux__namespaces": [{"type": "mount"}, {"type": "net", "path": "rel"}]},
            'linux.namespaces[1].type: unknown namespace type "net"',
        ),
        (
            {"linux__namespaces": [{"type": "mount"}, {"type": "network", "path": "rel"}]},
            'linux.namespaces[1].path: "rel" is not an absolute path',
        ),
        (
            {"linux__namespaces": [{"type": "mount"}, {"type": "user"}]},
            "linux.uidMappings: user namespaces enabled, but no uid or gid mappings found",
        ),
        (
            {"linux__uidMappings": [{"containerID": 0, "hostID": 1, "size": 1}]},
            "linux.uidMappings: mappings need a user namespace in linux.namespaces",
        ),
        (
            {"hostname": "h", "linux__namespaces": [{"type": "mount"}]},
            "hostname: unable to set hostname without a private UTS namespace",
        ),
        ({"root": {}}, "root.path: missing"),
        ({"root": None}, "root: missing"),
        ({"root": {"path": ""}}, "root.path: must not be empty"),
        ({"root": {"path": "a\x00b"}}, "root.path: path contains a NUL byte"),
        ({"process": None}, "process: missing"),
        ({"process__args": []}, "process.args: must not be empty"),
        ({"process__args": "sh"}, 'process.args: expected an array, got "sh"'),
        ({"process__args": ["sh", 1]}, "process.args[1]: expected a string, got 1"),
        ({"process__env": ["NOEQUALS"]}, 'process.env[0]: "NOEQUALS" is not of the form KEY=value'),
        ({"process__cwd": "rel"}, 'process.cwd: "rel" is not an absolute path'),
        ({"process__user": {"uid": -1}}, "process.user.uid: -1 is out of range [0, 4294967295]"),
        ({"process__user": {"uid": "0"}}, 'process.user.uid: expected an integer, got "0"'),
        ({"process__user": {"gid": True}}, "process.user.gid: expected an integer, got true"),
        ({"process__terminal": "yes"}, 'process.terminal: expected true or false, got "yes"'),
        (
            {"process__capabilities": {"bounding": ["CAP_FLY"]}},
            'process.capabilities.bounding[0]: unknown capability "CAP_FLY"',
        ),
        (
            {"process__rlimits": [{"type": "RLIMIT_BOGUS", "soft": 1, "hard": 1}]},
            'process.rlimits[0].type: unknown rlimit type "RLIMIT_BOGUS"',
        ),
        (
            {"process__rlimits": [{"type": "RLIMIT_NOFILE", "soft": 2, "hard": 1}]},
            "process.rlimits[0]: soft limit 2 of RLIMIT_NOFILE exceeds hard limit 1",
        ),
        (
            {
                "process__rlimits": [
                    {"type": "RLIMIT_NOFILE", "soft": 1, "hard": 1},
                    {"type": "RLIMIT_NOFILE", "soft": 1, "hard": 1},
                ]
            },
            'process.rlimits[1].type: duplicate rlimit type "RLIMIT_NOFILE"',
        ),
        ({"process__oomScoreAdj": 1001}, "process.oomScoreAdj: 1001 is out of range [-1000, 1000]"),
        (
            {"mounts": [{"destination": "rel", "type": "tmpfs"}]},
            'mounts[0].destination: "rel" is not an absolute path',
        ),
        (
            {"mounts": [{"destination": "/x", "type": "bind"}]},
            "mounts[0].source: required for a bind mount",
        ),
        (
            {"mounts": [{"destination": "/x", "options": ["ro"]}]},
            "mounts[0].type: required for a mount that is not a bind mount",
        ),
        (
            {
                "mounts": [
                    {"destination": "/x", "type": "bind", "source": "/s", "options": ["idmap"]}
                ]
            },
            'mounts[0].options[0]: mount option "idmap" is not supported',
        ),
        (
            {"linux__rootfsPropagation": "sideways"},
            'linux.rootfsPropagation: unknown rootfs propagation "sideways"',
        ),
        (
            {"linux__devices": [{"path": "/dev/x", "type": "z", "major": 1, "minor": 1}]},
            'linux.devices[0].type: unknown device type "z" (want c, b, u or p)',
        ),
        (
            {"linux__devices": [{"path": "/dev/x", "type": "c"}]},
            "linux.devices[0].major: expected an integer, got null",
        ),
        (
            {"linux__maskedPaths": ["proc/kcore"]},
            'linux.maskedPaths[0]: "proc/kcore" is not an absolute path',
        ),
        (
            {"linux__sysctl": {"net.ipv4.ip_forward": "1"}},
            'linux.sysctl["net.ipv4.ip_forward"]: sysctl "net.ipv4.ip_forward" is not allowed as '
            "it conflicts with the host's network namespace (the container has no private one)",
        ),
        (
            {"linux__sysctl": {"vm.swappiness": "1"}},
            'linux.sysctl["vm.swappiness"]: sysctl "vm.swappiness" is not in a separate kernel '
            "namespace",
        ),
        (
            {"linux__sysctl": {"net/../x": "1"}},
            'linux.sysctl["net/../x"]: sysctl "net/../x" is not a valid name',
        ),
        (
            {"linux__resources": {"memory": {"swap": 100}}},
            "linux.resources.memory.swap: set without a memory limit",
        ),
        (
            {"linux__resources": {"memory": {"limit": 100 << 20, "swap": 50 << 20}}},
            "linux.resources.memory.swap: 52428800 is less than the memory limit 104857600",
        ),
        (
            {"linux__resources": {"blockIO": {"weight": 5}}},
            "linux.resources.blockIO.weight: 5 is not in [10, 1000]",
        ),
        (
            {"linux__resources": {"hugepageLimits": [{"pageSize": "2M/x", "limit": 1}]}},
            'linux.resources.hugepageLimits[0].pageSize: invalid hugepage size "2M/x" '
            '(want e.g. "2MB" or "1GB")',
        ),
        (
            {"linux__resources": {"unified": {"cgroup.procs": "1"}}},
            'linux.resources.unified: invalid cgroup file name "cgroup.procs"',
        ),
        (
            {"linux__resources": {"unified": {"../../x.y": "1"}}},
            'linux.resources.unified: invalid cgroup file name "../../x.y"',
        ),
        (
            {"linux__seccomp": {"defaultAction": "SCMP_ACT_BOGUS"}},
            'linux.seccomp.defaultAction: unknown action "SCMP_ACT_BOGUS"',
        ),
        ({"linux": []}, "linux: expected an object, got an array"),
    ],
)
def test_errors(changes: dict[str, Any], message: str) -> None:
    assert error_of(**changes) == message


def test_parse_process_alone_with_the_seccomp_extension() -> None:
    proc = spec_mod.parse_process(
        {"args": ["ls"], "seccomp": {"defaultAction": "SCMP_ACT_ALLOW"}}, "process"
    )
    assert proc.cwd == "/" and proc.seccomp is not None


def test_console_size_only_with_a_terminal_and_within_a_winsize() -> None:
    """runtime-spec config.md: consoleSize (height, width: uint) is ignored without a
    terminal; struct winsize holds 16 bits, so larger values are taken as 65535."""
    base = {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}}
    size = {"height": 24, "width": 80}
    on = spec_mod.parse_process({**base, "terminal": True, "consoleSize": size})
    assert on.console_size == (24, 80)
    assert spec_mod.parse_process({**base, "consoleSize": size}).console_size is None
    assert spec_mod.parse_process({**base, "terminal": True}).console_size is None
    huge = {"height": 70000, "width": 2**32 - 1}
    assert spec_mod.parse_process({**base, "terminal": True, "consoleSize": huge}).console_size == (
        65535,
        65535,
    )
    for bad, message in (
        ({"height": 24}, "process.consoleSize.width: expected an integer"),
        ({"height": -1, "width": 80}, "process.consoleSize.height: -1 is out of range"),
        ("24x80", "process.consoleSize: expected an object"),
    ):
        with pytest.raises(SpecError, match=message):
            spec_mod.parse_process({**base, "terminal": True, "consoleSize": bad})


def test_a_device_mode_with_its_file_type_bits_is_taken_as_runc_takes_it() -> None:
    """podman writes a whole st_mode (``--device /dev/fuse``: 8576 = 020600); runc clears the
    type bits. Permission bits alone, or the default, are as before; more is refused."""
    devices = [
        {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 0o20600},
        {"path": "/dev/sda", "type": "b", "major": 8, "minor": 0, "fileMode": 0o60660},
        {"path": "/dev/x", "type": "c", "major": 1, "minor": 3, "fileMode": 0o640},
        {"path": "/dev/y", "type": "c", "major": 1, "minor": 5},
    ]
    parsed = parse(linux__devices=devices).devices
    assert [d.mode for d in parsed] == [0o600, 0o660, 0o640, 0o666]
    too_big = [{"path": "/dev/x", "type": "c", "major": 1, "minor": 3, "fileMode": 0o1000000}]
    assert error_of(linux__devices=too_big) == (
        "linux.devices[0].fileMode: 262144 is out of range [0, 65535]"
    )


@pytest.mark.parametrize(
    ("entry", "copy_up"),
    [
        ({"type": "tmpfs", "options": ["tmpcopyup", "size=1m"]}, True),
        ({"type": "tmpfs", "options": ["tmpcopyup", "notmpcopyup"]}, False),
        ({"type": "tmpfs", "options": ["size=1m"]}, False),
        ({"type": "bind", "source": "/x", "options": ["rbind", "tmpcopyup"]}, False),  # runc
    ],
)
def test_tmpcopyup_is_kept_for_a_tmpfs_and_never_passed_to_mount(
    entry: dict[str, object], copy_up: bool
) -> None:
    mount = spec_mod.parse_mount({"destination": "/d", "source": "tmpfs", **entry}, "mounts[0]")
    assert mount.copy_up is copy_up
    assert "copyup" not in mount.data
