"""``pysandbox run``: one command, one fresh VM, one container, secure defaults.

Shares the runtime's code path (pod boot, file sharing, agent container RPCs); only the
image resolution and the spec built from command-line options are specific to it.
Exit status: the container's (128+N when killed by signal N); 125 when pysandbox itself
fails, 126 when the command cannot be run, 127 when it is not found, 124 on --timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import termios
import threading
import tty
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox import same_file, terminal_size
from sandbox.errors import EXIT_TIMEOUT, AgentError, SandboxError
from sandbox.image import store as images
from sandbox.pod.lifecycle import Pod
from sandbox.pod.sharing import HeldSources, unshare_container_files
from sandbox.pod.stdio import StdioRelay
from sandbox.run import pool
from sandbox.run.launch import CONTAINER_ID, boot_watched, create_with, run_kind
from sandbox.run.spec import build_spec, check_name_free, check_options, run_name
from sandbox.signal_forward import forwarding

if TYPE_CHECKING:  # grpc: imported while the pod boots (run.foreground)
    from sandbox.pod.agent_client import ContainerClient


@contextlib.contextmanager
def _raw_terminal(active: bool) -> Iterator[None]:
    if not active:
        yield
        return
    saved = termios.tcgetattr(sys.stdin.fileno())
    tty.setraw(sys.stdin.fileno())
    try:
        yield
    finally:
        termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)


def run(args: argparse.Namespace, root: Path) -> int:
    """Run one container in a fresh VM; return its exit status.

    (``-d`` runs are :func:`sandbox.run.detached.run_detached`.)

    The VM goes when this process does, however it ends: a watcher of ours, started before
    the boot (:func:`sandbox.run.launch.watch_owner`), tears the pod down once we are gone.
    On a normal end we only mark the pod ``stopping`` (a run of the same name waits for it)
    and exit with the container's status: the watcher asks the agent to power the guest off
    (it syncs its file systems first: what the container wrote to volumes is on the host),
    waits for QEMU and removes everything the run started, off the command's path
    (:mod:`sandbox.run.teardown`).
    """
    check_options(args)
    _import_agent_client_meanwhile()
    image = _resolve_image(args)
    with HeldSources() as held:  # the sources as checked, until they are shared
        pod_id = run_name(args)
        check_name_free(root, pod_id)
        spec = build_spec(args, image, held, pod_id)
        kind = run_kind(args, spec, image)  # the pool's settings checked before a boot
        if args.name:  # its pod goes by its name, which that reserves: no pooled VM
            kind = None
        pod, watch = boot_watched(root, pod_id, CONTAINER_ID, args, spec, image, kind)
        try:
            status = _run_in_pod(args, pod, spec, image, held, pod_id)
        except BaseException:
            _teardown(pod)
            watch.dismiss()
            raise
    # The container has ended: its host files (the image, -v volumes) are unmounted before
    # this command returns, so that nothing below --root reaches a host directory once it has
    # (an 'rm -rf ROOT' right after followed a read-write volume's bind and emptied the
    # volume; breaker4). The VM's power-off stays off the command's path.
    with contextlib.suppress(SandboxError):
        unshare_container_files(pod, CONTAINER_ID)
    pod.mark_stopping()
    pool.refill(root, kind)
    sys.stdout.flush()
    sys.stderr.flush()
    return status


def _resolve_image(args: argparse.Namespace) -> images.Image:
    """:func:`sandbox.image.pull.resolve_image`, whose modules (registries, skopeo, the pull
    display: ~20 ms of imports) are imported only for an image that may have to be pulled."""
    local = images.resolve_local(args.image, bool(getattr(args, "quiet", False)))
    if local is not None:
        return local
    from sandbox.image import pull as image_pull

    return image_pull.resolve_image(args)


def _import_agent_client_meanwhile() -> None:
    """Import the agent client (gRPC and the protocol's messages: ~80 ms of CPU) in a thread
    while this one boots the pod, whose first call to the agent comes once QEMU has loaded
    the template's state (~0.5 s of waiting). The boot path imports none of it at module
    level; the first use imports it as usual (waiting for this thread if it is still at it,
    or raising what it raised)."""
    threading.Thread(
        target=importlib.import_module, args=("sandbox.pod.agent_client",), daemon=True
    ).start()


def _teardown(pod: Pod) -> None:
    with contextlib.suppress(SandboxError):
        unshare_container_files(pod, CONTAINER_ID)
    pod.stop()


def _run_in_pod(
    args: argparse.Namespace,
    pod: Pod,
    spec: dict[str, Any],
    image: images.Image,
    held: HeldSources,
    name: str,
) -> int:
    terminal = args.tty and sys.stdin.isatty()
    if terminal:
        # The container's terminal has ours size from its first moment (docker's ConsoleSize;
        # a resize after the start raced a quick ``stty size``, which read 0 x 0).
        size = terminal_size.console_size(terminal_size.of_caller((sys.stdin.fileno(),)))
        if size is not None:
            spec = {**spec, "process": {**spec["process"], "consoleSize": size}}
    with pod.client() as client:
        # Without -i nothing is relayed to stdin: create, start and EOF on stdin are one call
        # (the output waits in the guest's pipes until the relay reads it).
        one_call = not args.interactive
        create_with(
            client,
            pod,
            CONTAINER_ID,
            spec,
            image,
            held,
            start=one_call,
            run_name=name,
            # One pipe for both streams when ours are one file (``2>&1``), as runc's process
            # would inherit it: the order written is the order seen.
            stderr_to_stdout=not args.tty
            and same_file.one_description(sys.stdout.fileno(), sys.stderr.fileno()),
            workdir_option=bool(args.workdir),
        )
        stdin = sys.stdin.fileno() if args.interactive else None
        relay = StdioRelay(
            client, CONTAINER_ID, "", stdin, sys.stdout.fileno(), sys.stderr.fileno(), args.tty
        )
        # Raw only when the keys go to the container (-i): with -t alone the local terminal
        # keeps its line discipline, so Ctrl-C is a SIGINT here, forwarded (docker run -t).
        with _raw_terminal(terminal and args.interactive), _forward_signals(client, terminal):
            relay.start()
            if not one_call:
                client.start_container(CONTAINER_ID)
            if terminal:
                _resize(client)
            try:
                status, sig, oom = client.wait_process(CONTAINER_ID, "", args.timeout)
            except AgentError:
                if args.timeout is None:
                    raise
                client.signal(CONTAINER_ID, "", signal.SIGKILL, all=True)
                relay.join(10)
                print(f"pysandbox: timed out after {args.timeout:g}s; killed", file=sys.stderr)
                return EXIT_TIMEOUT
            relay.join(30)
        if oom:  # the cgroup's OOM killer acted: on the container's process, or another
            whom = "the container" if sig == signal.SIGKILL else "a process of the container"
            print(f"pysandbox: {whom} was killed: out of memory", file=sys.stderr)
        # No RemoveContainer: the VM is powered off next (its guest file systems synced).
        return status


def _resize(client: ContainerClient) -> None:
    with contextlib.suppress(OSError, AgentError):
        cols, rows = os.get_terminal_size(sys.stdin.fileno())
        client.resize(CONTAINER_ID, "", rows, cols)


#: The signals a foreground run passes on to its container (docker's sig-proxy passes every
#: catchable one): SIGQUIT (a thread dump), SIGUSR1/SIGUSR2 (reopen logs...) used to kill
#: this process and so the sandbox. SIGALRM is not among them: it paces this process's own
#: deferred termination (sandbox.cli.termination).
FORWARDED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


def _forward_signals(
    client: ContainerClient, terminal: bool
) -> contextlib.AbstractContextManager[None]:
    """Forward :data:`FORWARDED` to the container (and window size changes), as docker's
    sig-proxy does, except one this process ignores: it was started with it ignored (a
    shell's background job ignores SIGINT, ``nohup`` SIGHUP), so its container is not to get
    it either."""
    actions: dict[int, Callable[[int], None]] = {
        signum: lambda signum: _signal_quietly(client, signum)
        for signum in FORWARDED
        if signal.getsignal(signum) != signal.SIG_IGN
    }
    if terminal:
        actions[signal.SIGWINCH] = lambda _signum: _resize(client)
    return forwarding(actions)


def _signal_quietly(client: ContainerClient, signum: int) -> None:
    with contextlib.suppress(AgentError):
        client.signal(CONTAINER_ID, "", signum)
