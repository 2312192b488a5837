"""Template garbage collection (sandbox/pod/template.py ``collect``): bounded by count and
disk use, least recently used first, and never under a pod that restores from one.

Templates are made by hand (a directory with a state file of a known size) or built through
the fake drivers (tests/unit/fake_drivers.py), whose fake QEMU reads the whole saved state
from the fd it is given, as QEMU's ``-incoming fd:N`` does.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.errors import ConfigError
from sandbox.pod import template
from sandbox.pod.lifecycle import Pod
from tests.unit.fake_drivers import FakeDrivers, FakeVM, fixture_drivers

MIB = 1 << 20


def make_template(base: Path, name: str, mib: int, used: float) -> Path:
    """A template directory ``name`` whose state takes ``mib`` MiB, last used at ``used``."""
    directory = base / name
    directory.mkdir(parents=True)
    (directory / template.STATE_FILE).write_bytes(b"s" * (mib * MIB))
    (base / f"{name}.lock").touch()
    os.utime(directory, (used, used))
    return directory


def names(base: Path) -> list[str]:
    return sorted(p.name for p in base.iterdir() if p.is_dir())


def test_least_recently_used_go_first_by_count_and_by_disk_use(tmp_path: Path) -> None:
    now = time.time()
    for age, name in enumerate("abcdef"):
        make_template(tmp_path, name, 2, now - age * 10)  # a: newest ... f: oldest
    assert template.collect(tmp_path, keep=4, max_bytes=100 * MIB) == ["e", "f"]
    assert names(tmp_path) == ["a", "b", "c", "d"]
    # Each takes 2 MiB: a 5 MiB budget keeps two.
    assert sorted(template.collect(tmp_path, keep=4, max_bytes=5 * MIB)) == ["c", "d"]
    assert names(tmp_path) == ["a", "b"]
    # Lock files go with their templates.
    assert sorted(p.name for p in tmp_path.glob("*.lock")) == ["a.lock", "b.lock"]


def test_the_template_just_used_is_kept_whatever_its_size(tmp_path: Path) -> None:
    now = time.time()
    make_template(tmp_path, "new", 1, now)
    make_template(tmp_path, "big", 8, now - 100)  # the one this pod uses: older mtime
    assert template.collect(tmp_path, keep=4, max_bytes=4 * MIB, protect="big") == ["new"]
    assert names(tmp_path) == ["big"]
    assert template.collect(tmp_path, keep=0, max_bytes=0, protect="big") == []


def test_a_template_whose_lock_is_held_or_that_was_used_meanwhile_is_kept(
    tmp_path: Path,
) -> None:
    now = time.time()
    make_template(tmp_path, "held", 1, now - 50)
    make_template(tmp_path, "old", 1, now - 60)
    with template._locked(tmp_path / "held.lock"):  # being built or opened elsewhere
        assert template.collect(tmp_path, keep=0, max_bytes=0) == ["old"]
    assert names(tmp_path) == ["held"]
    mtime = (tmp_path / "held").stat().st_mtime_ns
    os.utime(tmp_path / "held")  # used after the collector listed it
    assert not template._evict(tmp_path, tmp_path / "held", mtime)
    assert names(tmp_path) == ["held"]


def test_a_lock_removed_with_its_template_is_not_held_twice(tmp_path: Path) -> None:
    """A waiter on the lock of a template being evicted must not hold the old (removed)
    lock file while someone else holds the new one at the same path."""
    lock = tmp_path / "t.lock"
    inside: list[str] = []
    waiting = threading.Event()

    def waiter() -> None:
        waiting.set()
        with template._locked(lock):
            inside.append("waiter in")
            time.sleep(0.2)
            inside.append("waiter out")

    with template._locked(lock):  # the evictor
        thread = threading.Thread(target=waiter)
        thread.start()
        waiting.wait()
        time.sleep(0.2)  # the waiter blocks on this file
        lock.unlink()
    with template._locked(lock):  # a newcomer takes the new file at once
        inside.append("newcomer in")
        time.sleep(0.3)
        inside.append("newcomer out")
    thread.join()
    assert inside in (
        ["newcomer in", "newcomer out", "waiter in", "waiter out"],
        ["waiter in", "waiter out", "newcomer in", "newcomer out"],
    ), inside


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDrivers]:
    for drivers in fixture_drivers(tmp_path, monkeypatch):
        monkeypatch.setenv("PYSANDBOX_TEMPLATES", "1")
        monkeypatch.setenv("PYSANDBOX_QEMU", "/bin/true")  # only hashed into the key
        yield drivers


@pytest.mark.parametrize("moment", ["once it is found", "before qemu reads it"])
def test_a_pod_restores_from_a_template_evicted_under_it(
    fake: FakeDrivers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moment: str
) -> None:
    """Another process evicts every template right after this pod found its template, or
    just before QEMU reads it: the pod is restored all the same (it holds the state open).
    Before, the state file was opened after the lookup: evicted in between, the pod cold
    booted."""
    root = tmp_path / "root"
    base = tmp_path / "templates"
    Pod.boot(root, "p0").stop()  # builds the template
    start, collect = FakeVM.start, template.collect

    def evict_all() -> None:
        assert len(collect(base, keep=0, max_bytes=0)) == 1
        assert names(base) == []

    def evicted_first(vm: FakeVM, *, paused: bool = True) -> None:
        if vm.config.incoming_fd is not None:
            evict_all()
        start(vm, paused=paused)

    def others_collect_too(*args: object, **kwargs: object) -> list[str]:
        evict_all()  # another process's collection, at the same moment
        return []

    if moment == "once it is found":
        monkeypatch.setattr(template, "collect", others_collect_too)
    else:
        monkeypatch.setattr(FakeVM, "start", evicted_first)
    pod = Pod.boot(root, "p1")
    assert pod.record.boot == "restored"
    pod.stop()
    monkeypatch.setattr(FakeVM, "start", start)
    monkeypatch.setattr(template, "collect", collect)
    again = Pod.boot(root, "p2")  # the next pod rebuilds it
    assert again.record.boot == "restored" and len(names(base)) == 1
    again.stop()
    assert fake.alive() == []


def test_many_memory_sizes_stay_within_the_bound(
    fake: FakeDrivers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six sizes in turn with room for three: every pod is restored, at most three
    templates stay, the least recently used go."""
    monkeypatch.setattr(template, "KEEP", 3)
    root = tmp_path / "root"
    base = tmp_path / "templates"
    keys = []
    for index, mib in enumerate((256, 320, 384, 448, 512, 576)):
        pod = Pod.boot(root, f"p{index}", memory_mib=mib)
        assert pod.record.boot == "restored"
        pod.stop()
        keys.append(max(base.iterdir(), key=lambda p: p.stat().st_mtime_ns).name)
        assert len(names(base)) == min(index + 1, 3)
    assert names(base) == sorted(keys[-3:])


