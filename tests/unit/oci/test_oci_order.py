"""The exact order of side effects of agent.oci.init and agent.oci.exec, without root.

Every test drives the runtime's ``run`` with a :class:`RecordingSyscalls` and compares the
recorded calls with the sequence the OCI spec (and runc's ordering) requires.
"""

from __future__ import annotations

import errno
import json
from typing import Any

import pytest

from agent.oci import exec as exec_mod
from agent.oci import init
from agent.oci import syscalls as sc
from ocispec import linux

SYNC = 4
CGROUP = "/sys/fs/cgroup/pysandbox/c1"
# RecordingSyscalls hands out descriptors from 11: the two pipes of the fork are 11-14.
PID_R, PID_W, DONE_R, DONE_W = 11, 12, 13, 14


def typical_spec(**changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {
            "args": ["sh", "-c", "echo hi"],
            "env": ["PATH=/bin", "A=b"],
            "cwd": "/work",
            "user": {"uid": 1000, "gid": 1000, "additionalGids": [10]},
            "capabilities": {
                "bounding": ["CAP_KILL", "CAP_CHOWN"],
                "effective": ["CAP_KILL"],
                "permitted": ["CAP_KILL"],
                "inheritable": [],
                "ambient": [],
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 100, "hard": 200}],
            "noNewPrivileges": True,
            "oomScoreAdj": 100,
        },
        "root": {"path": "/r", "readonly": True},
        "hostname": "box",
        "mounts": [
            {
                "destination": "/proc",
                "type": "proc",
                "source": "proc",
                "options": ["nosuid", "noexec", "nodev"],
            },
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "mode=755"],
            },
            {
                "destination": "/data",
                "type": "bind",
                "source": "/host/data",
                "options": ["rbind", "ro", "rprivate"],
            },
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "mount", "uts", "ipc", "network")],
            "resources": {"memory": {"limit": 67108864}, "pids": {"limit": 10}},
            "sysctl": {"net.ipv4.ip_forward": "1"},
            "maskedPaths": ["/proc/kcore", "/sys/firmware", "/absent"],
            "readonlyPaths": ["/proc/sys"],
            "seccomp": {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}],
            },
        },
    }
    spec.update(changes)
    return spec


def fake(**kwargs: Any) -> sc.RecordingSyscalls:
    """A system with /r as rootfs, cgroup2 at /sys/fs/cgroup, and a container /bin/sh.

    The fake file system is flat: paths seen after pivot_root (/proc/kcore, /bin/sh) are
    listed next to those before it (/r/proc).
    """
    kwargs.setdefault("reads", {PID_R: b"4242", SYNC: b"start\n"})
    system = sc.RecordingSyscalls(
        fs={
            "/r": "dir",
            "/r/proc": "dir",
            "/r/dev": "dir",
            "/host/data": "dir",
            "/sys/fs/cgroup": "dir",
            "/sys/fs/cgroup/pysandbox": "dir",
            "/proc/kcore": "file",
            "/sys/firmware": "dir",
            "/proc/sys": "dir",
            "/bin/sh": "file",
            "/work": "dir",
        },
        **kwargs,
    )
    for name in ("null", "zero", "full", "random", "urandom", "tty"):
        system.fs[f"/dev/{name}"] = "chr"  # the guest's device nodes
    system.magic["/sys/fs/cgroup/pysandbox"] = sc.CGROUP2_SUPER_MAGIC
    system.texts["/proc/sys/kernel/cap_last_cap"] = "40\n"
    system.texts["/etc/passwd"] = (
        "root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"
    )
    system.texts["/proc/self/mountinfo"] = (
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
        "30 22 0:5 / /proc rw,nosuid shared:12 - proc proc rw\n"
    )
    return system


def run_init(
    system: sc.RecordingSyscalls, spec: dict[str, Any], cgroup: str | None = CGROUP
) -> sc.FakeExec:
    with pytest.raises(sc.FakeExec) as info:
        init.run(system, json.dumps(spec).encode(), SYNC, cgroup)
    return info.value


def drops_except(*kept: int) -> list[tuple[object, ...]]:
    return [("capbset_drop", cap) for cap in range(41) if cap not in kept]


