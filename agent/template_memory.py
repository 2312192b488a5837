"""Leave a template VM's memory as small as it can be before the host saves it.

Every pod restored from a template holds, in host memory, each guest page that was not zero
when the template was saved (the host punches the zero ones out after the restore,
``hypervisor/zeropages.py``). Measured in an idle restored pod (docs/performance.md, "Guest
RAM of a restored pod"): ~11 MiB of page cache nothing maps (the ``.pyc`` files the agent
read at boot), ~7 MiB of reclaimable slab (dentries and inodes), and a few MiB of free pages
that still hold what they held before they were freed (boot-time buffers, the initramfs).

:func:`prepare` drops the clean caches and then zeroes the free memory: it maps anonymous
memory until only :func:`margin_bytes` stay free and writes every page of it — the kernel
hands out a zeroed page on each first write — then unmaps it, so the pages go back to the
free lists holding zeros. The buddy allocator hands out the smallest free blocks first, so
the scattered pages just freed by the drop are among those zeroed; what stays free is mostly
blocks no one ever wrote.

Only for a guest about to be saved as a template: the caches dropped are read again on use,
and the pass briefly takes nearly all free memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass

#: madvise(2) advice that faults pages in writable (Linux 5.14); absent from Python 3.11's mmap.
MADV_POPULATE_WRITE = 23
#: Memory mapped per step of the zeroing pass.
CHUNK = 8 << 20
#: Free memory always left alone, on top of the kernel's reserve (:func:`margin_bytes`).
MIN_MARGIN = 8 << 20
PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` did, bytes: free memory before the drop, after it, and zeroed."""

    free_before: int
    free_after_drop: int
    zeroed: int


def mem_free(meminfo: str = "/proc/meminfo") -> int:
    """``MemFree`` of ``meminfo`` in bytes; ValueError if it has none."""
    with open(meminfo, encoding="ascii") as lines:
        for line in lines:
            if line.startswith("MemFree:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no MemFree in {meminfo}")


def margin_bytes(min_free: str = "/proc/sys/vm/min_free_kbytes") -> int:
    """Free memory the zeroing pass leaves: four times the kernel's ``min_free_kbytes``
    (above every zone's high watermark, so reclaim never starts) plus :data:`MIN_MARGIN`."""
    try:
        with open(min_free, encoding="ascii") as source:
            reserve = int(source.read().strip() or 0) * 1024
    except (OSError, ValueError):
        reserve = 16 << 20
    return 4 * reserve + MIN_MARGIN


def drop_caches(sysctl: str = "/proc/sys/vm/drop_caches") -> None:
    """Write back, then drop the clean page cache and reclaimable slab (``drop_caches`` 3).
    OSError if the kernel refuses (needs CAP_SYS_ADMIN)."""
    os.sync()
    with open(sysctl, "w", encoding="ascii") as knob:
        knob.write("3\n")


def zero_free_memory(
    margin: int,
    free: int | None = None,
    read_free: Callable[[], int] = mem_free,
    chunk: int = CHUNK,
) -> int:
    """Map and write anonymous memory until at most ``margin`` bytes stay free, then unmap
    it all; bytes written. ``read_free`` (a callable returning free bytes, default
    :func:`mem_free`) is asked before every ``chunk`` so that the pass stops early if
    something else took memory meanwhile; ``free`` is a first reading, if the caller has one.
    """
    maps: list[mmap.mmap] = []
    written = 0
    try:
        available = read_free() if free is None else free
        while available - chunk >= margin:
            area = mmap.mmap(-1, chunk, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            maps.append(area)
            # Small pages: a huge page would take a never-written 2 MiB block, not the
            # scattered small blocks that hold stale bytes.
            area.madvise(mmap.MADV_NOHUGEPAGE)
            _populate(area, chunk)
            written += chunk
            available = read_free()
    finally:
        for area in maps:
            area.close()
    return written


def _populate(area: mmap.mmap, size: int) -> None:
    """Fault every page of ``area`` in writable (each is zeroed by the kernel)."""
    try:
        area.madvise(MADV_POPULATE_WRITE)
    except OSError:  # a kernel older than 5.14: one write per page
        for offset in range(0, size, PAGE):
            area[offset] = 0


def trim_own_heap() -> None:
    """Collect this process's garbage and give the free parts of its C heap back to the
    kernel (``malloc_trim(0)``), so that the zeroing pass finds them free."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def prepare() -> Prepared:
    """Drop the guest's clean caches and zero its free memory (module docstring); the
    agent's own garbage first (:func:`trim_own_heap`). OSError if the caches cannot be
    dropped."""
    trim_own_heap()
    before = mem_free()
    drop_caches()
    after = mem_free()
    zeroed = zero_free_memory(margin_bytes(), free=after)
    return Prepared(free_before=before, free_after_drop=after, zeroed=zeroed)
