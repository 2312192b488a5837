"""The pod record: its transition table, its guard, and reading what is on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hypervisor.process import ProcessHandle
from sandbox import store
from sandbox.errors import ConfigError, NotFoundError, StateError
from sandbox.pod import record as pod_record
from sandbox.pod.record import TRANSITIONS, BootKind, PodRecord, PodStatus

#: A pod.json as the first version of pod.py wrote it (a running pod with a pod network and
#: one member container), key for key.
FIRST_VERSION = {
    "id": "pod-a",
    "status": "running",
    "created": 1717171717.25,
    "accel": "tcg",
    "memory_mib": 512,
    "image": "/var/lib/pysandbox/guest",
    "processes": {
        "virtiofsd": {"pid": 4101, "start": 90001},
        "qemu": {"pid": 4102, "start": 90002},
        "proxy": {"pid": 4103, "start": 90003},
    },
    "network": {
        "mode": "netns",
        "netns": "/run/netns/cni-1",
        "identity": [4, 4026532000],
        "links": [{"device": "eth0", "tap": "tap0_psb"}],
        "guest_files": {"resolv_conf": "/run/pysandbox-network/resolv.conf", "hosts": ""},
    },
    "boot": "restored",
    "containers": ["pod-a", "member-1"],
}


def write(root: Path, pod_id: str, data: object) -> Path:
    directory = store.ensure_dir(root / "p" / store.pod_dir_name(pod_id))
    (directory / "pod.json").write_text(json.dumps(data))
    return directory / "pod.json"


def test_legal_paths() -> None:
    record = PodRecord("p")
    for status in (PodStatus.RUNNING, PodStatus.STOPPING, PodStatus.BROKEN, PodStatus.STOPPING):
        record.transition(status)
    record.transition(PodStatus.STOPPED)
    failed_boot = PodRecord("q")
    failed_boot.transition(PodStatus.STOPPING)
    failed_boot.transition(PodStatus.STOPPING)  # a teardown retried after a crash
    assert failed_boot.status is PodStatus.STOPPING


@pytest.mark.parametrize(
    ("start", "target"),
    [
        (PodStatus.BOOTING, PodStatus.STOPPED),  # never without tearing down
        (PodStatus.RUNNING, PodStatus.BOOTING),
        (PodStatus.RUNNING, PodStatus.BROKEN),
        (PodStatus.STOPPING, PodStatus.RUNNING),
        (PodStatus.BROKEN, PodStatus.RUNNING),
        (PodStatus.STOPPED, PodStatus.STOPPING),
        (PodStatus.STOPPED, PodStatus.RUNNING),
    ],
)
def test_illegal_transitions_are_refused(start: PodStatus, target: PodStatus) -> None:
    record = PodRecord("p", status=start)
    with pytest.raises(StateError, match=f"pod p cannot go from {start} to {target}"):
        record.transition(target)
    assert record.status is start


def test_every_status_has_a_row() -> None:
    assert set(TRANSITIONS) == set(PodStatus)
    # Everything but a removed pod can still be torn down.
    assert all(
        PodStatus.STOPPING in TRANSITIONS[s] for s in PodStatus if s is not PodStatus.STOPPED
    )


def test_reads_what_the_first_version_wrote(tmp_path: Path) -> None:
    write(tmp_path, "pod-a", FIRST_VERSION)
    record = pod_record.load(tmp_path, "pod-a")
    assert record.status is PodStatus.RUNNING and record.boot is BootKind.RESTORED
    assert record.processes["qemu"] == ProcessHandle(4102, 90002)
    assert record.containers == ["pod-a", "member-1"]
    assert record.accel == "tcg" and record.memory_mib == 512
    assert record.guest_files() == {
        "resolv_conf": "/run/pysandbox-network/resolv.conf",
        "hosts": "",
    }
    assert record.to_json() == FIRST_VERSION  # written back key for key


def test_host_cgroup_round_trips(tmp_path: Path) -> None:
    placement = {
        "dirs": ["/sys/fs/cgroup/memory/kubepods/x"],
        "version": "v1",
        "created": ["/sys/fs/cgroup/memory/kubepods/x"],
        "unit": "",
        "containers": {"x": {"memory": 67108864, "cpu_milli": None}},
    }
    write(tmp_path, "pod-a", {**FIRST_VERSION, "host_cgroup": placement})
    record = pod_record.load(tmp_path, "pod-a")
    assert record.host_cgroup == placement and record.extra == {}
    assert record.to_json() == {**FIRST_VERSION, "host_cgroup": placement}


def test_owner_round_trips_and_a_malformed_one_is_none(tmp_path: Path) -> None:
    owner = {"pid": 4242, "start": 123456}
    write(tmp_path, "pod-a", {**FIRST_VERSION, "owner": owner})
    record = pod_record.load(tmp_path, "pod-a")
    assert record.owner == ProcessHandle(4242, 123456) and record.extra == {}
    assert record.to_json() == {**FIRST_VERSION, "owner": owner}
    write(tmp_path, "pod-b", {**FIRST_VERSION, "id": "pod-b", "owner": {"pid": "x"}})
    assert pod_record.load(tmp_path, "pod-b").owner is None
    assert "owner" not in pod_record.load(tmp_path, "pod-b").to_json()


def test_a_booting_pod_of_the_first_version(tmp_path: Path) -> None:
    booting = {k: v for k, v in FIRST_VERSION.items() if k not in ("boot", "containers")}
    write(tmp_path, "pod-a", {**booting, "status": "booting", "processes": {}})
    record = pod_record.load(tmp_path, "pod-a")
    assert record.status is PodStatus.BOOTING and record.boot is None
    assert record.containers == [] and record.processes == {}


def test_unknown_keys_survive_and_unknown_status_is_broken(tmp_path: Path) -> None:
    write(tmp_path, "pod-a", {**FIRST_VERSION, "status": "hibernating", "future": {"x": 1}})
    record = pod_record.load(tmp_path, "pod-a")
    assert record.status is PodStatus.BROKEN  # only a teardown is allowed
    record.transition(PodStatus.STOPPING)
    pod_record.save(tmp_path, record)
    assert pod_record.load(tmp_path, "pod-a").extra == {"future": {"x": 1}}


def test_malformed_process_entries_are_dropped(tmp_path: Path) -> None:
    processes = {
        "qemu": {"pid": "1"},
        "proxy": {"pid": -1, "start": 2},
        "virtiofsd": {"pid": 7, "start": 9},
    }
    write(tmp_path, "pod-a", {**FIRST_VERSION, "processes": processes})
    assert pod_record.load(tmp_path, "pod-a").processes == {"virtiofsd": ProcessHandle(7, 9)}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("containers", "pod-a", "containers is not a list of ids"),
        ("containers", [1], "containers is not a list of ids"),
        ("processes", [], "processes is not an object"),
        ("network", "user", "network is not an object"),
        ("host_cgroup", "/kubepods/x", "host_cgroup is not an object"),
        ("memory_mib", "512", "memory_mib is not an integer"),
        ("cpus", 0, "cpus is not a positive integer"),
        ("cpus", True, "cpus is not a positive integer"),
        ("created", True, "created is not a number"),
        ("boot", "warm", "unknown boot kind 'warm'"),
        ("id", None, "no pod id"),
    ],
)
def test_corrupt_fields_are_named(tmp_path: Path, field: str, value: object, message: str) -> None:
    path = write(tmp_path, "pod-a", {**FIRST_VERSION, field: value})
    with pytest.raises(ConfigError, match=f"state file {path} is corrupt: {message}"):
        pod_record.load(tmp_path, "pod-a")


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="pod nope does not exist"):
        pod_record.load(tmp_path, "nope")
    with pytest.raises(ConfigError, match="invalid pod id"):
        pod_record.load(tmp_path, "../x")
    write(tmp_path, "pod-a", {**FIRST_VERSION, "id": "pod-b"})
    with pytest.raises(StateError, match="belongs to another pod"):
        pod_record.load(tmp_path, "pod-a")
    (tmp_path / "p" / "junk").mkdir()
    (tmp_path / "p" / "junk" / "pod.json").write_text("{broken")
    assert list(pod_record.all_records(tmp_path)) == []  # neither is listed


def test_save_is_atomic_private_and_never_recreates_a_pod(tmp_path: Path) -> None:
    path = write(tmp_path, "pod-a", FIRST_VERSION)
    record = pod_record.load(tmp_path, "pod-a")
    record.containers.append("member-2")
    pod_record.save(tmp_path, record)
    assert json.loads(path.read_text())["containers"] == ["pod-a", "member-1", "member-2"]
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["pod.json"]
    path.unlink()
    path.parent.rmdir()
    with pytest.raises(FileNotFoundError):
        pod_record.save(tmp_path, record)
    assert not path.parent.exists()


def test_vcpus_round_trip_and_default_to_one(tmp_path: Path) -> None:
    write(tmp_path, "pod-a", FIRST_VERSION)
    assert pod_record.load(tmp_path, "pod-a").cpus == 1
    write(tmp_path, "pod-b", {**FIRST_VERSION, "id": "pod-b", "cpus": 2})
    record = pod_record.load(tmp_path, "pod-b")
    assert record.cpus == 2 and record.to_json()["cpus"] == 2


def test_the_agent_protocol_round_trips_and_is_absent_when_not_told(tmp_path: Path) -> None:
    write(tmp_path, "pod-a", {**FIRST_VERSION, "agent_protocol": "1.14"})
    record = pod_record.load(tmp_path, "pod-a")
    assert record.agent_protocol == "1.14" and record.extra == {}
    assert record.to_json() == {**FIRST_VERSION, "agent_protocol": "1.14"}
    write(tmp_path, "pod-b", {**FIRST_VERSION, "id": "pod-b"})
    assert pod_record.load(tmp_path, "pod-b").agent_protocol is None
