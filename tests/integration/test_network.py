"""Pod networking: the pod's network namespace reaches the guest (tap + tc redirect), and
``pysandbox run --network user`` gives outbound NAT through QEMU user networking.

Every namespace, veth and bridge is created here (tests/integration/netns_topology.py) and
removed afterwards; containers only talk to addresses inside those namespaces, or to the
host's loopback through the user-networking gateway.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.errors import ConfigError
from sandbox.image import store as images
from sandbox.pod import network
from sandbox.pod.lifecycle import Pod
from tests.integration.cli import pysandbox
from tests.integration.helpers import Result, busybox_spec, run_container
from tests.integration.netns_topology import Topology, finish, topology
from tests.integration.pods import PodFactory
from tests.processes import wait_until

ROOT = Path(__file__).resolve().parents[2]
POD_ADDR, PEER_ADDR = "10.251.0.2", "10.251.0.1"


def in_pod_network(spec: dict[str, Any], netns: Path) -> dict[str, Any]:
    """``spec`` with its network namespace set to ``netns`` (as CRI/podman pass the pod's)."""
    for ns in spec["linux"]["namespaces"]:
        if ns["type"] == "network":
            ns["path"] = str(netns)
    return spec


def pod_sh(pod: Pod, netns: Path, script: str, **kwargs: Any) -> Result:
    return run_container(pod, in_pod_network(busybox_spec("sh", "-c", script), netns), **kwargs)


@pytest.fixture(scope="module")
def peer_net() -> Iterator[Topology]:
    """pod netns (eth0 10.251.0.2/24, mtu 1400, default via the peer, one extra route) and
    a peer netns holding the other end of the veth (10.251.0.1/24)."""
    with topology() as topo:
        pod_ns, peer_ns = topo.netns("pod"), topo.netns("peer")
        topo.veth(
            pod_ns,
            "eth0",
            peer_ns,
            "peer0",
            addr_a=f"{POD_ADDR}/24",
            addr_b=f"{PEER_ADDR}/24",
            mtu=1400,
        )
        topo.route(pod_ns, "default", "via", PEER_ADDR)
        topo.route(pod_ns, "10.99.0.0/16", "via", PEER_ADDR, "metric", "7")
        yield topo


@pytest.fixture(scope="module")
def net_pod(peer_net: Topology, module_pods: PodFactory) -> Iterator[Pod]:
    """A pod in the pod netns of :func:`peer_net`, destroyed before the namespaces go."""
    pod = module_pods("net-peer-pod", netns=peer_net.path(peer_net.namespaces[0]))
    yield pod
    pod.destroy()


def test_guest_gets_the_pod_interface(net_pod: Pod, peer_net: Topology) -> None:
    netns = peer_net.path(peer_net.namespaces[0])
    mac = _mac(peer_net.namespaces[0], "eth0")
    result = pod_sh(net_pod, netns, "ip -o link; ip -o addr; ip route")
    assert result.status == 0, result.stderr
    out = result.out
    assert "eth0: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1400" in out
    assert mac in out
    assert f"inet {POD_ADDR}/24" in out
    assert f"default via {PEER_ADDR} dev eth0" in out
    assert f"10.99.0.0/16 via {PEER_ADDR} dev eth0  metric 7" in out


def test_ping_and_tcp_both_ways(net_pod: Pod, peer_net: Topology) -> None:
    pod_ns, peer_ns = peer_net.namespaces
    netns = peer_net.path(pod_ns)
    ping = pod_sh(net_pod, netns, f"ping -c 3 -W 5 {PEER_ADDR}")
    assert ping.status == 0, ping.out + ping.stderr.decode()
    assert "3 packets received" in ping.out

    # container -> peer
    server = peer_net.server(peer_ns, PEER_ADDR, 5001)
    try:
        sent = pod_sh(net_pod, netns, f"echo hello from the pod | nc -w 10 {PEER_ADDR} 5001")
    finally:
        status, _out, err = finish(server)
    assert status == 0, err
    assert sent.status == 0, sent.stderr
    assert "HELLO FROM THE POD" in sent.out

    # peer -> container (the container echoes through `nc -l -e cat`)
    results: list[Result] = []
    listener = threading.Thread(
        target=lambda: results.append(pod_sh(net_pod, netns, "nc -l -p 5002 -e cat"))
    )
    listener.start()
    try:
        reply = peer_net.client(peer_ns, POD_ADDR, 5002, "hello from the peer\n", limit=90)
    finally:
        listener.join(120)
    assert reply.returncode == 0, reply.stderr
    assert reply.stdout == "hello from the peer\n"
    assert results and results[0].status == 0

    # the peer pings the guest, too
    back = peer_net.run(peer_ns, "busybox", "ping", "-c", "2", "-W", "5", POD_ADDR)
    assert back.returncode == 0, back.stdout + back.stderr


def test_container_without_netns_path_has_only_loopback(net_pod: Pod) -> None:
    spec = busybox_spec(
        "sh", "-c", f"ip -o link; ip -o addr; ping -c 1 -W 2 127.0.0.1; ping -c 1 -W 2 {PEER_ADDR}"
    )
    assert {"type": "network"} in spec["linux"]["namespaces"]  # a new one, no path
    result = run_container(net_pod, spec)
    links = [line for line in result.out.splitlines() if ": <" in line]
    assert len(links) == 1 and links[0].startswith("1: lo: <LOOPBACK,UP,LOWER_UP>"), result.out
    assert "1 packets received" in result.out  # loopback works
    assert POD_ADDR not in result.out
    assert result.status != 0  # the ping to the peer found no route


def test_resolv_conf_and_hosts_bind_mounts_reach_the_guest(
    net_pod: Pod, peer_net: Topology, tmp_path: Path
) -> None:
    """CRI and podman give DNS as bind mounts of host files: they travel over virtio-fs."""
    (tmp_path / "resolv.conf").write_text(f"nameserver {PEER_ADDR}\nsearch pod.test\n")
    (tmp_path / "hosts").write_text(f"127.0.0.1 localhost\n{POD_ADDR} mypod\n")
    spec = in_pod_network(
        busybox_spec("cat", "/etc/resolv.conf", "/etc/hosts"), peer_net.path(peer_net.namespaces[0])
    )
    for name in ("resolv.conf", "hosts"):
        spec["mounts"].append(
            {
                "destination": f"/etc/{name}",
                "type": "bind",
                "source": str(tmp_path / name),
                "options": ["rbind", "ro"],
            }
        )
    result = run_container(net_pod, spec)
    assert result.status == 0, result.stderr
    assert f"nameserver {PEER_ADDR}" in result.out and f"{POD_ADDR} mypod" in result.out


def test_two_pods_on_one_bridge(pod_factory: PodFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # One pod restored from a template (its card hot-plugged), one booted cold (its card on
    # QEMU's command line): both ways a tap reaches the guest carry traffic.
    with topology() as topo:
        switch = topo.netns("switch")
        addrs = {"a": "10.252.0.11", "b": "10.252.0.12"}
        pods_ns = {}
        for name, addr in addrs.items():
            ns = topo.netns(f"pod{name}")
            topo.veth(ns, "eth0", switch, f"port{name}", addr_a=f"{addr}/24")
            pods_ns[name] = ns
        topo.bridge(switch, "br0", "porta", "portb")
        monkeypatch.setenv("PYSANDBOX_TEMPLATES", "1")
        pod_a = pod_factory("net-bridge-a", netns=topo.path(pods_ns["a"]))
        try:
            assert pod_a.record.boot == "restored"
            monkeypatch.setenv("PYSANDBOX_TEMPLATES", "0")
            pod_b = pod_factory("net-bridge-b", netns=topo.path(pods_ns["b"]))
            try:
                assert pod_b.record.boot == "cold"
                results: list[Result] = []
                server = threading.Thread(
                    target=lambda: results.append(
                        pod_sh(pod_a, topo.path(pods_ns["a"]), "nc -l -p 6000 -e cat")
                    )
                )
                server.start()
                try:
                    client = pod_sh(
                        pod_b,
                        topo.path(pods_ns["b"]),
                        f"ping -c 2 -W 5 {addrs['a']} && for i in $(seq 1 60); do "
                        f"echo across the bridge | nc -w 5 {addrs['a']} 6000 && exit 0; "
                        "sleep 1; done; exit 1",
                    )
                finally:
                    server.join(180)
                assert client.status == 0, client.out + client.stderr.decode()
                assert "2 packets received" in client.out
                assert "across the bridge" in client.out
                assert results and results[0].status == 0
            finally:
                pod_b.destroy()
        finally:
            pod_a.destroy()
        for ns in pods_ns.values():
            assert network.leftovers(topo.path(ns)) == []


# -- errors and cleanup ------------------------------------------------------------------------


def create(root: Path, bundle: Path, cid: str, logs: Path) -> subprocess.CompletedProcess[str]:
    """``pysandbox create``; the container's stdio (inherited by its shim) goes to files
    ``<logs>/<cid>.out`` and ``.err``, so waiting for create never waits for the container."""
    with (logs / f"{cid}.out").open("w") as out, (logs / f"{cid}.err").open("w+") as err:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "sandbox",
                "--root",
                str(root),
                "create",
                "--bundle",
                str(bundle),
                cid,
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            text=True,
            timeout=300,
            cwd=ROOT,
        )
        err.seek(0)
        done.stderr = err.read()
    return done


def bundle(base: Path, name: str, spec: dict[str, Any]) -> Path:
    path = base / name
    path.mkdir()
    spec["root"] = {"path": str(images.ensure_default_image()), "readonly": True}
    (path / "config.json").write_text(json.dumps(spec))
    return path


@pytest.fixture
def cli_root(pod_factory: PodFactory) -> Path:
    """An empty --root of this test's (its pods' logs kept if the test fails)."""
    return pod_factory.new_root("psn")


def _left_in(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name not in ("p", "logs", "locks")) + (
        sorted(p.name for p in (root / "p").iterdir()) if (root / "p").is_dir() else []
    )


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (
            "/run/netns/psb-no-such-netns",
            "network namespace /run/netns/psb-no-such-netns does not exist",
        ),
        ("/etc/hostname", "/etc/hostname is not a network namespace"),
        ("/proc/self/ns/mnt", "/proc/self/ns/mnt is a namespace, but not a network namespace"),
        ("/proc/self/ns/net", "/proc/self/ns/net is the host's network namespace"),
    ],
)
def test_bad_netns_path_is_a_precise_error_at_create(
    cli_root: Path, pod_factory: PodFactory, tmp_path: Path, path: str, message: str
) -> None:
    spec = in_pod_network(busybox_spec("true"), Path(path))
    done = create(cli_root, bundle(tmp_path, "b", spec), "badnet", tmp_path)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr
    assert _left_in(cli_root) == []
    with pytest.raises(ConfigError, match="not exist"):
        pod_factory("badnet2", root=cli_root, netns=Path("/run/netns/psb-no-such-netns"))
    assert _left_in(cli_root) == []


