"""Per-pod agent proxy: many host clients, one agent channel.

A virtio-serial port carries exactly one byte stream, yet several host processes talk to a
pod's agent at once (CLI verbs, each container's shim). This small daemon owns the single
channel to the guest and serves the agent's gRPC API on ``<pod>/agent.sock``, forwarding every
call, unary or streaming, as opaque bytes (a generic gRPC proxy: it needs no knowledge of the
messages, so it never lags the proto). A failed call is answered with the agent's status code,
message and Failure reason (:mod:`agentapi.failure`), the one trailing metadata entry passed on.

Upstream it relays a private unix socket to QEMU's chardev socket, running the channel
handshake (:mod:`agentapi.channel`) on every new connection. The daemon exits when the VM's QEMU
process (``--vm-pid``) is gone, so it never outlives its pod.

It also serves the containers' host stand-ins (:mod:`sandbox.runtime.shim`, and attached
``pysandbox exec`` calls: :mod:`sandbox.runtime.exec_attach`) on ``<pod>/shim.sock``: it
starts an attached exec's process, relays their stdio, forwards their signals and waits for
their processes (:mod:`sandbox.pod.standin_service`), so that they need no gRPC. Those calls
go over the proxy's own channel to the agent.

With ``--forward-fd N`` (a listening socket in the pod's network namespace) it also serves
``kubectl port-forward``: each connection there is relayed to the guest over the same channel
(:mod:`sandbox.pod.portforward`).

Run as ``python -c PROGRAM --serial S --listen L --vm-pid P [--vsock CID] [--forward-fd N]``
(:data:`PROGRAM`: :func:`main` with the lazy imports of :mod:`agentapi.lazy_import` installed
first, so that ``asyncio``, ``grpc.aio`` and protobuf's pure-Python message code, which a
synchronous relay never uses, cost nothing: ~3.5 MiB of the proxy's own pages), or as
``python -m sandbox.pod.agent_proxy ...`` (everything imported).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from agentapi import failure
from agentapi.channel import VSOCK_PORT, HandshakeError, host_handshake
from agentapi.limits import GRPC_OPTIONS
from hypervisor.process import ProcessHandle, pid_alive
from sandbox import IMPORT_ROOT
from sandbox.errors import AgentError
from sandbox.pod import console_bound

SERVICE_PREFIX = "/pysandbox.agent.v1.Agent/"
#: What the proxy's interpreter runs (``-c``; see the module docstring). It names this module,
#: so the proxy's command line mentions ``sandbox.pod.agent_proxy`` as with ``-m``.
PROGRAM = (
    "from agentapi import lazy_import; lazy_import.install(); "
    "from sandbox.pod.agent_proxy import main; main()"
)
_HANDSHAKE_TIMEOUT = 10.0
_CHUNK = 65536


def start(directory: Path, vm_pid: int, forward: socket.socket | None = None) -> int:
    """Start the agent proxy of the VM whose files are in ``directory``; its pid once ready
    (:func:`spawn`, then wait for it)."""
    return spawn(directory, vm_pid, forward).wait().pid


class Starting:
    """An agent proxy process that may not be ready yet (:func:`spawn`)."""

    def __init__(self, proc: subprocess.Popen[bytes], directory: Path) -> None:
        self._proc = proc
        self._directory = directory
        self.handle = ProcessHandle.of(proc.pid)

    def wait(self) -> ProcessHandle:
        """Its handle once it reports ready; AgentError (it is killed and reaped) if it
        does not."""
        proc = self._proc
        if proc.stdout is not None:
            line = proc.stdout.readline()
            proc.stdout.close()
            if line.strip() == b"agent-proxy: ready":
                return self.handle
        proc.kill()
        proc.wait()
        raise AgentError(f"agent proxy failed to start; see {self._directory / 'proxy.log'}")


def spawn(directory: Path, vm_pid: int, forward: socket.socket | None = None) -> Starting:
    """Start the agent proxy of the VM whose files are in ``directory``, not waiting for it
    to be ready (:meth:`Starting.wait`).

    It serves ``directory/agent.sock`` and relays to QEMU's ``agent-serial.sock``; its log is
    ``proxy.log``; it keeps the VM's ``console.log`` bounded (:mod:`sandbox.pod.console_bound`).
    It runs as root without any capability (empty bounding set, no_new_privs).
    ``forward``, a listening socket in the pod's network namespace, is handed to it for port
    forwarding (the caller keeps and closes its own copy). AgentError if it does not report
    ready.
    """
    from hypervisor.virtiofsd import SETPRIV

    # It relays bytes between sockets root owns (pod directory 0700, sockets 0600): it needs
    # uid 0 for those, and no capability at all (docs/trust-boundaries.md).
    argv = [
        str(SETPRIV),
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
        sys.executable,
        "-P",  # not the working directory ("/") on sys.path
        "-c",
        PROGRAM,
        "--listen",
        str(directory / "agent.sock"),
        "--serial",
        str(directory / "agent-serial.sock"),
        "--vm-pid",
        str(vm_pid),
        "--console-log",
        str(directory / "console.log"),
    ]
    if forward is not None:
        argv += ["--forward-fd", str(forward.fileno())]
    log = open(directory / "proxy.log", "ab")  # noqa: SIM115 - handed to the child
    with log:
        proc = subprocess.Popen(
            argv,
            pass_fds=() if forward is None else (forward.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
            cwd="/",
            env={**os.environ, "PYTHONPATH": IMPORT_ROOT},
        )
    return Starting(proc, directory)


class _Forwarder(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Forwards every Agent method to ``channel`` as a raw-bytes stream-stream call."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._channel = channel

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        method: str = handler_call_details.method
        if not method.startswith(SERVICE_PREFIX):
            return None
        multicallable = self._channel.stream_stream(method, None, None)

        def forward(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            remaining = context.time_remaining()
            # Without a client deadline gRPC reports an enormous remaining time; pass none on.
            timeout = remaining if remaining is not None and remaining < 1e6 else None
            call: Any = multicallable(requests, timeout=timeout, wait_for_ready=True)
            context.add_callback(call.cancel)
            try:
                yield from call
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED or context.is_active():
                    context.set_trailing_metadata(failure.forwarded(exc.trailing_metadata()))
                    context.abort(exc.code(), exc.details() or "agent call failed")

        return grpc.stream_stream_rpc_method_handler(forward)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(_CHUNK):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class SerialRelay:
    """Relays connections on ``listen_path`` to the QEMU chardev socket, one at a time."""

    def __init__(self, listen_path: Path, serial_path: Path) -> None:
        self._serial_path = serial_path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            listen_path.unlink()
        self._listener.bind(str(listen_path))
        os.chmod(listen_path, 0o600)
        self._listener.listen(4)

    def serve_forever(self) -> None:
        while True:
            client, _ = self._listener.accept()
            try:
                upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                upstream.settimeout(_HANDSHAKE_TIMEOUT)
                upstream.connect(str(self._serial_path))
                leftover = host_handshake(upstream, _HANDSHAKE_TIMEOUT, _resent)
                if leftover:
                    client.sendall(leftover)
            except (OSError, HandshakeError) as exc:
                print(f"agent-proxy: channel handshake failed: {exc}", file=sys.stderr, flush=True)
                client.close()
                time.sleep(0.2)
                continue
            back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
            back.start()
            _pump(client, upstream)
            back.join()
            client.close()
            upstream.close()


def _resent(waited: float) -> None:
    print(f"agent-proxy: no ACK after {waited:.1f}s: SYNC sent again", file=sys.stderr, flush=True)


#: Every how many seconds the idle proxy gives its freed heap pages back (:func:`_trimmer`).
TRIM_INTERVAL = 10.0


def _watch_vm(pid: int, console_log: Path | None) -> None:
    """Exit the process once ``pid`` is gone; meanwhile keep ``console_log`` bounded
    (:mod:`sandbox.pod.console_bound`) and the heap trimmed (:func:`_trimmer`)."""
    trim = _trimmer()
    ticks = 0
    while True:
        if not pid_alive(pid):
            os._exit(0)
        if console_log is not None:
            console_bound.bound(console_log)
        ticks += 1
        if trim is not None and ticks % int(TRIM_INTERVAL / 0.5) == 0:
            trim(0)
        time.sleep(0.5)


def _trimmer() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (None elsewhere): it returns the free pages inside every
    malloc arena to the kernel, not only the top of the main heap as ``free`` does. The
    proxy's startup (importing grpc and the agent's protobuf stubs) and each relayed call
    leave such pages behind in its ~20 threads' arenas; this process is idle most of its
    life, so they are given back every :data:`TRIM_INTERVAL` seconds (bench/footprint.py)."""
    import ctypes

    try:  # the process's own symbols, libc's among them (ctypes.util would cost 0.4 MiB)
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