def test_typical_container_in_order() -> None:
    system = fake()
    execd = run_init(system, typical_spec())
    assert execd.path == "/bin/sh"
    assert execd.argv == ["sh", "-c", "echo hi"]
    assert execd.env == ["PATH=/bin", "A=b", "HOME=/home/user"]
    # The spec has no cgroup namespace: the container gets one all the same, rooted at the
    # cgroup it joined just before (its own cgroup is what it sees at /sys/fs/cgroup).
    new_namespaces = (
        linux.CLONE_NEWPID
        | linux.CLONE_NEWNS
        | linux.CLONE_NEWUTS
        | linux.CLONE_NEWIPC
        | linux.CLONE_NEWNET
        | linux.CLONE_NEWCGROUP
    )
    assert system.calls == [
        # A: inherited settings, cgroup with limits before joining, namespaces, fork.
        ("write_file", "/proc/self/oom_score_adj", "100"),
        ("mkdir", CGROUP, "0o755"),
        ("write_file", f"{CGROUP}/memory.max", "67108864"),
        ("write_file", f"{CGROUP}/pids.max", "10"),
        # The device filter (runc's default rules: the spec has none) before joining.
        ("load_device_program", 64),
        ("attach_device_program", CGROUP, sc.DEVICE_PROGRAM_FD),
        ("close", sc.DEVICE_PROGRAM_FD),
        ("write_file", f"{CGROUP}/cgroup.procs", "0"),
        ("unshare", new_namespaces),
        ("loopback_up",),  # a new network namespace gets lo up, as with runc
        ("pipe",),
        ("pipe",),
        ("fork",),
        # B: learn its pid, own session.
        ("close", PID_W),
        ("close", DONE_R),
        ("read", PID_R),
        ("close", PID_R),
        ("setsid",),
        ("umask", "0o0"),
        # Rootfs: propagation, parent private (it is shared), bind, mounts in order.
        ("mount", None, "/", None, "rec|slave", ""),
        ("mount", None, "/", None, "private", ""),
        ("mount", "/r", "/r", None, "bind|rec", ""),
        ("mount", "proc", "/r/proc", "proc", "nosuid|nodev|noexec", ""),
        ("mount", "tmpfs", "/r/dev", "tmpfs", "nosuid", "mode=755"),
        ("mkdir", "/r/data", "0o755"),
        ("mount", "/host/data", "/r/data", None, "bind|rec", ""),
        ("mount", None, "/r/data", None, "ro|remount|bind", ""),
        ("mount", None, "/r/data", None, "rec|private", ""),
        # Devices into the new /dev, then its links.
        ("mknod", "/r/dev/null", "0o20666", 1, 3),
        ("chown", "/r/dev/null", 0, 0),
        ("mknod", "/r/dev/zero", "0o20666", 1, 5),
        ("chown", "/r/dev/zero", 0, 0),
        ("mknod", "/r/dev/full", "0o20666", 1, 7),
        ("chown", "/r/dev/full", 0, 0),
        ("mknod", "/r/dev/random", "0o20666", 1, 8),
        ("chown", "/r/dev/random", 0, 0),
        ("mknod", "/r/dev/urandom", "0o20666", 1, 9),
        ("chown", "/r/dev/urandom", 0, 0),
        ("mknod", "/r/dev/tty", "0o20666", 5, 0),
        ("chown", "/r/dev/tty", 0, 0),
        ("symlink", "/proc/self/fd", "/r/dev/fd"),
        ("symlink", "/proc/self/fd/0", "/r/dev/stdin"),
        ("symlink", "/proc/self/fd/1", "/r/dev/stdout"),
        ("symlink", "/proc/self/fd/2", "/r/dev/stderr"),
        ("symlink", "pts/ptmx", "/r/dev/ptmx"),
        # pivot_root(".", ".") and detach the old root.
        ("open", "/"),
        ("open", "/r"),
        ("fchdir", 16),
        ("pivot_root", ".", "."),
        ("fchdir", 15),
        ("mount", None, ".", None, "rec|slave", ""),
        ("umount2", ".", sc.MNT_DETACH),
        ("chdir", "/"),
        ("close", 15),
        ("close", 16),
        # Inside: names, sysctls, read-only and masked paths, read-only root.
        ("sethostname", "box"),
        ("write_file", "/proc/sys/net/ipv4/ip_forward", "1"),
        ("mount", "/proc/sys", "/proc/sys", None, "bind|rec", ""),
        ("mount", None, "/proc/sys", None, "ro|remount|bind", ""),
        ("mount", "/dev/null", "/proc/kcore", None, "bind", ""),
        ("mount", "tmpfs", "/sys/firmware", "tmpfs", "ro", ""),
        ("mount", None, "/", None, "ro|remount|bind", ""),
        # The process: rlimits, nnp, bounding set, keepcaps + ids, capset, umask, cwd.
        ("setrlimit", 7, 100, 200),
        ("set_no_new_privs",),
        *drops_except(0, 5),
        ("set_keepcaps", True),
        # The stdio (root's pipes) becomes the user's before root is given up.
        ("fchown", 0, 1000, -1),
        ("fchown", 1, 1000, -1),
        ("fchown", 2, 1000, -1),
        ("setgroups", [10]),
        ("setresgid", 1000),
        ("setresuid", 1000),
        ("set_keepcaps", False),
        ("capset", "0x20", "0x20", "0x0"),
        ("ambient_clear",),
        ("umask", "0o22"),
        ("chdir", "/work"),
        # Release A; ready; start; exec with seccomp last (nnp).
        ("write", DONE_W, b"k"),
        ("close", DONE_W),
        ("cloexec_from", 3),
        ("write", SYNC, b"ready 4242\n"),
        ("read", SYNC),
        ("reset_signals",),
        ("seccomp_load", 9, 0),
        ("execve", "/bin/sh", ["sh", "-c", "echo hi"]),
    ]


def test_seccomp_without_nnp_is_loaded_before_capabilities_are_dropped() -> None:
    spec = typical_spec()
    spec["process"]["noNewPrivileges"] = False
    system = fake()
    run_init(system, spec)
    names = system.names()
    assert "set_no_new_privs" not in names
    assert names.index("seccomp_load") < names.index("capbset_drop")
    assert names.index("setrlimit") < names.index("seccomp_load")
    assert names.count("seccomp_load") == 1


def test_the_runtime_process_hands_over_the_pid_and_exits_0() -> None:
    system = fake(forks=[4242], reads={DONE_R: b"k"})
    assert init.run(system, json.dumps(typical_spec()).encode(), SYNC, CGROUP) == 0
    after_fork = system.calls[system.names().index("fork") + 1 :]
    assert after_fork == [
        ("close", PID_R),
        ("close", DONE_W),
        ("write", PID_W, b"4242"),
        ("close", PID_W),
        ("read", DONE_R),
        ("close", DONE_R),
    ]


@pytest.mark.parametrize(
    ("status", "code"), [(127 << 8, 127), (1 << 8, 1), (9, 128 + 9)], ids=["127", "1", "sig9"]
)
def test_the_runtime_process_exits_like_a_child_that_failed(status: int, code: int) -> None:
    system = fake(forks=[4242], reads={DONE_R: b""})
    system.statuses[4242] = status
    assert init.run(system, json.dumps(typical_spec()).encode(), SYNC, CGROUP) == code
    assert system.calls[-1] == ("waitpid", 4242)
    assert not any(call[0] == "write" and call[1] == SYNC for call in system.calls)


def test_invalid_spec_writes_one_error_and_touches_nothing() -> None:
    spec = typical_spec()
    spec["linux"]["namespaces"].append({"type": "bogus"})
    system = fake()
    assert init.run(system, json.dumps(spec).encode(), SYNC, CGROUP) == 1
    assert system.calls == [
        (
            "write",
            SYNC,
            b'error INVALID_SPEC linux.namespaces[5].type: unknown namespace type "bogus"\n',
        )
    ]


