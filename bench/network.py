"""Pod networking benchmark: TCP through the pod VM against a networking floor (the same
QEMU, tap and kernel with a busybox guest) and against two plain network namespaces.

Run as root from the repository root with the project venv::

    .venv/bin/python bench/network.py [--runs N] [--mib M] [--exchanges K] [--out DIR]

Topology (all namespaces created here and removed at the end; nothing else is contacted)::

    pod:    [pod netns eth0 10.253.0.2] --veth-- [peer netns 10.253.0.1]   (pod VM attached)
    floor:  [floor netns eth0 10.255.0.2] --veth-- [peer netns 10.255.0.1] (floor VM attached)
    plain:  [plain netns eth0 10.254.0.2] --veth-- [peer netns 10.254.0.1] (no VM)

The same busybox programs serve and send on the pod side -- in a container of the pod VM
(guest root netns, the pod network), in the floor VM's /init shell, or, for "plain", directly
in the plain netns -- and the same Python program measures on the peer side.

* floor: ``bench.run.floor_config`` (the pod's QEMU binary, machine, accelerator, memory and
  kernel command line, no disk, agent or share) booting ``floor-net-initramfs.cpio`` with
  ``floor_net=10.255.0.2/24 floor_gw=10.255.0.1``: its busybox /init loads virtio_net,
  configures eth0 and runs one ``sh`` per connection to port 5000, through which this script
  sends each program (a few hundred bytes before each transfer; idle during it). Its NIC is
  attached exactly as a pod's: ``sandbox.pod.network.attach`` (a tap in the netns, tc
  redirect both ways to eth0) and the same ``NicConfig`` (MAC, MTU). The busybox is the
  image's busybox-static, the same Debian package the containers' default image copies from
  the host. What differs pod vs floor is ours: the agent, the container runtime and its
  namespaces/cgroups, the virtio-fs root, the template restore (a hot-plugged NIC), QEMU's
  jail.
* pod vs plain: the whole VM path (veth -> tc redirect -> tap -> QEMU virtio-net under TCG ->
  guest kernel -> busybox).

* upload (pod -> peer): ``dd if=/dev/zero bs=64k count=N | nc PEER 5100``; the peer's sink
  times first byte -> EOF and reports MiB/s.
* download (peer -> pod): the peer sends N MiB to ``nc -l -p 5101 -e wc -c`` and times
  connect+send -> the byte count coming back.
* round trip: the peer sends K 32-byte messages one at a time to ``nc -l -p 5102 -e cat``
  and times each echo; the run's value is the median exchange.

Runs alternate plain, floor, pod, plain, floor, pod... Reports the median over runs and the
ratios pod / floor (throughput: floor / pod = how many times slower; latency: pod / floor),
and the same against plain. PSS (``/proc/PID/smaps_rollup``) of each VM's QEMU is read after
every transfer; the table shows the largest reading. Writes
``<out>/<YYYY-MM-DD>-network.json`` unless ``--no-json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.run import floor_config, floor_vm, tree_pss_kib  # noqa: E402
from hypervisor import accel as accel_mod  # noqa: E402
from hypervisor.guest_image import find_image, floor_net_initrd  # noqa: E402
from hypervisor.qemu import find_qemu  # noqa: E402
from hypervisor.qemu_args import NicConfig  # noqa: E402
from sandbox.pod import lifecycle, network  # noqa: E402
from sandbox.pod.lifecycle import DEFAULT_MEMORY_MIB, Pod  # noqa: E402
from tests.integration.helpers import Result, busybox_spec, run_container  # noqa: E402
from tests.integration.netns_topology import Topology, finish, topology  # noqa: E402

#: Peer-side measuring client: "download HOST PORT MIB LIMIT" prints seconds;
#: "rtt HOST PORT COUNT LIMIT" prints a JSON list of per-exchange seconds. Connects with
#: retries (the listener may still be starting) until LIMIT seconds have passed.
PEER = r"""
import json, socket, sys, time
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
amount, limit = int(sys.argv[4]), float(sys.argv[5])
deadline = time.monotonic() + limit
while True:
    try:
        conn = socket.create_connection((host, port), timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
conn.settimeout(limit)
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def read_all():
    chunks = []
    while True:
        data = conn.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)
