"""The agent's early mounts: cgroup2 with favordynmods where the kernel has it, else without."""

from __future__ import annotations

import errno

import pytest

from agent import pid1


def _fake_mounts(
    monkeypatch: pytest.MonkeyPatch, refuse: int | None
) -> list[tuple[str, str | None]]:
    calls: list[tuple[str, str | None]] = []

    def mount(
        source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None
    ) -> None:
        calls.append((target, data))
        if refuse is not None and data == pid1.FAVOR_DYNMODS:
            raise OSError(refuse, "refused")

    monkeypatch.setattr(pid1.syscalls, "mount", mount)
    monkeypatch.setattr(pid1, "_is_mountpoint", lambda _path: False)
    monkeypatch.setattr(pid1.os, "makedirs", lambda *_a, **_k: None)
    monkeypatch.setattr(pid1.os, "chmod", lambda *_a, **_k: None)
    return calls


def test_cgroup2_is_mounted_favouring_dynamic_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_mounts(monkeypatch, refuse=None)
    pid1.early_mounts()
    assert [data for target, data in calls if target == "/sys/fs/cgroup"] == ["favordynmods"]


def test_a_kernel_without_the_option_gets_a_plain_cgroup2(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_mounts(monkeypatch, refuse=errno.EINVAL)
    pid1.early_mounts()
    assert [data for target, data in calls if target == "/sys/fs/cgroup"] == ["favordynmods", ""]
    assert calls[-1][0] == "/dev/mqueue"  # and the mounts after it go on


def test_other_mount_failures_are_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_mounts(monkeypatch, refuse=errno.EPERM)
    with pytest.raises(OSError):
        pid1.early_mounts()
