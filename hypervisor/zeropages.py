"""Give back the guest-RAM pages of a restored VM that hold only zeros.

Loading a saved VM state, QEMU 7.2 reads every page of guest RAM to see whether it is already
zero (``ram_handle_compressed``); on a shared memfd (the RAM of a VM with virtio-fs) a read
fault allocates the page, so a restored 512 MiB guest costs 512 MiB of host memory although
the guest only ever touched ~100 MiB. While the VM is paused after loading, the zero pages
are punched out of the memfd (``fallocate(PUNCH_HOLE)``): the guest reads them as zeros and
they cost nothing until written again. Which pages are zero depends only on the saved state,
so the runs found at the first restore of a template are kept beside it (:class:`ZeroMap`)
and later restores punch them without reading guest RAM.

Only ever call this while the VM is paused: a page the guest writes between the check and
the punch would be lost.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

PAGE = 4096
CHUNK = 2 << 20
_ZERO_CHUNK = bytes(CHUNK)
_ZERO_PAGE = bytes(PAGE)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
#: Runs of a ZeroMap spot-checked before it is trusted.
SPOT_CHECKS = 32
#: Largest zero-page map read (bytes): far above a 512 MiB guest's worst case.
MAX_MAP_BYTES = 16 << 20
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


@dataclass(frozen=True)
class ZeroMap:
    """Where the zero-page runs of one saved state are kept (a small JSON file next to it),
    and ``key``, the identity of that state (:meth:`key_of`). A restore of the same state
    loads the same bytes into guest RAM, so the runs found once hold for every later restore:
    they are punched without reading the 512 MiB again (~0.15 s of every template restore).

    The key is what makes a map trustworthy: the same state file (written once, never
    rewritten in place), loaded into a fresh memfd of the same size by a paused QEMU, gives
    the same bytes. The spot check of :func:`punch_zero_pages` reads only the ends of some
    runs: it catches a gross mismatch, it does not prove a map."""

    path: Path
    key: str

    @staticmethod
    def key_of(state_fd: int) -> str:
        """The identity of the saved state open at ``state_fd``: device, inode, size and
        modification time (a template's state is written once, then renamed into place)."""
        st = os.fstat(state_fd)
        return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"

    def load(self, size: int) -> list[tuple[int, int]] | None:
        """The runs recorded for this key and a RAM of ``size`` bytes; None when there are
        none, or they are for another state or size, or malformed."""
        try:
            with open(self.path, "rb") as handle:
                raw = handle.read(MAX_MAP_BYTES + 1)
            document = json.loads(raw)
        except (OSError, ValueError):
            return None
        if len(raw) > MAX_MAP_BYTES or not isinstance(document, dict):
            return None
        if document.get("key") != self.key or document.get("size") != size:
            return None
        runs = document.get("runs")
        if not isinstance(runs, list):
            return None
        checked: list[tuple[int, int]] = []
        end = 0
        for run in runs:
            if not (isinstance(run, list) and len(run) == 2):
                return None
            start, length = run
            if not (isinstance(start, int) and isinstance(length, int)):
                return None
            if start < end or length <= 0 or start % PAGE or length % PAGE or start + length > size:
                return None
            checked.append((start, length))
            end = start + length
        return checked

    def store(self, size: int, runs: list[tuple[int, int]]) -> None:
        """Record ``runs`` for this key (best effort: a map that cannot be written is
        computed again next time)."""
        document = {"key": self.key, "size": size, "runs": [list(run) for run in runs]}
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        with contextlib.suppress(OSError):
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with open(fd, "w", encoding="ascii") as handle:
                handle.write(json.dumps(document, separators=(",", ":")))
            os.replace(temporary, self.path)
        with contextlib.suppress(OSError):
            temporary.unlink()


def punch_zero_pages(path: Path, known: ZeroMap | None = None) -> int:
    """Punch every all-zero page out of the memfd at ``path``; bytes released.

    With ``known`` holding the runs of this very state (:class:`ZeroMap`), those are punched
    after a spot check (the first and last page of up to :data:`SPOT_CHECKS` runs read as
    zeros; otherwise the map is ignored). Else each page is read once (all are resident after
    a state load, so reading allocates nothing), runs of zero pages are coalesced into one
    ``fallocate`` each, and recorded in ``known``. OSError if the file cannot be opened or
    punched.
    """
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        runs = known.load(size) if known is not None else None
        if runs is None or not _spot_check(fd, runs):
            with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as ram:
                runs = _zero_runs(ram, size)
            if known is not None:
                known.store(size, runs)
        for start, length in runs:
            _fallocate_punch(fd, start, length)
        return sum(length for _start, length in runs)
    finally:
        os.close(fd)


def _spot_check(fd: int, runs: list[tuple[int, int]]) -> bool:
    """The first and last page of up to :data:`SPOT_CHECKS` runs, spread over the list,
    read as zeros."""
    step = max(1, len(runs) // SPOT_CHECKS)
    for start, length in runs[::step]:
        for offset in (start, start + length - PAGE):
            if os.pread(fd, PAGE, offset) != _ZERO_PAGE:
                return False
    return True


def _zero_runs(ram: mmap.mmap, size: int) -> list[tuple[int, int]]:
    """(offset, length) of every run of all-zero pages, in order."""
    # Slices of an mmap are bytes, whose == is one memcmp (a memoryview compares per item).
    runs: list[tuple[int, int]] = []
    run_start: int | None = None

    def flush(end: int) -> None:
        nonlocal run_start
        if run_start is not None and end > run_start:
            runs.append((run_start, end - run_start))
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
    return runs


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
