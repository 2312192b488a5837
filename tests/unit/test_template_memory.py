"""The guest's template preparation (agent/template_memory.py) without a VM: how much free
memory the zeroing pass takes and leaves, and what it reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import template_memory

CHUNK = 64 << 10


def test_zeroing_takes_free_memory_down_to_the_margin_and_no_further(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    free = [10 * CHUNK]

    def read_free() -> int:
        return free[0]

    real_populate = template_memory._populate

    def populate(area: object, size: int) -> None:
        real_populate(area, size)  # type: ignore[arg-type]
        free[0] -= size  # what the kernel would report once the pages are taken

    monkeypatch.setattr(template_memory, "_populate", populate)
    written = template_memory.zero_free_memory(3 * CHUNK + 1, read_free=read_free, chunk=CHUNK)
    assert written == 6 * CHUNK  # 10 free, 4 chunks (more than the margin) stay free
    assert free[0] == 4 * CHUNK


def test_zeroing_stops_when_something_else_takes_the_memory() -> None:
    readings = iter([8 * CHUNK, CHUNK])  # after the first chunk, another process took it
    written = template_memory.zero_free_memory(CHUNK, read_free=lambda: next(readings), chunk=CHUNK)
    assert written == CHUNK


def test_nothing_is_taken_when_free_memory_is_within_the_margin() -> None:
    assert template_memory.zero_free_memory(8 * CHUNK, free=8 * CHUNK, chunk=CHUNK) == 0


def test_meminfo_and_margin_are_read_from_the_kernel_files(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  481284 kB\nMemFree:   401752 kB\nBuffers: 1 kB\n")
    assert template_memory.mem_free(str(meminfo)) == 401752 * 1024
    meminfo.write_text("MemTotal:  481284 kB\n")
    with pytest.raises(ValueError, match="no MemFree"):
        template_memory.mem_free(str(meminfo))
    min_free = tmp_path / "min_free_kbytes"
    min_free.write_text("2740\n")
    assert template_memory.margin_bytes(str(min_free)) == 4 * 2740 * 1024 + (8 << 20)
    # Unreadable: a conservative reserve rather than none.
    assert template_memory.margin_bytes(str(tmp_path / "missing")) > 4 * 2740 * 1024
