"""agent.share_view: when the guest forgets cached share entries before a create."""

from __future__ import annotations

from pathlib import Path

from agent import share_view


def test_host_paths_are_the_rootfs_and_bind_sources_under_the_share() -> None:
    spec = {
        "mounts": [
            {"source": "/run/pysandbox/shared/_volumes/k-rw", "destination": "/v"},
            {"source": "proc", "destination": "/proc"},
            {"source": "/run/pysandbox-other/x", "destination": "/x"},
            "junk",
        ]
    }
    assert share_view.host_paths("/run/pysandbox/shared/c/rootfs", spec, "/run/pysandbox") == [
        "/run/pysandbox/shared/c/rootfs",
        "/run/pysandbox/shared/_volumes/k-rw",
    ]
    assert share_view.host_paths("/r", {"mounts": "bad"}, "/run/pysandbox") == ["/r"]


def test_drops_caches_only_when_a_path_is_missing_or_the_id_was_used(tmp_path: Path) -> None:
    knob = tmp_path / "drop_caches"
    knob.write_text("")
    present = tmp_path / "rootfs"
    present.mkdir()
    assert not share_view.refresh([str(present)], reused=False, drop_caches=str(knob))
    assert knob.read_text() == ""
    assert share_view.refresh([str(present), str(tmp_path / "gone")], False, str(knob))
    assert knob.read_text() == "2"
    knob.write_text("")
    assert share_view.refresh([str(present)], reused=True, drop_caches=str(knob))
    assert knob.read_text() == "2"


def test_a_missing_knob_is_not_an_error(tmp_path: Path) -> None:
    assert share_view.refresh([str(tmp_path / "gone")], False, str(tmp_path / "no" / "knob"))