#: How long (seconds) one of grpc's blocking waits sleeps before it looks again (see
#: :func:`_quiet_blocking_waits`).
BLOCKING_WAIT_SLICE = 30.0


def _quiet_blocking_waits() -> None:
    """Let a thread blocked in a gRPC call sleep until it is woken, not wake 10 times a second.

    grpcio's synchronous API waits on a condition in slices of
    ``grpc._common.MAXIMUM_WAIT_TIMEOUT`` (0.1 s) so that a signal handler of the main thread
    runs within 0.1 s; the condition is notified on every state change, so the slice only
    bounds that latency. Here every relayed call that lasts — a container's stdout, its Wait,
    a stand-in's stream — holds a thread for the container's life: N threads x 10 wake-ups a
    second on an idle pod. The proxy's only signal, SIGTERM, is taken by ``sigwait`` in the
    main thread, not by a handler, so a long slice delays nothing. The attribute is private:
    when a grpcio release drops it, nothing changes but the wake-ups (bench/idle_cpu.py).
    """
    import grpc._common as grpc_common

    if isinstance(getattr(grpc_common, "MAXIMUM_WAIT_TIMEOUT", None), float):
        grpc_common.MAXIMUM_WAIT_TIMEOUT = BLOCKING_WAIT_SLICE


