"""Give back the guest-RAM pages of a restored VM that hold only zeros.

Loading a saved VM state, QEMU 7.2 reads every page of guest RAM to see whether it is already
zero (``ram_handle_compressed``); on a shared memfd (the RAM of a VM with virtio-fs) a read
fault allocates the page, so a restored 512 MiB guest costs 512 MiB of host memory although
the guest only ever touched ~100 MiB. While the VM is paused after loading, the zero pages
are punched out of the memfd (``fallocate(PUNCH_HOLE)``): the guest reads them as zeros and
they cost nothing until written again.

Only ever call this while the VM is paused: a page the guest writes between the check and
the punch would be lost.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
from pathlib import Path

PAGE = 4096
CHUNK = 2 << 20
_ZERO_CHUNK = bytes(CHUNK)
_ZERO_PAGE = bytes(PAGE)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
#: How QEMU's memory-backend-memfd shows in /proc/PID/fd.
MEMFD_PREFIX = "/memfd:memory-backend-memfd"


def find_ram_memfd(pid: int) -> Path | None:
    """The /proc path of QEMU ``pid``'s guest-RAM memfd, or None if it has none."""
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = list(fd_dir.iterdir())
    except OSError:
        return None
    for entry in entries:
        try:
            if os.readlink(entry).startswith(MEMFD_PREFIX):
                return entry
        except OSError:
            continue
    return None


def punch_zero_pages(path: Path) -> int:
    """Punch every all-zero page out of the memfd at ``path``; bytes released.

    Reads each page once (all are resident after a state load, so reading allocates nothing)
    and coalesces runs of zero pages into one ``fallocate`` each. OSError if the file cannot
    be opened or punched.
    """
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as ram:
            return _punch_runs(fd, ram, size)
    finally:
        os.close(fd)


def _punch_runs(fd: int, ram: mmap.mmap, size: int) -> int:
    # Slices of an mmap are bytes, whose == is one memcmp (a memoryview compares per item).
    released = 0
    run_start: int | None = None

    def flush(end: int) -> None:
        nonlocal run_start, released
        if run_start is not None and end > run_start:
            _fallocate_punch(fd, run_start, end - run_start)
            released += end - run_start
        run_start = None

    for chunk in range(0, size, CHUNK):
        data = ram[chunk : chunk + CHUNK]
        if data == _ZERO_CHUNK:
            if run_start is None:
                run_start = chunk
            continue
        for offset in range(0, len(data), PAGE):
            if data[offset : offset + PAGE] == _ZERO_PAGE:
                if run_start is None:
                    run_start = chunk + offset
            else:
                flush(chunk + offset)
    flush(size)
    return released


def _fallocate_punch(fd: int, offset: int, length: int) -> None:
    """``fallocate(PUNCH_HOLE|KEEP_SIZE)`` (Python's os module has no flags argument)."""
    libc = _libc()
    if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"fallocate(PUNCH_HOLE) at {offset}: {os.strerror(errno)}")


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    libc.fallocate.restype = ctypes.c_int
    return libc
