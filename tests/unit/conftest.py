"""Fixtures shared by the unit tests that drive the runtime verbs on fake drivers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.fake_drivers import FakeDrivers, fixture_drivers


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDrivers]:
    """Fake drivers (no QEMU, virtiofsd or proxy) with fake shims installed."""
    for drivers in fixture_drivers(tmp_path, monkeypatch):
        drivers.install_shims(monkeypatch)
        yield drivers


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A ``--root`` directory, made as the CLI makes it (mode 0700)."""
    (tmp_path / "root").mkdir(mode=0o700)
    return tmp_path / "root"