if mode == "download":
    block = b"\0" * (1 << 20)
    start = time.perf_counter()
    for _ in range(amount):
        conn.sendall(block)
    conn.shutdown(socket.SHUT_WR)
    reply = read_all()
    elapsed = time.perf_counter() - start
    assert int(reply.split()[0]) == amount << 20, reply
    print(elapsed)
else:
    times = []
    message = b"x" * 31 + b"\n"
    for _ in range(amount):
        start = time.perf_counter()
        conn.sendall(message)
        got = b""
        while len(got) < len(message):
            data = conn.recv(64)
            if not data:
                raise SystemExit("echo closed early")
            got += data
        times.append(time.perf_counter() - start)
    conn.shutdown(socket.SHUT_WR)
    read_all()
    print(json.dumps(times))
"""

POD = {"self": "10.253.0.2", "peer": "10.253.0.1"}
PLAIN = {"self": "10.254.0.2", "peer": "10.254.0.1"}
FLOOR = {"self": "10.255.0.2", "peer": "10.255.0.1"}
LIMIT = 300.0
#: Console line of the networking floor once eth0 is configured (guest-image/floor-init.sh),
#: and the port of its control shell.
FLOOR_NET_MARKER = b"PYSANDBOX-FLOOR-NET-READY"
FLOOR_CONTROL_PORT = 5000
FLOOR_STATUS = "FLOOR-STATUS"
KINDS = ("plain", "floor", "pod")


def floor_sh(peer_nsfd: int, host: str, script: str, limit: float) -> tuple[int, str]:
    """Run ``script`` in the floor guest's control shell (``nc -l -p 5000 -e sh``), from a
    socket of the peer namespace; (status, stdout). The script is sent whole and the
    connection half-closed, so the shell reads EOF after it."""
    sock = network.in_netns(peer_nsfd, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    with sock:
        deadline = time.monotonic() + limit
        sock.settimeout(5)
        while True:  # the guest restarts its listener between connections
            try:
                sock.connect((host, FLOOR_CONTROL_PORT))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        sock.settimeout(limit)
        sock.sendall(f"{script}\necho {FLOOR_STATUS} $?\n".encode())
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    text = b"".join(chunks).decode(errors="replace")
    body, _sep, status = text.rstrip("\n").rpartition("\n")
    if not status.startswith(FLOOR_STATUS):
        if text.startswith(FLOOR_STATUS):
            body, status = "", text.strip()
        else:
            raise RuntimeError(f"floor: no status from the control shell: {text[-300:]!r}")
    return int(status.split()[1]), body + "\n"


class Side:
    """Where the pod-side programs run: a container of the pod VM, the floor VM's control
    shell (``floor_peer_fd``: an fd of the peer netns), or the plain netns."""

    def __init__(
        self,
        name: str,
        addrs: dict[str, str],
        peer_ns: str,
        pod: Pod | None,
        ns: str,
        applets: Path | None = None,
        floor_peer_fd: int | None = None,
        qemu_pid: int | None = None,
    ) -> None:
        self.name, self.addrs, self.peer_ns, self.pod, self.ns = name, addrs, peer_ns, pod, ns
        self.applets = applets
        self.floor_peer_fd = floor_peer_fd
        self.qemu_pid = qemu_pid

    def pss(self) -> dict[str, int]:
        """PSS (KiB) now: the VM's QEMU, and for a pod QEMU + virtiofsd + agent proxy."""
        if self.pod is not None:
            found = {}
            for name in ("qemu", "virtiofsd", "proxy"):
                handle = self.pod.process(name)
                found[name] = tree_pss_kib(handle.pid)[0] if handle is not None else 0
            return {"qemu": found["qemu"], "total": sum(found.values())}
        if self.qemu_pid is not None:
            qemu = tree_pss_kib(self.qemu_pid)[0]
            return {"qemu": qemu, "total": qemu}
        return {}

    def sh(self, script: str) -> tuple[int, str]:
        """Run ``script`` with busybox sh on the pod side; (status, stdout)."""
        if self.pod is not None:
            spec = busybox_spec("sh", "-c", script)
            for entry in spec["linux"]["namespaces"]:
                if entry["type"] == "network":
                    entry["path"] = f"/run/netns/{self.ns}"  # the pod network
            result: Result = run_container(self.pod, spec, timeout=LIMIT)
            return result.status, result.out
        if self.floor_peer_fd is not None:
            return floor_sh(self.floor_peer_fd, self.addrs["self"], script, LIMIT)
        done = subprocess.run(
            ["ip", "netns", "exec", self.ns, "busybox", "sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=LIMIT,
            env={"PATH": f"{self.applets}:/usr/bin:/bin", "HOME": "/"},
        )
        return done.returncode, done.stdout

    def serve_and_measure(self, server: str, peer_args: list[str]) -> str:
        """Start ``server`` on the pod side, run :data:`PEER` against it, return its output."""
        outcome: list[tuple[int, str]] = []
        thread = threading.Thread(target=lambda: outcome.append(self.sh(server)), daemon=True)
        thread.start()
        try:
            done = subprocess.run(
                ["ip", "netns", "exec", self.peer_ns, sys.executable, "-c", PEER, *peer_args],
                capture_output=True,
                text=True,
                timeout=LIMIT + 30,
            )
        finally:
            thread.join(LIMIT)
        if done.returncode != 0:
            raise RuntimeError(f"{self.name}: peer client failed: {done.stderr.strip()[-300:]}")
        return done.stdout

    def upload(self, topo: Topology, mib: int) -> float:
        sink = topo.server(self.peer_ns, self.addrs["peer"], 5100, "sink", 1, LIMIT)
        try:
            status, out = self.sh(
                f"dd if=/dev/zero bs=65536 count={mib * 16} 2>/dev/null | "
                f"nc {self.addrs['peer']} 5100"
            )
        finally:
            code, _o, err = finish(sink, LIMIT)
        if status != 0 or code != 0:
            raise RuntimeError(f"{self.name}: upload failed ({status}/{code}): {err.strip()}")
        total, seconds = out.split()
        assert int(total) == mib << 20, out
        return mib / float(seconds)

    def download(self, mib: int) -> float:
        out = self.serve_and_measure(
            "nc -l -p 5101 -e wc -c", ["download", self.addrs["self"], "5101", str(mib), "120"]
        )
        return mib / float(out)

    def rtt(self, exchanges: int) -> float:
        out = self.serve_and_measure(
            "nc -l -p 5102 -e cat", ["rtt", self.addrs["self"], "5102", str(exchanges), "120"]
        )
        return float(statistics.median(json.loads(out))) * 1e6  # microseconds


def busybox_applets(directory: Path) -> Path:
    """``directory`` with nc, dd, wc, cat linked to the host's busybox, so that the plain side
    runs the same programs as the container (busybox from the default image)."""
    busybox = shutil.which("busybox")
    assert busybox is not None
    directory.mkdir()
    for applet in ("nc", "dd", "wc", "cat", "sh"):
        (directory / applet).symlink_to(busybox)
    return directory


def build(topo: Topology) -> dict[str, str]:
    names = {
        "pod": topo.netns("benchpod"),
        "pod-peer": topo.netns("benchpodpeer"),
        "plain": topo.netns("benchplain"),
        "plain-peer": topo.netns("benchplainpeer"),
        "floor": topo.netns("benchfloor"),
        "floor-peer": topo.netns("benchfloorpeer"),
    }
    for side, addrs in (("pod", POD), ("plain", PLAIN), ("floor", FLOOR)):
        topo.veth(
            names[side],
            "eth0",
            names[f"{side}-peer"],
            "peer0",
            addr_a=f"{addrs['self']}/24",
            addr_b=f"{addrs['peer']}/24",
        )
        topo.route(names[side], "default", "via", addrs["peer"])
    return names


@contextlib.contextmanager
def floor_machine(
    topo: Topology, ns: str, workdir: Path, timeout: float
) -> Iterator[tuple[int, float]]:
    """Boot the networking floor attached to netns ``ns`` the way a pod is attached; yield
    (QEMU pid, seconds from spawn to eth0 configured). Killed and detached on leaving."""
    image = find_image()
    recorded: dict[str, Any] = {}
    attached = network.attach(topo.path(ns), recorded.update)
    try:
        nics = tuple(
            NicConfig(nic.mac, "tap", fd, nic.mtu)
            for nic, fd in zip(attached.config.interfaces, attached.tap_fds, strict=True)
        )
        guest = f"floor_net={FLOOR['self']}/24 floor_gw={FLOOR['peer']}"
        accel = accel_mod.detect().chosen
        cmdline = f"{lifecycle.kernel_cmdline(accel)} {guest}"
        base = floor_config(image, workdir, accel, DEFAULT_MEMORY_MIB, cmdline)
        config = dataclasses.replace(
            base, name="pysandbox-bench-floor-net", initrd=floor_net_initrd(image), nics=nics
        )
        with floor_vm(config, find_qemu(), timeout, FLOOR_NET_MARKER) as (proc, t0, seen):
            for fd in attached.tap_fds:
                os.close(fd)  # QEMU holds them now
            attached = dataclasses.replace(attached, tap_fds=())
            yield proc.pid, seen - t0
    finally:
        for fd in attached.tap_fds:
            os.close(fd)
        with contextlib.suppress(Exception):
            network.detach(recorded)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each kind (default 5)")
    parser.add_argument("--mib", type=int, default=16, help="MiB per transfer (default 16)")
    parser.add_argument("--exchanges", type=int, default=200, help="echoes per RTT run")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--no-json", action="store_true", help="only print the table")
    parser.add_argument("--suffix", default="", help="JSON name suffix (<date>-network<S>.json)")
    parser.add_argument("--timeout", type=float, default=120.0, help="floor VM boot, seconds")
    parser.add_argument(
        "--kernel-arg",
        action="append",
        default=[],
        help="append this to the kernel command line of pod and floor (an experiment; repeat)",
    )
    args = parser.parse_args(argv)
    if args.kernel_arg:
        pod_cmdline = " ".join([lifecycle.kernel_cmdline(), *args.kernel_arg])
        lifecycle.kernel_cmdline = lambda: pod_cmdline  # this process only
    if shutil.which("busybox") is None:
        parser.error("busybox is needed on the host (the plain side runs busybox nc/dd)")

    root = Path(tempfile.mkdtemp(prefix="psbn-", dir="/tmp"))
    samples: dict[str, dict[str, list[float]]] = {
        kind: {"upload": [], "download": [], "rtt": []} for kind in KINDS
    }
    pss: dict[str, list[dict[str, int]]] = {"floor": [], "pod": []}
    boot_seconds = floor_boot = 0.0
    load: list[str] = [Path("/proc/loadavg").read_text().strip()]
    try:
        with topology() as topo, contextlib.ExitStack() as stack:
            names = build(topo)
            peer_fd = network.open_netns(topo.path(names["floor-peer"]))
            stack.callback(os.close, peer_fd)
            floor_pid, floor_boot = stack.enter_context(
                floor_machine(topo, names["floor"], root, args.timeout)
            )
            started = time.monotonic()
            pod = Pod.boot(root / "pods", "bench-net", netns=topo.path(names["pod"]))
            boot_seconds = time.monotonic() - started
            stack.callback(pod.destroy)
            sides = [
                Side(
                    "plain",
                    PLAIN,
                    names["plain-peer"],
                    None,
                    names["plain"],
                    busybox_applets(root / "applets"),
                ),
                Side(
                    "floor",
                    FLOOR,
                    names["floor-peer"],
                    None,
                    names["floor"],
                    floor_peer_fd=peer_fd,
                    qemu_pid=floor_pid,
                ),
                Side("pod", POD, names["pod-peer"], pod, names["pod"]),
            ]
            for run in range(args.runs):
                for side in sides:
                    got = samples[side.name]
                    got["upload"].append(side.upload(topo, args.mib))
                    memory = [side.pss()]
                    got["download"].append(side.download(args.mib))
                    memory.append(side.pss())
                    got["rtt"].append(side.rtt(args.exchanges))
                    memory.append(side.pss())
                    if side.name in pss:
                        pss[side.name] += memory
                    print(
                        f"run {run + 1}/{args.runs} {side.name:<5}: "
                        f"upload {got['upload'][-1]:8.1f} MiB/s  "
                        f"download {got['download'][-1]:8.1f} MiB/s  "
                        f"rtt {got['rtt'][-1]:8.1f} us",
                        flush=True,
                    )
    finally:
        load.append(Path("/proc/loadavg").read_text().strip())
        shutil.rmtree(root, ignore_errors=True)

    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in samples.items()}

    def ratios(slow: str, fast: str) -> dict[str, float]:
        return {
            "upload_slowdown": med[fast]["upload"] / med[slow]["upload"],
            "download_slowdown": med[fast]["download"] / med[slow]["download"],
            "rtt_ratio": med[slow]["rtt"] / med[fast]["rtt"],
        }

    pod_floor, pod_plain, floor_plain = (
        ratios("pod", "floor"),
        ratios("pod", "plain"),
        ratios("floor", "plain"),
    )
    peak = {
        kind: {key: max(m[key] for m in readings) for key in readings[0]}
        for kind, readings in pss.items()
    }
    print()
    print(f"medians of {args.runs} runs ({args.mib} MiB transfers, {args.exchanges} echoes)")
    print(f"{'':<28}{'plain netns':>12}{'floor VM':>12}{'pod VM':>12}{'pod/floor':>12}")
    rows = (
        ("upload pod->peer MiB/s", "upload", "upload_slowdown", "x slower"),
        ("download peer->pod MiB/s", "download", "download_slowdown", "x slower"),
        ("TCP round trip (median) us", "rtt", "rtt_ratio", "x"),
    )
    for label, key, ratio, unit in rows:
        print(
            f"{label:<28}{med['plain'][key]:>12.1f}{med['floor'][key]:>12.1f}"
            f"{med['pod'][key]:>12.1f}{pod_floor[ratio]:>8.2f}{unit}"
        )
    print(
        f"{'QEMU PSS after a transfer MiB':<28}{'':>12}{peak['floor']['qemu'] / 1024:>12.1f}"
        f"{peak['pod']['qemu'] / 1024:>12.1f}   (largest reading; pod with virtiofsd and "
        f"proxy {peak['pod']['total'] / 1024:.1f})"
    )
    print(f"floor VM spawn -> eth0 configured: {floor_boot:.2f}s")
    print(f"pod boot with the netns attached: {boot_seconds:.2f}s")
    print(f"load average before / after: {load[0]} / {load[-1]}")
    if not args.no_json:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"{datetime.date.today().isoformat()}-network{args.suffix}.json"
        image = find_image()
        report: dict[str, Any] = {
            "host": platform.node(),
            "kernel": platform.release(),
            "loadavg_before_after": load,
            "guest_image": str(image.dir),
            "guest_busybox": image.manifest.get("packages", {}).get("busybox-static"),
            "runs": args.runs,
            "mib": args.mib,
            "exchanges": args.exchanges,
            "kernel_args_added": args.kernel_arg,
            "samples": samples,
            "medians": med,
            "ratios_pod_to_floor": pod_floor,
            "ratios_pod_to_plain": pod_plain,
            "ratios_floor_to_plain": floor_plain,
            "pss_kib_after_each_transfer": pss,
            "pss_kib_peak": peak,
            "floor_boot_seconds": floor_boot,
            "pod_boot_seconds": boot_seconds,
        }
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