def test_a_bad_budget_is_one_line_before_anything_starts(
    fake: FakeDrivers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYSANDBOX_TEMPLATE_MAX_MIB", "2g")
    with pytest.raises(ConfigError, match="PYSANDBOX_TEMPLATE_MAX_MIB='2g': expected a whole"):
        Pod.boot(tmp_path / "root", "p1")
    assert fake.events == []
    monkeypatch.setenv("PYSANDBOX_TEMPLATE_MAX_MIB", "0")  # keeps only the template in use
    assert template.max_bytes() == 0


def test_a_template_build_whose_proxy_dies_gives_up_at_once(
    fake: FakeDrivers, tmp_path: Path
) -> None:
    """The template VM's agent never answers and its proxy dies: the build fails within a
    second (not after the boot timeout) and the pod cold boots, noting why."""
    stuck = threading.Event()
    fake.fail["agent.Health"] = stuck

    def kill_the_template_proxy() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            proxies = [p for p in fake.processes if p.name == "proxy"]
            if proxies:
                proxies[0].kill()
                time.sleep(1.0)  # the watch gives up first; then the agent answers again
                stuck.set()
                return
            time.sleep(0.01)

    threading.Thread(target=kill_the_template_proxy).start()
    started = time.monotonic()
    pod = Pod.boot(tmp_path / "root", "p1")
    assert time.monotonic() - started < 4
    assert pod.record.boot == "cold"
    notes = (pod.dir / "boot.log").read_text()
    assert "of the template VM died" in notes, notes
    pod.stop()
