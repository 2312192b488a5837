"""sandbox.same_file: one open file description or two (kcmp(2) KCMP_FILE)."""

from __future__ import annotations

import os
from pathlib import Path

from sandbox.same_file import one_description


def test_a_dup_is_one_description(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    copy = os.dup(fd)
    try:
        assert one_description(fd, copy)
    finally:
        os.close(fd)
        os.close(copy)


def test_two_opens_of_one_file_are_two(tmp_path: Path) -> None:
    # `>f 2>f`: the same inode, two offsets: not one file for the container's purposes.
    first = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    second = os.open(tmp_path / "f", os.O_WRONLY)
    reader, writer = os.pipe()
    try:
        assert not one_description(first, second)
        assert not one_description(reader, writer)
        assert not one_description(first, 987654)  # not open
    finally:
        for fd in (first, second, reader, writer):
            os.close(fd)
