"""The serial channel handshake, the guest agent's server on the port and the host proxy,
without a VM.

A pty stands in for the virtio-serial port and a unix socket server for QEMU's chardev.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.server import AgentService, make_server
from agentapi.channel import HandshakeError, SyncScanner, ack_line, host_handshake, sync_line
from sandbox.pod.agent_client import AgentClient

ROOT = Path(__file__).resolve().parents[2]


def test_scanner_finds_sync_split_across_chunks() -> None:
    scanner = SyncScanner()
    line = sync_line("ab" * 16)
    assert scanner.feed(b"stale garbage" + line[:10]) is None
    assert scanner.feed(line[10:] + b"PRI *") == ("ab" * 16, b"PRI *")


def test_scanner_keeps_bounded_window() -> None:
    scanner = SyncScanner()
    for _ in range(1000):
        assert scanner.feed(os.urandom(4096).replace(b"P", b"x")) is None
    assert len(scanner._window) <= 256


def test_host_handshake_discards_stale_bytes() -> None:
    host, guest = socket.socketpair()

    def fake_guest() -> None:
        guest.sendall(b"old http2 frames from a previous session" * 100)
        scanner = SyncScanner()
        while (found := scanner.feed(guest.recv(4096))) is None:
            pass
        guest.sendall(b"more stale" + ack_line("0" * 32) + ack_line(found[0]) + b"SETTINGS")

    thread = threading.Thread(target=fake_guest)
    thread.start()
    assert host_handshake(host, timeout=5) == b"SETTINGS"
    thread.join()


def test_host_handshake_resends_a_lost_sync() -> None:
    """A guest that lost the first SYNC (it reopened its port: a restored template VM)
    answers the next one; the host takes only the ACK of its latest SYNC, well before the
    timeout."""
    host, guest = socket.socketpair()
    nonces: list[str] = []

    def fake_guest() -> None:
        scanner = SyncScanner()
        while len(nonces) < 2:
            found = scanner.feed(guest.recv(4096))
            if found is not None:
                nonces.append(found[0])
        # The first SYNC was "lost"; a late ACK of it must not be taken for the second's.
        guest.sendall(ack_line(nonces[0]) + b"junk" + ack_line(nonces[1]) + b"SETTINGS")

    thread = threading.Thread(target=fake_guest)
    thread.start()
    started = time.monotonic()
    assert host_handshake(host, timeout=10) == b"SETTINGS"
    assert time.monotonic() - started < 5  # the first resend, not the 10 s timeout
    thread.join()
    assert len(set(nonces)) == 2


def test_host_handshake_times_out_on_silent_guest() -> None:
    host, _guest = socket.socketpair()
    with pytest.raises(HandshakeError, match="within"):
        host_handshake(host, timeout=0.3)


def test_host_handshake_reports_eof() -> None:
    host, guest = socket.socketpair()
    guest.close()
    with pytest.raises(HandshakeError, match="closed"):
        host_handshake(host, timeout=2)


class FakeQemuChardev:
    """A unix socket server bridging each accepted connection to a pty master."""

    def __init__(self, path: Path, master: int) -> None:
        self._master = master
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(1)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            conn, _ = self._server.accept()
            done = threading.Event()

            def to_guest(conn: socket.socket = conn, done: threading.Event = done) -> None:
                with contextlib.suppress(OSError):
                    while data := conn.recv(65536):
                        os.write(self._master, data)
                done.set()

            threading.Thread(target=to_guest, daemon=True).start()
            while not done.is_set():
                import select

                ready, _, _ = select.select([self._master], [], [], 0.05)
                if ready:
                    data = os.read(self._master, 65536)
                    with contextlib.suppress(OSError):
                        conn.sendall(data)
            conn.close()


@pytest.fixture
def fake_guest(tmp_path: Path) -> Iterator[Path]:
    """Start an in-process agent serving a pty as its serial port; yield the chardev path."""
    master, slave = os.openpty()
    tty.setraw(slave)
    tty.setraw(master)
    port_path = Path(os.ttyname(slave))
    server = make_server(AgentService(transport="serial", power_off=lambda: None))
    server.serve_serial(port_path)
    server.start()
    chardev = tmp_path / "agent-serial.sock"
    FakeQemuChardev(chardev, master)
    yield chardev
    server.stop(0)


def _start_proxy(chardev: Path, listen: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sandbox.pod.agent_proxy",
            "--serial",
            str(chardev),
            "--listen",
            str(listen),
            "--vm-pid",
            str(os.getpid()),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"agent-proxy: ready"
    return proc


def test_proxy_reaches_agent_and_survives_proxy_restart(fake_guest: Path, tmp_path: Path) -> None:
    listen = tmp_path / "agent.sock"
    proxy = _start_proxy(fake_guest, listen)
    try:
        with AgentClient(f"unix:{listen}", timeout=10) as client:
            assert client.health() > 0
            assert client.info().transport == "serial"
            client.write_file(str(tmp_path / "f"), b"x" * 100_000)
    finally:
        proxy.kill()
        proxy.wait()
    # A new proxy (a restarted host client) must resynchronise over the same port.
    proxy = _start_proxy(fake_guest, listen)
    try:
        with AgentClient(f"unix:{listen}", timeout=10) as client:
            assert client.read_file(str(tmp_path / "f")) == b"x" * 100_000
    finally:
        proxy.kill()
        proxy.wait()


def test_many_concurrent_clients_share_one_channel(fake_guest: Path, tmp_path: Path) -> None:
    listen = tmp_path / "agent.sock"
    proxy = _start_proxy(fake_guest, listen)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with AgentClient(f"unix:{listen}", timeout=10) as client:
                for _ in range(5):
                    client.health()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    proxy.kill()
    proxy.wait()
    assert not errors, errors
    assert time.monotonic() - start < 30


def test_proxy_exits_at_once_on_sigterm(fake_guest: Path, tmp_path: Path) -> None:
    # Teardown sends SIGTERM and kills after a short grace: the proxy must go at once, even
    # with a call in flight (its threads sleep in long waits) and whichever thread gets it.
    listen = tmp_path / "agent.sock"
    proxy = _start_proxy(fake_guest, listen)
    try:
        with AgentClient(f"unix:{listen}", timeout=10) as client:
            assert client.health() > 0
            proxy.send_signal(signal.SIGTERM)
            assert proxy.wait(2) == 0
    finally:
        proxy.kill()
        proxy.wait()
