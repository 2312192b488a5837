"""sandbox/pod/console_bound.py: a flooded console log is cut to its end; appends go on."""

from __future__ import annotations

import os
from pathlib import Path

from sandbox.pod import console_bound


def test_a_log_past_the_limit_keeps_its_end_and_appends_continue(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    writer = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # as QEMU holds it
    try:
        os.write(writer, b"a" * 900 + b"b" * 100 + b"c" * 100)
        assert not console_bound.bound(log, limit=2000, keep=150)
        assert log.stat().st_size == 1100
        assert console_bound.bound(log, limit=1000, keep=150)
        assert log.read_bytes() == console_bound.MARKER + b"b" * 50 + b"c" * 100
        os.write(writer, b"after")
        assert log.read_bytes().endswith(b"c" * 100 + b"after")
        assert log.stat().st_size == len(console_bound.MARKER) + 155
    finally:
        os.close(writer)


def test_a_missing_log_or_a_symlink_is_left_alone(tmp_path: Path) -> None:
    assert not console_bound.bound(tmp_path / "missing", limit=0, keep=0)
    target = tmp_path / "target"
    target.write_bytes(b"x" * 100)
    (tmp_path / "link").symlink_to(target)
    assert not console_bound.bound(tmp_path / "link", limit=10, keep=5)
    assert target.read_bytes() == b"x" * 100
