"""Pod boot, stop and rollback ordering against fake drivers (tests/unit/fake_drivers.py).

What a user relies on: a pod that booted runs with everything recorded; a pod that stops or
fails to boot leaves nothing behind (no process, mount, directory or record), whichever step
failed; and things are stopped in an order that never pulls a resource from under a user
of it (QEMU before virtiofsd, mounts before the directory).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hypervisor.errors import HypervisorTimeout, LaunchError, QMPError, VirtiofsdError
from sandbox.errors import AgentError, NotFoundError, StateError
from sandbox.pod.lifecycle import Pod
from sandbox.pod.record import PodStatus
from tests.unit.fake_drivers import Event, FakeDrivers, FakeVM, fixture_drivers


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDrivers]:
    yield from fixture_drivers(tmp_path, monkeypatch)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


def on_disk(pod: Pod) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((pod.dir / "pod.json").read_text())
    return data


def teardown_events(fake: FakeDrivers, since: int) -> list[Event]:
    """Stops and unmounts after event ``since``."""
    return [e for e in fake.events[since:] if e[0] in ("terminate", "umount") or e[1] == "kill"]


def assert_nothing_left(fake: FakeDrivers, root: Path, pod_id: str) -> None:
    assert fake.alive() == []
    assert fake.mounts.points == set()
    assert Pod.list(root) == []
    assert not any((root / "p").iterdir())
    with pytest.raises(NotFoundError, match=f"pod {pod_id} does not exist"):
        Pod.load(root, pod_id)


def test_boot_starts_in_order_and_records_everything(fake: FakeDrivers, root: Path) -> None:
    pod = Pod.boot(root, "p1")
    shared = str(pod.shared_dir)
    assert fake.events == [
        ("mount", shared),  # the share is a shared mount before virtiofsd sees it
        ("virtiofsd", "start"),  # before QEMU, which connects to its socket
        ("qemu", "start", "cold"),
        ("proxy", "start"),
        ("qemu", "resume"),
        ("agent", "Health"),
        ("agent", "MountShare"),
    ]
    assert pod.status is PodStatus.RUNNING
    record = on_disk(pod)
    assert record["status"] == "running" and record["boot"] == "cold"
    assert record["accel"] == "tcg" and record["memory_mib"] == 512
    processes = record["processes"]
    assert isinstance(processes, dict) and sorted(processes) == ["proxy", "qemu", "virtiofsd"]
    assert sorted(fake.alive()) == ["proxy", "qemu", "virtiofsd"]
    assert Pod.load(root, "p1").record == pod.record
    with pytest.raises(StateError, match="pod p1 already exists"):
        Pod.boot(root, "p1")
    pod.destroy()


def test_stop_powers_off_then_tears_down_in_reverse(fake: FakeDrivers, root: Path) -> None:
    pod = Pod.boot(root, "p1")
    shared = str(pod.shared_dir)
    booted = len(fake.events)
    pod.stop()
    assert fake.events[booted:] == [
        ("agent", "Shutdown"),
        ("terminate", "qemu"),
        ("terminate", "proxy"),
        ("terminate", "virtiofsd"),
        ("umount", shared, True),  # unmounted while the directory still existed
    ]
    assert pod.status is PodStatus.STOPPED
    assert not pod.dir.exists()
    assert_nothing_left(fake, root, "p1")
    done = len(fake.events)
    pod.destroy()  # idempotent
    pod.stop()
    assert len(fake.events) == done


def test_destroy_without_the_agent(fake: FakeDrivers, root: Path) -> None:
    pod = Pod.boot(root, "p1")
    booted = len(fake.events)
    Pod.load(root, "p1").destroy()  # e.g. delete --force from another process
    assert [e for e in fake.events[booted:] if e[0] == "agent"] == []
    assert teardown_events(fake, booted)[:3] == [
        ("terminate", "qemu"),
        ("terminate", "proxy"),
        ("terminate", "virtiofsd"),
    ]
    assert_nothing_left(fake, root, "p1")
    pod.destroy()  # a stale object: nothing recreated
    assert_nothing_left(fake, root, "p1")


# What each injected failure leaves started (and so what the rollback must stop, in order).
FAILURES = [
    ("mount", OSError(1, "mount: Operation not permitted"), []),
    ("virtiofsd.start", VirtiofsdError("virtiofsd exited"), ["mount"]),
    ("qemu.start", LaunchError("qemu exited with status 1"), ["mount", "virtiofsd"]),
    ("proxy.start", AgentError("agent proxy failed"), ["mount", "virtiofsd", "qemu"]),
    ("qemu.resume", QMPError("cont failed"), ["mount", "virtiofsd", "qemu", "proxy"]),
    ("qemu.resume", KeyboardInterrupt(), ["mount", "virtiofsd", "qemu", "proxy"]),
    ("agent.Health", "not yet", ["mount", "virtiofsd", "qemu", "proxy"]),
    ("agent.MountShare", "no such tag", ["mount", "virtiofsd", "qemu", "proxy"]),
    ("agent.ConfigureNetwork", "bad route", ["mount", "virtiofsd", "qemu", "proxy"]),
]


@pytest.mark.parametrize(
    ("point", "failure", "started"),
    FAILURES,
    ids=[f"{p}-{i}" for i, (p, *_) in enumerate(FAILURES)],
)
def test_failed_boot_rolls_back_in_reverse_order(
    fake: FakeDrivers, root: Path, point: str, failure: BaseException | str, started: list[str]
) -> None:
    fake.fail[point] = failure
    user_network = point == "agent.ConfigureNetwork"
    expected: type[BaseException] = AgentError if isinstance(failure, str) else type(failure)
    with pytest.raises(expected) as raised:
        Pod.boot(root, "p1", user_network=user_network)
    undo: list[Event] = []
    if "qemu" in started:
        undo.append(("terminate", "qemu"))
    if "proxy" in started:
        undo.append(("terminate", "proxy"))
    if "virtiofsd" in started:
        undo.append(("terminate", "virtiofsd"))
    teardown = teardown_events(fake, 0)
    assert [e[:2] for e in teardown if e[0] == "terminate"] == undo
    mounted = [e for e in fake.events if e[0] == "mount"]
    unmounted = [e for e in teardown if e[0] == "umount"]
    assert [e[1] for e in unmounted] == [e[1] for e in mounted]
    assert all(e[2] for e in unmounted), "unmounted after the directory was removed"
    assert_nothing_left(fake, root, "p1")
    if point.startswith("agent."):
        # The console log of a VM that did not come up is kept and named.
        assert "serial console log kept at" in str(raised.value)
        assert (root / "logs" / "p1-console.log").read_text().startswith("fake console")
    fake.fail.clear()
    Pod.boot(root, "p1").destroy()  # the id is free again


def test_teardown_that_cannot_finish_leaves_the_pod_broken(
    fake: FakeDrivers, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pod = Pod.boot(root, "p1")
    stuck = str(pod.shared_dir)

    def busy(fd: int) -> None:
        raise OSError(16, f"umount {os.readlink(f'/proc/self/fd/{fd}')}: busy")

    monkeypatch.setattr("sandbox.pod.hostfs._umount_fd", busy)
    with pytest.raises(StateError, match=f"cannot remove pod p1: still mounted: {stuck}"):
        pod.stop()
    assert fake.alive() == []  # every process stopped all the same
    broken = Pod.load(root, "p1")
    assert broken.status is PodStatus.BROKEN and [p.id for p in Pod.list(root)] == ["p1"]
    monkeypatch.setattr("sandbox.pod.hostfs._umount_fd", fake.mounts._umount_fd)
    broken.destroy()  # retried: broken -> stopping -> stopped
    assert str(broken.status) == "stopped"
    assert_nothing_left(fake, root, "p1")


def test_user_network_is_recorded(fake: FakeDrivers, root: Path) -> None:
    pod = Pod.boot(root, "p1", user_network=True, hostname="web")
    assert ("agent", "ConfigureNetwork") in fake.events
    assert on_disk(pod)["network"] == {
        "mode": "user",
        "guest_files": {
            "resolv_conf": "/run/pysandbox-network/resolv.conf",
            "hosts": "/run/pysandbox-network/hosts",
        },
    }
    assert pod.record.guest_files()["hosts"] == "/run/pysandbox-network/hosts"
    pod.destroy()


def test_a_dead_proxy_is_replaced_only_while_running(fake: FakeDrivers, root: Path) -> None:
    pod = Pod.boot(root, "p1")
    old = pod.process("proxy")
    assert old is not None
    fake.terminate("proxy", old)
    with pod.client(timeout=2.0) as agent:
        agent.health()
    new = Pod.load(root, "p1").process("proxy")
    assert new is not None and new != old and new.alive()
    pod.record.transition(PodStatus.STOPPING)
    pod.save()
    fake.terminate("proxy", new)
    starts = fake.events.count(("proxy", "start"))
    with pytest.raises(AgentError), pod.client(timeout=1.0) as agent:
        agent.health()
    assert fake.events.count(("proxy", "start")) == starts
    pod.destroy()
    assert_nothing_left(fake, root, "p1")


@pytest.fixture
def templates(fake: FakeDrivers, monkeypatch: pytest.MonkeyPatch) -> FakeDrivers:
    monkeypatch.setenv("PYSANDBOX_TEMPLATES", "1")
    monkeypatch.setenv("PYSANDBOX_QEMU", sys.executable)  # only hashed into the template key
    return fake


def test_restored_pods_share_one_template(templates: FakeDrivers, root: Path) -> None:
    fake = templates
    first = Pod.boot(root, "p1")
    build = [e for e in fake.events if e[0] in ("qemu", "proxy", "terminate")]
    assert build[:6] == [
        ("qemu", "start", "template"),
        ("proxy", "start"),
        ("qemu", "resume"),
        ("qemu", "save_state"),
        ("qemu", "kill"),  # the template VM, then its proxy
        ("terminate", "proxy"),
    ]
    # The guest drops its caches and zeroes its free memory right before the save.
    saved = fake.events.index(("qemu", "save_state"))
    assert fake.events[saved - 1] == ("agent", "PrepareTemplate")
    since = len(fake.events)
    second = Pod.boot(root, "p2")
    assert fake.events[since:] == [
        ("mount", str(second.shared_dir)),
        ("virtiofsd", "start"),
        ("qemu", "start", "restore"),
        ("proxy", "start"),
        ("qemu", "wait_incoming"),
        ("qemu", "release_zero_pages"),
        ("qemu", "hotplug_share", "pod"),  # virtiofsd serves before the share is plugged
        ("qemu", "resume"),
        # The first call: it proves the agent serves, and it mounts the share (1.8).
        ("agent", "Restored"),
    ]
    assert fake.shares[-1] == ("pod", "/run/pysandbox/shared")
    assert first.record.boot == "restored" and on_disk(second)["boot"] == "restored"
    first.stop()
    second.stop()
    assert fake.alive() == []


def test_a_restored_pod_of_an_older_agent_mounts_its_share_by_itself(
    templates: FakeDrivers, root: Path
) -> None:
    """An agent before protocol 1.8 ignores Restored.share: the host sees share_mounted
    false and calls MountShare, as it did before."""
    fake = templates
    fake.agent_minor = 7
    Pod.boot(root, "p1").stop()
    since, shares = len(fake.events), len(fake.shares)
    pod = Pod.boot(root, "p2")
    agent_calls = [e for e in fake.events[since:] if e[0] == "agent"]
    assert agent_calls == [("agent", "Restored"), ("agent", "MountShare")]
    assert fake.shares[shares:] == [("pod", "/run/pysandbox/shared")]
    assert pod.record.boot == "restored"
    pod.stop()


def test_failed_restore_is_undone_then_cold_boots(templates: FakeDrivers, root: Path) -> None:
    fake = templates
    Pod.boot(root, "p0").stop()  # builds the template
    template_dirs = [p for p in (root.parent / "templates").iterdir() if p.is_dir()]
    assert len(template_dirs) == 1
    fake.fail["qemu.wait_incoming"] = LaunchError(
        "loading the saved state ended in 'failed'", reported=True
    )
    since = len(fake.events)
    pod = Pod.boot(root, "p1")
    events = [e for e in fake.events[since:] if e[0] in ("qemu", "proxy", "terminate")]
    assert events == [
        ("qemu", "start", "restore"),
        ("proxy", "start"),
        ("qemu", "wait_incoming"),
        ("qemu", "kill"),
        ("terminate", "proxy"),
        ("qemu", "start", "cold"),
        ("proxy", "start"),
        ("qemu", "resume"),
    ]
    assert pod.record.boot == "cold"
    assert not template_dirs[0].exists()  # a state QEMU cannot load is discarded
    assert sorted(on_disk(pod)["processes"]) == ["proxy", "qemu", "virtiofsd"]
    assert sorted(fake.alive()) == ["proxy", "qemu", "virtiofsd"]
    pod.stop()
    assert_nothing_left(fake, root, "p1")


def test_restore_timeout_keeps_the_template(templates: FakeDrivers, root: Path) -> None:
    fake = templates
    Pod.boot(root, "p0").stop()
    fake.fail["qemu.wait_incoming"] = HypervisorTimeout("did not load its saved state in 5s")
    pod = Pod.boot(root, "p1")
    assert pod.record.boot == "cold"
    assert len([p for p in (root.parent / "templates").iterdir() if p.is_dir()]) == 1
    pod.stop()


@pytest.mark.parametrize("exitcode", [-9, None])  # None: a jailed QEMU, not our child
def test_a_qemu_killed_while_restoring_keeps_the_template(
    templates: FakeDrivers, root: Path, exitcode: int | None
) -> None:
    """SIGKILL (the OOM killer) is not the state's fault: the pod cold boots, the template
    stays for the next pod (it was discarded: "exited with status None during startup")."""
    fake = templates
    Pod.boot(root, "p0").stop()
    fake.fail["qemu.wait_incoming"] = LaunchError(
        "qemu for vm x was killed by SIGKILL while loading its saved state", exitcode=exitcode
    )
    pod = Pod.boot(root, "p1")
    assert pod.record.boot == "cold"
    assert len([p for p in (root.parent / "templates").iterdir() if p.is_dir()]) == 1
    pod.stop()
    del fake.fail["qemu.wait_incoming"]
    assert Pod.boot(root, "p2").record.boot == "restored"


@pytest.mark.parametrize("victim", ["qemu", "virtiofsd"])
def test_pod_list_says_broken_once_qemu_or_virtiofsd_is_killed(
    fake: FakeDrivers, root: Path, capsys: pytest.CaptureFixture[str], victim: str
) -> None:
    """``pysandbox pod list`` said ``running`` for a pod whose QEMU was SIGKILLed."""
    from sandbox.cli.main import main

    Pod.boot(root, "p1")
    Pod.boot(root, "p2")

    def listed() -> list[str]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            main(["--root", str(root), "pod", "list"])
        assert exited.value.code == 0
        return sorted(line.split("\t")[1] for line in capsys.readouterr().out.splitlines())

    assert listed() == ["running", "running"]
    killed = Pod.load(root, "p1").process(victim)
    assert killed is not None
    next(p for p in fake.processes if p.handle == killed).kill()
    assert listed() == ["broken", "running"]
    proxy = Pod.load(root, "p2").process("proxy")
    next(p for p in fake.processes if p.handle == proxy).kill()  # replaced on demand
    assert listed() == ["broken", "running"]
    for pod in Pod.list(root):
        pod.destroy()


def test_pod_stop_leaves_no_lock_file(fake: FakeDrivers, root: Path) -> None:
    """``pod stop X`` (then ``delete X``, which finds no pod) left locks/pod-<hash>.lock."""
    from sandbox.cli.main import main
    from sandbox.pod import record as pod_record

    Pod.boot(root, "k1")
    with pod_record.lock(root, "k1"):  # as create does when it adds a container
        pass
    assert [p.name for p in (root / "locks").iterdir()] != []
    for pod_id, status in (("k1", 0), ("k1", 1)):  # the second: no such pod
        with pytest.raises(SystemExit) as exited:
            main(["--root", str(root), "pod", "stop", pod_id])
        assert exited.value.code == status
        assert list((root / "locks").iterdir()) == []
    assert_nothing_left(fake, root, "k1")


def test_lock_mode_reaches_the_file_server_and_the_record(
    fake: FakeDrivers, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Guest-local locks unless asked (argument, else $PYSANDBOX_LOCKS); recorded like
    # privileged_files (absent means local, so older records read back unchanged).
    monkeypatch.delenv("PYSANDBOX_LOCKS", raising=False)
    cases = (
        ("p1", {}, None, "local"),
        ("p2", {"locks": "remote"}, None, "remote"),
        ("p3", {}, "remote", "remote"),
        ("p4", {"locks": "local"}, "remote", "local"),
    )
    for pod_id, kwargs, env, expected in cases:
        if env is not None:
            monkeypatch.setenv("PYSANDBOX_LOCKS", env)
        pod = Pod.boot(root, pod_id, **kwargs)
        assert fake.locks == expected
        assert on_disk(pod).get("remote_locks", False) is (expected == "remote")
        assert Pod.load(root, pod_id).record.remote_locks is (expected == "remote")
        pod.destroy()


def test_cached_files_reach_the_file_server_and_the_record(fake: FakeDrivers, root: Path) -> None:
    # Off unless asked; recorded (absent means off, so older records read back unchanged).
    for pod_id, cached in (("p1", False), ("p2", True)):
        pod = Pod.boot(root, pod_id, cached_files=cached)
        assert fake.cached is cached
        assert on_disk(pod).get("cached_files", False) is cached
        assert Pod.load(root, pod_id).record.cached_files is cached
        pod.destroy()


def test_privileged_files_reach_the_file_server_and_the_record(
    fake: FakeDrivers, root: Path
) -> None:
    # A pod's files are powerless on the host unless asked (docs/security.md); the choice
    # is made once, for its virtiofsd, and recorded.
    for pod_id, kwargs, expected in (("p1", {}, False), ("p2", {"privileged_files": True}, True)):
        pod = Pod.boot(root, pod_id, **kwargs)
        assert fake.privileged_files is expected
        assert on_disk(pod).get("privileged_files", False) is expected
        assert Pod.load(root, pod_id).record.privileged_files is expected
        pod.destroy()


@pytest.mark.parametrize(
    ("victim", "label", "log"),
    [
        ("virtiofsd", "virtiofsd", "virtiofsd.log"),
        ("proxy", "agent proxy", "proxy.log"),
        ("qemu", "QEMU", "console-qemu.log"),
    ],
)
def test_a_call_gives_up_at_once_when_a_pod_process_dies(
    fake: FakeDrivers, root: Path, victim: str, label: str, log: str
) -> None:
    """The guest never answers CreateContainer (a dead share, a dead channel): the call
    ends within a second of the process's death, not after its 120 s deadline, and names the
    process and its log, kept outside the pod's directory (which goes with the pod)."""
    import threading
    import time

    from sandbox.errors import PodProcessDied

    pod = Pod.boot(root, "p1")
    (pod.dir / log).write_text(f"{victim}: last words\n")
    fake.fail["agent.CreateContainer"] = threading.Event()
    process = next(p for p in fake.processes if p.name == victim)
    pid = process.handle.pid
    threading.Timer(0.5, process.kill).start()
    started = time.monotonic()
    with pod.client() as client, pytest.raises(PodProcessDied) as caught:
        client.create_container("c1", b"{}", "/r")
    assert 0.5 <= time.monotonic() - started < 1.5
    kept = root / "logs" / f"p1-{victim}.log"
    assert str(caught.value) == f"{label} (pid {pid}) of pod p1 died; its log is kept at {kept}"
    assert (caught.value.rpc, caught.value.pod_id, caught.value.container_id) == (
        "CreateContainer",
        "p1",
        "c1",
    )
    assert kept.read_text() == f"{victim}: last words\n"
    pod.destroy()
    assert kept.exists()  # the pod's directory is gone, the log is not
    assert_nothing_left(fake, root, "p1")


