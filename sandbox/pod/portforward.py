"""``kubectl port-forward`` into a pod VM: the host half (docs/kubernetes.md, "Port forwarding").

containerd's CRI PortForward (1.6, ``sandbox_portforward_linux.go``) enters the pod's network
namespace and dials ``localhost:PORT`` there, IPv4 first. Under runc the container listens in
that namespace; with pysandbox nothing does: the namespace's interfaces are redirected into the
VM (sandbox/pod/network.py) and its own stack only has ``lo``. So, in the pod's namespace:

1. one netfilter rule (sandbox/pod/redirect.py), ``nat OUTPUT -o lo -p tcp -d 127.0.0.1
   -j REDIRECT --to-ports 65535``, sends every TCP connection made to 127.0.0.1 in the
   namespace (nothing but a port-forward makes any: the pod's processes run in the VM) to
2. a listener on 127.0.0.1::data:`LISTEN_PORT` (:func:`listen`, made in the namespace and
   handed to the pod's agent proxy), where
3. :class:`Forwarder` reads the port the client asked for (``SO_ORIGINAL_DST``) and relays
   the connection over the agent channel (agent.proto ``PortForward``) to the guest's
   loopback, where the containers of the pod network listen (agent/portforward.py).

A connection to a port nothing listens on in the guest is reset at once (runc: refused).
The rule is removed with the pod's network (sandbox/pod/network.py ``detach``); a namespace
that is deleted takes it along.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from sandbox.errors import NetworkError
from sandbox.pod.grpc_relay import Call, CallError, Relay
from sandbox.pod.redirect import LISTEN_PORT

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
METHOD = "/pysandbox.agent.v1.Agent/PortForward"
#: Connections relayed at once (the agent takes as many: agent/portforward.py).
MAX_CONNECTIONS = 8
#: The agent must have connected in the guest within this many seconds.
CONNECT_TIMEOUT = 15.0
#: Longest life of one forwarded connection: kubelet's default streaming idle timeout (4 h).
MAX_SECONDS = 4 * 3600.0
CHUNK = 64 * 1024


def listen(netns: Path, identity: str) -> socket.socket:
    """A listening socket on 127.0.0.1::data:`LISTEN_PORT` in network namespace ``netns``,
    which must still be the namespace of ``identity`` (NetworkError otherwise)."""
    from sandbox.pod import network

    nsfd = network.open_netns(netns)
    try:
        if network.identity(nsfd) != identity:
            raise NetworkError(f"{netns} is no longer the pod's network namespace")

        def make() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", LISTEN_PORT))
                sock.listen(16)
            except OSError as exc:
                sock.close()
                raise NetworkError(f"port-forward listener: {exc.strerror or exc}") from exc
            return sock

        return network.in_netns(nsfd, make)
    finally:
        import os

        os.close(nsfd)


def original_port(conn: socket.socket) -> int:
    """The port the client dialled before the rule redirected it (``SO_ORIGINAL_DST``)."""
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port: int = struct.unpack("!H", raw[2:4])[0]
    return port


def _reset(conn: socket.socket) -> None:
    """Close ``conn`` with a RST, as a refused connection looks to the client. (Shutting the
    reading side down first wakes a thread still reading it; the socket is released, and
    the RST sent, when the last of them lets go.)"""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.shutdown(socket.SHUT_RD)
    conn.close()


class Forwarder:
    """Accepts on the pod namespace's listener and relays each connection to the guest over
    ``relay`` (the agent proxy's own connection to the agent:
    :class:`~sandbox.pod.grpc_relay.Relay`) to the port ``port_of`` names (the one the
    client dialled; tests give another)."""

    def __init__(
        self,
        listener: socket.socket,
        relay: Relay,
        port_of: Callable[[socket.socket], int] = original_port,
    ) -> None:
        self._listener = listener
        self._relay = relay
        self._port_of = port_of
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def serve_forever(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError as exc:
                _log(f"accept failed: {exc}")
                return
            if not self._slots.acquire(blocking=False):
                _log(f"more than {MAX_CONNECTIONS} connections at a time: one refused")
                _reset(conn)
                continue
            threading.Thread(target=self._relay_one, args=(conn,), daemon=True).start()

    @staticmethod
    def _send(conn: socket.socket, call: Call, port: int) -> None:
        """The connection's bytes to the call (the port first); the end of its input
        ends the request side, as a client closing for writing does the guest side."""
        from agentapi.proto import agent_pb2 as pb

        if not call.send(pb.PortForwardRequest(port=port).SerializeToString()):
            return
        while True:
            try:
                data = conn.recv(CHUNK)
            except OSError:
                break
            if not data:
                break
            if not call.send(pb.PortForwardRequest(data=data).SerializeToString()):
                return
        call.done_sending()

    def _relay_one(self, conn: socket.socket) -> None:
        from agentapi.proto import agent_pb2 as pb

        port = 0
        call: Call | None = None
        try:
            port = self._port_of(conn)
            call = self._relay.call(METHOD, MAX_SECONDS)
            threading.Thread(target=self._send, args=(conn, call, port), daemon=True).start()
            timer = threading.Timer(CONNECT_TIMEOUT, call.cancel)
            timer.start()
            try:
                first = call.receive()
            finally:
                timer.cancel()
            if first is None or not pb.PortForwardResponse.FromString(first).connected:
                raise ValueError("the agent's first reply is not 'connected'")
            for reply in call:
                conn.sendall(pb.PortForwardResponse.FromString(reply).data)
            _finish(conn)
        except (CallError, OSError, ValueError) as exc:  # DecodeError is a ValueError
            detail = exc.details if isinstance(exc, CallError) else str(exc)
            _log(f"connection to port {port} ended: {detail}")
            _reset(conn)
        finally:
            if call is not None:
                call.cancel()
            self._slots.release()


def _finish(conn: socket.socket, linger: float = 5.0) -> None:
    """The guest side closed: pass the EOF on, let the client close its side (discarding
    what it still sends, for up to ``linger`` s), then close. Closing with unread bytes
    would reset the connection and could drop the last bytes sent to the client."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(linger)
        while conn.recv(CHUNK):
            pass
    conn.close()


def _log(message: str) -> None:
    print(f"agent-proxy: port-forward: {message}", file=sys.stderr, flush=True)
