"""The stand-in's network namespace and a pod network set up after create
(sandbox/runtime/standin_netns.py, sandbox/pod/late_network.py; docs/networking.md).

Real namespaces (root): the fake shim of :mod:`tests.unit.fake_drivers` lives in a new network
namespace when asked, where a test adds what podman's CNI would (an ethernet interface with an
address and a default route) between create and start.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ocispec.spec import parse_spec
from sandbox.errors import ConfigError
from sandbox.pod.lifecycle import Pod
from sandbox.runtime import standin_netns
from sandbox.runtime.create import create
from sandbox.runtime.delete import delete
from sandbox.runtime.record import ContainerRecord
from sandbox.runtime.start import start
from tests.processes import wait_until
from tests.unit.fake_drivers import FakeDrivers
from tests.unit.test_runtime_lifecycle import bundle, since

MAPPING = [{"containerID": 0, "hostID": 100000, "size": 65536}]
NS_GET_USERNS = 0xB701


def _spec(namespaces: list[dict[str, str]], userns: bool = False) -> dict[str, object]:
    linux: dict[str, object] = {"namespaces": [{"type": "mount"}, *namespaces]}
    if userns:
        linux["uidMappings"] = linux["gidMappings"] = MAPPING
    return {
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"], "cwd": "/"},
        "root": {"path": "rootfs"},
        "linux": linux,
    }


@pytest.mark.parametrize(
    ("namespaces", "userns", "wanted"),
    [
        ([{"type": "network"}], False, standin_netns.StandinNetns()),
        ([{"type": "network", "path": "/run/netns/x"}], False, None),
        ([], False, None),  # host network: refused by create anyway
        (
            [{"type": "network"}, {"type": "user"}],
            True,
            standin_netns.StandinNetns("0 100000 65536\n", "0 100000 65536\n"),
        ),
        (  # a user namespace: never the host's network namespace either
            [{"type": "network", "path": "/run/netns/x"}, {"type": "user"}],
            True,
            standin_netns.StandinNetns("0 100000 65536\n", "0 100000 65536\n"),
        ),
    ],
)
def test_which_specs_get_a_stand_in_network_namespace(
    namespaces: list[dict[str, str]], userns: bool, wanted: standin_netns.StandinNetns | None
) -> None:
    spec = parse_spec(_spec(namespaces, userns))
    assert standin_netns.for_spec(spec) == wanted
    if wanted is not None:
        _flag, uid_map, gid_map = wanted.argv()
        assert standin_netns.from_options(uid_map, gid_map) == wanted


@pytest.mark.parametrize("word", ["0:1", "a:b:c", "0:1:2,", "0 1 2"])
def test_a_malformed_map_option_is_refused(word: str) -> None:
    with pytest.raises(ConfigError, match="expected inside:outside:count"):
        standin_netns.from_options(word, "-")


def _enter_in_child(netns: standin_netns.StandinNetns) -> subprocess.Popen[str]:
    """A child process that entered ``netns`` and then waits (its pid is on stdout)."""
    code = (
        "import sys, os\n"
        "from sandbox.runtime import standin_netns\n"
        f"standin_netns.enter(standin_netns.from_options({netns.argv()[1]!r}, "
        f"{netns.argv()[2]!r}))\n"
        "print(os.getpid(), flush=True)\n"
        "sys.stdin.read()\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )


def _owner_uid_map(pid: int) -> str:
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    owner = fcntl.ioctl(fd, NS_GET_USERNS)
    os.close(fd)
    try:
        done = subprocess.run(
            ["nsenter", f"--user=/proc/{os.getpid()}/fd/{owner}", "cat", "/proc/self/uid_map"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    finally:
        os.close(owner)
    return " ".join(done.stdout.split())


@pytest.mark.parametrize("mapped", [True, False])
def test_enter_moves_into_a_new_empty_namespace(mapped: bool) -> None:
    netns = (
        standin_netns.StandinNetns("0 100000 65536\n", "0 100000 65536\n")
        if mapped
        else standin_netns.StandinNetns()
    )
    child = _enter_in_child(netns)
    try:
        assert child.stdout is not None
        pid = int(child.stdout.readline())
        assert standin_netns.identity(f"/proc/{pid}/ns/net") != standin_netns.identity(
            "/proc/self/ns/net"
        )
        links = subprocess.run(
            ["nsenter", f"--net=/proc/{pid}/ns/net", "ip", "-o", "link"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]
        # The process itself stays in the host's user namespace (it must reach our state).
        assert os.stat(f"/proc/{pid}/ns/user").st_ino == os.stat("/proc/self/ns/user").st_ino
        if mapped:
            assert _owner_uid_map(pid) == "0 100000 65536"
    finally:
        child.communicate("", timeout=30)
    assert child.returncode == 0


def _bundle(tmp_path: Path, name: str) -> Path:
    directory = bundle(tmp_path, name)  # network namespace without a path
    return directory


def _in(pid: int, *argv: str) -> None:
    subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", *argv], check=True, timeout=30)


@pytest.mark.parametrize("userns", [False, True], ids=["root-netns", "container-netns"])
def test_a_network_added_after_create_reaches_the_vm_at_start(
    fake: FakeDrivers, root: Path, tmp_path: Path, request: pytest.FixtureRequest, userns: bool
) -> None:
    """Configured in the guest's root namespace, or with a user namespace in the
    container's own (owned by its user namespace, as runc's)."""
    directory = _bundle(tmp_path, "c1")
    if userns:
        spec = json.loads((directory / "config.json").read_text())
        spec["linux"]["namespaces"].append({"type": "user"})
        spec["linux"]["uidMappings"] = spec["linux"]["gidMappings"] = MAPPING
        (directory / "config.json").write_text(json.dumps(spec))
    record = create(root, "c1", directory)
    assert record.data["network_after_create"] is True
    assert record.data["network_in_container"] is userns
    guest_spec = json.loads(fake.vms[0].guest.specs["c1"])
    joins = {"type": "network", "path": "/proc/1/ns/net"}
    assert (joins in guest_spec["linux"]["namespaces"]) is not userns
    shim = fake.shims["c1"]
    host = standin_netns.identity("/proc/self/ns/net")
    assert standin_netns.identity(f"/proc/{shim.handle.pid}/ns/net") != host
    # What CNI does in the --pid-file process's namespace: a veth (its peer elsewhere).
    pid = shim.handle.pid
    peer = subprocess.Popen(["unshare", "--net", "--", "sleep", "120"])
    request.addfinalizer(peer.kill)
    assert wait_until(lambda: standin_netns.identity(f"/proc/{peer.pid}/ns/net") != host, 10)
    _in(pid, "ip", "link", "add", "eth0", "address", "02:00:00:00:00:2a", "type", "veth")
    _in(pid, "ip", "link", "set", "veth0", "netns", str(peer.pid))
    _in(pid, "ip", "addr", "add", "10.77.0.5/24", "dev", "eth0")
    _in(pid, "ip", "link", "set", "eth0", "up")
    _in(pid, "ip", "route", "add", "default", "via", "10.77.0.1")
    created = len(fake.events)
    start(root, "c1")
    assert since(fake, created, "qemu", "agent") == [
        *([("agent", "Version")] if userns else []),  # protocol 1.6 checked first
        ("qemu", "hotplug_nic", 0),
        ("agent", "ConfigureNetwork"),
        ("agent", "StartContainer"),
    ]
    [told] = fake.networks
    assert told.container_id == ("c1" if userns else "")
    assert [(i.name, i.mac, list(i.addresses)) for i in told.interfaces] == [
        ("eth0", "02:00:00:00:00:2a", ["10.77.0.5/24"])
    ]
    assert [(r.destination, r.gateway) for r in told.routes] == [("0.0.0.0/0", "10.77.0.1")]
    network = Pod.load(root, "c1").record.network
    assert network is not None and network["netns"] == f"/proc/{pid}/ns/net"
    assert network["after_create"] is True
    # The guest spec joins the pod network (the guest's root namespace).
    assert ContainerRecord.load(root, "c1").oci_state()["status"] == "running"
    shim.kill()
    delete(root, "c1")
    assert Pod.list(root) == [] and fake.alive() == []


def test_an_empty_namespace_at_start_changes_nothing(
    fake: FakeDrivers, root: Path, tmp_path: Path
) -> None:
    create(root, "c1", _bundle(tmp_path, "c1"))
    created = len(fake.events)
    start(root, "c1")
    assert since(fake, created, "qemu", "agent") == [("agent", "StartContainer")]
    assert Pod.load(root, "c1").record.network is None
    fake.shims["c1"].kill()
    delete(root, "c1")


def test_a_stand_in_in_the_hosts_namespace_is_never_configured(
    fake: FakeDrivers, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Were the stand-in in the host's network namespace, start refuses to carry it."""
    monkeypatch.setattr(standin_netns, "for_spec", lambda _spec: None)
    create(root, "c1", _bundle(tmp_path, "c1"))
    created = len(fake.events)
    with pytest.raises(ConfigError, match="is the host's network namespace"):
        start(root, "c1")
    assert since(fake, created, "qemu", "agent") == []
    assert Pod.load(root, "c1").record.network is None
    fake.shims["c1"].kill()
    delete(root, "c1", force=True)


