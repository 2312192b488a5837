"""Pod networking without a VM: spec handling on the host, namespace checks, the agent's
validation and the commands it runs (a fake runner, a fake /sys/class/net), and
ConfigureNetwork end to end over gRPC."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent import network as guest
from agent.server import AgentService, make_server
from sandbox.errors import AgentError, ConfigError
from sandbox.pod import network
from sandbox.pod.agent_client import ContainerClient
from sandbox.pod.sharing import GUEST_POD_NETNS, _rewrite_namespaces

MAC_A, MAC_B = "be:5f:58:e1:19:a1", "02:00:00:00:00:02"


# -- host side ---------------------------------------------------------------------------------


def spec_with(*namespaces: dict[str, str]) -> dict[str, Any]:
    return {"linux": {"namespaces": list(namespaces)}}


def test_network_path_joins_the_guest_pod_network_and_no_path_stays_private() -> None:
    spec = spec_with(
        {"type": "network", "path": "/proc/4242/ns/net"}, {"type": "uts"}, {"type": "mount"}
    )
    _rewrite_namespaces(spec, lambda _path: None)
    assert spec["linux"]["namespaces"][0] == {"type": "network", "path": GUEST_POD_NETNS}
    private = spec_with({"type": "network"})
    _rewrite_namespaces(private, lambda _path: None)
    assert private["linux"]["namespaces"] == [{"type": "network"}]


def test_user_network_config_is_qemus_slirp_defaults() -> None:
    config = network.user_network_config("box")
    assert config.interfaces == (
        network.Interface("eth0", "52:54:00:12:34:56", 1500, ("10.0.2.15/24",)),
    )
    assert config.routes == (network.Route("0.0.0.0/0", "10.0.2.2", "eth0"),)
    assert config.dns_servers == ("10.0.2.3",)
    assert config.hostname == "box"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/nonexistent/netns", "network namespace /nonexistent/netns does not exist"),
        ("/etc/hostname", "/etc/hostname is not a network namespace"),
        ("/proc/self/ns/mnt", "is a namespace, but not a network namespace"),
        ("/proc/self/ns/net", "is the host's network namespace"),
    ],
)
def test_bad_netns_paths(path: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        network.check_netns(Path(path))


def test_detach_ignores_records_without_a_live_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    entered: list[int] = []

    def spy(nsfd: int, work: object) -> list[str]:  # what would run in the namespace
        entered.append(nsfd)
        return []

    monkeypatch.setattr(network, "in_netns", spy)
    network.detach(None)
    network.detach({"mode": "user"})
    network.detach({"mode": "netns", "netns": "/nonexistent", "links": [{"device": "eth0"}]})
    # The host's netns is refused by open_netns, hence never touched by detach.
    network.detach(
        {"mode": "netns", "netns": "/proc/self/ns/net", "identity": "x", "links": [{"tap": "t"}]}
    )
    assert entered == []

    # A path that names another namespace now (not the recorded identity) is left alone; the
    # recorded one is entered.
    monkeypatch.setattr(network, "open_netns", lambda _path: os.open("/dev/null", os.O_RDONLY))
    record = {"mode": "netns", "netns": "/run/netns/x", "identity": "0:0", "links": [{"tap": "t"}]}
    network.detach(record)
    assert entered == []
    with open("/dev/null", "rb") as null:
        record["identity"] = network.identity(null.fileno())
    network.detach(record)
    assert len(entered) == 1


# -- guest side --------------------------------------------------------------------------------


class FakeRunner:
    def __init__(self, fail: dict[str, tuple[int, str]] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail or {}

    def __call__(self, argv: Sequence[str]) -> tuple[int, str]:
        assert argv[:2] == [guest.BUSYBOX, "ip"]
        self.calls.append(list(argv[2:]))
        return self.fail.get(" ".join(argv[2:]), (0, ""))


@pytest.fixture
def sysnet(tmp_path: Path) -> Path:
    base = tmp_path / "sys-class-net"
    for name, mac in (("lo", "00:00:00:00:00:00"), ("eth0", MAC_B), ("eth1", MAC_A)):
        (base / name).mkdir(parents=True)
        (base / name / "address").write_text(f"{mac}\n")
    return base


def manager(
    tmp_path: Path, sysnet: Path, runner: FakeRunner, hostnames: list[str] | None = None
) -> guest.NetworkManager:
    return guest.NetworkManager(
        runner=runner,
        sys_class_net=str(sysnet),
        network_dir=str(tmp_path / "netfiles"),
        nic_wait=0.2,
        sethostname=(hostnames if hostnames is not None else []).append,
    )


def test_configure_finds_nics_by_mac_swaps_names_and_orders_routes(
    tmp_path: Path, sysnet: Path
) -> None:
    runner, hostnames = FakeRunner(), []
    settings = guest.Settings(
        interfaces=(
            guest.Interface("eth0", MAC_A, 1400, ("10.251.0.2/24", "fd00::2/64")),
            guest.Interface("eth1", MAC_B, 0, ()),
        ),
        routes=(
            guest.Route("0.0.0.0/0", "10.251.0.1", "eth0"),
            guest.Route("10.99.0.0/16", "", "eth0", 7),
            guest.Route("::/0", "fd00::1", ""),
        ),
        dns_servers=("10.251.0.1",),
        dns_search=("pod.test",),
        dns_options=("ndots:5",),
        hosts=(("10.251.0.2", ("mypod",)),),
        hostname="mypod",
    )
    outcome = manager(tmp_path, sysnet, runner, hostnames).configure(settings)
    assert runner.calls == [
        ["link", "set", "dev", "lo", "up"],
        ["link", "set", "dev", "eth1", "down"],
        ["link", "set", "dev", "eth1", "name", "psbtmp0"],
        ["link", "set", "dev", "eth0", "down"],
        ["link", "set", "dev", "eth0", "name", "psbtmp1"],
        ["link", "set", "dev", "psbtmp0", "name", "eth0"],
        ["link", "set", "dev", "psbtmp1", "name", "eth1"],
        ["link", "set", "dev", "eth0", "mtu", "1400"],
        ["addr", "add", "10.251.0.2/24", "dev", "eth0"],
        ["addr", "add", "fd00::2/64", "dev", "eth0"],
        ["link", "set", "dev", "eth0", "up"],
        ["link", "set", "dev", "eth1", "up"],
        ["-4", "route", "replace", "10.99.0.0/16", "dev", "eth0", "metric", "7"],
        ["-4", "route", "replace", "0.0.0.0/0", "via", "10.251.0.1", "dev", "eth0"],
        ["-6", "route", "replace", "::/0", "via", "fd00::1"],
    ]
    assert outcome.interfaces == ["eth0", "eth1"]
    assert Path(outcome.resolv_conf).read_text() == (
        "nameserver 10.251.0.1\nsearch pod.test\noptions ndots:5\n"
    )
    hosts = Path(outcome.hosts).read_text()
    assert "127.0.0.1\tlocalhost\n" in hosts and "10.251.0.2\tmypod\n" in hosts
    assert hostnames == ["mypod"]


def test_configure_in_a_containers_namespace_moves_the_nics_there_first(
    tmp_path: Path, sysnet: Path
) -> None:
    """With a container's process: each NIC comes up in the root namespace (where sysfs
    shows its operational state), moves into the container's namespace, and every later
    command runs in a thread that joined that namespace."""
    runner, entered = FakeRunner(), []

    def enter(path: str, work: Callable[[], None]) -> None:
        entered.append((path, len(runner.calls)))
        work()

    settings = guest.Settings(
        interfaces=(guest.Interface("eth0", MAC_A, 1500, ("10.88.0.9/16",)),),
        routes=(guest.Route("0.0.0.0/0", "10.88.0.1", "eth0"),),
    )
    nm = guest.NetworkManager(
        runner=runner,
        sys_class_net=str(sysnet),
        network_dir=str(tmp_path / "netfiles"),
        nic_wait=0.2,
        enter_netns=enter,
    )
    outcome = nm.configure(settings, netns_pid=4242)
    assert runner.calls == [
        ["link", "set", "dev", "lo", "up"],
        ["link", "set", "dev", "eth1", "up"],
        ["link", "set", "dev", "eth1", "netns", "4242"],
        # in the container's namespace:
        ["link", "set", "dev", "eth1", "down"],
        ["link", "set", "dev", "eth1", "name", "psbtmp0"],
        ["link", "set", "dev", "psbtmp0", "name", "eth0"],
        ["link", "set", "dev", "eth0", "mtu", "1500"],
        ["addr", "add", "10.88.0.9/16", "dev", "eth0"],
        ["link", "set", "dev", "eth0", "up"],
        ["-4", "route", "replace", "0.0.0.0/0", "via", "10.88.0.1", "dev", "eth0"],
    ]
    assert entered == [("/proc/4242/ns/net", 3)]
    assert outcome.interfaces == ["eth0"]


def test_configure_without_dns_writes_no_files(tmp_path: Path, sysnet: Path) -> None:
    settings = guest.Settings(interfaces=(guest.Interface("eth0", MAC_B, 0, ("10.0.0.2/8",)),))
    outcome = manager(tmp_path, sysnet, FakeRunner()).configure(settings)
    assert (outcome.resolv_conf, outcome.hosts) == ("", "")
    assert not (tmp_path / "netfiles").exists()


def test_existing_address_is_tolerated_other_failures_are_reported(
    tmp_path: Path, sysnet: Path
) -> None:
    settings = guest.Settings(interfaces=(guest.Interface("eth0", MAC_B, 0, ("10.0.0.2/8",)),))
    exists = FakeRunner({"addr add 10.0.0.2/8 dev eth0": (2, "ip: RTNETLINK answers: File exists")})
    manager(tmp_path, sysnet, exists).configure(settings)
    broken = FakeRunner({"link set dev eth0 up": (1, "ip: SIOCSIFFLAGS: No such device\n")})
    with pytest.raises(guest.NetworkError, match=r"ip link set dev eth0 up: .*No such device"):
        manager(tmp_path, sysnet, broken).configure(settings)


def test_missing_mac_is_a_precondition_failure(tmp_path: Path, sysnet: Path) -> None:
    settings = guest.Settings(interfaces=(guest.Interface("eth0", "02:00:00:00:00:99"),))
    with pytest.raises(guest.NetworkError, match="no guest NIC with mac 02:00:00:00:00:99") as err:
        manager(tmp_path, sysnet, FakeRunner()).configure(settings)
    assert err.value.code == "FAILED_PRECONDITION"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (guest.Settings(interfaces=(guest.Interface("eth0; reboot", MAC_A),)), "interface name"),
        (guest.Settings(interfaces=(guest.Interface("lo", MAC_A),)), "interface name"),
        (guest.Settings(interfaces=(guest.Interface("eth0", "nope"),)), "invalid mac"),
        (guest.Settings(interfaces=(guest.Interface("eth0", MAC_A, 9),)), "outside 68..65535"),
        (
            guest.Settings(interfaces=(guest.Interface("eth0", MAC_A, 0, ("10.0.0.2",)),)),
            "needs a prefix length",
        ),
        (
            guest.Settings(
                interfaces=(guest.Interface("eth0", MAC_A), guest.Interface("eth1", MAC_A))
            ),
            "given twice",
        ),
        (guest.Settings(routes=(guest.Route("10.0.0.1/8", "", "x"),)), "not in CIDR"),
        (guest.Settings(routes=(guest.Route("10.0.0.0/8", "fd00::1"),)), "mixes families"),
        (guest.Settings(routes=(guest.Route("10.0.0.0/8", "", "eth9"),)), "unknown device"),
        (guest.Settings(routes=(guest.Route("10.0.0.0/8"),)), "needs a gateway or a device"),
        (guest.Settings(dns_servers=("dns.example",)), "not an IP address"),
        (guest.Settings(dns_search=("a b",)), "invalid dns search"),
        (guest.Settings(hosts=(("10.0.0.1", ("x\ny",)),)), "invalid host name"),
        (guest.Settings(hostname="-x y"), "invalid hostname"),
        (
            guest.Settings(
                interfaces=tuple(
                    guest.Interface(f"e{i}", f"02:00:00:00:00:{i:02x}") for i in range(17)
                )
            ),
            "more than 16 interfaces",
        ),
    ],
)
def test_validation(settings: guest.Settings, message: str) -> None:
    with pytest.raises(guest.NetworkError, match=message) as err:
        guest.validate(settings)
    assert err.value.code == "INVALID_ARGUMENT"


# -- over gRPC ---------------------------------------------------------------------------------


@pytest.fixture
def agent(tmp_path: Path, sysnet: Path) -> Iterator[tuple[ContainerClient, FakeRunner]]:
    runner = FakeRunner()
    service = AgentService(transport="unix", network=manager(tmp_path, sysnet, runner))
    server = make_server(service)
    server.add_insecure_port(f"unix:{tmp_path / 'agent.sock'}")
    server.start()
    with ContainerClient(f"unix:{tmp_path / 'agent.sock'}", timeout=10.0) as client:
        yield client, runner
    server.stop(0)


def test_configure_network_rpc(agent: tuple[ContainerClient, FakeRunner], tmp_path: Path) -> None:
    client, runner = agent
    config = network.NetworkConfig(
        interfaces=(network.Interface("eth0", MAC_B, 1500, ("10.0.2.15/24",)),),
        routes=(network.Route("0.0.0.0/0", "10.0.2.2", "eth0"),),
        dns_servers=("10.0.2.3",),
        hostname="box",
    )
    # A real guest writes below /run/pysandbox-network; this one writes to tmp_path, which
    # the host client refuses as a path outside that directory.
    with pytest.raises(AgentError, match="outside /run/pysandbox-network"):
        client.configure_network(config)
    assert ["addr", "add", "10.0.2.15/24", "dev", "eth0"] in runner.calls
    assert ["-4", "route", "replace", "0.0.0.0/0", "via", "10.0.2.2", "dev", "eth0"] in (
        runner.calls
    )
    files = client.configure_network(network.NetworkConfig())
    assert (files.resolv_conf, files.hosts) == ("", "")
    bad = network.NetworkConfig(interfaces=(network.Interface("eth0", "zz", 1500),))
    with pytest.raises(AgentError, match="invalid mac"):
        client.configure_network(bad)
    assert os.path.exists(tmp_path / "netfiles" / "resolv.conf")


def test_agent_without_network_support_says_so(tmp_path: Path) -> None:
    server = make_server(AgentService(transport="unix"))
    server.add_insecure_port(f"unix:{tmp_path / 'a.sock'}")
    server.start()
    try:
        with (
            ContainerClient(f"unix:{tmp_path / 'a.sock'}", timeout=10.0) as client,
            pytest.raises(AgentError, match="configures no network"),
        ):
            client.configure_network(network.NetworkConfig())
    finally:
        server.stop(0)
