"""sandbox/pod/host_cgroup.py on fake cgroup trees (v1 as on these hosts, and v2): runc's
reading of cgroupsPath, the limits that cover a VM, making and removing what a pod made, and
the one-line refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox.errors import ConfigError
from sandbox.pod import host_cgroup as hc

MIB = 2**20

# This host's mountinfo and /proc/self/cgroup (cgroup v1, hybrid), trimmed.
V1_MOUNTINFO = """\
25 30 0:22 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
26 25 0:23 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
27 25 0:24 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
28 25 0:25 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
29 25 0:26 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
30 25 0:27 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
31 25 0:28 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V1_SELF = """\
9:name=systemd:/
8:pids:/
4:memory:/process_api/abc
2:cpuacct:/
1:cpu:/
0::/
"""
V2_MOUNTINFO = "30 1 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
V2_SELF = "0::/user.slice/user-0.slice/session-1.scope\n"


def v1_layout(base: Path | None = None) -> hc.Layout:
    layout = hc.parse_layout(V1_MOUNTINFO, V1_SELF)
    if base is None:
        return layout
    return hc.Layout(
        "v1",
        tuple(hc.Hierarchy(base / h.mount.name, h.controllers, h.own) for h in layout.hierarchies),
    )


def test_v1_layout_of_this_kind_of_host() -> None:
    layout = v1_layout()
    assert layout.version == "v1"
    by_controller = {h.controllers: (str(h.mount), h.own) for h in layout.hierarchies}
    assert by_controller == {
        ("name=systemd",): ("/sys/fs/cgroup/systemd", "/"),
        ("pids",): ("/sys/fs/cgroup/pids", "/"),
        ("memory",): ("/sys/fs/cgroup/memory", "/process_api/abc"),
        ("cpuacct",): ("/sys/fs/cgroup/cpuacct", "/"),
        ("cpu",): ("/sys/fs/cgroup/cpu", "/"),
    }
    assert layout.missing() == []


def test_v2_layout_and_missing_controllers() -> None:
    layout = hc.parse_layout(V2_MOUNTINFO, V2_SELF, lambda _mount: ["cpuset", "cpu", "pids"])
    assert layout.version == "v2"
    assert layout.hierarchies[0].own == "/user.slice/user-0.slice/session-1.scope"
    assert layout.missing() == ["memory"]
    with pytest.raises(ConfigError) as caught:
        hc.plan(hc.request("/kubepods/x", False, "x"), layout)
    message = str(caught.value)
    assert "\n" not in message
    assert "memory controller is not available" in message
    assert "cgroup.subtree_control" in message
    ok, line = hc.report(layout)
    assert not ok and "missing memory" in line


def test_cgroupfs_paths_as_runc_reads_them() -> None:
    layout = v1_layout()
    absolute = hc.request("/kubepods/burstable/pod1/abc", False, "abc")
    dirs = {str(d) for d in hc.directories(absolute, layout)}
    assert "/sys/fs/cgroup/memory/kubepods/burstable/pod1/abc" in dirs
    assert "/sys/fs/cgroup/cpu/kubepods/burstable/pod1/abc" in dirs
    # Relative: below this process's own cgroup in each hierarchy.
    relative = hc.request("libpod_parent/x", False, "x")
    dirs = {str(d) for d in hc.directories(relative, layout)}
    assert "/sys/fs/cgroup/memory/process_api/abc/libpod_parent/x" in dirs
    assert "/sys/fs/cgroup/cpu/libpod_parent/x" in dirs
    # None: the container id, relative (runc's default).
    assert hc.request(None, False, "cid") == hc.Request("cid", relative=True)
    # ".." never climbs above the root (runc's CleanPath).
    assert hc.request("/a/../../b", False, "x").path == "/b"
    assert hc.request("../../b", False, "x").path == "b"
    # cgroup v2: relative to the parent of the own cgroup (the own one holds processes).
    v2 = hc.parse_layout(V2_MOUNTINFO, V2_SELF, lambda _m: ["cpu", "memory"])
    assert [str(d) for d in hc.directories(relative, v2)] == [
        "/sys/fs/cgroup/user.slice/user-0.slice/libpod_parent/x"
    ]