def test_missing_rootfs_is_an_error_before_any_side_effect() -> None:
    system = fake()
    del system.fs["/r"]
    assert init.run(system, json.dumps(typical_spec()).encode(), SYNC, CGROUP) == 1
    assert system.calls == [
        ("write", SYNC, b"error INVALID_SPEC root.path: /r is not a directory\n")
    ]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"root": {"path": "rootfs"}},
            b'error INVALID_SPEC root.path: "rootfs" is not an absolute path\n',
        ),
        (
            {"mounts": [{"destination": "/d", "type": "bind", "source": "data"}]},
            b'error INVALID_SPEC mounts[0].source: "data" is not an absolute path\n',
        ),
    ],
)
def test_paths_relative_to_the_bundle_are_refused_in_the_guest(
    changes: dict[str, Any], message: bytes
) -> None:
    # The host resolves them and sends absolute ones: in the guest there is no bundle.
    system = fake()
    assert init.run(system, json.dumps(typical_spec(**changes)).encode(), SYNC, CGROUP) == 1
    assert system.calls == [("write", SYNC, message)]


def test_invalid_json_is_a_spec_error() -> None:
    system = fake()
    assert init.run(system, b"{nope", SYNC, None) == 1
    assert len(system.calls) == 1
    written = system.calls[0][2]
    assert isinstance(written, bytes) and written.startswith(
        b"error INVALID_SPEC config.json is not valid JSON"
    )


def test_program_not_found_is_reported_before_ready_with_127() -> None:
    spec = typical_spec()
    spec["process"]["args"] = ["nope"]
    system = fake()
    assert init.run(system, json.dumps(spec).encode(), SYNC, CGROUP) == 127
    assert system.calls[-1] == (
        "write",
        SYNC,
        b'error EXECUTABLE_NOT_FOUND exec: "nope": executable file not found in $PATH\n',
    )
    assert "cloexec_from" not in system.names()


def test_eof_instead_of_start_exits_1_without_exec() -> None:
    system = fake(reads={PID_R: b"4242", SYNC: b""})
    assert init.run(system, json.dumps(typical_spec()).encode(), SYNC, CGROUP) == 1
    assert system.calls[-2:] == [("write", SYNC, b"ready 4242\n"), ("read", SYNC)]


def _with_start_hooks(*hooks: dict[str, Any]) -> dict[str, Any]:
    spec = typical_spec()
    spec["hooks"] = {
        "startContainer": list(hooks),
        "prestart": [{"path": "/host/only"}],  # the host's: never run in the guest
    }
    spec["pysandbox.hookState"] = {
        "ociVersion": "1.0.2",
        "id": "c1",
        "bundle": "/b",
        "annotations": {"k": "v"},
    }
    return spec


def test_start_container_hooks_run_after_start_and_seccomp_before_execve() -> None:
    system = fake(pid=1)
    hooks = (
        {"path": "/bin/h1", "args": ["one", "x"], "timeout": 5},
        {"path": "/bin/h2", "env": ["FOO=1"], "timeout": 7},
    )
    execd = run_init(system, _with_start_hooks(*hooks))
    assert execd.path == "/bin/sh"
    state = (
        b'{"ociVersion":"1.0.2","id":"c1","status":"created","pid":1,'
        b'"bundle":"/b","annotations":{"k":"v"}}'
    )
    env = ["PATH=/bin", "A=b", "HOME=/home/user"]  # the process's, for a hook without env
    assert system.calls[-6:] == [
        ("read", SYNC),
        ("reset_signals",),
        ("seccomp_load", 9, 0),
        ("run_hook", "/bin/h1", ["one", "x"], env, state, 5),
        ("run_hook", "/bin/h2", ["/bin/h2"], ["FOO=1"], state, 7),
        ("execve", "/bin/sh", ["sh", "-c", "echo hi"]),
    ]


@pytest.mark.parametrize(
    ("result", "message"),
    [
        ((3 << 8, b"out\n", b"no\nway\n"), "failed: exit status 3, stdout: out, stderr: no way"),
        ((9, b"", b""), "failed: killed by signal 9"),
        ((None, b"", b""), "ran past its timeout of 5s and was killed"),
    ],
    ids=["exit", "signal", "timeout"],
)
def test_a_failing_start_container_hook_is_reported_and_nothing_runs(
    result: tuple[int | None, bytes, bytes], message: str
) -> None:
    system = fake()
    system.hook_results = [(0, b"", b""), result]
    hook = {"path": "/bin/h", "timeout": 5}
    spec = _with_start_hooks(hook, hook, hook)
    assert init.run(system, json.dumps(spec).encode(), SYNC, CGROUP) == 1
    assert system.names().count("run_hook") == 2  # the third never runs
    assert system.calls[-1] == (
        "write",
        SYNC,
        f"error HOOK_FAILED startContainer hook #1 (/bin/h) {message}\n".encode(),
    )
    assert "execve" not in system.names()


@pytest.mark.parametrize(
    ("hook", "error"),
    [
        (
            {"path": "rel", "timeout": 1},
            'hooks.startContainer[0].path: "rel" is not an absolute path',
        ),
        ({"path": "/h"}, "hooks.startContainer[0].timeout: expected seconds in 1..86400"),
        ({"path": "/h", "timeout": 1, "env": ["NOEQUALS"]}, "hooks.startContainer[0].env"),
        ({"path": "/h", "timeout": 1, "args": "sh"}, "hooks.startContainer[0].args"),
    ],
)
def test_bad_start_container_hooks_are_spec_errors_before_anything(
    hook: dict[str, Any], error: str
) -> None:
    system = fake()
    assert init.run(system, json.dumps(_with_start_hooks(hook)).encode(), SYNC, CGROUP) == 1
    assert len(system.calls) == 1
    written = system.calls[0][2]
    assert isinstance(written, bytes) and written.startswith(f"error INVALID_SPEC {error}".encode())


