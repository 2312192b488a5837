"""``python3 -m agent.oci.zygote``: the in-guest runtime, pre-imported, forked per request.

A fresh ``python3 -m agent.oci.init`` costs ~0.6 s under TCG (interpreter start-up and
imports, translated anew in every QEMU); this process pays that once, when the agent starts
(before the template VM is saved), and then forks one runtime per container or exec. The
forked runtime runs exactly what ``python3 -m MODULE ARGS`` would: same interpreter, flags,
environment, working directory, session, cgroup and signal dispositions (those of this
process, which the agent spawns the way it spawned runtimes), the same ``main(argv)``, the
same fds 0-4. See docs/oci-in-guest.md, "The zygote".

Protocol on fd 3, a SOCK_SEQPACKET socket from the agent (:mod:`agent.zygote`): this process
first sends ``ready``. Then each request is one message: the JSON ``{"module": M, "args":
[...]}`` (M one of :data:`MODULES`) with exactly five fds attached (SCM_RIGHTS), which become
the runtime's fds 0-4; the reply is one message, the runtime's pid in decimal ASCII (as the
agent's pid namespace sees it), or ``error <message>``. EOF: exit. Requests are served one at
a time; this process never runs anything else and stays single-threaded (fork is safe).

The runtime is a grandchild (fork, fork, the middle one exits at once): it is re-parented to
the agent, PID 1 or a subreaper, whose reaper gets its exit status as with a spawned runtime.

Fresh state per runtime: Python's ``random`` module reseeds itself from ``os.urandom`` in every
forked child (``os.register_at_fork``), i.e. from the guest kernel's CRNG, which the host
reseeds in every restored VM before any container exists (``Restored``). The string-hash
secret (``PYTHONHASHSEED``) is fixed when this process starts, i.e. in the template VM, so
every runtime of every VM restored from one template shares it — as the agent (PID 1) always
did. It only perturbs the order of Python's own dicts/sets inside the runtime, which execs
the container's program (nothing of its memory survives ``execve``) and takes its input from
the host; no workload sees it.
"""

from __future__ import annotations

import fcntl
import gc
import json
import os
import socket
import sys

from agent.oci import exec as exec_mod
from agent.oci import init as init_mod
from ocispec import seccomp as _seccomp  # noqa: F401 - imported lazily by ocispec.spec

#: The runtimes a request may name, and their entry points (``main(argv) -> status``).
MODULES = {"agent.oci.init": init_mod, "agent.oci.exec": exec_mod}
#: fds attached to each request: the runtime's 0 (stdin), 1, 2, 3 (payload), 4 (sync).
FDS_PER_REQUEST = 5
MAX_REQUEST_BYTES = 64 * 1024
#: The request socket's fd in this process.
SOCKET_FD = 3


def _runtime(module_name: str, args: list[str], fds: list[int], keep: tuple[int, ...]) -> None:
    """In the forked runtime: install ``fds`` as 0-4, close ours, run the module. Never
    returns."""
    code = 1
    # Short-lived (until execve, or the container's start): no collection, no COW copies.
    gc.disable()
    try:
        for fd in keep:
            os.close(fd)
        # Out of the way of 0-4 first (a received fd may have a number in 0-4), then in place.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
        for target, fd in enumerate(high):
            os.dup2(fd, target, inheritable=True)
        os.closerange(FDS_PER_REQUEST, 65536)
        module = MODULES[module_name]
        sys.argv = [str(module.__file__), *args]
        code = module.main(args)
    except BaseException:  # the fresh interpreter would have printed it and exited 1
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def _serve_one(sock: socket.socket, message: bytes, fds: list[int]) -> bytes:
    """Fork the runtime a request asks for; the reply to send."""
    try:
        request = json.loads(message)
        module = request["module"]
        args = request["args"]
        if module not in MODULES or not isinstance(args, list):
            raise ValueError(f"unknown module {module!r}")
        if not all(isinstance(arg, str) for arg in args):
            raise ValueError("args must be strings")
        if len(fds) != FDS_PER_REQUEST:
            raise ValueError(f"{len(fds)} fds attached, not {FDS_PER_REQUEST}")
    except (ValueError, KeyError, TypeError) as exc:
        return f"error bad request: {exc}".encode()
    pid_r, pid_w = os.pipe()
    try:
        middle = os.fork()
    except OSError as exc:
        os.close(pid_r)
        os.close(pid_w)
        return f"error fork: {exc.strerror}".encode()
    if middle == 0:  # the middle process: fork the runtime, tell its pid, exit
        try:
            os.close(pid_r)
            runtime = os.fork()
            if runtime == 0:
                _runtime(module, args, fds, (pid_w, sock.fileno()))
            os.write(pid_w, str(runtime).encode())
        finally:
            os._exit(0)
    os.close(pid_w)
    reply = b""
    while chunk := os.read(pid_r, 32):
        reply += chunk
    os.close(pid_r)
    os.waitpid(middle, 0)
    return reply if reply.isdigit() else b"error fork failed"


def serve(sock: socket.socket) -> None:
    """Answer requests on ``sock`` until EOF."""
    # Everything imported so far is frozen out of the collector's reach: a collection in a
    # forked runtime would write the header of every tracked object, i.e. copy (COW) most of
    # this process's heap page by page -- under TCG the dearest part of a fork.
    gc.collect()
    gc.freeze()
    sock.send(b"ready")
    while True:
        try:
            message, fds, _flags, _addr = socket.recv_fds(
                sock, MAX_REQUEST_BYTES, FDS_PER_REQUEST + 1
            )
        except InterruptedError:
            continue
        if not message and not fds:
            return
        try:
            reply = _serve_one(sock, message, fds)
        finally:
            for fd in fds:
                os.close(fd)
        sock.send(reply)


def main() -> int:
    sock = socket.socket(fileno=SOCKET_FD)
    try:
        serve(sock)
    except OSError:
        return 1
    return 0


if __name__ == "__main__":
    os._exit(main())
