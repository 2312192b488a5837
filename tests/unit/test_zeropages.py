"""Zero pages punched out of a memfd: contents unchanged, memory released."""

from __future__ import annotations

import os
from pathlib import Path

from hypervisor import zeropages


def test_zero_pages_are_released_and_data_kept() -> None:
    size = 8 << 20
    fd = os.memfd_create("memory-backend-memfd")
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, bytes(size), 0)  # every page resident, as after a state load
        data = {3 * 4096: b"a" * 4096, (2 << 20) + 5: b"middle", size - 4096: b"end"}
        for offset, payload in data.items():
            os.pwrite(fd, payload, offset)
        before = os.fstat(fd).st_blocks
        released = zeropages.punch_zero_pages(Path(f"/proc/self/fd/{fd}"))
        # 3 pages hold data; everything else was zero.
        assert released == size - 3 * 4096
        assert os.fstat(fd).st_blocks < before
        assert os.fstat(fd).st_size == size
        for offset, payload in data.items():
            assert os.pread(fd, len(payload), offset) == payload
        assert os.pread(fd, 4096, 0) == bytes(4096)
    finally:
        os.close(fd)


def test_memfd_of_a_process_is_found() -> None:
    fd = os.memfd_create("memory-backend-memfd")
    try:
        found = zeropages.find_ram_memfd(os.getpid())
        assert found is not None and os.readlink(found).startswith(zeropages.MEMFD_PREFIX)
    finally:
        os.close(fd)
    assert zeropages.find_ram_memfd(os.getpid()) is None