@pytest.mark.parametrize(
    ("program", "kind", "line"),
    [
        ("/bin/script", "file", b'error NOT_EXECUTABLE exec: "/bin/script": permission denied\n'),
        ("/bin", "dir", b'error NOT_EXECUTABLE exec: "/bin": is a directory\n'),
        (
            "/no/such",
            None,
            b'error EXECUTABLE_NOT_FOUND exec: "/no/such": '
            b"stat /no/such: no such file or directory\n",
        ),
    ],
    ids=["not-executable", "directory", "missing-path"],
)
def test_a_program_that_cannot_run_is_reported_with_its_reason(
    program: str, kind: str | None, line: bytes
) -> None:
    """The reason the agent passes to the host rides on the sync line; the exit code is the
    one a shell gives (127 not found, 126 cannot be run)."""
    spec = typical_spec()
    spec["process"]["args"] = [program]
    system = fake()
    if kind is not None:
        system.fs[program] = kind
    system.not_executable.add(program)
    code = 127 if kind is None else 126
    assert init.run(system, json.dumps(spec).encode(), SYNC, CGROUP) == code
    assert system.calls[-1] == ("write", SYNC, line)


def test_a_failing_mount_is_one_error_line() -> None:
    system = fake()
    system.fail["mount"] = errno.EPERM
    assert init.run(system, json.dumps(typical_spec()).encode(), SYNC, CGROUP) == 1
    assert system.calls[-1] == (
        "write",
        SYNC,
        b"error SETUP_FAILED preparing the rootfs: mount: Operation not permitted\n",
    )


def test_no_cgroup_v2_means_no_cgroup_calls() -> None:
    system = fake()
    system.magic.clear()
    run_init(system, typical_spec())
    assert not any(str(call[1:2]).startswith("('/sys/fs/cgroup") for call in system.calls)
    # ... and no cgroup namespace of its own: there is no cgroup of its own to root it at.
    unshared = [call[1] for call in system.calls if call[0] == "unshare"]
    assert unshared and not any(int(str(flags)) & linux.CLONE_NEWCGROUP for flags in unshared)


CGROUP_MOUNT = {
    "destination": "/sys/fs/cgroup",
    "type": "cgroup",
    "source": "cgroup",
    "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
}


BASIC_NAMESPACES = linux.CLONE_NEWNS | linux.CLONE_NEWUTS | linux.CLONE_NEWNET


def test_a_cgroup_mount_is_the_containers_own_cgroup_whatever_the_spec() -> None:
    for namespaces in (["mount", "uts", "network"], ["mount", "uts", "network", "cgroup"]):
        spec = typical_spec(mounts=[CGROUP_MOUNT])
        spec["linux"]["namespaces"] = [{"type": t} for t in namespaces]
        system = fake()
        system.fs["/r/sys/fs/cgroup"] = "dir"
        run_init(system, spec)
        unshare = ("unshare", BASIC_NAMESPACES | linux.CLONE_NEWCGROUP)
        joined = system.calls.index(("write_file", f"{CGROUP}/cgroup.procs", "0"))
        assert joined < system.calls.index(unshare)
        # Mounted in the new cgroup namespace: rooted at the container's cgroup.
        flags = "ro|nosuid|nodev|noexec|relatime"
        assert ("mount", "cgroup2", "/r/sys/fs/cgroup", "cgroup2", flags, "") in system.calls


def test_a_cgroup_namespace_given_by_path_is_joined_not_replaced() -> None:
    spec = typical_spec()
    spec["linux"]["namespaces"] = [
        {"type": "mount"},
        {"type": "uts"},
        {"type": "network"},
        {"type": "cgroup", "path": "/proc/7/ns/cgroup"},
    ]
    system = fake()
    system.fs["/proc/7/ns/cgroup"] = "file"
    run_init(system, spec)
    assert ("setns", 11, linux.CLONE_NEWCGROUP) in system.calls
    assert ("unshare", BASIC_NAMESPACES) in system.calls


def test_a_user_namespace_given_by_path_is_joined_and_its_root_become_before_mounts() -> None:
    """As runc's nsexec: the process becomes root of the joined user namespace (the guest's
    root is unmapped there: what it created on the container's file systems would fail with
    EOVERFLOW), before any mount; no maps are written, no targets pre-created."""
    spec = typical_spec()
    spec["linux"]["namespaces"] = [
        {"type": "mount"},
        {"type": "uts"},
        {"type": "network", "path": "/proc/7/ns/net"},
        {"type": "user", "path": "/proc/7/ns/user"},
    ]
    spec["linux"]["uidMappings"] = spec["linux"]["gidMappings"] = [
        {"containerID": 0, "hostID": 100000, "size": 65536}
    ]
    system = fake()
    system.fs["/proc/7/ns/net"] = system.fs["/proc/7/ns/user"] = "file"
    run_init(system, spec)
    user = system.calls.index(("setns", 11, linux.CLONE_NEWUSER))
    assert system.calls.index(("setns", 12, linux.CLONE_NEWNET)) > user
    root = system.calls.index(("setresuid", 0))
    assert user < system.calls.index(("setresgid", 0)) < root
    first_mount = next(i for i, call in enumerate(system.calls) if call[0] == "mount")
    assert root < first_mount
    assert not [c for c in system.calls if c[0] == "write_file" and "_map" in str(c[1])]


def test_a_cgroup_mount_refused_in_a_user_namespace_binds_the_own_cgroup() -> None:
    spec = userns_spec()
    spec["mounts"] = [CGROUP_MOUNT]
    system = fake(forks=[55, 0], reads={13: b"4242", SYNC: b"start\n"})
    system.fs["/r/sys/fs/cgroup"] = "dir"
    failing = sc.RecordingSyscalls.mount

    def mount(self: Any, source: Any, target: str, fstype: Any, flags: int, data: Any) -> None:
        failing(self, source, target, fstype, flags, data)
        if fstype == "cgroup2":
            raise PermissionError(1, "mount: Operation not permitted")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sc.RecordingSyscalls, "mount", mount)
        run_init(system, spec)
    assert ("mount", CGROUP, "/r/sys/fs/cgroup", None, "bind|rec", "") in system.calls


