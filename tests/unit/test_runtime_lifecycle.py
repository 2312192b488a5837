"""Container create, start and delete (sandbox/runtime/) against fake drivers.

The container verbs drive the pod layer, which starts its processes through the fake of
tests/unit/fake_drivers.py; the container's shim is a sleep process standing in for it.
Checked: what each verb asks of the agent and the host, in order, and that a create that
fails leaves no record, process, mount or pod behind (or, for a container joining a pod,
leaves the pod as it was).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hypervisor.errors import LaunchError
from sandbox.errors import AgentError, ConfigError, NotFoundError, StateError
from sandbox.pod.lifecycle import Pod
from sandbox.pod.record import PodStatus
from sandbox.runtime.create import create
from sandbox.runtime.delete import delete
from sandbox.runtime.record import ContainerRecord
from sandbox.runtime.start import start
from tests.unit.fake_drivers import Event, FakeDrivers

SANDBOX = {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "pod"}
MEMBER = {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "pod"}


ALL_NAMESPACES = ("pid", "network", "ipc", "uts", "mount")


def bundle(
    tmp_path: Path,
    name: str,
    annotations: dict[str, str] | None = None,
    namespaces: tuple[str, ...] = ALL_NAMESPACES,
    volume_options: tuple[str, ...] = ("rbind",),
) -> Path:
    directory = tmp_path / "bundles" / name
    (directory / "rootfs").mkdir(parents=True)
    (directory / "volume").mkdir()
    spec = {
        "ociVersion": "1.0.2",
        "process": {"args": ["sleep", "1000"], "cwd": "/"},
        "root": {"path": "rootfs"},
        "linux": {"namespaces": [{"type": kind} for kind in namespaces]},  # mount: required
        "mounts": [
            {
                "destination": "/data",
                "type": "bind",
                "source": "volume",
                "options": list(volume_options),
            }
        ],
        "annotations": annotations or {},
    }
    (directory / "config.json").write_text(json.dumps(spec))
    return directory


def volume_in_share(shared: Path, source: Path, readonly: bool = False) -> Path:
    """Where a volume is mounted in the pod share: once per pod, keyed by its inode."""
    info = source.stat()
    return shared / "_volumes" / f"{info.st_dev:x}-{info.st_ino:x}-{'ro' if readonly else 'rw'}"


def since(fake: FakeDrivers, start: int, *kinds: str) -> list[Event]:
    return [e for e in fake.events[start:] if not kinds or e[0] in kinds]


def assert_gone(root: Path, container_id: str) -> None:
    assert not (root / container_id).exists()
    with pytest.raises(NotFoundError):
        ContainerRecord.load(root, container_id)


def test_create_start_delete(fake: FakeDrivers, root: Path, tmp_path: Path) -> None:
    record = create(root, "c1", bundle(tmp_path, "c1"))
    pod = Pod.load(root, "c1")
    shared = pod.shared_dir
    volume = volume_in_share(shared, tmp_path / "bundles" / "c1" / "volume")
    assert since(fake, 0, "mount", "agent", "shim") == [
        ("mount", str(shared)),
        ("agent", "Health"),
        ("agent", "MountShare"),
        ("mount", str(shared / "c1" / "rootfs")),  # the container's files into the share
        ("mount", str(volume)),  # its volume, once per pod
        ("agent", "CreateContainer"),  # after its files are there
        ("shim", "spawn", "c1"),
    ]
    assert record.oci_state()["status"] == "created"
    assert pod.record.containers == ["c1"] and pod.status is PodStatus.RUNNING

    created = len(fake.events)
    start(root, "c1")
    assert since(fake, created) == [("agent", "StartContainer")]
    assert ContainerRecord.load(root, "c1").oci_state()["status"] == "running"
    with pytest.raises(StateError, match="cannot delete container c1: it is running"):
        delete(root, "c1")

    fake.shims["c1"].kill()  # the container exited
    assert ContainerRecord.load(root, "c1").oci_state()["status"] == "stopped"
    stopped = len(fake.events)
    delete(root, "c1")
    # The pod's own container takes the VM with it: no RemoveContainer, a clean power-off,
    # then QEMU before virtiofsd, and every mount (deepest first) before the directory.
    assert since(fake, stopped) == [
        ("agent", "Shutdown"),
        ("terminate", "qemu"),
        ("terminate", "proxy"),
        ("terminate", "virtiofsd"),
        ("umount", str(shared / "c1" / "rootfs"), True),
        ("umount", str(volume), True),
        ("umount", str(shared), True),
    ]
    assert_gone(root, "c1")
    assert Pod.list(root) == [] and fake.alive() == [] and fake.mounts.points == set()


def test_member_joins_and_leaves_a_pod(fake: FakeDrivers, root: Path, tmp_path: Path) -> None:
    create(root, "sandbox", bundle(tmp_path, "sandbox", SANDBOX))
    booted = len(fake.events)
    create(root, "member", bundle(tmp_path, "member", MEMBER))
    assert [e[0] for e in since(fake, booted)].count("qemu") == 0  # no second VM
    assert Pod.load(root, "pod").record.containers == ["sandbox", "member"]
    shared = Pod.load(root, "pod").shared_dir

    joined = len(fake.events)
    delete(root, "member", force=True)
    assert since(fake, joined) == [
        ("agent", "RemoveContainer"),  # out of the guest before its files leave the share
        ("umount", str(shared / "member" / "rootfs"), True),
        # its volume, which no other container uses
        ("umount", str(volume_in_share(shared, tmp_path / "bundles" / "member" / "volume")), True),
    ]
    assert_gone(root, "member")
    pod = Pod.load(root, "pod")
    assert pod.record.containers == ["sandbox"] and pod.status is PodStatus.RUNNING
    assert not (shared / "member").exists()
    assert sorted(fake.alive()) == ["proxy", "qemu", "shim-sandbox", "virtiofsd"]

    delete(root, "sandbox", force=True)
    assert Pod.list(root) == [] and fake.alive() == [] and fake.mounts.points == set()


def test_containers_of_a_pod_share_one_mount_of_a_volume(
    fake: FakeDrivers, root: Path, tmp_path: Path
) -> None:
    # One bind per pod, source and mode (so the guest sees one inode: locks and page cache
    # shared, docs/file-semantics.md); the last container to go unmounts it.
    create(root, "sandbox", bundle(tmp_path, "sandbox", SANDBOX))
    shared_volume = tmp_path / "bundles" / "sandbox" / "volume"
    member = bundle(tmp_path, "member", MEMBER)
    spec = json.loads((member / "config.json").read_text())
    spec["mounts"][0]["source"] = str(shared_volume)
    (member / "config.json").write_text(json.dumps(spec))
    joined = len(fake.events)
    create(root, "member", member)
    shared = Pod.load(root, "pod").shared_dir
    volume = volume_in_share(shared, shared_volume)
    assert since(fake, joined, "mount") == [("mount", str(shared / "member" / "rootfs"))]
    assert str(volume) in fake.mounts.points

    delete(root, "member", force=True)
    assert str(volume) in fake.mounts.points  # the sandbox still uses it
    left = len(fake.events)
    delete(root, "sandbox", force=True)
    assert ("umount", str(volume), True) in since(fake, left)
    assert fake.mounts.points == set()


ALL = ["qemu", "proxy", "virtiofsd"]


@pytest.mark.parametrize(
    ("point", "failure", "stopped"),
    [
        ("mount", OSError(2, "mount: No such file or directory"), []),
        ("qemu.start", LaunchError("qemu exited with status 1"), ["virtiofsd"]),
        ("agent.MountShare", "no such tag", ALL),
        ("agent.CreateContainer", "exec format error", ALL),
        ("shim.spawn", OSError(24, "Too many open files"), ALL),
    ],
)
def test_failed_create_of_a_pod_leaves_nothing(
    fake: FakeDrivers,
    root: Path,
    tmp_path: Path,
    point: str,
    failure: BaseException | str,
    stopped: list[str],
) -> None:
    fake.fail[point] = failure
    with pytest.raises(AgentError if isinstance(failure, str) else type(failure)):
        create(root, "c1", bundle(tmp_path, "c1"))
    assert_gone(root, "c1")
    assert Pod.list(root) == [] and fake.alive() == [] and fake.mounts.points == set()
    assert not any((root / "p").iterdir())
    # What was started is stopped, QEMU first (the reverse of the boot order).
    assert [e for e in fake.events if e[0] == "terminate"] == [("terminate", n) for n in stopped]
    fake.fail.clear()
    create(root, "c1", bundle(tmp_path, "c1-again"))  # the id is free again
    delete(root, "c1", force=True)


@pytest.mark.parametrize(
    ("point", "failure"),
    [
        ("mount", OSError(2, "mount: No such file or directory")),
        ("agent.CreateContainer", "exec format error"),
        ("shim.spawn", OSError(24, "Too many open files")),
    ],
)
def test_failed_join_leaves_the_pod_as_it_was(
    fake: FakeDrivers, root: Path, tmp_path: Path, point: str, failure: BaseException | str
) -> None:
    create(root, "sandbox", bundle(tmp_path, "sandbox", SANDBOX))
    before = sorted(fake.alive())
    fake.fail[point] = failure
    start = len(fake.events)
    with pytest.raises(AgentError if isinstance(failure, str) else type(failure)):
        create(root, "member", bundle(tmp_path, "member", MEMBER))
    assert_gone(root, "member")
    pod = Pod.load(root, "pod")
    assert pod.record.containers == ["sandbox"] and pod.status is PodStatus.RUNNING
    assert not (pod.shared_dir / "member").exists()
    assert all(not p.startswith(str(pod.shared_dir / "member")) for p in fake.mounts.points)
    assert sorted(fake.alive()) == before
    if point != "mount":  # the guest saw the container: it is removed there too
        assert ("agent", "RemoveContainer") in since(fake, start)
    fake.fail.clear()
    delete(root, "sandbox", force=True)
    assert fake.alive() == []


def test_joining_a_pod_that_is_not_running(fake: FakeDrivers, root: Path, tmp_path: Path) -> None:
    create(root, "sandbox", bundle(tmp_path, "sandbox", SANDBOX))
    pod = Pod.load(root, "pod")
    pod.record.transition(PodStatus.STOPPING)
    pod.record.transition(PodStatus.BROKEN)
    pod.save()
    with pytest.raises(StateError, match="pod sandbox pod of container member is broken"):
        create(root, "member", bundle(tmp_path, "member", MEMBER))
    assert_gone(root, "member")
    assert Pod.load(root, "pod").record.containers == ["sandbox"]
    delete(root, "sandbox", force=True)
    assert Pod.list(root) == [] and fake.alive() == []


@pytest.mark.parametrize(
    ("annotations", "dropped", "option"),
    [
        (SANDBOX, ("network", "uts"), "hostNetwork"),
        (SANDBOX, ("ipc",), "hostIPC"),
        (SANDBOX, ("pid",), "hostPID"),
        (None, ("uts",), "--uts host"),
        (MEMBER, ("ipc",), "hostIPC"),
    ],
)
def test_host_namespaces_are_refused_before_anything_starts(
    fake: FakeDrivers,
    root: Path,
    tmp_path: Path,
    annotations: dict[str, str] | None,
    dropped: tuple[str, ...],
    option: str,
) -> None:
    """A spec that leaves out a namespace (the node's, for runc) is refused with the option's
    name, before any VM boots or anything is recorded; for a pod's member as well."""
    namespaces = tuple(kind for kind in ALL_NAMESPACES if kind not in dropped)
    with pytest.raises(ConfigError, match="cannot be VM-isolated") as refused:
        create(root, "c1", bundle(tmp_path, "c1", annotations, namespaces))
    assert option in str(refused.value) and "\n" not in str(refused.value)
    assert fake.events == [] and fake.alive() == []
    assert_gone(root, "c1")
    assert Pod.list(root) == []


def test_shared_propagation_is_a_warning(fake: FakeDrivers, root: Path, tmp_path: Path) -> None:
    warnings: list[str] = []
    create(
        root,
        "c1",
        bundle(tmp_path, "c1", volume_options=("rbind", "rshared")),
        warn=warnings.append,
    )
    assert len(warnings) == 1 and warnings[0].startswith("mount /data: rshared propagation"), (
        warnings
    )
    delete(root, "c1", force=True)
    quiet: list[str] = []
    create(
        root, "c2", bundle(tmp_path, "c2", volume_options=("rbind", "rslave")), warn=quiet.append
    )
    assert quiet == []
    delete(root, "c2", force=True)


def test_a_record_creating_by_a_process_that_is_gone_has_stopped(tmp_path: Path) -> None:
    """A ``create``/``run -d`` killed half-way leaves ``creating``: stopped once its creator
    (recorded by ContainerRecord.new) is gone, not creating for ever."""
    from sandbox.runtime.record import Status

    record = ContainerRecord.new(tmp_path, "half", {"pod_id": "half"})
    assert record.data["creator"]["pid"] == os.getpid()
    assert ContainerRecord.load(tmp_path, "half").status is Status.CREATING  # we are alive
    record.data["creator"] = {"pid": record.data["creator"]["pid"], "start": 1}  # not us
    record.save()
    assert ContainerRecord.load(tmp_path, "half").status is Status.STOPPED
    assert ContainerRecord.load(tmp_path, "half").oci_state()["status"] == "stopped"