def _wait_stopped(root: Path, cid: str, limit: float = 120) -> None:
    def stopped() -> bool:
        done = pysandbox(root, "state", cid)
        return done.returncode == 0 and json.loads(done.stdout)["status"] == "stopped"

    assert wait_until(stopped, limit, interval=0.5), f"container {cid} still running after {limit}s"


def test_cri_pod_through_the_cli_and_nothing_left_after_delete(
    cli_root: Path, tmp_path: Path
) -> None:
    """A CRI-shaped pod: the sandbox container names the pod netns, an app container joins
    with /proc/<sandbox pid>/ns/net; both reach the peer; delete removes tap, qdisc, filter."""
    with topology() as topo:
        pod_ns, peer_ns = topo.netns("cripod"), topo.netns("cripeer")
        topo.veth(
            pod_ns, "eth0", peer_ns, "peer0", addr_a=f"{POD_ADDR}/24", addr_b=f"{PEER_ADDR}/24"
        )
        netns = topo.path(pod_ns)
        sandbox_spec = in_pod_network(busybox_spec("sleep", "600"), netns)
        sandbox_spec["annotations"] = {
            "io.kubernetes.cri.container-type": "sandbox",
            "io.kubernetes.cri.sandbox-id": "crisb",
        }
        created = create(cli_root, bundle(tmp_path, "sb", sandbox_spec), "crisb", tmp_path)
        assert created.returncode == 0, created.stderr
        try:
            assert pysandbox(cli_root, "start", "crisb").returncode == 0
            left = network.leftovers(netns)
            assert "tap tap0_psb" in left and "ingress qdisc on eth0" in left
            assert "filter on eth0" in left
            assert "port-forward rule" in left  # kubectl port-forward (sandbox/pod/portforward.py)
            shim_pid = json.loads(pysandbox(cli_root, "state", "crisb").stdout)["pid"]
            app_spec = in_pod_network(
                busybox_spec("sh", "-c", f"ip -o addr show eth0; ping -c 2 -W 5 {PEER_ADDR}"),
                Path(f"/proc/{shim_pid}/ns/net"),
            )
            app_spec["annotations"] = {
                "io.kubernetes.cri.container-type": "container",
                "io.kubernetes.cri.sandbox-id": "crisb",
            }
            created = create(cli_root, bundle(tmp_path, "app", app_spec), "app", tmp_path)
            assert created.returncode == 0, created.stderr
            assert pysandbox(cli_root, "start", "app").returncode == 0
            _wait_stopped(cli_root, "app")
            text = (tmp_path / "app.out").read_text()
            assert f"inet {POD_ADDR}/24" in text and "2 packets received" in text, text
            assert pysandbox(cli_root, "delete", "app").returncode == 0
        finally:
            deleted = pysandbox(cli_root, "delete", "--force", "crisb")
        assert deleted.returncode == 0, deleted.stderr
        assert network.leftovers(netns) == []
        assert _left_in(cli_root) == []
        # The namespace works on its own again: nothing redirects eth0 any more.
        assert topo.run(pod_ns, "busybox", "ping", "-c", "1", "-W", "5", PEER_ADDR).returncode == 0