def fake_v1() -> sc.RecordingSyscalls:
    """:func:`fake` with the guest's v1 layout: hierarchies under /run/cgroup-v1."""
    system = fake()
    system.fs["/run/cgroup-v1"] = "dir"
    for name in ("cpu,cpuacct", "cpuset", "devices", "memory", "pids"):
        system.fs[f"/run/cgroup-v1/{name}"] = "dir"
        system.fs[f"/run/cgroup-v1/{name}/pysandbox"] = "dir"
    return system


def test_v1_layout_limits_in_v1_files_and_a_v1_view() -> None:
    spec = typical_spec(mounts=[CGROUP_MOUNT])
    spec["linux"]["resources"] = {
        "memory": {"limit": 67108864},
        "pids": {"limit": 10},
        "cpu": {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0"},
    }
    system = fake_v1()
    system.fs["/r/sys/fs/cgroup"] = "dir"
    with pytest.raises(sc.FakeExec):
        init.run(system, json.dumps(spec).encode(), SYNC, CGROUP, "/run/cgroup-v1")
    v1 = "/run/cgroup-v1/{}/pysandbox/c1"
    names = ("cpu,cpuacct", "cpuset", "devices", "memory", "pids")
    cpu, cpuset, devices, memory, pids = (v1.format(n) for n in names)
    unshare = next(i for i, c in enumerate(system.calls) if c[0] == "unshare")
    assert system.calls[1:unshare] == [
        ("mkdir", CGROUP, "0o755"),
        ("mkdir", cpu, "0o755"),
        ("mkdir", cpuset, "0o755"),
        ("mkdir", devices, "0o755"),
        ("mkdir", memory, "0o755"),
        ("mkdir", pids, "0o755"),
        ("write_file", f"{memory}/memory.limit_in_bytes", "67108864"),
        ("write_file", f"{pids}/pids.max", "10"),
        ("write_file", f"{cpu}/cpu.shares", "512"),
        ("write_file", f"{cpu}/cpu.cfs_period_us", "100000"),
        ("write_file", f"{cpu}/cpu.cfs_quota_us", "50000"),
        ("write_file", f"{cpuset}/cpuset.cpus", "0"),
        # runc's device rules, as runc writes them on a v1 host (deny all, then allows).
        ("write_file", f"{devices}/devices.deny", "a *:* rwm"),
        ("write_file", f"{devices}/devices.allow", "b *:* m"),
        ("write_file", f"{devices}/devices.allow", "c *:* m"),
        ("write_file", f"{devices}/devices.allow", "c 1:3 rwm"),
        ("write_file", f"{devices}/devices.allow", "c 1:5 rwm"),
        ("write_file", f"{devices}/devices.allow", "c 1:7 rwm"),
        ("write_file", f"{devices}/devices.allow", "c 1:8 rwm"),
        ("write_file", f"{devices}/devices.allow", "c 1:9 rwm"),
        ("write_file", f"{devices}/devices.allow", "c 5:0 rwm"),
        ("write_file", f"{devices}/devices.allow", "c 5:2 rwm"),
        ("write_file", f"{devices}/devices.allow", "c 10:200 rwm"),
        ("write_file", f"{devices}/devices.allow", "c 136:* rwm"),
        ("write_file", f"{CGROUP}/cgroup.procs", "0"),
        ("write_file", f"{cpu}/cgroup.procs", "0"),
        ("write_file", f"{cpuset}/cgroup.procs", "0"),
        ("write_file", f"{devices}/cgroup.procs", "0"),
        ("write_file", f"{memory}/cgroup.procs", "0"),
        ("write_file", f"{pids}/cgroup.procs", "0"),
    ]
    assert system.calls[unshare][1] & linux.CLONE_NEWCGROUP  # type: ignore[operator]
    flags = "ro|nosuid|nodev|noexec|relatime"
    tmpfs = ("mount", "tmpfs", "/r/sys/fs/cgroup", "tmpfs", flags[3:], "mode=755")
    first = system.calls.index(tmpfs)
    assert system.calls[first + 1 : first + 14] == [
        ("mkdir", "/r/sys/fs/cgroup/cpu,cpuacct", "0o555"),
        ("mount", "cgroup", "/r/sys/fs/cgroup/cpu,cpuacct", "cgroup", flags, "cpu,cpuacct"),
        ("symlink", "cpu,cpuacct", "/r/sys/fs/cgroup/cpu"),
        ("symlink", "cpu,cpuacct", "/r/sys/fs/cgroup/cpuacct"),
        ("mkdir", "/r/sys/fs/cgroup/cpuset", "0o555"),
        ("mount", "cgroup", "/r/sys/fs/cgroup/cpuset", "cgroup", flags, "cpuset"),
        ("mkdir", "/r/sys/fs/cgroup/devices", "0o555"),
        ("mount", "cgroup", "/r/sys/fs/cgroup/devices", "cgroup", flags, "devices"),
        ("mkdir", "/r/sys/fs/cgroup/memory", "0o555"),
        ("mount", "cgroup", "/r/sys/fs/cgroup/memory", "cgroup", flags, "memory"),
        ("mkdir", "/r/sys/fs/cgroup/pids", "0o555"),
        ("mount", "cgroup", "/r/sys/fs/cgroup/pids", "cgroup", flags, "pids"),
        (
            "mount",
            None,
            "/r/sys/fs/cgroup",
            None,
            "ro|nosuid|nodev|noexec|remount|bind|relatime",
            "",
        ),
    ]


def test_v1_layout_refuses_unified_and_names_a_missing_hierarchy() -> None:
    for resources, message in (
        ({"unified": {"memory.high": "1"}}, "linux.resources.unified needs cgroup v2"),
        (
            {"blockIO": {"weight": 500}},
            'cannot set blkio.weight: controller "blkio" is not mounted',
        ),
    ):
        spec = typical_spec()
        spec["linux"]["resources"] = resources
        system = fake_v1()
        code = init.run(system, json.dumps(spec).encode(), SYNC, CGROUP, "/run/cgroup-v1")
        assert code == 1
        error = [c for c in system.calls if c[0] == "write" and c[1] == SYNC][-1]
        assert message in bytes(error[2]).decode()  # type: ignore[arg-type]


def test_a_cpuset_the_vm_lacks_names_the_vms_cpus() -> None:
    spec = typical_spec()
    spec["linux"]["resources"] = {"cpu": {"cpus": "1"}}
    system = fake()
    system.texts["/sys/fs/cgroup/pysandbox/cpuset.cpus.effective"] = "0\n"
    real_write = sc.RecordingSyscalls.write_file

    def write_file(self: Any, path: str, data: str) -> None:
        real_write(self, path, data)
        if path.endswith("cpuset.cpus"):
            raise OSError(22, "Invalid argument")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sc.RecordingSyscalls, "write_file", write_file)
        assert init.run(system, json.dumps(spec).encode(), SYNC, CGROUP) == 1
    error = [c for c in system.calls if c[0] == "write" and c[1] == SYNC][-1]
    assert error[2] == (
        b'error SETUP_FAILED cgroup: cpuset.cpus "1" is not available: the VM has CPUs "0" '
        b"(cpuset.cpus must be a subset of them)\n"
    )