def test_the_guest_spec_of_the_pod_owner_joins_the_pod_network(
    fake: FakeDrivers, root: Path, tmp_path: Path
) -> None:
    create(root, "c1", _bundle(tmp_path, "c1"))
    guest = json.loads(fake.vms[0].guest.specs["c1"])
    assert {"type": "network", "path": "/proc/1/ns/net"} in guest["linux"]["namespaces"]
    fake.shims["c1"].kill()
    delete(root, "c1")


def test_an_agent_too_old_for_a_containers_network_is_a_clear_error(
    fake: FakeDrivers,
    root: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An agent before protocol 1.6 would ignore ``container_id`` and configure the root
    namespace, leaving the container without its network: refused instead."""
    from sandbox.errors import AgentError
    from tests.unit import fake_drivers

    directory = _bundle(tmp_path, "c1")
    spec = json.loads((directory / "config.json").read_text())
    spec["linux"]["namespaces"].append({"type": "user"})
    spec["linux"]["uidMappings"] = spec["linux"]["gidMappings"] = MAPPING
    (directory / "config.json").write_text(json.dumps(spec))
    create(root, "c1", directory)
    pid = fake.shims["c1"].handle.pid
    peer = subprocess.Popen(["unshare", "--net", "--", "sleep", "120"])
    request.addfinalizer(peer.kill)
    host = standin_netns.identity("/proc/self/ns/net")
    assert wait_until(lambda: standin_netns.identity(f"/proc/{peer.pid}/ns/net") != host, 10)
    _in(pid, "ip", "link", "add", "eth0", "type", "veth")
    _in(pid, "ip", "link", "set", "veth0", "netns", str(peer.pid))
    monkeypatch.setattr(fake_drivers, "PROTOCOL_VERSION", "1.5")
    created = len(fake.events)
    with pytest.raises(
        AgentError, match=r"protocol 1\.5, a container's own pod network needs 1\.6"
    ):
        start(root, "c1")
    assert since(fake, created, "qemu", "agent") == [("agent", "Version")]
    assert fake.networks == [] and Pod.load(root, "c1").record.network is None
    fake.shims["c1"].kill()
    delete(root, "c1", force=True)
    assert Pod.list(root) == [] and fake.alive() == []
