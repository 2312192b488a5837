"""The warm pool's settings and kinds (sandbox/run/pool.py), without VMs."""

from __future__ import annotations

import dataclasses

import pytest

from sandbox.errors import ConfigError
from sandbox.run import pool


@pytest.mark.parametrize(("raw", "count"), [(None, 0), ("", 0), ("0", 0), ("1", 1), (" 8 ", 8)])
def test_pool_size(monkeypatch: pytest.MonkeyPatch, raw: str | None, count: int) -> None:
    if raw is None:
        monkeypatch.delenv(pool.POOL_ENV, raising=False)
    else:
        monkeypatch.setenv(pool.POOL_ENV, raw)
    assert pool.wanted() == count


@pytest.mark.parametrize("raw", ["9", "-1", "1.5", "many", "1e3"])
def test_a_bad_pool_size_names_the_setting(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(pool.POOL_ENV, raw)
    with pytest.raises(ConfigError, match=r"PYSANDBOX_POOL=.*0\.\.8"):
        pool.wanted()


@pytest.mark.parametrize("raw", ["0", "-3", "nan", "inf", "x", "86401"])
def test_a_bad_idle_time_names_the_setting(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(pool.IDLE_ENV, raw)
    with pytest.raises(ConfigError, match="PYSANDBOX_POOL_IDLE="):
        pool.idle_seconds()


def test_idle_time_default_and_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pool.IDLE_ENV, raising=False)
    assert pool.idle_seconds() == pool.DEFAULT_IDLE
    monkeypatch.setenv(pool.IDLE_ENV, "2.5")
    assert pool.idle_seconds() == 2.5


def test_every_field_of_a_kind_is_in_its_key() -> None:
    kind = pool.Kind(512, 1, False, False, True, {"pids": 1024}, "/g/manifest.json:1", {"A": "b"})
    assert pool.Kind.from_json(kind.to_json()) == kind
    changed = [
        dataclasses.replace(kind, memory_mib=640),
        dataclasses.replace(kind, cpus=2),
        dataclasses.replace(kind, user_network=True),
        dataclasses.replace(kind, privileged_files=True),
        dataclasses.replace(kind, cached_files=False),
        dataclasses.replace(kind, limits={"pids": 1023}),
        dataclasses.replace(kind, image="/g/manifest.json:2"),
        dataclasses.replace(kind, environment={"A": "c"}),
        dataclasses.replace(kind, cgroup_layout="v1"),
    ]
    keys = {kind.key(), *(k.key() for k in changed)}
    assert len(keys) == 1 + len(changed)


def test_a_kind_document_of_another_shape_is_refused() -> None:
    with pytest.raises(ConfigError, match="not a pool kind"):
        pool.Kind.from_json({"memory_mib": 512})