def test_terminal_is_a_pty_of_the_containers_devpts_with_a_console() -> None:
    """As runc: the pty comes from /dev/ptmx after pivot_root (the container's devpts, not
    the guest's), its peer becomes fds 0-2 and the controlling terminal, is bound to
    /dev/console before the root turns read-only, and the master goes with ``ready``."""
    spec = typical_spec()
    spec["process"]["terminal"] = True
    spec["root"]["readonly"] = True
    system = fake()
    run_init(system, spec)
    calls = system.calls
    names = system.names()
    pty = names.index("open_pty")
    _, master, peer = calls[pty]
    assert names.index("setsid") < names.index("pivot_root") < pty
    assert calls[pty + 1 : pty + 6] == [
        ("dup2", peer, 0),
        ("dup2", peer, 1),
        ("dup2", peer, 2),
        ("close", peer),
        ("set_controlling_tty", 0),
    ]
    console = calls.index(("mount", "/dev/pts/3", "/dev/console", None, "bind", ""))
    assert ("create_file", "/dev/console") in calls[pty:console]
    root_ro = [i for i, c in enumerate(calls) if c[0] == "mount" and c[2] == "/"][-1]
    assert pty < console < root_ro
    ready = names.index("send_fds")
    assert calls[ready : ready + 2] == [
        ("send_fds", SYNC, b"ready 4242\n", [master]),
        ("close", master),
    ]
    assert ("write", SYNC, b"ready 4242\n") not in calls


def test_a_terminal_has_the_console_size_before_anything_runs_on_it() -> None:
    """process.consoleSize (runtime-spec config.md) sizes the pty right after it is made,
    before its peer becomes the process's stdio: a quick ``stty size`` read 0 x 0 when the
    host resized it after the start."""
    spec = typical_spec()
    spec["process"]["terminal"] = True
    spec["process"]["consoleSize"] = {"height": 31, "width": 97}
    system = fake()
    run_init(system, spec)
    names = system.names()
    pty = names.index("open_pty")
    _, master, _peer = system.calls[pty]
    assert system.calls[pty + 1] == ("set_window_size", master, 31, 97)
    without = typical_spec()
    without["process"]["terminal"] = True
    system = fake()
    run_init(system, without)
    assert "set_window_size" not in system.names()


def test_without_a_terminal_no_pty_and_a_plain_ready() -> None:
    system = fake()
    run_init(system, typical_spec())
    assert "open_pty" not in system.names() and "set_controlling_tty" not in system.names()
    assert ("write", SYNC, b"ready 4242\n") in system.calls


def test_namespaces_given_by_path_are_joined_user_first_before_unsharing() -> None:
    spec = typical_spec()
    spec["linux"]["namespaces"] = [
        {"type": "mount"},
        {"type": "network", "path": "/proc/77/ns/net"},
        {"type": "pid"},
        {"type": "user", "path": "/proc/77/ns/user"},
        {"type": "uts"},
    ]
    system = fake(reads={13: b"4242", SYNC: b"start\n"})
    run_init(system, spec)
    start = system.calls.index(("write_file", f"{CGROUP}/cgroup.procs", "0"))  # cgroup joined
    joined = [c for c in system.calls[start:] if c[0] in ("open", "setns", "close", "unshare")][:7]
    assert joined == [
        ("open", "/proc/77/ns/user"),
        ("open", "/proc/77/ns/net"),
        ("setns", 11, linux.CLONE_NEWUSER),
        ("setns", 12, linux.CLONE_NEWNET),
        ("close", 11),
        ("close", 12),
        (
            "unshare",
            linux.CLONE_NEWNS | linux.CLONE_NEWPID | linux.CLONE_NEWUTS | linux.CLONE_NEWCGROUP,
        ),
    ]