def test_crash_then_destroy_leaves_nothing(pod_factory: PodFactory) -> None:
    with topology() as topo:
        pod_ns, peer_ns = topo.netns("crash"), topo.netns("crashpeer")
        topo.veth(
            pod_ns, "eth0", peer_ns, "peer0", addr_a=f"{POD_ADDR}/24", addr_b=f"{PEER_ADDR}/24"
        )
        netns = topo.path(pod_ns)
        pod = pod_factory("net-crash", netns=netns)
        try:
            qemu = pod.process("qemu")
            assert qemu is not None
            os.kill(qemu.pid, signal.SIGKILL)
            assert qemu.wait(10)
            # QEMU held the only fd of the tap: the tap is gone, the redirect on eth0 and the
            # port-forward rule are not.
            wait_until(lambda: "tap tap0_psb" not in network.leftovers(netns), 10)
            assert network.leftovers(netns) == [
                "port-forward rule",
                "ingress qdisc on eth0",
                "filter on eth0",
            ]
            Pod.load(pod.root, "net-crash").destroy()
            assert network.leftovers(netns) == []
        finally:
            pod.destroy()  # idempotent
        assert not pod.dir.exists()
        assert topo.run(pod_ns, "busybox", "ping", "-c", "1", "-W", "5", PEER_ADDR).returncode == 0


