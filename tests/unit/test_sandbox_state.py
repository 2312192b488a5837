"""State store, container records and the container state machine."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from sandbox import store as state
from sandbox.errors import ConfigError, NotFoundError, StateError
from sandbox.runtime.record import ContainerRecord, Status


@pytest.mark.parametrize(
    "bad", ["", "../x", "a/b", "..", "x..y", "-lead", "a b", "x" * 201, "x" * 1000, "x\n"]
)
def test_invalid_ids_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="invalid container id"):
        state.validate_id(bad)


@pytest.mark.parametrize("name", ["p", "locks", "logs"])
def test_the_state_directorys_own_names_are_not_container_ids(name: str) -> None:
    # <root>/<id> is a container's directory: these are the pods', the locks' and the kept
    # logs' (a run named 'locks' took the lock directory, and rm -f removed it).
    with pytest.raises(ConfigError, match="keeps its own"):
        state.validate_id(name)
    with pytest.raises(ConfigError, match="invalid name id"):
        state.validate_id(name, "name")
    assert state.validate_id(name, "pod") == name  # pods live below p/, hashed


def test_an_id_too_long_for_a_file_name_says_the_limit() -> None:
    with pytest.raises(ConfigError) as info:
        state.validate_id("x" * 1000)
    assert "(1000 characters): at most 200 characters" in str(info.value)
    assert len(str(info.value)) < 200  # one short line, not the id echoed back


def test_the_longest_id_fits_every_name_built_from_it(tmp_path: Path) -> None:
    longest = "a" * state.MAX_ID_LENGTH
    assert state.validate_id(longest) == longest
    # What the runtime and the guest create from an id, as single path components.
    for name in (longest, f"{longest}-console.log"):
        (tmp_path / name).mkdir()


@pytest.mark.parametrize("good", ["c1", "a" * 64, "pod_1.x+y-z", "b" * 200])
def test_valid_ids(good: str) -> None:
    assert state.validate_id(good) == good


def test_pod_dir_name_is_short_and_stable() -> None:
    long_id = "f" * 64
    assert state.pod_dir_name(long_id) == state.pod_dir_name(long_id)
    assert len(state.pod_dir_name(long_id)) == 16
    base = "/run/containerd/runc/k8s.io/p/"
    assert len(base + state.pod_dir_name(long_id) + "/agent-serial.sock") < 108


def test_pod_dir_name_is_the_sha256_earlier_versions_used() -> None:
    """A pod made by an earlier pysandbox (hashlib's sha256) is found by this one, whichever
    sha256 implementation it loads."""
    import hashlib

    for pod_id in ("t1", "f" * 64, "bench-exec-123"):
        assert state.pod_dir_name(pod_id) == hashlib.sha256(pod_id.encode()).hexdigest()[:16]


def test_atomic_write_and_corrupt_read(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state.write_json_atomic(path, {"a": 1})
    assert state.read_json(path) == {"a": 1}
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    path.write_text("{broken")
    with pytest.raises(ConfigError, match="is corrupt"):
        state.read_json(path)
    path.write_text("[1]")
    with pytest.raises(ConfigError, match="not a JSON object"):
        state.read_json(path)


def test_lock_excludes_concurrent_holders(tmp_path: Path) -> None:
    order: list[str] = []

    def holder(name: str) -> None:
        with state.locked(tmp_path, "x"):
            order.append(f"{name}-in")
            time.sleep(0.1)
            order.append(f"{name}-out")

    threads = [threading.Thread(target=holder, args=(n,)) for n in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert order[0][0] == order[1][0] and order[2][0] == order[3][0]


def test_state_machine_guards() -> None:
    assert Status.CREATED.can_start() and not Status.RUNNING.can_start()
    assert Status.RUNNING.can_pause() and not Status.CREATED.can_pause()
    assert Status.PAUSED.can_resume() and not Status.RUNNING.can_resume()
    assert not Status.STOPPED.can_kill() and Status.PAUSED.can_kill()
    assert Status.STOPPED.can_delete() and not Status.RUNNING.can_delete()
    assert Status.RUNNING.can_exec() and not Status.PAUSED.can_exec()


def test_record_lifecycle_and_oci_state(tmp_path: Path) -> None:
    record = ContainerRecord.new(tmp_path, "c1", {"bundle": "/b", "pod_id": "c1"})
    with pytest.raises(StateError, match="container c1 already exists"):
        ContainerRecord.new(tmp_path, "c1", {"bundle": "/b", "pod_id": "c1"})
    loaded = ContainerRecord.load(tmp_path, "c1")
    assert loaded.oci_state()["status"] == "created"  # creating is reported as created
    record.set_status(Status.RUNNING)
    # No shim process recorded: a "running" container without its shim has stopped.
    doc = ContainerRecord.load(tmp_path, "c1").oci_state()
    assert (doc["status"], doc["pid"], doc["id"], doc["bundle"]) == ("stopped", 0, "c1", "/b")
    assert json.loads(json.dumps(doc)) == doc
    with pytest.raises(NotFoundError, match="nope: container does not exist"):
        ContainerRecord.load(tmp_path, "nope")
    assert [r.id for r in ContainerRecord.all(tmp_path)] == ["c1"]


def test_ps_lists_the_host_standins_that_still_run(tmp_path: Path) -> None:
    """``ps --format json``: the init's shim, then live exec stand-ins oldest first; files
    of stand-ins that are gone (or unreadable) are ignored."""
    import os
    import subprocess
    import sys

    from hypervisor.process import ProcessHandle
    from sandbox.runtime import control
    from sandbox.runtime.record import standin_file

    me = ProcessHandle.of(os.getpid())  # stands for the init here
    record = ContainerRecord.new(tmp_path, "c1", {"pod_id": "c1", "shim": me.to_json()})
    record.set_status(Status.RUNNING)
    children = [subprocess.Popen([sys.executable, "-c", "input()"], stdin=subprocess.PIPE)]
    time.sleep(0.05)  # a later start time (clock ticks of 10 ms)
    children.append(subprocess.Popen([sys.executable, "-c", "input()"], stdin=subprocess.PIPE))
    try:
        for exec_id, child in zip(("exec-b", "exec-a"), children, strict=True):
            handle = ProcessHandle.of(child.pid)
            state.write_json_atomic(standin_file(record.dir, exec_id), handle.to_json())
        dead = {"pid": children[0].pid, "start": 1}  # that pid, another start time: not it
        state.write_json_atomic(standin_file(record.dir, "exec-gone"), dead)
        standin_file(record.dir, "exec-garbage").write_text("{not json")
        listed = control.processes(tmp_path, "c1")
        assert listed == [os.getpid(), children[0].pid, children[1].pid]
        assert list(record.exec_standins()) == ["exec-b", "exec-a"]
    finally:
        for child in children:
            child.kill()
            child.communicate()
    assert control.processes(tmp_path, "c1") == [os.getpid()]


def test_ps_table_text() -> None:
    from sandbox.pod.agent_client import GuestProcess
    from sandbox.runtime.control import ProcessRow, render_table

    init = GuestProcess(1, 0, 0, "sh -c sleep 1000 & exec sleep 2000", 107, "", True)
    child = GuestProcess(7, 1, 1000, "sleep 1000", 112, "", False)
    text = render_table([ProcessRow(init, 2021), ProcessRow(child, None)])
    assert [line.split(None, 4) for line in text.splitlines()] == [
        ["PID", "PPID", "UID", "HOST-PID", "CMD"],
        ["1", "0", "0", "2021", "sh -c sleep 1000 & exec sleep 2000"],
        ["7", "1", "1000", "-", "sleep 1000"],
    ]
