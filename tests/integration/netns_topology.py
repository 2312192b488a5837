"""Network namespaces, veth pairs and bridges made by tests (and bench/network.py).

Everything is created inside network namespaces this module adds (``ip netns add``); veth
pairs are created directly in their target namespaces, so the host's own namespace is never
touched. :meth:`Topology.remove` deletes every namespace it added (and with them their
devices). Peer programs run in a namespace with ``ip netns exec`` and only ever talk to
addresses inside these namespaces; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

NETNS_DIR = Path("/run/netns")

#: Python run in a peer namespace: accept ``count`` connections on HOST:PORT; for each,
#: read until EOF and answer with the bytes upper-cased (or, with ``sink``, with the byte
#: count and the seconds between the first and the last byte). Prints "ready" once listening.
SERVER = r"""
import socket, sys, time
host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
count, limit = int(sys.argv[4]), float(sys.argv[5])
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port))
srv.listen(8)
srv.settimeout(limit)
print("ready", flush=True)
for _ in range(count):
    conn, _addr = srv.accept()
    conn.settimeout(limit)
    if mode == "sink":
        total, first = 0, None
        while True:
            data = conn.recv(1 << 16)
            if not data:
                break
            if first is None:
                first = time.monotonic()
            total += len(data)
        elapsed = time.monotonic() - (first or time.monotonic())
        conn.sendall(f"{total} {elapsed:.6f}\n".encode())
    elif mode == "echo-lines":
        stream = conn.makefile("rwb", buffering=0)
        while True:
            line = stream.readline()
            if not line:
                break
            stream.write(line)
    else:
        chunks = []
        while True:
            data = conn.recv(65536)
            if not data:
                break
            chunks.append(data)
        conn.sendall(b"".join(chunks).upper())
    conn.close()
"""

#: Python run in a peer namespace: connect to HOST:PORT (retrying until LIMIT seconds have
#: passed), send the payload from argv, half-close, print what comes back.
CLIENT = r"""
import socket, sys, time
host, port, payload, limit = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), float(sys.argv[4])
deadline = time.monotonic() + limit
while True:
    try:
        conn = socket.create_connection((host, port), timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
conn.settimeout(limit)
conn.sendall(payload)
conn.shutdown(socket.SHUT_WR)
chunks = []
while True:
    data = conn.recv(65536)
    if not data:
        break
    chunks.append(data)
sys.stdout.write(b"".join(chunks).decode())
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Topology:
    """Namespaces this object created (named ``psbt-<random>-<name>``)."""

    def __init__(self) -> None:
        self.tag = f"psbt-{secrets.token_hex(3)}"
        self.namespaces: list[str] = []

    def netns(self, name: str) -> str:
        """Add a namespace (loopback up) and return its name."""
        full = f"{self.tag}-{name}"
        _ip("netns", "add", full)
        self.namespaces.append(full)
        _ip("-n", full, "link", "set", "lo", "up")
        return full

    @staticmethod
    def path(ns: str) -> Path:
        return NETNS_DIR / ns

    def veth(
        self,
        ns_a: str,
        name_a: str,
        ns_b: str,
        name_b: str,
        *,
        addr_a: str | None = None,
        addr_b: str | None = None,
        mtu: int | None = None,
    ) -> None:
        """A veth pair with one end in each namespace, both up."""
        _ip("link", "add", name_a, "netns", ns_a, "type", "veth", "peer", name_b, "netns", ns_b)
        for ns, name, addr in ((ns_a, name_a, addr_a), (ns_b, name_b, addr_b)):
            if mtu is not None:
                _ip("-n", ns, "link", "set", name, "mtu", str(mtu))
            if addr is not None:
                _ip("-n", ns, "addr", "add", addr, "dev", name)
            _ip("-n", ns, "link", "set", name, "up")

    def bridge(self, ns: str, name: str, *ports: str) -> None:
        _ip("-n", ns, "link", "add", name, "type", "bridge")
        for port in ports:
            _ip("-n", ns, "link", "set", port, "master", name)
        _ip("-n", ns, "link", "set", name, "up")

    def route(self, ns: str, *spec: str) -> None:
        _ip("-n", ns, "route", "add", *spec)

    @staticmethod
    def popen(ns: str, *argv: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    @staticmethod
    def run(ns: str, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout
        )

    def server(
        self, ns: str, host: str, port: int, mode: str = "upper", count: int = 1, limit: float = 120
    ) -> subprocess.Popen[str]:
        """Start :data:`SERVER` in ``ns``; returns once it listens."""
        proc = self.popen(
            ns, sys.executable, "-c", SERVER, host, str(port), mode, str(count), str(limit)
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            proc.kill()
            _out, err = proc.communicate(timeout=10)
            raise RuntimeError(f"peer server did not start: {err.strip()}")
        return proc

    def client(
        self, ns: str, host: str, port: int, payload: str, limit: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return self.run(
            ns,
            sys.executable,
            "-c",
            CLIENT,
            host,
            str(port),
            payload,
            str(limit),
            timeout=limit + 30,
        )

    def remove(self) -> None:
        """Delete every namespace this topology added (bounded retries)."""
        for ns in reversed(self.namespaces):
            for _attempt in range(20):
                done = subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
                if done.returncode == 0 or not (NETNS_DIR / ns).exists():
                    break
                time.sleep(0.1)
        self.namespaces.clear()


@contextlib.contextmanager
def topology() -> Iterator[Topology]:
    topo = Topology()
    try:
        yield topo
    finally:
        topo.remove()


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    """Wait for a peer program (killing it after ``timeout``); (status, stdout, stderr)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
    return proc.returncode, out, err
