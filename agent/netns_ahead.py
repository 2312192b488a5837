"""A network namespace made ahead of a restored VM's first container.

Making a network namespace is the largest single step of a container's set-up that is not
Python (every pernet subsystem of the guest kernel, IPv6 included: ~0.1 s of guest CPU under
TCG, docs/performance.md). A restored VM idles while the host turns its ``Restored`` answer
into a CreateContainer (a round trip, ~0.1 s); :class:`NetnsAhead` makes one namespace then,
in a thread of the agent, so that the first container that asks for a new one of its own
joins it instead of making it on its path.

Never in the template VM: a new namespace draws random values (its hash seeds, for port and
hash-table randomisation), which every VM restored from the template would then share. It is
made after ``Restored`` reseeded the CRNG, so each VM's is its own, as one the runtime made
would be. It is given to one container only (this module drops its reference once that
container's runtime has joined it), so it goes with that container, as one it made would
(:func:`agent.containers.hold_namespaces`: at RemoveContainer); any further container makes
its own.

The namespace is what the runtime would have made: new, empty, owned by the guest's initial
user namespace, loopback up (runc's "loopback only", agent/oci/init.py step 5b). Only a spec
that asks for a new network namespace and no user namespace of its own gets it (a namespace
made in a new user namespace must be owned by that one).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from agent.oci import syscalls
from ocispec import linux

#: How long a container waits for a namespace still being made (seconds) before it makes its
#: own (both use the same vCPU: waiting is the cheaper choice, unless something is wrong).
TAKE_WAIT = 5.0


class NetnsAhead:
    """At most one namespace made ahead; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._made = threading.Event()
        self._started = False

    def start(self) -> None:
        """Make the namespace in a thread of its own (once; later calls do nothing)."""
        with self._lock:
            if self._started:
                return
            self._started = True
        threading.Thread(target=self._make, name="netns-ahead", daemon=True).start()

    def _make(self) -> None:
        # unshare(2) moves only the calling thread into the new namespace; this thread ends
        # right after, leaving the fd the only reference.
        fd = None
        try:
            # Behind the agent's own threads (the answer to Restored is still being sent):
            # this one only uses what would otherwise be idle time.
            os.setpriority(os.PRIO_PROCESS, 0, 19)  # 0: this thread (Linux nice is per thread)
            syscalls.check(syscalls.libc().unshare(linux.CLONE_NEWNET), "unshare(CLONE_NEWNET)")
            fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            syscalls.LinuxSyscalls().loopback_up()  # a socket of this thread: the new namespace
        except OSError:
            if fd is not None:
                os.close(fd)
            fd = None  # the container makes its own, as without this module
        with self._lock:
            self._fd = fd
        self._made.set()

    def take_for(self, spec: dict[str, Any]) -> int | None:
        """If ``spec`` (a decoded OCI config) asks for a new network namespace and has no
        user namespace, and one was made (or is being made: waited for up to
        :data:`TAKE_WAIT`), point its ``network`` entry at it and return the fd, which the
        caller closes once the runtime has joined (or failed). None, ``spec`` unchanged,
        otherwise."""
        entry = _new_network_entry(spec)
        if entry is None:
            return None
        with self._lock:
            if not self._started:
                return None
        if not self._made.wait(TAKE_WAIT):
            return None
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            entry["path"] = f"/proc/{os.getpid()}/fd/{fd}"
        return fd


def _new_network_entry(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The spec's ``{"type": "network"}`` entry without a path, when it has no user namespace
    entry; else None (anything malformed too: the runtime's parser says what is wrong)."""
    spec_linux = spec.get("linux")
    namespaces = spec_linux.get("namespaces") if isinstance(spec_linux, dict) else None
    if not isinstance(namespaces, list):
        return None
    found = None
    for entry in namespaces:
        if not isinstance(entry, dict):
            return None
        kind = entry.get("type")
        if kind == "user":
            return None
        if kind == "network":
            if found is not None or "path" in entry:
                return None
            found = entry
    return found