def test_systemd_form() -> None:
    req = hc.request("kubepods-burstable-pod1.slice:cri-containerd:abc", True, "abc")
    assert req.path == (
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/"
        "cri-containerd-abc.scope"
    )
    assert (req.slice, req.unit, req.relative) == (
        "kubepods-burstable-pod1.slice",
        "cri-containerd-abc.scope",
        False,
    )
    assert hc.request(":libpod:x", True, "x").path == "/system.slice/libpod-x.scope"
    assert hc.request("", True, "x").path == "/system.slice/pysandbox-x.scope"
    assert hc.request("-.slice:p:x", True, "x").path == "/p-x.scope"
    argv = hc.scope_argv(req, 42)
    assert argv[:6] == [
        "busctl",
        "call",
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        "StartTransientUnit",
    ]
    assert argv[7:9] == ["cri-containerd-abc.scope", "fail"]
    assert argv[argv.index("PIDs") : argv.index("PIDs") + 4] == ["PIDs", "au", "1", "42"]


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("/kubepods/pod1/abc", "is not of the form slice:prefix:name"),
        ("a:b", "is not of the form slice:prefix:name"),
        ("kubepods:cri:abc", 'invalid slice name "kubepods"'),
        ("a--b.slice:cri:abc", 'invalid slice name "a--b.slice"'),
        ("-a.slice:cri:abc", 'invalid slice name "-a.slice"'),
        ("system.slice:cri:", "invalid unit name"),
        ("system.slice:cri:a/b", "invalid unit name"),
    ],
)
def test_invalid_systemd_form_is_one_line(path: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        hc.request(path, True, "abc")
    message = str(caught.value)
    assert says in message and "\n" not in message
    assert "--systemd-cgroup" in message  # what to do about it


def test_root_cgroup_is_refused() -> None:
    with pytest.raises(ConfigError, match="names the root cgroup"):
        hc.request("/", False, "x")


def test_limits_cover_the_vm() -> None:
    one = hc.container_limits({"memory": {"limit": 64 * MIB}, "cpu": {"quota": 50000}})
    assert one == {"memory": 64 * MIB, "cpu_milli": 500}
    two = hc.container_limits(
        {"memory": {"limit": 32 * MIB}, "cpu": {"quota": 25000, "period": 50000}}
    )
    assert two == {"memory": 32 * MIB, "cpu_milli": 500}
    limits = hc.pod_limits({"a": one, "b": two})
    assert limits == hc.Limits(96 * MIB + hc.MEMORY_OVERHEAD, 1000 + hc.CPU_OVERHEAD_MILLI)
    # One container without a limit: the pod has none (as a Kubernetes pod).
    free = hc.container_limits({})
    assert hc.pod_limits({"a": one, "b": free}) == hc.Limits(None, None)
    assert hc.pod_limits({}) == hc.Limits(None, None)
    assert hc.container_limits({"memory": {"limit": -1}, "cpu": {"quota": -1}}) == free
    assert hc.limit_files("v1", hc.Limits(100, 750)) == [
        ("memory.limit_in_bytes", "100"),
        ("cpu.cfs_period_us", "100000"),
        ("cpu.cfs_quota_us", "75000"),
    ]
    assert hc.limit_files("v2", hc.Limits(None, None)) == [
        ("memory.max", "max"),
        ("cpu.max", "max 100000"),
    ]


def test_v1_make_limit_remove_on_a_fake_tree(tmp_path: Path) -> None:
    for name in ("cpu", "cpuacct", "memory", "pids", "systemd"):
        (tmp_path / name / "process_api" / "abc").mkdir(parents=True)
    layout = v1_layout(tmp_path)
    req = hc.request("/kubepods/pod1/abc", False, "abc")
    (tmp_path / "memory" / "kubepods").mkdir()  # exists already: never removed by the pod
    placement = hc.plan(req, layout)
    hc.make(placement, req, systemd_running=False)
    memory = tmp_path / "memory" / "kubepods" / "pod1" / "abc"
    assert memory.is_dir() and str(memory) in placement.dirs
    assert str(tmp_path / "memory" / "kubepods") not in placement.created
    assert str(tmp_path / "cpu" / "kubepods") in placement.created
    # The kernel's files (a fake tree has none until written).
    (memory / "memory.limit_in_bytes").write_text("-1")
    cpu = tmp_path / "cpu" / "kubepods" / "pod1" / "abc"
    (cpu / "cpu.cfs_quota_us").write_text("-1")
    (cpu / "cpu.cfs_period_us").write_text("100000")
    placement.containers["abc"] = {"memory": 64 * MIB, "cpu_milli": 500}
    hc.apply(placement, hc.pod_limits(placement.containers))
    assert (memory / "memory.limit_in_bytes").read_text() == str(64 * MIB + hc.MEMORY_OVERHEAD)
    assert (cpu / "cpu.cfs_quota_us").read_text() == "75000"
    assert not (tmp_path / "pids" / "kubepods" / "pod1" / "abc" / "memory.limit_in_bytes").exists()
    for leaf in (memory, cpu):
        for f in leaf.iterdir():
            f.unlink()  # the kernel's files go with the directory
    restored = hc.Placement.from_json(placement.to_json())
    assert restored is not None
    hc.remove(restored, wait=0)
    assert not memory.exists()
    assert not (tmp_path / "cpu" / "kubepods").exists()  # made by the pod: removed
    assert (tmp_path / "memory" / "kubepods").is_dir()  # not made by it: kept
    hc.remove(restored, wait=0)  # idempotent


def test_v2_make_enables_controllers_along_the_path(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    layout = hc.parse_layout(
        V2_MOUNTINFO.replace("/sys/fs/cgroup", str(tmp_path)), "0::/\n", hc._read_v2_controllers
    )
    req = hc.request("/kubepods/abc", False, "abc")
    placement = hc.plan(req, layout)
    hc.make(placement, req, systemd_running=False)
    assert placement.dirs == [str(tmp_path / "kubepods" / "abc")]
    assert placement.created == [str(tmp_path / "kubepods"), str(tmp_path / "kubepods" / "abc")]
    # The root's subtree_control got every wanted controller (a plain file keeps the last).
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+pids"
    leaf = tmp_path / "kubepods" / "abc"
    (leaf / "memory.max").write_text("max")
    (leaf / "cpu.max").write_text("max 100000")
    hc.apply(placement, hc.Limits(64 * MIB, 500))
    assert (leaf / "memory.max").read_text() == str(64 * MIB)
    assert (leaf / "cpu.max").read_text() == "50000 100000"
    (leaf / "memory.max").unlink()
    (leaf / "cpu.max").unlink()
    hc.remove(placement, wait=0)
    assert not (tmp_path / "kubepods").exists()


def test_a_path_that_cannot_be_made_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    for name in ("cpu", "cpuacct", "memory", "pids", "systemd"):
        (tmp_path / name).mkdir()
    (tmp_path / "memory" / "taken").write_text("a file where a cgroup should go")
    layout = hc.Layout(
        "v1", tuple(hc.Hierarchy(tmp_path / n, (n,), "/") for n in ("cpu", "memory"))
    )
    req = hc.request("/taken/abc", False, "abc")
    placement = hc.plan(req, layout)
    with pytest.raises(ConfigError) as caught:
        hc.make(placement, req, systemd_running=False)
    message = str(caught.value)
    assert "\n" not in message
    assert f"cannot create cgroup {tmp_path / 'memory' / 'taken' / 'abc'}" in message
    assert "cgroupsPath" in message
    assert not (tmp_path / "cpu" / "taken").exists()  # made before the failure: removed
    assert placement.created == []


def test_record_round_trip_and_malformed() -> None:
    placement = hc.Placement(["/a"], "v2", ["/a"], "", {"c": {"memory": 1, "cpu_milli": None}})
    assert hc.Placement.from_json(placement.to_json()) == placement
    assert hc.Placement.from_json({"dirs": "x", "version": "v1"}) is None
    assert hc.Placement.from_json(None) is None


def test_check_line_on_a_complete_host() -> None:
    ok, line = hc.report(v1_layout())
    assert ok
    assert line.startswith("cgroup v1: memory, cpu available")


def test_pids_of_a_cgroup_removed_meanwhile_are_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two removers of one pod (a run's teardown and `delete --force`): the other one's rmdir
    # may come between finding a directory and listing it (seen in a CI dry run).
    leaf = tmp_path / "pod"
    (leaf / "sub").mkdir(parents=True)
    (leaf / "cgroup.procs").write_text("11\n12\n")
    (leaf / "sub" / "cgroup.procs").write_text("13\n")
    placement = hc.Placement([str(leaf), str(tmp_path / "gone")], "v2", [], "", {})
    assert hc.pids(placement) == {11, 12, 13}
    (leaf / "sub" / "cgroup.procs").unlink()
    (leaf / "sub").rmdir()
    (leaf / "cgroup.procs").unlink()
    leaf.rmdir()
    assert hc.pids(placement) == set()
    monkeypatch.setattr(Path, "is_dir", lambda _self: True)  # it was there when looked at
    assert hc.pids(placement) == set()
    hc.remove(placement, wait=0)  # nothing left to wait for, nothing to remove: no error
