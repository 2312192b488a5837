"""Agent entry point: ``python3 -m agent`` as PID 1 in the guest (or, for tests, on a host).

As PID 1 it mounts what the guest needs, reaps orphans, and serves gRPC
(agent/grpc_server.py) to the host on the virtio-serial port ``agent.0`` when present,
otherwise on vsock. ``--listen unix:PATH`` serves only that address (tests on the host).
If anything fatal happens as PID 1 the VM is powered off so the host sees QEMU exit.
"""

from __future__ import annotations

import os
import sys
import threading

#: How long the agent waits at boot for the runtime zygote's imports before it reports ready.
ZYGOTE_BOOT_TIMEOUT = 20.0

TYPE_CHECKING = False
if TYPE_CHECKING:
    from agent import pid1
    from agent.zygote import Zygote


def _serve_in_guest() -> None:
    from agent import kmod, pid1
    from agent.containers import ContainerManager
    from agent.grpc_server import find_serial_port
    from agent.network import NetworkManager
    from agent.server import AgentService, make_server
    from agentapi.channel import VSOCK_PORT

    pid1.early_mounts()
    pid1.raise_hard_limits()
    kmod.install_kernel_helper()
    reaper = pid1.Reaper()
    reaper.install()
    zygote = _start_zygote(reaper)
    _preload_overlay()
    port = find_serial_port()
    transport = "serial" if port is not None else "vsock"
    server = make_server(
        AgentService(
            transport=transport,
            containers=ContainerManager(reaper, zygote=zygote),
            network=NetworkManager(reaper, load_nic_driver=_load_virtio_net),
        )
    )
    # Ready only with the zygote's imports done: a template VM is saved once the agent
    # answers, and a zygote caught mid-import would finish them in every restored VM.
    if zygote is not None and not zygote.wait_ready(ZYGOTE_BOOT_TIMEOUT):
        print("pysandbox-agent: runtime zygote not ready; spawning runtimes", flush=True)
    # The server speaks HTTP/2 on the port itself (after the channel handshake), or on
    # vsock: its I/O loop is this thread's from here on.
    if port is not None:
        server.serve_serial(port)
        print(f"pysandbox-agent: ready on {port}", flush=True)
    else:
        server.add_insecure_port(f"vsock:4294967295:{VSOCK_PORT}")  # VMADDR_CID_ANY
        print(f"pysandbox-agent: ready on vsock port {VSOCK_PORT}", flush=True)
    server.watch_stalls()
    server.serve_forever()


def _start_zygote(reaper: pid1.Reaper) -> Zygote | None:
    """The runtime zygote (agent/zygote.py), started now so that it imports while the agent
    does; None (runtimes are spawned) if it cannot be started."""
    from agent.containers import runtime_env
    from agent.zygote import Zygote

    zygote = Zygote(reaper, runtime_env())
    try:
        zygote.start()
    except OSError as exc:
        print(f"pysandbox-agent: runtime zygote not started: {exc}", flush=True)
        return None
    return zygote


def _preload_overlay() -> None:
    """Load the overlay module now, while the zygote imports: every container's root is an
    overlay, and a template VM saved after this has it, so no pod's first CreateContainer
    pays for it (0.15 s under TCG, docs/performance.md). A failure is only reported: the
    first overlay mount tries again and fails with the reason."""
    from agent import kmod

    try:
        kmod.ensure("overlay")
    except OSError as exc:
        print(f"pysandbox-agent: overlay module not loaded at boot: {exc}", flush=True)


def _load_virtio_net() -> None:
    from agent import kmod

    kmod.ensure("virtio_net")


def _serve_on(address: str) -> None:
    from agent.server import AgentService, make_server

    server = make_server(AgentService(transport="unix", power_off=lambda: os._exit(0)))
    server.add_insecure_port(address)
    print(f"pysandbox-agent: ready on {address}", flush=True)
    server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    """Run the agent; see the module docstring."""
    if argv is None:
        argv = sys.argv[1:]
    if argv:  # PID 1 gets no arguments: argparse costs ~0.15 s of a TCG boot (performance.md)
        import argparse

        parser = argparse.ArgumentParser(prog="pysandbox-agent")
        parser.add_argument("--listen", help="serve only this gRPC address (host-side testing)")
        args = parser.parse_args(argv)
        if args.listen:
            _serve_on(args.listen)
            return
    try:
        _serve_in_guest()
    except BaseException:
        import traceback

        traceback.print_exc()
        print("pysandbox-agent: fatal error, powering off", file=sys.stderr, flush=True)
        if os.getpid() == 1:
            from agent import pid1

            threading.Timer(0.0, pid1.power_off).run()
        raise


if __name__ == "__main__":
    main()
