"""The messages between a container's host stand-in (the shim) and its pod's agent proxy.

A shim (:mod:`sandbox.runtime.shim`) is the host process a client waits on for a container
process; the agent proxy (:mod:`sandbox.pod.agent_proxy`), one per pod, already holds the
gRPC channel to the guest. So the shim imports no gRPC: it hands its stdio fds to the proxy
over ``<pod>/`` :data:`SOCKET_NAME` and the proxy relays them and waits for the process
(:mod:`sandbox.pod.standin_service`).

Transport: a ``SOCK_SEQPACKET`` unix socket, one JSON object per packet (at most
:data:`MAX_MESSAGE` bytes), fds attached with ``SCM_RIGHTS`` (at most :data:`MAX_FDS`).

Shim -> proxy:

* ``{"op": "attach", "id": ID, "exec_id": EXEC, "terminal": bool, "stdin": bool,
  "resume": bool, "output_limit": BYTES or null}`` first, with the fds: the terminal (one
  fd), or ``[stdin,] stdout, stderr``. ``resume``: a previous proxy died; the output
  streams are read again, stdin is not relayed again (as before that proxy died, at most a
  chunk in flight is lost).
  ``output_limit``: the shim's RLIMIT_FSIZE; the proxy writes to regular files within it.
* or, from an attached ``pysandbox exec`` (:mod:`sandbox.runtime.exec_attach`), which is
  the exec's stand-in itself: ``{"op": "exec", "id": ID, "exec_id": EXEC, "terminal":
  bool}`` first, with the fds ``document, stdin, stdout[, stderr]`` (no stderr with a
  terminal: its output is on stdout). ``document`` holds the OCI ``process`` JSON the
  agent gets (at most ``ocispec.document.MAX_DOCUMENT_BYTES``; a memfd, read from offset
  0). The proxy starts the process (ExecProcess) and then serves it as an attached shim's.
* ``{"op": "signal", "signum": N}``: forward signal N to the process.
* ``{"op": "resize", "rows": R, "cols": C}``: the terminal's new size.

Proxy -> shim:

* ``{"op": "attached"}``: the process runs (``exec``) and the relay runs.
  ``{"op": "error", "message": TEXT}``: it does not; after an ``exec`` whose ExecProcess
  failed, the message also carries the agent's failure as ``rpc``, ``code``, ``reason``
  and ``detail`` (the fields of :class:`sandbox.errors.AgentError`).
* ``{"op": "signal-failed", "signum": N}``: the signal could not be delivered (the agent no
  longer knows the process, or the VM is gone) before the process was seen to exit.
* ``{"op": "exit", "status": S, "oom": bool}``: the process exited (S is 128+N for signal N,
  137 when its VM is gone); its output was delivered (within the drain time) and the
  proxy closed its copies of the fds.

The shim closing its end before ``exit`` means it died: the proxy kills the process
(SIGKILL), as the client believes it gone. The proxy closing its end before ``exit`` means
it died: the shim gets a new proxy started and attaches again with ``resume``.

This module imports only the standard library: the shim loads it.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~0.6 MiB)

if TYPE_CHECKING:  # annotations only: the shim imports this module, and neither of these
    from typing import Any

#: The proxy's stand-in socket, in the pod directory next to ``agent.sock``.
SOCKET_NAME = "shim.sock"
#: Largest packet, bytes.
MAX_MESSAGE = 4096
#: Most fds one packet carries.
MAX_FDS = 4


class WireError(Exception):
    """A packet that is not one of the messages above (too long, not JSON, too many fds)."""


def socket_path(agent_address: str) -> str:
    """The stand-in socket of the pod whose agent proxy serves ``agent_address``
    (``unix:<pod>/agent.sock``)."""
    return os.path.join(os.path.dirname(agent_address.removeprefix("unix:")), SOCKET_NAME)


def send(sock: socket.socket, message: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
    """Send ``message`` (with ``fds``) as one packet; OSError if the peer is gone."""
    data = json.dumps(message).encode()
    if len(data) > MAX_MESSAGE or len(fds) > MAX_FDS:
        raise WireError(f"message too large: {len(data)} bytes, {len(fds)} fds")
    ancillary = []
    if fds:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    sock.sendmsg([data], ancillary)


def receive(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """The next packet as (message, fds received with it); (None, []) at EOF. The caller
    owns the fds. WireError (fds closed) for a malformed packet; OSError as recvmsg."""
    fd_size = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
    data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE + 1, fd_size)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % array.array("i").itemsize
            fds += array.array("i", payload[:usable]).tolist()
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) > MAX_MESSAGE:
            raise WireError("packet too large")
        if not data:
            if fds:
                raise WireError("fds without a message")
            return None, []
        try:
            message = json.loads(data)
        except ValueError:
            raise WireError("packet is not JSON") from None
        if not isinstance(message, dict) or not isinstance(message.get("op"), str):
            raise WireError("packet is not a message")
    except WireError:
        close_all(fds)
        raise
    return message, fds


def close_all(fds: list[int]) -> None:
    """Close every fd of ``fds`` (errors ignored)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
