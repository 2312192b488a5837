"""The host's choice of the guest's cgroup layout (sandbox/pod/guest_cgroup.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sandbox.errors import ConfigError
from sandbox.pod import guest_cgroup

KEY = "org.pysandbox.cgroup"


def test_no_choice_leaves_the_spec_without_a_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYSANDBOX_CGROUP", raising=False)
    spec: dict[str, Any] = {"annotations": {"a": "b"}}
    guest_cgroup.resolve(spec)
    assert spec == {"annotations": {"a": "b"}}


def test_the_annotation_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYSANDBOX_CGROUP", "v1")
    spec: dict[str, Any] = {"annotations": {KEY: "v2"}}
    guest_cgroup.resolve(spec)
    assert spec["annotations"][KEY] == "v2"
    spec = {}
    guest_cgroup.resolve(spec)
    assert spec["annotations"] == {KEY: "v1"}


def test_host_means_the_hosts_own_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hybrid = tmp_path / "hybrid"
    hybrid.write_text(
        "30 22 0:25 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        "31 30 0:26 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
    )
    unified = tmp_path / "unified"
    unified.write_text("30 22 0:25 / /sys/fs/cgroup rw,relatime shared:4 - cgroup2 cgroup2 rw\n")
    assert guest_cgroup.host_layout(str(hybrid)) == "v1"
    assert guest_cgroup.host_layout(str(unified)) == "v2"
    monkeypatch.setenv("PYSANDBOX_CGROUP", "host")
    spec: dict[str, Any] = {}
    guest_cgroup.resolve(spec)
    assert spec["annotations"][KEY] == guest_cgroup.host_layout()


def test_a_bad_value_names_where_it_came_from(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYSANDBOX_CGROUP", "v3")
    with pytest.raises(ConfigError, match='environment variable PYSANDBOX_CGROUP: "v3"'):
        guest_cgroup.resolve({})
    with pytest.raises(ConfigError, match=r'annotation org\.pysandbox\.cgroup: "2" is not one'):
        guest_cgroup.resolve({"annotations": {KEY: "2"}})


def test_the_layout_a_new_vm_prepares_is_the_one_resolve_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PYSANDBOX_CGROUP", raising=False)
    spec: dict[str, Any] = {"annotations": {"a": "b"}}
    assert guest_cgroup.layout_for(spec) == "v2"
    assert spec == {"annotations": {"a": "b"}}  # unchanged
    assert guest_cgroup.layout_for({"annotations": {KEY: "v1"}}) == "v1"
    monkeypatch.setenv("PYSANDBOX_CGROUP", "v1")
    assert guest_cgroup.layout_for({}) == "v1"
    monkeypatch.setenv("PYSANDBOX_CGROUP", "v3")  # refused later, when the files are shared
    assert guest_cgroup.layout_for({}) == ""