def userns_spec() -> dict[str, Any]:
    spec = typical_spec()
    spec["linux"]["namespaces"].append({"type": "user"})
    spec["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    spec["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    return spec


def test_user_namespace_is_mapped_by_a_helper_outside_it() -> None:
    # pipes: go 11-12, then the fork's 13-16
    system = fake(forks=[555], pid=321, reads={13: b"4242", SYNC: b"start\n"})
    run_init(system, userns_spec(), cgroup=None)
    calls = system.calls
    begin = calls.index(("pipe",))
    assert calls[begin : begin + 10] == [
        ("pipe",),
        ("fork",),
        ("close", 11),
        ("unshare", linux.CLONE_NEWUSER),
        ("write", 12, b"g"),
        ("close", 12),
        ("waitpid", 555),
        ("setresgid", 0),
        ("setresuid", 0),
        (
            "unshare",
            linux.CLONE_NEWPID
            | linux.CLONE_NEWNS
            | linux.CLONE_NEWUTS
            | linux.CLONE_NEWIPC
            | linux.CLONE_NEWNET,
        ),
    ]
    # mknod is not allowed in a user namespace: the guest's nodes are bound instead.
    assert "mknod" not in system.names()
    assert ("mount", "/dev/null", "/r/dev/null", None, "bind", "") in calls


def test_user_namespace_mount_targets_are_made_outside_and_given_to_its_root() -> None:
    """virtiofsd creates files with the caller's fsuid and no DAC override, so the
    namespace's root could not create a target in its own 0555 ``/`` (runc's root can):
    missing targets are made before the namespace, owned by the ids its 0 maps to."""
    spec = userns_spec()
    spec["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    spec["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 200000, "size": 65536}]
    spec["mounts"] += [
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts"},  # on /dev's tmpfs
        {"destination": "/etc/resolv.conf", "type": "bind", "source": "/host/resolv"},
        {"destination": "/a/b", "type": "tmpfs", "source": "tmpfs"},
    ]
    system = fake(forks=[555], pid=321, reads={13: b"4242", SYNC: b"start\n"})
    system.fs["/host/resolv"] = "file"
    run_init(system, spec, cgroup=None)
    calls = system.calls
    before = calls[: calls.index(("unshare", linux.CLONE_NEWUSER))]
    made = [c for c in before if c[0] in ("mkdir", "chown", "create_file")]
    assert made == [
        ("mkdir", "/r/data", "0o755"),
        ("chown", "/r/data", 100000, 200000),
        ("mkdir", "/r/etc", "0o755"),
        ("chown", "/r/etc", 100000, 200000),
        ("create_file", "/r/etc/resolv.conf"),
        ("chown", "/r/etc/resolv.conf", 100000, 200000),
        ("mkdir", "/r/a", "0o755"),
        ("chown", "/r/a", 100000, 200000),
        ("mkdir", "/r/a/b", "0o755"),
        ("chown", "/r/a/b", 100000, 200000),
    ]


def test_without_a_user_namespace_targets_are_made_inside() -> None:
    system = fake()
    run_init(system, typical_spec())
    calls = system.calls
    assert not [c for c in calls if c[0] == "chown" and c[1] == "/r/data"]
    assert calls.index(("mkdir", "/r/data", "0o755")) > system.names().index("fork")


def test_the_map_helper_writes_the_maps_of_its_parent() -> None:
    system = fake(forks=[0], pid=321)
    with pytest.raises(sc.FakeExit) as info:
        init.run(system, json.dumps(userns_spec()).encode(), SYNC, None)
    assert info.value.code == 0
    assert system.calls[-5:] == [
        ("close", 12),
        ("read", 11),
        ("write_file", "/proc/321/uid_map", "0 100000 65536\n"),
        ("write_file", "/proc/321/gid_map", "0 100000 65536\n"),
        ("exit_now", 0),
    ]


def test_failed_map_helper_is_an_error() -> None:
    system = fake(forks=[555])
    system.statuses[555] = errno.EPERM << 8
    assert init.run(system, json.dumps(userns_spec()).encode(), SYNC, None) == 1
    assert system.calls[-1] == (
        "write",
        SYNC,
        b"error SETUP_FAILED user namespace: writing uid_map: Operation not permitted\n",
    )


def test_pivot_root_on_initramfs_falls_back_to_move_and_chroot() -> None:
    system = fake()
    system.fail["pivot_root"] = errno.EINVAL
    run_init(system, typical_spec())
    at = system.names().index("pivot_root")
    assert system.calls[at + 1 : at + 4] == [
        ("mount", "/r", "/", None, "move", ""),
        ("chroot", "."),
        ("chdir", "/"),
    ]


def test_bind_remount_retries_with_locked_flags() -> None:
    system = fake()
    system.flags["/r/data"] = linux.MS_NOSUID | linux.MS_NODEV
    original = system.mount
    attempts: list[str] = []

    def mount(
        source: str | None, target: str, fstype: str | None, flags: int, data: str | None
    ) -> None:
        if target == "/r/data" and flags & linux.MS_REMOUNT and not flags & linux.MS_NOSUID:
            attempts.append("refused")
            raise PermissionError(errno.EPERM, "locked")
        original(source, target, fstype, flags, data)

    system.mount = mount  # type: ignore[method-assign]
    run_init(system, typical_spec())
    assert attempts == ["refused"]
    assert ("mount", None, "/r/data", None, "ro|nosuid|nodev|remount|bind", "") in system.calls


def test_symlinked_mount_target_stays_inside_the_rootfs() -> None:
    spec = typical_spec()
    spec["mounts"][2]["destination"] = "/data/x"
    system = fake()
    system.fs["/r/data"] = "link:/etc/../../../host"
    run_init(system, spec)
    assert ("mount", "/host/data", "/r/host/x", None, "bind|rec", "") in system.calls


# -- exec -----------------------------------------------------------------------------------


def exec_fake(**kwargs: Any) -> sc.RecordingSyscalls:
    system = fake(**kwargs)
    for name in ("user", "ipc", "uts", "net", "pid", "cgroup", "mnt"):
        system.fs[f"/proc/99/ns/{name}"] = f"link:{name}:[4026532{len(name)}00]"
        system.fs[f"/proc/self/ns/{name}"] = f"link:{name}:[4026531{len(name)}00]"
    # The container shares our user namespace: setns into it would be EINVAL.
    system.fs["/proc/99/ns/user"] = system.fs["/proc/self/ns/user"]
    system.fs["/proc/99"] = "dir"
    return system


