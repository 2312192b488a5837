"""Per-pod agent proxy: many host clients, one agent channel.

A virtio-serial port carries exactly one byte stream, yet several host processes talk to a
pod's agent at once (CLI verbs, each container's shim). This small daemon owns the single
channel to the guest and serves the agent's gRPC API on ``<pod>/agent.sock``, forwarding every
call, unary or streaming, as opaque bytes (a generic gRPC proxy: it needs no knowledge of the
messages, so it never lags the proto). A failed call is answered with the agent's status code,
message and Failure reason (:mod:`agentapi.failure`), the one trailing metadata entry passed on.

It is an HTTP/2 relay (:mod:`sandbox.pod.grpc_relay`, on the ``h2`` library; no grpcio): each
call's stream is relayed as is onto one HTTP/2 connection to the agent, made through QEMU's
chardev socket with the channel handshake (:mod:`agentapi.channel`) every time it is made
anew, or on vsock. The daemon exits when the VM's QEMU process (``--vm-pid``) is gone, so it
never outlives its pod.

It also serves the containers' host stand-ins (:mod:`sandbox.runtime.shim`, and attached
``pysandbox exec`` calls: :mod:`sandbox.runtime.exec_attach`) on ``<pod>/shim.sock``: it
starts an attached exec's process, relays their stdio, forwards their signals and waits for
their processes (:mod:`sandbox.pod.standin_service`), so that they need no gRPC. Those calls
are the relay's own (:mod:`sandbox.pod.proxy_client`), on the same connection to the agent.

With ``--forward-fd N`` (a listening socket in the pod's network namespace) it also serves
``kubectl port-forward``: each connection there is relayed to the guest over the same
connection (:mod:`sandbox.pod.portforward`).

Run as ``python -c PROGRAM --listen L (--serial S | --vsock-cid CID) --vm-pid P
[--console-log F] [--forward-fd N]`` (:data:`PROGRAM`: :func:`main` with the lazy imports of
:data:`LAZY_MODULES` installed first: modules that the proxy's imports import but never use,
~1.6 MiB of its own pages, docs/performance.md "Lean host processes, part 4"), or as
``python -m sandbox.pod.agent_proxy ...`` (everything imported).
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from agentapi.channel import VSOCK_PORT, host_handshake
from agentapi.h2_loop import Loop
from hypervisor.process import ProcessHandle, pid_alive
from sandbox import IMPORT_ROOT
from sandbox.errors import AgentError
from sandbox.pod import console_bound
from sandbox.pod.grpc_relay import Relay

if TYPE_CHECKING:
    import subprocess

#: What the proxy's interpreter runs (``-c``; see the module docstring). It names this module,
#: so the proxy's command line mentions ``sandbox.pod.agent_proxy`` as with ``-m``.
PROGRAM = (
    "from agentapi import lazy_import; "
    "lazy_import.install(lazy_import.PROXY_LAZY_MODULES); "
    "from sandbox.pod.agent_proxy import main; main()"
)
_HANDSHAKE_TIMEOUT = 10.0


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
    import subprocess

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


def connect_serial(path: Path) -> tuple[socket.socket, bytes]:
    """A new connection to the agent through QEMU's chardev socket ``path``, after the
    channel handshake (:func:`agentapi.channel.host_handshake`); and the bytes that followed
    the handshake. OSError or HandshakeError when it cannot."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(_HANDSHAKE_TIMEOUT)
        sock.connect(str(path))
        leftover = host_handshake(sock, _HANDSHAKE_TIMEOUT, _resent)
    except BaseException:
        sock.close()
        raise
    return sock, leftover


def connect_vsock(cid: int) -> tuple[socket.socket, bytes]:
    """A new connection to the agent's vsock port in guest ``cid`` (no handshake: each
    vsock connection is a stream of its own)."""
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(_HANDSHAKE_TIMEOUT)
        sock.connect((cid, VSOCK_PORT))
    except BaseException:
        sock.close()
        raise
    return sock, b""


def start_relay(
    listener: socket.socket, connect: Callable[[], tuple[socket.socket, bytes]]
) -> Relay:
    """A :class:`~sandbox.pod.grpc_relay.Relay` serving ``listener``, its loop running in a
    thread of its own (also what tests run in-process)."""
    loop = Loop()
    relay = Relay(loop, connect)
    relay.serve(listener)
    loop.start()
    return relay


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


def main(argv: list[str] | None = None) -> None:
    """Run the proxy daemon; see the module docstring."""
    args = _arguments(sys.argv[1:] if argv is None else argv)
    # SIGTERM is blocked in every thread (those started below inherit the mask) and taken by
    # the main thread's sigwait: the proxy exits at once whichever thread it was sent to.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_watch_vm, args=(args.vm_pid, args.console_log), daemon=True).start()
    connect: Callable[[], tuple[socket.socket, bytes]]
    if args.vsock_cid is not None:
        connect = functools.partial(connect_vsock, args.vsock_cid)
    else:
        assert args.serial is not None  # _arguments: one of the two
        connect = functools.partial(connect_serial, args.serial)
    from sandbox.pod import standin_service

    relay = start_relay(standin_service.listen(args.listen, socket.SOCK_STREAM), connect)
    from sandbox.pod.standin_wire import SOCKET_NAME

    # The stand-in socket listens before "ready" (a shim may connect at once); it is served
    # once the agent's messages (protobuf) are loaded, off the path of the pod's start.
    standins = standin_service.listen(args.listen.with_name(SOCKET_NAME))
    print("agent-proxy: ready", flush=True)
    from sandbox.pod.proxy_client import ProxyClient

    if args.forward_fd is not None:
        from sandbox.pod.portforward import Forwarder

        forwarder = Forwarder(socket.socket(fileno=args.forward_fd), relay)
        threading.Thread(target=forwarder.serve_forever, daemon=True).start()
    # Output through the pod's output ports when free.
    client = ProxyClient(relay, output_ports=args.listen.parent)
    threading.Thread(
        target=standin_service.serve,
        args=(standins, client, lambda: pid_alive(args.vm_pid)),
        daemon=True,
    ).start()
    signal.sigwait({signal.SIGTERM})
    os._exit(0)


class _Arguments:
    listen: Path
    serial: Path | None = None
    vsock_cid: int | None = None
    vm_pid: int
    forward_fd: int | None = None
    console_log: Path | None = None


def _arguments(argv: list[str]) -> _Arguments:
    """The options of the module docstring (argparse would cost 0.4 MiB for this internal
    command line); SystemExit 2 naming what is wrong."""
    args = _Arguments()
    kinds = {"--listen": Path, "--serial": Path, "--console-log": Path, "--vsock-cid": int}
    kinds.update({"--vm-pid": int, "--forward-fd": int})
    if len(argv) % 2:
        sys.exit(f"pysandbox-agent-proxy: option without a value: {argv[-1]}")
    for option, value in zip(argv[::2], argv[1::2], strict=True):
        kind = kinds.get(option)
        if kind is None:
            sys.exit(f"pysandbox-agent-proxy: unknown option {option}")
        try:
            setattr(args, option[2:].replace("-", "_"), kind(value))
        except ValueError:
            sys.exit(f"pysandbox-agent-proxy: {option} takes a number, not {value!r}")
    missing = [o for o in ("--listen", "--vm-pid") if not hasattr(args, o[2:].replace("-", "_"))]
    if missing or (args.serial is None) == (args.vsock_cid is None):
        sys.exit("pysandbox-agent-proxy: needs --listen, --vm-pid and --serial or --vsock-cid")
    return args


if __name__ == "__main__":
    main()
