"""Host cgroups, as a user reads them: the pid a client got (``--pid-file``, ``podman
inspect``, ``ctr tasks ls``) and the pod's QEMU sit in the cgroup named by the container's
``linux.cgroupsPath``, whose limits hold the whole VM (docs/cgroups.md "Host cgroups").

runc is run on the same requests side by side: it puts its container in the same cgroup
path with exactly the requested limit; pysandbox's cgroup has that limit plus the VM's
overhead (``host_cgroup.MEMORY_OVERHEAD``, ``CPU_OVERHEAD_MILLI``). Every cgroup a pod made
is gone after its removal, runc's too.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from sandbox.pod import host_cgroup
from tests.integration import containerd_env
from tests.integration.containerd_env import HANDLER, IMAGE, Containerd
from tests.integration.pods import PodFactory
from tests.integration.test_cri import (  # noqa: F401 (cri: a fixture)
    Cri,
    _container_config,
    _pod_config,
    cri,
)
from tests.integration.test_podman import IMAGE as PODMAN_IMAGE
from tests.integration.test_podman import pm, podman  # noqa: F401 (a fixture)
from tests.processes import processes_mentioning, wait_until

MIB = 2**20
LIMIT = 64 * MIB
_ids = itertools.count()


@pytest.fixture(scope="module")
def containerd(request: pytest.FixtureRequest, module_pods: PodFactory) -> Iterator[Containerd]:
    with containerd_env.running(lambda: request.session.testsfailed > 0) as daemon:
        module_pods.watch(daemon.runtime_root)
        yield daemon


def _cid(name: str) -> str:
    return f"{name}-{next(_ids)}-{int(time.time())}"


def cgroups_of(pid: int) -> dict[str, str]:
    """controller -> the pid's cgroup path, from /proc/PID/cgroup (v2: key "")."""
    found = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            found[controller] = path
    return found


def _mount(controller: str) -> Path:
    layout = host_cgroup.host_layout()
    for h in layout.hierarchies:
        if layout.version == "v2" or controller in h.controllers:
            return h.mount
    raise AssertionError(f"no {controller} hierarchy")


def cgroup_dir(pid: int, controller: str) -> Path:
    """The directory of the pid's cgroup of ``controller``, as a user finds it."""
    layout = host_cgroup.host_layout()
    path = cgroups_of(pid)["" if layout.version == "v2" else controller]
    return _mount(controller) / path.lstrip("/")


def memory_limit(pid: int) -> int:
    """What a user reads as the memory limit of the pid's cgroup (v1 limit_in_bytes / v2
    memory.max; "max" as -1)."""
    d = cgroup_dir(pid, "memory")
    name = "memory.limit_in_bytes" if (d / "memory.limit_in_bytes").exists() else "memory.max"
    text = (d / name).read_text().strip()
    return -1 if text == "max" or int(text) >= 2**62 else int(text)


def cpu_quota(pid: int) -> tuple[int, int]:
    d = cgroup_dir(pid, "cpu")
    if (d / "cpu.cfs_quota_us").exists():
        return int((d / "cpu.cfs_quota_us").read_text()), int((d / "cpu.cfs_period_us").read_text())
    quota, period = (d / "cpu.max").read_text().split()
    return (-1 if quota == "max" else int(quota)), int(period)


