"""hypervisor.qmp: every failure of the library is a QMPError, even its own state checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from hypervisor.errors import QMPError
from hypervisor.qmp import QMP


def test_a_library_assertion_when_qemu_went_away_is_a_qmp_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """qemu.qmp asserts its run state (``assert self.runstate == Runstate.RUNNING``) and the
    assertion fails when QEMU is killed in the middle of a call (``rm -f`` of a booting run):
    the CLI said "internal error: AssertionError"."""
    qmp = QMP(tmp_path / "qmp.sock")

    async def lost(*_args: object) -> object:
        raise AssertionError

    def lost_fd(_fd: int) -> None:
        raise AssertionError

    monkeypatch.setattr(qmp._client, "execute", lost)
    monkeypatch.setattr(qmp._client, "send_fd_scm", lost_fd)
    try:
        with pytest.raises(QMPError, match=r"qmp cont on .* failed: connection lost"):
            qmp.execute("cont")
        with pytest.raises(QMPError, match="passing fd failed: connection lost"):
            qmp.execute("getfd", fd=0)
    finally:
        qmp.close()
