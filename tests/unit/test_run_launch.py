"""How ``pysandbox run`` creates its container (sandbox/run/launch.py ``create_with``),
against fake drivers (tests/unit/fake_drivers.py).

What a user relies on: the container's program runs with its stdin at EOF (without ``-i``),
whatever the agent's protocol: one CreateContainer call does create, start and EOF with an
agent of protocol 1.8, and an older agent (which ignores those fields and answers
started=false) gets StartContainer and CloseStdin as before, so the program still runs and
never waits on stdin.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sandbox.pod.lifecycle import Pod
from sandbox.pod.sharing import HeldSources
from sandbox.run import launch
from tests.unit.fake_drivers import FakeDrivers


def _spec(terminal: bool = False) -> dict[str, Any]:
    return {
        "root": {"path": "rootfs"},
        "hostname": "0123456789ab",
        "process": {"args": ["true"], "terminal": terminal},
    }


#: The container's /etc/hosts and /etc/hostname written into the guest before its creation.
ETC_FILES = ["WriteFile", "WriteFile"]


def _create(
    fake: FakeDrivers,
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    start: bool,
    terminal: bool = False,
    user_network: bool = False,
    agent_protocol: str | None = None,
) -> list[str]:
    """Boot a fake pod, create the run's container; the agent calls the creation made.
    ``agent_protocol``: what a restored pod's agent told (recorded)."""
    monkeypatch.setattr(
        launch,
        "share_container_files",
        lambda *_args, **_kwargs: ("/run/pysandbox/shared/main/rootfs", {"mounts": []}),
    )
    pod = Pod.boot(root, "r1", user_network=user_network)
    pod.record.agent_protocol = agent_protocol
    since = len(fake.events)
    image: Any = SimpleNamespace(rootfs=root / "image" / "rootfs")
    try:
        with pod.client() as client, HeldSources() as held:
            pid = launch.create_with(
                client, pod, launch.CONTAINER_ID, _spec(terminal), image, held, start=start
            )
        assert pid > 0
        return [e[1] for e in fake.events[since:] if e[0] == "agent"]
    finally:
        pod.stop()


