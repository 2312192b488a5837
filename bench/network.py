"""Pod networking benchmark: TCP through the VM against the same exchange between two plain
network namespaces.

Run as root from the repository root with the project venv::

    .venv/bin/python bench/network.py [--runs N] [--mib M] [--exchanges K] [--out DIR]

Topology (all namespaces created here and removed at the end; nothing else is contacted)::

    pod:    [pod netns eth0 10.253.0.2] --veth-- [peer netns 10.253.0.1]   (pod VM attached)
    plain:  [plain netns eth0 10.254.0.2] --veth-- [peer netns 10.254.0.1] (no VM)

The same busybox programs serve and send on the pod side -- in a container of the pod VM
(guest root netns, the pod network) or, for "plain", run directly in the plain netns --
and the same Python program measures on the peer side, so the only difference is the VM
path (veth -> tc redirect -> tap -> QEMU virtio-net under TCG -> guest kernel -> busybox).

* upload (pod -> peer): ``dd if=/dev/zero bs=64k count=N | nc PEER 5100``; the peer's sink
  times first byte -> EOF and reports MiB/s.
* download (peer -> pod): the peer sends N MiB to ``nc -l -p 5101 -e wc -c`` and times
  connect+send -> the byte count coming back.
* round trip: the peer sends K 32-byte messages one at a time to ``nc -l -p 5102 -e cat``
  and times each echo; the run's value is the median exchange.

Runs alternate plain, pod, plain, pod... Reports the median over runs and the ratios
pod / plain (throughput: plain / pod = how many times slower; latency: pod / plain).
Writes ``<out>/<YYYY-MM-DD>-network.json`` unless ``--no-json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sandbox.pod.lifecycle import Pod  # noqa: E402
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
LIMIT = 300.0


class Side:
    """Where the pod-side programs run: a container of the pod VM, or the plain netns."""

    def __init__(
        self,
        name: str,
        addrs: dict[str, str],
        peer_ns: str,
        pod: Pod | None,
        ns: str,
        applets: Path | None = None,
    ) -> None:
        self.name, self.addrs, self.peer_ns, self.pod, self.ns = name, addrs, peer_ns, pod, ns
        self.applets = applets

    def sh(self, script: str) -> tuple[int, str]:
        """Run ``script`` with busybox sh on the pod side; (status, stdout)."""
        if self.pod is not None:
            spec = busybox_spec("sh", "-c", script)
            for entry in spec["linux"]["namespaces"]:
                if entry["type"] == "network":
                    entry["path"] = f"/run/netns/{self.ns}"  # the pod network
            result: Result = run_container(self.pod, spec, timeout=LIMIT)
            return result.status, result.out
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
        return statistics.median(json.loads(out)) * 1e6  # microseconds


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
    }
    for side, addrs in (("pod", POD), ("plain", PLAIN)):
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each kind (default 5)")
    parser.add_argument("--mib", type=int, default=16, help="MiB per transfer (default 16)")
    parser.add_argument("--exchanges", type=int, default=200, help="echoes per RTT run")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--no-json", action="store_true", help="only print the table")
    args = parser.parse_args(argv)
    if shutil.which("busybox") is None:
        parser.error("busybox is needed on the host (the plain side runs busybox nc/dd)")

    root = Path(tempfile.mkdtemp(prefix="psbn-", dir="/tmp"))
    samples: dict[str, dict[str, list[float]]] = {
        kind: {"upload": [], "download": [], "rtt": []} for kind in ("plain", "pod")
    }
    boot_seconds = 0.0
    try:
        with topology() as topo:
            names = build(topo)
            started = time.monotonic()
            pod = Pod.boot(root, "bench-net", netns=topo.path(names["pod"]))
            boot_seconds = time.monotonic() - started
            try:
                sides = [
                    Side(
                        "plain",
                        PLAIN,
                        names["plain-peer"],
                        None,
                        names["plain"],
                        busybox_applets(root / "applets"),
                    ),
                    Side("pod", POD, names["pod-peer"], pod, names["pod"]),
                ]
                for run in range(args.runs):
                    for side in sides:
                        got = samples[side.name]
                        got["upload"].append(side.upload(topo, args.mib))
                        got["download"].append(side.download(args.mib))
                        got["rtt"].append(side.rtt(args.exchanges))
                        print(
                            f"run {run + 1}/{args.runs} {side.name:<5}: "
                            f"upload {got['upload'][-1]:8.1f} MiB/s  "
                            f"download {got['download'][-1]:8.1f} MiB/s  "
                            f"rtt {got['rtt'][-1]:8.1f} us",
                            flush=True,
                        )
            finally:
                pod.destroy()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in samples.items()}
    ratios = {
        "upload_slowdown": med["plain"]["upload"] / med["pod"]["upload"],
        "download_slowdown": med["plain"]["download"] / med["pod"]["download"],
        "rtt_ratio": med["pod"]["rtt"] / med["plain"]["rtt"],
    }
    print()
    print(f"medians of {args.runs} runs ({args.mib} MiB transfers, {args.exchanges} echoes)")
    print(f"{'':<28}{'plain netns':>14}{'pod VM':>14}{'ratio':>10}")
    print(
        f"{'upload pod->peer MiB/s':<28}{med['plain']['upload']:>14.1f}"
        f"{med['pod']['upload']:>14.1f}{ratios['upload_slowdown']:>9.1f}x slower"
    )
    print(
        f"{'download peer->pod MiB/s':<28}{med['plain']['download']:>14.1f}"
        f"{med['pod']['download']:>14.1f}{ratios['download_slowdown']:>9.1f}x slower"
    )
    print(
        f"{'TCP round trip (median) us':<28}{med['plain']['rtt']:>14.1f}"
        f"{med['pod']['rtt']:>14.1f}{ratios['rtt_ratio']:>9.1f}x"
    )
    print(f"pod boot with the netns attached: {boot_seconds:.2f}s")
    if not args.no_json:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"{datetime.date.today().isoformat()}-network.json"
        report: dict[str, Any] = {
            "host": platform.node(),
            "kernel": platform.release(),
            "runs": args.runs,
            "mib": args.mib,
            "exchanges": args.exchanges,
            "samples": samples,
            "medians": med,
            "ratios": ratios,
            "pod_boot_seconds": boot_seconds,
        }
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
