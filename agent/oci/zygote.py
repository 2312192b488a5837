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

A spare runtime: once this process has served a request and no other comes within
:data:`SPARE_AFTER` seconds, it forks the next runtime ahead the same way (fork, fork) and
leaves it waiting on a socket of its own; the next request is checked here as always and
then handed to that spare (its message and fds), whose pid is the reply. The two forks of a
~20 MiB process (~15 ms under TCG) so leave the path of the request (an ``exec``'s above
all) for an idle moment. A spare that cannot take the request (killed meanwhile) is dropped
and the runtime forked as before. Only after a first request: that is, never in the template
VM (a spare there would be one process, and one ``random`` state, for every VM restored from
it), always after the restored VM's CRNG was reseeded. The spare is the zygote's as it was
when forked — it never changes between requests — so what it runs is what a runtime forked
at the request would run.

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
import select
import socket
import sys
from collections.abc import Callable

from agent.oci import device_filter, syscalls
from agent.oci import exec as exec_mod
from agent.oci import init as init_mod
from ocispec import device_rules
from ocispec import seccomp as _seccomp  # noqa: F401 - imported lazily by ocispec.spec

#: The runtimes a request may name, and their entry points (``main(argv) -> status``).
MODULES = {"agent.oci.init": init_mod, "agent.oci.exec": exec_mod}
#: fds attached to each request: the runtime's 0 (stdin), 1, 2, 3 (payload), 4 (sync).
FDS_PER_REQUEST = 5
MAX_REQUEST_BYTES = 64 * 1024
#: The request socket's fd in this process.
SOCKET_FD = 3
#: Seconds without a request after which a spare runtime is forked (see above). Not at
#: once: while requests come in quick succession, its forks would compete for the guest's
#: CPU with the runtimes just started.
SPARE_AFTER = 0.2
#: The agent's message: fork the spare at the next idle moment, before any request.
SPARE_AHEAD = b"spare-ahead"


def _runtime(module_name: str, args: list[str], fds: list[int], keep: tuple[int, ...]) -> None:
    """In the forked runtime: close ``keep`` (the zygote's fds), install ``fds`` as 0-4,
    close everything else, run the module. Never returns."""
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
        start = FDS_PER_REQUEST
        for kept in device_filter.preloaded_fds():  # close-on-exec: never in a container
            os.closerange(start, kept)
            start = kept + 1
        os.closerange(start, 65536)
        module = MODULES[module_name]
        sys.argv = [str(module.__file__), *args]
        code = module.main(args)
    except BaseException:  # the fresh interpreter would have printed it and exited 1
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def _check(message: bytes, fds: list[int]) -> tuple[str, list[str]]:
    """The module and args of a request; ValueError (KeyError, TypeError) when it is bad."""
    request = json.loads(message)
    module = request["module"]
    args = request["args"]
    if module not in MODULES or not isinstance(args, list):
        raise ValueError(f"unknown module {module!r}")
    if not all(isinstance(arg, str) for arg in args):
        raise ValueError("args must be strings")
    if len(fds) != FDS_PER_REQUEST:
        raise ValueError(f"{len(fds)} fds attached, not {FDS_PER_REQUEST}")
    return module, args


def _fork_runtime(
    sock: socket.socket, run: Callable[[tuple[int, ...]], None], keep: tuple[int, ...]
) -> int | None:
    """Fork, fork: the grandchild calls ``run(fds_to_close)`` (it must not return), the
    middle process reports its pid and exits. The grandchild's pid; None when a fork
    failed."""
    pid_r, pid_w = os.pipe()
    try:
        middle = os.fork()
    except OSError:
        os.close(pid_r)
        os.close(pid_w)
        return None
    if middle == 0:  # the middle process: fork the runtime, tell its pid, exit
        try:
            os.close(pid_r)
            runtime = os.fork()
            if runtime == 0:
                run((pid_w, sock.fileno(), *keep))
            os.write(pid_w, str(runtime).encode())
        finally:
            os._exit(0)
    os.close(pid_w)
    reply = b""
    while chunk := os.read(pid_r, 32):
        reply += chunk
    os.close(pid_r)
    os.waitpid(middle, 0)
    return int(reply) if reply.isdigit() else None


