"""The agent's share mount (agent/server.py ``_mount_virtiofs``) without a VM.

What a user relies on: a restored pod's share, hot-plugged just before the agent is asked to
mount it, is mounted once the guest has probed the device (the kernel says EINVAL for a tag
it does not know yet), and a tag that never appears fails within the wait, with the
kernel's error; other errors fail at once.
"""

from __future__ import annotations

import errno
import time

import pytest

from agent import server


def _mount_failing(monkeypatch: pytest.MonkeyPatch, errors: list[int]) -> list[str]:
    """Make syscalls.mount fail with ``errors`` in turn, then succeed; the tags it was
    called with."""
    calls: list[str] = []

    def mount(source: str, target: str, fstype: str, flags: int = 0) -> None:
        calls.append(source)
        if errors:
            code = errors.pop(0)
            raise OSError(code, f"mount {source}: {errno.errorcode[code]}")

    monkeypatch.setattr(server.syscalls, "mount", mount)
    return calls


def test_a_tag_being_probed_is_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _mount_failing(monkeypatch, [errno.EINVAL, errno.EINVAL])
    server._mount_virtiofs("pod", "/run/pysandbox/shared", 0, wait=5.0)
    assert calls == ["pod"] * 3


def test_a_tag_that_never_appears_fails_after_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    _mount_failing(monkeypatch, [errno.EINVAL] * 1000)
    started = time.monotonic()
    with pytest.raises(OSError) as raised:
        server._mount_virtiofs("nope", "/run/pysandbox/x", 0, wait=0.2)
    assert raised.value.errno == errno.EINVAL
    assert 0.2 <= time.monotonic() - started < 2.0


def test_other_errors_fail_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _mount_failing(monkeypatch, [errno.ENODEV])
    with pytest.raises(OSError) as raised:
        server._mount_virtiofs("pod", "/run/pysandbox/shared", 0, wait=5.0)
    assert raised.value.errno == errno.ENODEV and calls == ["pod"]