def _task_pid(daemon: Containerd, cid: str) -> int:
    for line in daemon.ctr("tasks", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return int(fields[1])
    raise AssertionError(f"no task {cid}")


def _pod_processes(runtime_root: Path, cid: str) -> dict[str, int]:
    """pid of each host process of the pod of ``cid`` (from its pod.json)."""
    for pod_json in runtime_root.glob("*/p/*/pod.json"):
        data = json.loads(pod_json.read_text())
        if cid in data.get("containers", []):
            return {name: ref["pid"] for name, ref in data["processes"].items()}
    raise AssertionError(f"no pod of {cid} under {runtime_root}")


def _ctr_run(daemon: Containerd, runtime: list[str], cid: str, *flags: str) -> None:
    done = daemon.ctr("run", "-d", *flags, *runtime, IMAGE, cid, "sleep", "1000")
    assert done.returncode == 0, done.stderr


def _ctr_remove(daemon: Containerd, cid: str) -> None:
    daemon.ctr("tasks", "delete", "--force", cid)
    daemon.ctr("containers", "delete", cid)


def _runc(daemon: Containerd) -> list[str]:
    return ["--runtime", "io.containerd.runc.v2", "--runc-root", str(daemon.base / "runc")]


def test_ctr_memory_limit_and_cpu_quota_hold_the_vm(containerd: Containerd) -> None:
    """``ctr run --memory-limit 67108864 --cpu-quota 50000``: runc gives the pid-file pid a
    host cgroup of exactly that; pysandbox gives the pid-file pid, QEMU, virtiofsd and the
    proxy the same cgroup path with the limit plus the VM's overhead. Both leave none."""
    flags = ["--memory-limit", str(LIMIT), "--cpu-quota", "50000", "--cpu-period", "100000"]
    runc_cid, cid = _cid("runc-mem"), _cid("mem")
    _ctr_run(containerd, _runc(containerd), runc_cid, *flags)
    try:
        runc_pid = _task_pid(containerd, runc_cid)
        assert cgroups_of(runc_pid)["memory"] == f"/{containerd.namespace}/{runc_cid}"
        assert memory_limit(runc_pid) == LIMIT
        assert cpu_quota(runc_pid) == (50000, 100000)
        runc_dir = cgroup_dir(runc_pid, "memory")
    finally:
        _ctr_remove(containerd, runc_cid)
    assert wait_until(lambda: not runc_dir.exists(), 10), f"runc left {runc_dir}"

    _ctr_run(containerd, containerd.runtime_flags(), cid, *flags)
    try:
        pid = _task_pid(containerd, cid)  # the --pid-file pid: our shim
        expected = f"/{containerd.namespace}/{cid}"
        assert cgroups_of(pid)["memory"] == expected
        assert memory_limit(pid) == LIMIT + host_cgroup.MEMORY_OVERHEAD
        overhead_quota = host_cgroup.CPU_OVERHEAD_MILLI * 100
        assert cpu_quota(pid) == (50000 + overhead_quota, 100000)
        processes = _pod_processes(containerd.runtime_root, cid)
        assert set(processes) == {"qemu", "virtiofsd", "proxy"}
        for name, host_pid in processes.items():
            assert cgroups_of(host_pid) == cgroups_of(pid), name
        # Every thread of QEMU too (a thread can be moved alone on v1).
        for task in Path(f"/proc/{processes['qemu']}/task").iterdir():
            assert Path(task / "cgroup").read_text() == Path(f"/proc/{pid}/cgroup").read_text()
        # Nothing but the pod's processes is in it.
        inside = {int(p) for p in (cgroup_dir(pid, "memory") / "cgroup.procs").read_text().split()}
        assert set(processes.values()) | {pid} <= inside
        for other in inside - set(processes.values()) - {pid}:  # shims, virtiofsd's child
            cmdline = Path(f"/proc/{other}/cmdline").read_bytes()
            assert b"sandbox." in cmdline or str(containerd.runtime_root).encode() in cmdline
        # A detached exec's shim (what ``ctr tasks ps`` lists for it) starts there too.
        done = containerd.ctr("tasks", "exec", "-d", "--exec-id", "e1", cid, "sleep", "100")
        assert done.returncode == 0, done.stderr
        listed = containerd.ctr("tasks", "ps", cid).stdout.split()[1:]
        host_pids = [int(word) for word in listed if word.isdigit()]
        assert len(host_pids) >= 2, listed
        for host_pid in host_pids:
            assert cgroups_of(host_pid) == cgroups_of(pid), host_pid
        dirs = [cgroup_dir(pid, c) for c in ("memory", "cpu", "pids")]
    finally:
        _ctr_remove(containerd, cid)
    assert wait_until(lambda: not any(d.exists() for d in dirs), 15), dirs
    assert not processes_mentioning(str(containerd.runtime_root / containerd.namespace / "p"))


def test_systemd_form_without_systemd_uses_the_same_path(containerd: Containerd) -> None:
    """``--runc-systemd-cgroup --cgroup slice:prefix:name`` (containerd's SystemdCgroup):
    this host runs no systemd, so the scope's path is made on cgroupfs directly."""
    cid = _cid("sd")
    _ctr_run(
        containerd,
        containerd.runtime_flags(),
        cid,
        "--runc-systemd-cgroup",
        "--cgroup",
        f"pysandbox-test.slice:pst:{cid}",
        "--memory-limit",
        str(LIMIT),
    )
    try:
        pid = _task_pid(containerd, cid)
        # systemd nests slices by their dashes: pysandbox-test.slice is in pysandbox.slice.
        scope = f"/pysandbox.slice/pysandbox-test.slice/pst-{cid}.scope"
        assert cgroups_of(pid)["memory"] == scope
        assert memory_limit(pid) == LIMIT + host_cgroup.MEMORY_OVERHEAD
        leaf = cgroup_dir(pid, "memory")
    finally:
        _ctr_remove(containerd, cid)
    assert wait_until(lambda: not leaf.exists(), 15)
    assert not leaf.parent.exists()  # the slice directories were made for this pod: gone too
    assert not leaf.parent.parent.exists()


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--runc-systemd-cgroup", "--cgroup", "/not/systemd"], "slice:prefix:name"),
        (["--runc-systemd-cgroup", "--cgroup", "bad--x.slice:p:n"], 'invalid slice name "bad--x'),
        (["--cgroup", "/pysandbox-test/cgroup.procs/x"], "cannot create cgroup"),
    ],
)
def test_bad_cgroup_paths_are_refused_before_a_vm(
    containerd: Containerd, flags: list[str], says: str
) -> None:
    cid = _cid("badcg")
    before = sorted(Path("/sys/fs/cgroup").glob("*/pysandbox-test*"))
    started = time.monotonic()
    done = containerd.ctr("run", "--rm", *flags, *containerd.runtime_flags(), IMAGE, cid, "true")
    took = time.monotonic() - started
    try:
        assert done.returncode != 0
        assert says in done.stderr, done.stderr
        assert took < 15, f"{took:.1f}s: a VM was booted?"
        root = containerd.runtime_root / containerd.namespace
        assert list((root / "p").glob("*")) == []
        assert not processes_mentioning(str(root))
        assert sorted(Path("/sys/fs/cgroup").glob("*/pysandbox-test*")) == before
    finally:
        _ctr_remove(containerd, cid)


