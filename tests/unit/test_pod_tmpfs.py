"""An engine's /dev/shm tmpfs: recognised on the host (sandbox.pod.pod_shm), made once per pod
in the guest (agent.pod_tmpfs), with agentapi.pod_tmpfs's key checks between them."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import pod_tmpfs as agent_side
from agentapi import pod_tmpfs
from sandbox.pod import pod_shm

SHM = "/dev/shm"


def _mount_id(path: str) -> int:
    fd = os.open(path, os.O_PATH)
    try:
        found = pod_shm._mount_id(fd)
    finally:
        os.close(fd)
    assert found is not None
    return found


def _mountinfo(tmp_path: Path, source: str, fstype: str = "tmpfs") -> str:
    """This process's mountinfo with /dev/shm's entry given ``fstype`` and ``source``."""
    wanted = str(_mount_id(SHM))
    lines = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[0] == wanted:
            dash = fields.index("-", 6)
            fields[5] = "rw,nosuid,nodev,noexec,relatime"
            fields[dash + 1 : dash + 3] = [fstype, source]
        lines.append(" ".join(fields))
    path = tmp_path / "mountinfo"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def shm_fd() -> Iterator[int]:
    if not os.path.ismount(SHM):
        pytest.skip("no tmpfs mounted at /dev/shm on this host")
    fd = os.open(SHM, os.O_PATH)
    yield fd
    os.close(fd)


def _bind(destination: str = "/dev/shm", options: list[str] | None = None) -> dict[str, Any]:
    return {
        "destination": destination,
        "type": "bind",
        "source": "/engine/userdata/shm",
        "options": ["bind", "rprivate", *(options or [])],
    }


def test_an_engines_shm_becomes_a_guest_tmpfs_of_its_size_mode_and_flags(
    tmp_path: Path, shm_fd: int
) -> None:
    info = _mountinfo(tmp_path, "shm")
    guest = pod_shm.guest_mount(_bind(options=["rw"]), shm_fd, info)
    st = os.fstat(shm_fd)
    vfs = os.fstatvfs(shm_fd)
    assert guest == {
        "destination": "/dev/shm",
        "type": "tmpfs",
        "source": f"pysandbox-pod-tmpfs:{st.st_dev:x}-{st.st_ino:x}",
        "options": [
            "nosuid",
            "nodev",
            "noexec",
            "rw",
            f"size={vfs.f_blocks * vfs.f_frsize}",
            f"mode={stat.S_IMODE(st.st_mode):o}",
        ],
    }


@pytest.mark.parametrize(
    ("destination", "source", "fstype"),
    [
        ("/dev/shm2", "shm", "tmpfs"),  # not at /dev/shm: a volume like any other
        ("/dev/shm", "tmpfs", "tmpfs"),  # the host's own /dev/shm (--ipc host, -v)
        ("/dev/shm", "shm", "ext4"),
    ],
)
def test_other_binds_stay_shares(
    tmp_path: Path, shm_fd: int, destination: str, source: str, fstype: str
) -> None:
    info = _mountinfo(tmp_path, source, fstype)
    assert pod_shm.guest_mount(_bind(destination), shm_fd, info) is None


def test_a_directory_inside_a_shm_tmpfs_is_not_its_root(tmp_path: Path, shm_fd: int) -> None:
    info = _mountinfo(tmp_path, "shm")
    sub = Path(SHM) / f"psb-unit-{os.getpid()}"
    sub.mkdir()
    try:
        fd = os.open(sub, os.O_PATH)
        try:
            assert pod_shm.guest_mount(_bind(), fd, info) is None
        finally:
            os.close(fd)
    finally:
        sub.rmdir()


@pytest.mark.parametrize("value", ["../etc", "1-2/x", "", "g-1", "1" * 17 + "-1", "1-2\n"])
def test_keys_that_could_name_a_path_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="invalid pod tmpfs key"):
        pod_tmpfs.parse_source(pod_tmpfs.SOURCE_PREFIX + value)
    assert pod_tmpfs.parse_source("shm") is None


def _spec(key: str, options: list[str]) -> dict[str, Any]:
    mount = {"destination": "/dev/shm", "type": "tmpfs", "options": options}
    mount["source"] = pod_tmpfs.SOURCE_PREFIX + key
    return {"mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}, mount]}


def test_the_guest_mounts_one_tmpfs_per_key_and_binds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.oci import syscalls

    mounted: list[tuple[object, ...]] = []

    def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
        mounted.append((source, target, fstype, flags, data))
        (Path(target) / ".mounted").touch()

    monkeypatch.setattr(syscalls, "mount", mount)
    monkeypatch.setattr(os.path, "ismount", lambda p: (Path(p) / ".mounted").exists())
    options = ["nosuid", "nodev", "noexec", "rw", "size=65536000", "mode=1777"]
    first, second = _spec("2f-1", options), _spec("2f-1", options)
    agent_side.materialize(first, str(tmp_path))
    agent_side.materialize(second, str(tmp_path))
    path = str(tmp_path / "2f-1")
    assert mounted == [("shm", path, "tmpfs", 0x2 | 0x4 | 0x8, "size=65536000,mode=1777")]
    for spec in (first, second):
        assert spec["mounts"][1] == {
            "destination": "/dev/shm",
            "type": "bind",
            "source": path,
            "options": ["rbind", "rprivate", "nosuid", "nodev", "noexec", "rw"],
        }
        assert spec["mounts"][0]["type"] == "proc"


@pytest.mark.parametrize("option", ["size=1;rm", "uid=0", "bind", "mode=01777x", 7])
def test_the_guest_refuses_other_options(tmp_path: Path, option: object) -> None:
    with pytest.raises(ValueError, match="invalid pod tmpfs option"):
        agent_side.materialize(_spec("1-1", ["nosuid", option]), str(tmp_path))  # type: ignore[list-item]
    assert list(tmp_path.iterdir()) == []