def test_exec_joins_the_container_in_order() -> None:
    process = typical_spec()["process"]
    process["seccomp"] = typical_spec()["linux"]["seccomp"]
    process["terminal"] = True
    # 6 namespaces + root: fds 11-17; then the fork's pipes 18-21.
    system = exec_fake(reads={18: b"4243", SYNC: b"start\n"})
    with pytest.raises(sc.FakeExec):
        exec_mod.run(system, json.dumps(process).encode(), 99, SYNC, CGROUP)
    calls = system.calls
    assert (
        calls[:22]
        == [
            ("write_file", "/proc/self/oom_score_adj", "100"),
            ("write_file", f"{CGROUP}/cgroup.procs", "0"),
            ("open", "/proc/99/ns/ipc"),
            ("open", "/proc/99/ns/uts"),
            ("open", "/proc/99/ns/net"),
            ("open", "/proc/99/ns/pid"),
            ("open", "/proc/99/ns/cgroup"),
            ("open", "/proc/99/ns/mnt"),
            ("open", "/proc/99/root"),
            ("setns", 11, linux.CLONE_NEWIPC),
            ("setns", 12, linux.CLONE_NEWUTS),
            ("setns", 13, linux.CLONE_NEWNET),
            ("setns", 14, linux.CLONE_NEWPID),
            ("setns", 15, linux.CLONE_NEWCGROUP),
            ("setns", 16, linux.CLONE_NEWNS),
            ("fchdir", 17),
            ("chroot", "."),
            ("chdir", "/"),
            *[("close", fd) for fd in range(11, 18)],
        ][:22]
    )
    names = system.names()
    fork = names.index("fork")
    assert names[fork + 1 : fork + 7] == [
        "close",
        "close",
        "read",
        "close",
        "setsid",
        "open_pty",  # in the container's mount namespace and root: its /dev/ptmx
    ]
    pty = names.index("open_pty")
    _, master, peer = calls[pty]
    assert calls[pty + 1 : pty + 6] == [
        ("dup2", peer, 0),
        ("dup2", peer, 1),
        ("dup2", peer, 2),
        ("close", peer),
        ("set_controlling_tty", 0),
    ]
    assert names[-9:] == [
        "write",  # release A
        "close",
        "cloexec_from",
        "send_fds",  # ready, with the pty's master
        "close",
        "read",  # start
        "reset_signals",
        "seccomp_load",
        "execve",
    ]
    assert ("send_fds", SYNC, b"ready 4243\n", [master]) in calls
    assert "mount" not in names and "pivot_root" not in names


def test_exec_into_a_vanished_container_is_an_error() -> None:
    system = exec_fake()
    del system.fs["/proc/99"]
    process = typical_spec()["process"]
    assert exec_mod.run(system, json.dumps(process).encode(), 99, SYNC, None) == 1
    assert system.calls == [
        ("write", SYNC, b"error SETUP_FAILED container process 99 does not exist\n")
    ]


def test_a_missing_working_directory_is_made_after_pivot_root_as_runc_does() -> None:
    """runc's prepareRootfs makes process.cwd (mkdir -p, 0755, as root) once inside the new
    root and before it turns read-only: ``docker run -w /new/dir`` starts there. An existing
    one is left alone (test_typical_container_in_order: no mkdir of /work)."""
    spec = typical_spec()
    spec["process"]["cwd"] = "/new/../new/dir"
    system = fake()
    run_init(system, spec)
    calls = system.calls
    made = [c for c in calls if c[0] == "mkdir" and str(c[1]).startswith("/new")]
    assert made == [("mkdir", "/new", "0o755"), ("mkdir", "/new/dir", "0o755")]
    pivot = calls.index(("pivot_root", ".", "."))
    read_only = calls.index(("mount", None, "/", None, "ro|remount|bind", ""))
    assert pivot < calls.index(made[0]) < calls.index(made[1]) < read_only
    assert calls.index(("chdir", "/new/../new/dir")) > read_only


@pytest.mark.parametrize("readonly", [False, True])
def test_a_tmpcopyup_tmpfs_is_filled_from_the_directory_it_covers(readonly: bool) -> None:
    """runc's ``tmpcopyup`` (podman's --tmpfs default): the directory is opened before the
    tmpfs hides it, its content copied in, and only then is the tmpfs made read-only."""
    spec = typical_spec()
    options = ["tmpcopyup", "nosuid", "size=1m", *(["ro"] if readonly else [])]
    spec["mounts"].append(
        {"destination": "/work", "type": "tmpfs", "source": "tmpfs", "options": options}
    )
    system = fake()
    run_init(system, spec)
    calls = system.calls
    opened = calls.index(("open", "/r/work"))
    mounted = calls.index(("mount", "tmpfs", "/r/work", "tmpfs", "nosuid", "size=1m"))
    (copied,) = [i for i, c in enumerate(calls) if c[0] == "copy_up" and c[2] == "/r/work"]
    covered_fd = calls[copied][1]
    closed = calls.index(("close", covered_fd), copied)
    assert opened < mounted < copied < closed
    remounts = [c for c in calls if c[:3] == ("mount", None, "/r/work")]
    expected = [("mount", None, "/r/work", None, "ro|nosuid|remount", "size=1m")]
    assert remounts == (expected if readonly else [])


def test_exec_after_the_zygotes_preload_compares_with_the_namespaces_read_then(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """agent.oci.exec.preload (run in the zygote) reads our namespaces and the last
    capability once; a runtime forked afterwards joins what differs from those."""
    monkeypatch.setattr(exec_mod, "_own_namespaces", None)
    monkeypatch.setattr(init, "_known_last_cap", None)
    zygote = exec_fake()
    exec_mod.preload(zygote)
    runtime = exec_fake(reads={18: b"4243", SYNC: b"start\n"})
    # What the runtime would read itself now no longer matters: the preloaded values decide.
    runtime.fs["/proc/self/ns/net"] = runtime.fs["/proc/99/ns/net"]
    runtime.texts["/proc/sys/kernel/cap_last_cap"] = "35\n"
    with pytest.raises(sc.FakeExec):
        exec_mod.run(runtime, json.dumps(typical_spec()["process"]).encode(), 99, SYNC, None)
    opened = [call[1] for call in runtime.calls if call[0] == "open"]
    assert opened[:7] == [
        f"/proc/99/ns/{n}" for n in ("ipc", "uts", "net", "pid", "cgroup", "mnt")
    ] + ["/proc/99/root"]
    assert init.last_cap(runtime) == 40


def test_exec_without_preload_reads_its_own_namespaces() -> None:
    system = exec_fake(reads={18: b"4243", SYNC: b"start\n"})
    system.fs["/proc/self/ns/net"] = system.fs["/proc/99/ns/net"]  # shared: not joined
    with pytest.raises(sc.FakeExec):
        exec_mod.run(system, json.dumps(typical_spec()["process"]).encode(), 99, SYNC, None)
    opened = [call[1] for call in system.calls if call[0] == "open"]
    assert "/proc/99/ns/net" not in opened and "/proc/99/ns/uts" in opened
