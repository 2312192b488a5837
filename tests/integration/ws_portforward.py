"""A client of the CRI streaming server's port-forward endpoint, as kubectl reaches it.

The URL from CRI ``PortForward`` (``http://HOST:PORT/portforward/TOKEN``) speaks Kubernetes'
port-forward protocol over a WebSocket (RFC 6455) with subprotocol ``v4.channel.k8s.io``:
every binary message starts with a channel byte, data of the first port on channel 0 and its
errors on channel 1; the server opens each channel with the port number (2 bytes, little
endian); the server closes the WebSocket when the forwarded connection has ended. This is the
protocol containerd 1.6 serves (``pkg/cri/streaming/portforward/websocket.go``). Written for
the tests: one port per connection, no fragmentation, no TLS.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
from dataclasses import dataclass, field
from urllib.parse import urlsplit

PROTOCOL = "v4.channel.k8s.io"
DATA, ERROR = 0, 1
OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x2, 0x8, 0x9, 0xA


@dataclass
class PortForward:
    """One forwarded connection: :meth:`send` data, :meth:`read_all` until the server ends it."""

    sock: socket.socket
    port: int
    data: bytearray = field(default_factory=bytearray)
    errors: bytearray = field(default_factory=bytearray)
    closed: bool = False

    def send(self, payload: bytes) -> None:
        _write_frame(self.sock, OP_BINARY, bytes([DATA]) + payload)

    def _read_message(self) -> tuple[int, bytes]:
        header = _recv_exact(self.sock, 2)
        opcode, length = header[0] & 0x0F, header[1] & 0x7F
        if header[1] & 0x80:
            raise ValueError("the server masked a frame")
        if length == 126:
            length = struct.unpack("!H", _recv_exact(self.sock, 2))[0]
        elif length == 127:
            length = struct.unpack("!Q", _recv_exact(self.sock, 8))[0]
        return opcode, _recv_exact(self.sock, length)

    def read_all(self) -> None:
        """Collect data and error bytes until the server closes the WebSocket."""
        while not self.closed:
            try:
                opcode, payload = self._read_message()
            except (ConnectionError, EOFError):
                self.closed = True
                break
            if opcode == OP_CLOSE:
                self.closed = True
            elif opcode == OP_PING:
                _write_frame(self.sock, OP_PONG, payload)
            elif opcode == OP_BINARY and payload:
                (self.data if payload[0] == DATA else self.errors).extend(payload[1:])
        self.sock.close()


def open_port_forward(url: str, port: int, sock: socket.socket) -> PortForward:
    """Upgrade ``sock`` (connected to the URL's host and port) to a port-forward of ``port``;
    returns once the server has confirmed the port on both channels."""
    parts = urlsplit(url)
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {parts.path}?port={port} HTTP/1.1\r\n"
        f"Host: {parts.netloc}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: {PROTOCOL}\r\n\r\n"
    )
    sock.sendall(request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"the streaming server closed during the upgrade: {head!r}")
        head += chunk
    status = head.split(b"\r\n", 1)[0]
    if b" 101 " not in status:
        raise ConnectionError(f"the streaming server refused the upgrade: {head!r}")
    forward = PortForward(sock, port)
    confirmed = set()
    while confirmed != {DATA, ERROR}:
        opcode, payload = forward._read_message()
        if opcode == OP_BINARY and len(payload) == 3:
            if struct.unpack("<H", payload[1:])[0] != port:
                raise ValueError(f"the server confirmed another port: {payload!r}")
            confirmed.add(payload[0])
    return forward


def _write_frame(sock: socket.socket, opcode: int, payload: bytes) -> None:
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    sock.sendall(header + mask + masked)


def _recv_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise EOFError("connection closed")
        data += chunk
    return data