def test_a_proxy_restarted_by_another_process_is_no_casualty(fake: FakeDrivers, root: Path) -> None:
    pod = Pod.boot(root, "p1")
    other = Pod.load(root, "p1")
    next(p for p in fake.processes if p.name == "proxy").kill()
    with other.client() as client:  # another verb starts a new proxy and records it
        client.health()
    assert pod.casualty() is None  # pod's own record still names the dead one
    pod.destroy()


def test_a_flooded_console_log_is_kept_only_by_its_end(
    fake: FakeDrivers, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A guest writes its serial console without bound: the copy kept for a failed boot is
    the log's last KEPT_LOG_BYTES, saying how much was left out."""
    from sandbox.pod import lifecycle

    monkeypatch.setattr(lifecycle, "KEPT_LOG_BYTES", 1000)
    fake.fail["agent.MountShare"] = "no such tag"
    real_start = FakeVM.start

    def flooding(vm: FakeVM, *, paused: bool = True) -> None:
        real_start(vm, paused=paused)
        vm.config.console_log.write_bytes(b"x" * 5000 + b"the end\n")

    monkeypatch.setattr(FakeVM, "start", flooding)
    with pytest.raises(AgentError, match="serial console log kept at"):
        Pod.boot(root, "p1")
    kept = (root / "logs" / "p1-console.log").read_bytes()
    assert kept == b"[4008 earlier bytes not kept]\n" + (b"x" * 992 + b"the end\n")
    assert_nothing_left(fake, root, "p1")


def test_a_call_whose_channel_breaks_as_qemu_dies_names_qemu(fake: FakeDrivers, root: Path) -> None:
    """QEMU's death closes the agent channel under the call (the proxy goes with QEMU) a
    moment before the process is seen gone: the error still names QEMU, not the channel."""
    import threading
    import time

    from sandbox.errors import PodProcessDied

    pod = Pod.boot(root, "p1")
    fake.fail["agent.CreateContainer"] = threading.Event()
    qemu = next(p for p in fake.processes if p.name == "qemu")
    proxy = pod.process("proxy")
    assert proxy is not None

    def die() -> None:
        fake.servers.pop(proxy.pid).stop(0)  # the channel breaks first...
        time.sleep(0.1)
        qemu.kill()  # ...then QEMU is gone

    threading.Timer(0.3, die).start()
    with pod.client() as client, pytest.raises(PodProcessDied, match=r"^QEMU \(pid"):
        client.create_container("c1", b"{}", "/r")
    pod.destroy()


def test_guest_side_channel_mitigations_are_off_only_under_tcg() -> None:
    from sandbox.pod.lifecycle import kernel_cmdline

    assert "mitigations=off" in kernel_cmdline("tcg").split()
    assert "mitigations=off" not in kernel_cmdline("kvm").split()
    assert kernel_cmdline("kvm") != kernel_cmdline("tcg")  # so their templates differ


def test_a_vm_of_several_vcpus_keeps_acpi_interrupt_routing() -> None:
    """With acpi=noirq the guest kernel takes no SMP configuration from the MADT and runs on
    one CPU whatever -smp says (seen: "smpboot: Allowing 1 CPUs" under -smp 2)."""
    from sandbox.pod.lifecycle import kernel_cmdline

    assert "acpi=noirq" in kernel_cmdline("tcg", 1).split()
    assert "acpi=noirq" not in kernel_cmdline("tcg", 2).split()