def test_guest_using_all_its_memory_stays_within_the_host_limit(containerd: Containerd) -> None:
    """A container that allocates without end is OOM-killed in the guest (137); the host
    cgroup never went above its limit, the host never OOM-killed the VM, the pod lives on."""
    cid = _cid("hog")
    _ctr_run(containerd, containerd.runtime_flags(), cid, "--memory-limit", str(LIMIT))
    try:
        pid = _task_pid(containerd, cid)
        d = cgroup_dir(pid, "memory")
        limit = LIMIT + host_cgroup.MEMORY_OVERHEAD
        assert memory_limit(pid) == limit
        peak_file = d / "memory.max_usage_in_bytes"
        if peak_file.exists():
            # The boot's moment of all guest RAM came before the limit (docs/cgroups.md).
            peak_file.write_text("0")
        for n in range(3):
            done = containerd.ctr(
                "tasks", "exec", "--exec-id", f"hog{n}", cid, "awk", 'BEGIN{s="x"; while(1) s=s s}'
            )
            assert done.returncode == 137, (done.returncode, done.stderr)
        peak = int((peak_file if peak_file.exists() else d / "memory.peak").read_text())
        assert peak <= limit
        oom = d / "memory.oom_control"
        events = oom.read_text() if oom.exists() else (d / "memory.events").read_text()
        assert "oom_kill 0" in events, events
        alive = containerd.ctr("tasks", "exec", "--exec-id", "after", cid, "echo", "alive")
        assert (alive.returncode, alive.stdout) == (0, "alive\n"), alive.stderr
        print(f"\nhost peak {peak / MIB:.0f} MiB of {limit / MIB:.0f} MiB")
    finally:
        _ctr_remove(containerd, cid)


def leaf_gone(leaf: Path) -> Callable[[], bool]:
    return lambda: not leaf.exists()


