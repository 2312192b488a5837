"""What a guest restored from a template VM does to become a machine of its own.

Every pod restored from one saved template starts with the same kernel CRNG state and a
realtime clock as old as the template. :func:`reseed` mixes fresh host entropy into the
input pool (``RNDADDENTROPY``, credited) and forces the CRNG to reseed from it
(``RNDRESEEDCRNG``), so processes started afterwards (containers) draw numbers no other
clone draws. :func:`set_clock` steps ``CLOCK_REALTIME`` to the host's time.
:func:`set_hostname` names the guest (its root UTS namespace) as the host asks.

What cannot be undone here (see docs/performance.md): state that existed before the
snapshot stays shared by the clones — the agent's own address-space layout and
``/proc/sys/kernel/random/boot_id``.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import time

MIN_ENTROPY = 16
MAX_ENTROPY = 512
#: ioctls of random(4): _IOW('R', 0x03, int[2]) and _IO('R', 0x07).
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
#: No time before this (2020-01-01) is accepted: a zero or garbage value is a host bug.
MIN_REALTIME_NS = 1_577_836_800 * 10**9
#: sethostname(2) takes up to HOST_NAME_MAX bytes.
HOST_NAME_MAX = 64


def reseed(entropy: bytes, device: str = "/dev/urandom") -> None:
    """Credit ``entropy`` (MIN..MAX_ENTROPY bytes) to the input pool and reseed the CRNG.

    ValueError for a size out of range; OSError if the kernel refuses (needs CAP_SYS_ADMIN).
    """
    if not MIN_ENTROPY <= len(entropy) <= MAX_ENTROPY:
        raise ValueError(f"entropy must be {MIN_ENTROPY}..{MAX_ENTROPY} bytes, not {len(entropy)}")
    # struct rand_pool_info { int entropy_count (bits); int buf_size (bytes); __u32 buf[]; }
    padded = entropy + b"\0" * (-len(entropy) % 4)
    info = struct.pack("ii", len(entropy) * 8, len(entropy)) + padded
    with open(device, "wb", buffering=0) as random_device:
        fcntl.ioctl(random_device, RNDADDENTROPY, info)
        fcntl.ioctl(random_device, RNDRESEEDCRNG)


def set_clock(realtime_ns: int) -> None:
    """Step CLOCK_REALTIME to ``realtime_ns``; ValueError for an implausible time."""
    if realtime_ns < MIN_REALTIME_NS:
        raise ValueError(f"realtime_ns {realtime_ns} is before 2020")
    time.clock_settime_ns(time.CLOCK_REALTIME, realtime_ns)


def set_hostname(hostname: str) -> None:
    """Name the guest ``hostname`` (sethostname(2) in the root UTS namespace), which a
    container with a UTS namespace of its own and no ``hostname`` in its spec inherits, as
    one under runc inherits the host's (OCI runtime spec, config.md "Hostname"): the host's
    name byte for byte, whatever it holds. ValueError for an empty name, one longer than
    HOST_NAME_MAX bytes or with a NUL; OSError from the kernel."""
    raw = hostname.encode()
    if not 0 < len(raw) <= HOST_NAME_MAX or b"\0" in raw:
        raise ValueError(f"invalid hostname {hostname[:HOST_NAME_MAX]!r}")
    socket.sethostname(hostname)