def _serve_one(sock: socket.socket, message: bytes, fds: list[int]) -> bytes:
    """Fork the runtime a request asks for; the reply to send."""
    try:
        module, args = _check(message, fds)
    except (ValueError, KeyError, TypeError) as exc:
        return f"error bad request: {exc}".encode()
    pid = _fork_runtime(sock, lambda close: _runtime(module, args, fds, close), ())
    return b"error fork failed" if pid is None else str(pid).encode()


class _Spare:
    """A runtime forked ahead, waiting for its request on :attr:`sock` (see above)."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock

    @staticmethod
    def fork(sock: socket.socket) -> _Spare | None:
        """A new spare; None when it cannot be made (the next request forks as before)."""
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError:
            return None
        try:
            pid = _fork_runtime(sock, lambda close: _wait_as_spare(theirs, close), (ours.fileno(),))
        finally:
            theirs.close()
        if pid is None:
            ours.close()
            return None
        return _Spare(pid, ours)

    def take(self, message: bytes, fds: list[int]) -> bool:
        """Hand a checked request to the spare; whether it took it. The spare is used up
        either way."""
        try:
            socket.send_fds(self.sock, [message], fds)
            return True
        except OSError:  # it is gone (killed): the caller forks instead
            return False
        finally:
            self.sock.close()


def _wait_as_spare(sock: socket.socket, close: tuple[int, ...]) -> None:
    """In a spare: wait for the one request the zygote hands over and run it, as a runtime
    forked for it would; exit quietly when the zygote goes away first. Never returns."""
    gc.disable()
    for fd in close:
        os.close(fd)
    try:
        message, fds, _flags, _addr = socket.recv_fds(sock, MAX_REQUEST_BYTES, FDS_PER_REQUEST)
        module, args = _check(message, fds)  # checked by the zygote already
    except Exception:  # EOF (the zygote exited) or anything unexpected: nothing to run
        os._exit(0)
    _runtime(module, args, fds, (sock.fileno(),))


def _idle(sock: socket.socket, seconds: float) -> bool:
    """Whether no request arrives on ``sock`` within ``seconds``."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    try:
        return not poller.poll(int(seconds * 1000))
    except InterruptedError:
        return False


def serve(sock: socket.socket) -> None:
    """Answer requests on ``sock`` until EOF."""
    # Everything imported so far is frozen out of the collector's reach: a collection in a
    # forked runtime would write the header of every tracked object, i.e. copy (COW) most of
    # this process's heap page by page -- under TCG the dearest part of a fork.
    # The device filter most containers get, loaded once here (in the template VM) rather
    # than in every runtime (agent.oci.device_filter.preload).
    device_filter.preload(syscalls.LinuxSyscalls(), device_rules.policy(()))
    # What every runtime would otherwise look up anew: libc's functions, the signals not at
    # their default action, our namespaces, the kernel's last capability (constants of this
    # process and kernel: no runtime changes a disposition before it resets them).
    syscalls.preload_libc()
    syscalls.preload_signals()
    exec_mod.preload(syscalls.LinuxSyscalls())
    gc.collect()
    gc.freeze()
    sock.send(b"ready")
    spare: _Spare | None = None
    served = False
    while True:
        if served and spare is None and _idle(sock, SPARE_AFTER):
            spare = _Spare.fork(sock)
        try:
            message, fds, _flags, _addr = socket.recv_fds(
                sock, MAX_REQUEST_BYTES, FDS_PER_REQUEST + 1
            )
        except InterruptedError:
            continue
        if not message and not fds:
            return
        if message == SPARE_AHEAD and not fds:
            served = True
            sock.send(b"ok")
            continue
        served = True
        try:
            reply = None
            if spare is not None:
                try:
                    _check(message, fds)
                except (ValueError, KeyError, TypeError):
                    pass  # _serve_one says what is wrong; the spare waits for the next
                else:
                    if spare.take(message, fds):
                        reply = str(spare.pid).encode()
                    spare = None
            if reply is None:
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
