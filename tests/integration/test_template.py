"""Pods restored from a template VM (sandbox/pod/template.py): each one a distinct, working machine
with the right clock; a template that cannot be restored is discarded and the pod cold boots."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypervisor import zeropages
from sandbox.pod import template
from sandbox.pod.lifecycle import Pod
from tests.integration.helpers import busybox_spec, run_container
from tests.integration.pods import PodFactory
from tests.processes import processes_mentioning

#: How old the template must be before the clock check: a restored guest that did not set its
#: clock would be at least this far behind the host.
TEMPLATE_AGE = 8.0


@pytest.fixture
def template_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private template directory, so that these tests build their own template."""
    directory = tmp_path / "templates"
    monkeypatch.setenv("PYSANDBOX_TEMPLATE_DIR", str(directory))
    monkeypatch.setenv("PYSANDBOX_TEMPLATES", "1")
    yield directory


def _state_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"*/{template.STATE_FILE}"))


def _guest_check(pod: Pod) -> tuple[float, bytes]:
    """(guest clock minus host clock in seconds, a fresh kernel UUID) and the share working,
    from inside. The offset is 0 when the guest's ``date`` falls within the host times
    around the call (which can take seconds on a loaded host), else the distance to them."""
    (pod.shared_dir / "from-host.txt").write_text("host wrote this\n")
    with pod.client() as agent:
        assert agent.read_file("/run/pysandbox/shared/from-host.txt") == b"host wrote this\n"
        uuid = agent.read_file("/proc/sys/kernel/random/uuid").strip()
    before = time.time()
    result = run_container(pod, busybox_spec("date", "+%s"))
    after = time.time()
    assert result.status == 0, result.stderr
    guest = int(result.out)  # whole seconds, truncated
    offset = guest - before if guest < int(before) else max(0.0, guest - after)
    return offset, uuid


def _guest_ram_held(pod: Pod) -> int:
    """Bytes of the pod's guest RAM (QEMU's memfd) the host holds."""
    qemu = pod.process("qemu")
    assert qemu is not None
    memfd = zeropages.find_ram_memfd(qemu.pid)
    assert memfd is not None
    return os.stat(memfd).st_blocks * 512


def test_restored_pods_are_distinct_machines_with_the_right_clock(
    template_dir: Path, pod_factory: PodFactory
) -> None:
    first = pod_factory()  # builds the template, then restores from it
    assert first.record.boot == "restored"
    first_ram = _guest_ram_held(first)
    [state_file] = _state_files(template_dir)
    # The first restore recorded where the state's zero pages are (hypervisor/zeropages.py).
    assert (state_file.parent / template.ZERO_MAP_FILE).is_file()
    assert processes_mentioning(str(template_dir)) == [], "template VM left running"
    built = state_file.stat().st_mtime
    time.sleep(max(0.0, built + TEMPLATE_AGE - time.time()))

    second = pod_factory()
    assert second.record.boot == "restored"
    assert _state_files(template_dir) == [state_file]  # reused, not rebuilt
    # The second restore punched the recorded runs without scanning: the host holds as
    # little of its RAM as of the first one's (what the guest touched since differs a bit),
    # far below the guest's memory size; the guest checks below show its RAM intact.
    second_ram = _guest_ram_held(second)
    memory = second.record.memory_mib << 20
    assert first_ram < memory // 2 and second_ram < memory // 2, (first_ram, second_ram)
    assert abs(second_ram - first_ram) < 16 << 20, (first_ram, second_ram)
    checks = [_guest_check(pod) for pod in (first, second)]
    for offset, _ in checks:
        # Without Restored the guest clock would be TEMPLATE_AGE behind (the saved clock).
        assert abs(offset) < 3
    # Without the CRNG reseed both clones draw the same "random" UUID.
    assert checks[0][1] != checks[1][1]


def _meminfo_kib(pod: Pod) -> dict[str, int]:
    with pod.client() as agent:
        text = agent.read_file("/proc/meminfo").decode()
    return {line.split(":")[0]: int(line.split()[1]) for line in text.splitlines()}


def test_a_restored_pod_holds_no_cache_the_template_could_drop(
    template_dir: Path, pod_factory: PodFactory
) -> None:
    # Every page the template held is host memory in every restored pod. The template's
    # guest dropped the page cache nothing maps (the .pyc files read at boot: ~10 MiB
    # before) and holds no tracefs dentries and inodes (~9 MiB of slab before).
    pod = pod_factory()
    assert pod.record.boot == "restored"
    info = _meminfo_kib(pod)
    assert info["Cached"] - info["Mapped"] < 4 << 10, info
    assert info["Slab"] < 12 << 10, info
    # And it still works: a container runs.
    result = run_container(pod, busybox_spec("echo", "ok"))
    assert (result.status, result.out) == (0, "ok\n")


def test_unloadable_template_is_discarded_and_the_pod_cold_boots(
    template_dir: Path, pod_factory: PodFactory
) -> None:
    pod_factory().destroy()  # build a template
    [state_file] = _state_files(template_dir)
    with open(state_file, "r+b") as state:
        state.write(os.urandom(4096))  # QEMU refuses a state with a bad header

    pod = pod_factory()
    assert pod.record.boot == "cold"
    assert "template discarded" in (pod.dir / "boot.log").read_text()
    assert _state_files(template_dir) == []
    _guest_check(pod)
    assert pod_factory().record.boot == "restored"  # rebuilt on the next boot


def test_templates_can_be_turned_off(
    template_dir: Path, pod_factory: PodFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYSANDBOX_TEMPLATES", "0")
    pod = pod_factory()
    assert pod.record.boot == "cold"
    assert not template_dir.exists()


def test_network_cards_are_hot_plugged_into_restored_pods(
    template_dir: Path, pod_factory: PodFactory
) -> None:
    from sandbox.pod import network

    pod = pod_factory(user_network=True, hostname="restored-net")
    assert pod.record.boot == "restored"
    with pod.client() as agent:
        assert agent.read_file("/sys/class/net/eth0/address").strip() == network.USER_MAC.encode()
        assert agent.read_file("/sys/class/net/eth0/operstate").strip() == b"up"
    spec = busybox_spec("ip", "-4", "-o", "addr", "show", "eth0")
    # Share the guest's network, as `run --network user` does.
    spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "network"]
    result = run_container(pod, spec)
    assert "10.0.2.15/24" in result.out, result.stderr
