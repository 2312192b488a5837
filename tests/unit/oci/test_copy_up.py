"""agent.oci.copy_up: a tmpfs starts with the content of the directory it covers (runc's
tmpcopyup), copied through fds: modes, owners, times, symlinks as symlinks."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.oci.copy_up import copy_tree


def _tree(root: Path) -> dict[str, tuple[str, int, str]]:
    """{relative path: (kind, mode, content or link target)} of everything below root."""
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = str(path.relative_to(root))
        if stat.S_ISLNK(st.st_mode):
            found[rel] = ("link", 0, os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            found[rel] = ("dir", stat.S_IMODE(st.st_mode), "")
        elif stat.S_ISFIFO(st.st_mode):
            found[rel] = ("fifo", stat.S_IMODE(st.st_mode), "")
        else:
            found[rel] = ("file", stat.S_IMODE(st.st_mode), path.read_text())
    return found


def test_the_content_is_copied_with_modes_times_and_symlinks(tmp_path: Path) -> None:
    source = tmp_path / "image-dir"
    (source / "sub" / "deeper").mkdir(parents=True)
    (source / "conf").write_text("from the image\n")
    (source / "conf").chmod(0o640)
    (source / "sub" / "deeper" / "x").write_text("x")
    (source / "sub").chmod(0o750)
    (source / "escape").symlink_to("/etc/passwd")  # copied as a link, never followed
    (source / "relative").symlink_to("sub/deeper/x")
    os.mkfifo(source / "pipe", 0o620)
    os.utime(source / "conf", ns=(1_000_000_000, 2_000_000_000))
    source.chmod(0o1777)
    target = tmp_path / "tmpfs"
    target.mkdir(mode=0o755)
    fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY)
    try:
        copy_tree(fd, str(target))
    finally:
        os.close(fd)
    assert _tree(target) == _tree(source)
    assert (target / "conf").stat().st_mtime_ns == 2_000_000_000
    assert stat.S_IMODE(target.stat().st_mode) == 0o1777  # the covered directory's mode


def test_a_full_tmpfs_is_an_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "s"
    source.mkdir()
    (source / "big").write_bytes(b"x" * 10)
    target = tmp_path / "t"
    target.mkdir()

    def full(*_args: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "sendfile", full)
    fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as raised:
            copy_tree(fd, str(target))
    finally:
        os.close(fd)
    assert raised.value.errno == 28