def main(argv: list[str] | None = None) -> None:
    """Run the proxy daemon; see the module docstring."""
    _quiet_blocking_waits()
    parser = argparse.ArgumentParser(prog="pysandbox-agent-proxy")
    parser.add_argument("--listen", type=Path, required=True)
    parser.add_argument("--serial", type=Path, help="QEMU chardev socket of the agent port")
    parser.add_argument("--vsock-cid", type=int, help="guest CID when the agent is on vsock")
    parser.add_argument("--vm-pid", type=int, required=True)
    parser.add_argument("--forward-fd", type=int, help="port-forward listener (pod netns)")
    parser.add_argument("--console-log", type=Path, help="the VM's serial console log to bound")
    args = parser.parse_args(argv)
    # SIGTERM is blocked in every thread (those started below inherit the mask) and taken by
    # the main thread's sigwait: the proxy exits at once whichever thread it was sent to.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_watch_vm, args=(args.vm_pid, args.console_log), daemon=True).start()
    if args.vsock_cid is not None:
        upstream = f"vsock:{args.vsock_cid}:{VSOCK_PORT}"
    else:
        relay_path = args.listen.with_name("agent-relay.sock")
        relay = SerialRelay(relay_path, args.serial)
        threading.Thread(target=relay.serve_forever, daemon=True).start()
        upstream = f"unix:{relay_path}"
    channel = grpc.insecure_channel(upstream, options=GRPC_OPTIONS)
    if args.forward_fd is not None:
        from sandbox.pod.portforward import Forwarder

        listener = socket.socket(fileno=args.forward_fd)
        forwarder = Forwarder(listener, channel)
        threading.Thread(target=forwarder.serve_forever, daemon=True).start()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="proxy"),
        handlers=[_Forwarder(channel)],
        options=GRPC_OPTIONS,
    )
    with contextlib.suppress(FileNotFoundError):
        args.listen.unlink()
    server.add_insecure_port(f"unix:{args.listen}")
    server.start()
    os.chmod(args.listen, 0o600)
    from sandbox.pod import standin_service
    from sandbox.pod.agent_client import ContainerClient
    from sandbox.pod.standin_wire import SOCKET_NAME

    standins = standin_service.listen(args.listen.with_name(SOCKET_NAME))
    # No second hop through agent.sock; output through the pod's output ports when free.
    client = ContainerClient(upstream, channel=channel, output_ports=args.listen.parent)
    threading.Thread(
        target=standin_service.serve,
        args=(standins, client, lambda: pid_alive(args.vm_pid)),
        daemon=True,
    ).start()
    print("agent-proxy: ready", flush=True)
    signal.sigwait({signal.SIGTERM})
    os._exit(0)


if __name__ == "__main__":
    main()