# -- pysandbox run --network ---------------------------------------------------------------------


def test_run_network_user_configures_nat_and_reaches_host_loopback(cli_root: Path) -> None:
    """--network user: 10.0.2.15/24, default via 10.0.2.2, DNS 10.0.2.3 in resolv.conf; the
    gateway forwards to the host's loopback (a listener on 127.0.0.1 here)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(240)
    port = listener.getsockname()[1]
    got: list[bytes] = []

    def serve() -> None:
        try:
            conn, _addr = listener.accept()
            conn.settimeout(30)
            got.append(conn.recv(100))
            conn.sendall(b"pong from the host\n")
            conn.close()
        except OSError:
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        done = pysandbox(
            cli_root,
            "run",
            "--network",
            "user",
            "--name",
            "netuser",
            "default",
            "sh",
            "-c",
            "ip -o addr show eth0; ip route; cat /etc/resolv.conf /etc/hosts; "
            f"echo ping | nc -w 10 10.0.2.2 {port}",
        )
    finally:
        thread.join(10)
        listener.close()
    assert done.returncode == 0, done.stderr
    assert "inet 10.0.2.15/24" in done.stdout
    assert "default via 10.0.2.2 dev eth0" in done.stdout
    assert "nameserver 10.0.2.3" in done.stdout
    assert "netuser" in done.stdout  # hosts file names the container
    assert "pong from the host" in done.stdout
    assert got == [b"ping\n"]
    # The VM goes after the exit status (docs/performance.md): within 30 s nothing is left.
    assert wait_until(lambda: _left_in(cli_root) == [], 30), _left_in(cli_root)


def test_run_default_network_is_loopback_only(cli_root: Path) -> None:
    done = pysandbox(cli_root, "run", "default", "sh", "-c", "ip -o link; ping -c 1 127.0.0.1")
    assert done.returncode == 0, done.stderr
    links = [line for line in done.stdout.splitlines() if ": <" in line]
    assert len(links) == 1 and links[0].startswith("1: lo: <LOOPBACK,UP,LOWER_UP>"), done.stdout
    assert "1 packets received" in done.stdout


# -- helpers ---------------------------------------------------------------------------------------


def _mac(ns: str, dev: str) -> str:
    out = subprocess.run(
        ["ip", "-n", ns, "-j", "link", "show", dev], capture_output=True, text=True, check=True
    ).stdout
    return str(json.loads(out)[0]["address"])