def test_create_start_and_eof_are_one_call(
    fake: FakeDrivers, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _create(fake, root, monkeypatch, start=True) == [*ETC_FILES, "CreateContainer"]
    assert fake.creates == [("main", True, True)]


def test_an_older_agent_is_started_and_given_eof_as_before(
    fake: FakeDrivers, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.agent_minor = 7
    calls = _create(fake, root, monkeypatch, start=True)
    assert calls == [*ETC_FILES, "CreateContainer", "StartContainer", "CloseStdin"]


def test_a_terminal_gets_its_eof_from_close_stdin(
    fake: FakeDrivers, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A terminal's EOF is a ^D written to it (CloseStdin), not a closed pipe: the agent
    leaves it open at create, and the host sends it once the program runs."""
    calls = _create(fake, root, monkeypatch, start=True, terminal=True)
    assert calls == [*ETC_FILES, "CreateContainer", "CloseStdin"]


def test_without_start_only_the_container_is_created(
    fake: FakeDrivers, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``-i`` and ``-d`` runs: started later (after the stdin relay), stdin left open."""
    assert _create(fake, root, monkeypatch, start=False) == [*ETC_FILES, "CreateContainer"]
    assert fake.creates == [("main", False, False)]


LOOPBACK = (
    "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\n"
    "ff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
)


@pytest.mark.parametrize(
    ("user_network", "files"),
    [
        (
            False,
            {
                "/etc/hosts": f"{LOOPBACK}127.0.0.1\t0123456789ab r1\n",
                "/etc/hostname": "0123456789ab\n",
            },
        ),
        (
            True,
            {
                "/etc/hosts": f"{LOOPBACK}10.0.2.15\t0123456789ab r1\n",
                "/etc/hostname": "0123456789ab\n",
                "/etc/resolv.conf": "nameserver 10.0.2.3\n",
            },
        ),
    ],
)
def test_the_container_gets_docker_s_etc_files_read_write(
    fake: FakeDrivers,
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    user_network: bool,
    files: dict[str, str],
) -> None:
    """/etc/hosts (localhost, the hostname and the run's name), /etc/hostname and, with a
    network, /etc/resolv.conf: files of the container's own in guest memory, bind-mounted
    read-write over the image's, as docker and podman mount theirs."""
    calls = _create(fake, root, monkeypatch, start=True, user_network=user_network)
    assert calls == [*(["WriteFile"] * len(files)), "CreateContainer"]
    guest = fake.vms[-1].guest
    spec = json.loads(guest.specs["main"])
    mounts = {m["destination"]: m for m in spec["mounts"]}
    assert sorted(mounts) == sorted(files)
    for destination, content in files.items():
        mount = mounts[destination]
        assert mount["type"] == "bind" and "rw" in mount["options"], mount
        assert mount["source"].startswith("/run/pysandbox/etc-main-"), mount
        assert guest.files[mount["source"]] == content.encode()


@pytest.mark.parametrize(
    ("stored", "mounts", "expected"),
    [
        (True, [{"destination": "/proc", "type": "proc", "source": "proc"}], True),
        (False, [], False),  # a directory of the user's, used in place
        (
            True,
            [{"destination": "/v", "type": "bind", "source": "/srv", "options": ["rbind"]}],
            False,
        ),
        (True, [{"destination": "/v", "source": "/srv", "options": ["bind", "ro"]}], False),
    ],
)
def test_only_runs_whose_files_only_the_guest_changes_are_cached(
    stored: bool, mounts: list[dict[str, Any]], expected: bool
) -> None:
    image = launch.images.Image("x", Path("/store/x/rootfs"), stored=stored)
    assert launch.cacheable({"mounts": mounts}, image) is expected


@pytest.mark.parametrize(
    ("cpu", "vcpus"),
    [
        (None, 1),
        ({}, 1),
        ({"quota": 50000, "period": 100000}, 1),
        ({"quota": 100000, "period": 100000}, 1),
        ({"quota": 100001, "period": 100000}, 2),
        ({"quota": 150000}, 2),
        ({"quota": -1, "period": 100000}, 1),
        ({"quota": 10**9, "period": 100000}, "host"),
    ],
)
def test_a_run_vm_has_enough_vcpus_for_its_cpu_quota(cpu: Any, vcpus: int | str) -> None:
    from hypervisor.qemu_args import host_cpus
    from sandbox.run.spec import vm_cpus

    expected = host_cpus() if vcpus == "host" else vcpus
    assert vm_cpus(cpu) == min(expected, host_cpus())


def test_exec_reads_a_run_containers_users_where_the_agent_mounts_its_root() -> None:
    """``exec -u NAME`` into a run reads /etc/passwd below the agent's overlay of that
    container (sandbox.runtime.exec): the host's path must be the agent's."""
    from agent.containers import OVERLAY_ROOT
    from sandbox.runtime.exec import GUEST_OVERLAY

    assert GUEST_OVERLAY == OVERLAY_ROOT


def test_an_agent_of_1_14_writes_the_etc_files_with_the_create(
    fake: FakeDrivers, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One round trip instead of two: the pod's agent said at its Restored that it can."""
    fake.agent_minor = 14
    calls = _create(fake, root, monkeypatch, start=True, agent_protocol="1.14")
    assert calls == ["CreateContainer"]
    guest = fake.vms[-1].guest
    mounts = {m["destination"]: m for m in json.loads(guest.specs["main"])["mounts"]}
    assert sorted(mounts) == ["/etc/hostname", "/etc/hosts"]
    assert guest.files[mounts["/etc/hostname"]["source"]] == b"0123456789ab\n"
    assert _create(fake, root, monkeypatch, start=True, agent_protocol="1.12") == [
        *ETC_FILES,
        "CreateContainer",
    ]
