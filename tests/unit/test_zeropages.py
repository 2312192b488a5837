"""Zero pages punched out of a memfd: contents unchanged, memory released."""

from __future__ import annotations

import json
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


SIZE = 8 << 20
DATA = {3 * 4096: b"a" * 4096, (2 << 20) + 5: b"middle", SIZE - 4096: b"end"}


def _loaded_ram(data: dict[int, bytes]) -> int:
    """A memfd as after a state load: every page resident, ``data`` written."""
    fd = os.memfd_create("memory-backend-memfd")
    os.ftruncate(fd, SIZE)
    os.pwrite(fd, bytes(SIZE), 0)
    for offset, payload in data.items():
        os.pwrite(fd, payload, offset)
    return fd


def _punch(fd: int, known: zeropages.ZeroMap | None) -> int:
    return zeropages.punch_zero_pages(Path(f"/proc/self/fd/{fd}"), known)


def _state_key(tmp_path: Path) -> str:
    state = tmp_path / "state"
    state.write_bytes(b"saved vm")
    fd = os.open(state, os.O_RDONLY)
    try:
        return zeropages.ZeroMap.key_of(fd)
    finally:
        os.close(fd)


def test_a_restore_of_the_same_state_punches_the_recorded_runs(tmp_path: Path) -> None:
    known = zeropages.ZeroMap(tmp_path / "zero-pages.json", _state_key(tmp_path))
    first = _loaded_ram(DATA)
    try:
        assert _punch(first, known) == SIZE - 3 * 4096
    finally:
        os.close(first)
    recorded = known.load(SIZE)
    assert recorded is not None and len(recorded) == 3  # before, between and after the data
    # The next restore of that state punches the same runs, and keeps the same data.
    second = _loaded_ram(DATA)
    try:
        blocks = os.fstat(second).st_blocks
        assert _punch(second, known) == SIZE - 3 * 4096
        assert os.fstat(second).st_blocks < blocks
        for offset, payload in DATA.items():
            assert os.pread(second, len(payload), offset) == payload
    finally:
        os.close(second)


def test_a_map_that_does_not_fit_the_ram_is_not_trusted(tmp_path: Path) -> None:
    key = _state_key(tmp_path)
    known = zeropages.ZeroMap(tmp_path / "zero-pages.json", key)
    fd = _loaded_ram(DATA)
    try:
        _punch(fd, known)
    finally:
        os.close(fd)
    # Another state's key, another RAM size: ignored.
    assert zeropages.ZeroMap(known.path, key + "x").load(SIZE) is None
    assert known.load(SIZE * 2) is None
    # Same key, but the RAM holds data where the map says a run of zeros begins (a map of
    # other contents): the spot check refuses it, the pages are scanned, nothing is lost.
    # (The key is what makes a map trustworthy; the check reads only a run's ends.)
    other = {**DATA, 4 * 4096: b"b" * 4096}
    fd = _loaded_ram(other)
    try:
        assert _punch(fd, known) == SIZE - 4 * 4096
        for offset, payload in other.items():
            assert os.pread(fd, len(payload), offset) == payload
    finally:
        os.close(fd)
    rescanned = known.load(SIZE)  # the map now describes what was found
    assert rescanned is not None and rescanned[1][0] == 5 * 4096


def test_a_malformed_map_is_ignored(tmp_path: Path) -> None:
    key = _state_key(tmp_path)
    path = tmp_path / "zero-pages.json"
    known = zeropages.ZeroMap(path, key)
    for runs in ([[0, 4095]], [[4096, 4096], [0, 4096]], [[SIZE - 4096, 8192]], [["0", 4096]]):
        text = json.dumps({"key": key, "size": SIZE, "runs": runs})
        path.write_text(text)
        assert known.load(SIZE) is None, text
    for text in ("not json", "[]"):
        path.write_text(text)
        assert known.load(SIZE) is None, text