def test_podman_memory_like_runc(podman: list[str]) -> None:  # noqa: F811 (the fixture)
    """podman --memory 64m: runc's conmon pid-file pid has 64 MiB; ours (same cgroup path
    shape, libpod_parent/libpod-ID) has 64 MiB plus the VM's overhead; ``podman update``
    moves both; rm leaves none."""
    runc = [*podman[:-2], "--runtime", "runc"]
    # runc cannot set podman's default RLIMIT_NPROC/NOFILE here (no CAP_SYS_RESOURCE).
    flags = ["--memory", "64m", "--ulimit", "nproc=1000:1000", "--ulimit", "nofile=1024:1024"]
    seen: dict[str, tuple[str, int, Path]] = {}
    after_update: dict[str, int] = {}
    for kind, cmd in (("runc", runc), ("pysandbox", podman)):
        name = f"hcg-{kind}"
        done = pm(cmd, "run", "-d", "--name", name, *flags, PODMAN_IMAGE, "sleep", "1000")
        assert done.returncode == 0, done.stderr
        try:
            cid = done.stdout.strip()
            pid = int(pm(cmd, "inspect", "-f", "{{.State.Pid}}", name).stdout)
            path = cgroups_of(pid)["memory"]
            assert path.endswith(f"/libpod-{cid}"), path
            seen[kind] = (path, memory_limit(pid), cgroup_dir(pid, "memory"))
            updated = pm(cmd, "update", "--memory", "96m", name)
            assert updated.returncode == 0, updated.stderr
            after_update[kind] = memory_limit(pid)
        finally:
            removed = pm(cmd, "rm", "-f", "-t", "0", name)
        assert removed.returncode == 0, removed.stderr
        leaf = seen[kind][2]
        assert wait_until(leaf_gone(leaf), 15), leaf
    assert seen["runc"][0].rsplit("/", 1)[0] == seen["pysandbox"][0].rsplit("/", 1)[0]
    assert seen["runc"][1] == LIMIT
    assert seen["pysandbox"][1] == LIMIT + host_cgroup.MEMORY_OVERHEAD
    # podman update follows: runc's cgroup gets 96 MiB, the VM's 96 MiB + the overhead.
    assert after_update == {"runc": 96 * MIB, "pysandbox": 96 * MIB + host_cgroup.MEMORY_OVERHEAD}


def test_cri_pod_lands_under_its_cgroup_parent(cri: Cri) -> None:  # noqa: F811
    """A CRI pod with a cgroup parent (kubelet's /kubepods/...pod<uid>): the VM lands in
    ``<parent>/<sandbox id>``, as runc puts the pause container; the limit appears when
    the app container asks for one (the pause container counts for nothing); removal takes
    every cgroup the pod made."""
    pb, rt = cri.pb, cri.runtime
    config = _pod_config(cri, "hostcg")
    parent = config.linux.cgroup_parent
    pod_id = rt.RunPodSandbox(
        pb.RunPodSandboxRequest(config=config, runtime_handler=HANDLER), timeout=180
    ).pod_sandbox_id
    removed = False
    try:
        processes = _pod_processes(cri.daemon.runtime_root, pod_id)
        qemu = processes["qemu"]
        assert cgroups_of(qemu)["memory"] == f"{parent}/{pod_id}"
        assert cgroups_of(qemu)["cpu"] == f"{parent}/{pod_id}"
        assert memory_limit(qemu) == -1  # only the pause container: no limit yet
        container = _container_config(cri, "limited", "exec sleep 1000")
        container.linux.resources.CopyFrom(
            pb.LinuxContainerResources(
                memory_limit_in_bytes=LIMIT, cpu_quota=50000, cpu_period=100000
            )
        )
        cid = rt.CreateContainer(
            pb.CreateContainerRequest(
                pod_sandbox_id=pod_id, config=container, sandbox_config=config
            ),
            timeout=120,
        ).container_id
        rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)
        assert memory_limit(qemu) == LIMIT + host_cgroup.MEMORY_OVERHEAD
        assert cpu_quota(qemu) == (50000 + host_cgroup.CPU_OVERHEAD_MILLI * 100, 100000)
        for name, pid in processes.items():
            assert cgroups_of(pid) == cgroups_of(qemu), name
        leaf = cgroup_dir(qemu, "memory")
        rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
        removed = True
    finally:
        if not removed:
            with contextlib.suppress(grpc.RpcError):
                rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
                rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
    assert wait_until(leaf_gone(leaf), 15), leaf
    assert not leaf.parent.exists()  # pod<uid>: made for this pod (kubelet would own it)


def test_a_create_failing_after_the_boot_leaves_no_cgroup(containerd: Containerd) -> None:
    """The VM booted in its cgroup, then the container's command is missing: create fails,
    and the rollback takes the cgroup with the VM (in every hierarchy)."""
    cid = _cid("nocmd")
    done = containerd.ctr(
        "run",
        "--rm",
        "--memory-limit",
        str(LIMIT),
        *containerd.runtime_flags(),
        IMAGE,
        cid,
        "/nonexistent",
    )
    assert done.returncode != 0
    assert "/nonexistent" in done.stderr, done.stderr
    left = [
        h.mount / containerd.namespace / cid
        for h in host_cgroup.host_layout().hierarchies
        if (h.mount / containerd.namespace / cid).exists()
    ]
    assert left == []
    assert not processes_mentioning(str(containerd.runtime_root / containerd.namespace / "p"))
