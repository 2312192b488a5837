"""What the runtime leaves under its root: lock files of removed pods and runs, kept logs."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from sandbox import store
from sandbox.pod.lifecycle import prune_console_logs


def test_a_discarded_lock_file_is_removed(tmp_path: Path) -> None:
    with store.locked(tmp_path, "pod-x") as lock:
        assert lock.path.exists()
    assert lock.path.exists()  # kept: its subject may still exist
    with store.locked(tmp_path, "pod-x") as lock:
        lock.discard()
    assert not lock.path.exists()
    assert os.listdir(tmp_path / "locks") == []


def test_a_waiter_on_a_discarded_lock_takes_the_new_one_never_two_holders(
    tmp_path: Path,
) -> None:
    # The holder discards the file while a second process waits on it, and a third opens
    # the name afresh: the waiter must not hold the old (unlinked) file while the third holds
    # the new one.
    holding: list[str] = []
    overlaps: list[tuple[str, ...]] = []
    guard = threading.Lock()

    def hold(name: str, seconds: float, discard: bool) -> None:
        with store.locked(tmp_path, "pod-y") as lock:
            with guard:
                if holding:
                    overlaps.append((*holding, name))
                holding.append(name)
            time.sleep(seconds)
            if discard:
                lock.discard()
            with guard:
                holding.remove(name)

    first = threading.Thread(target=hold, args=("first", 0.3, True))
    first.start()
    time.sleep(0.1)
    waiter = threading.Thread(target=hold, args=("waiter", 0.3, False))
    waiter.start()
    time.sleep(0.3)  # the first released and unlinked; the waiter re-checks and relocks
    third = threading.Thread(target=hold, args=("third", 0.1, False))
    third.start()
    for thread in (first, waiter, third):
        thread.join(10)
    assert overlaps == []
    assert (tmp_path / "locks" / "pod-y.lock").exists()


def test_only_the_newest_console_logs_are_kept(tmp_path: Path) -> None:
    for index in range(20):
        log = tmp_path / f"pod{index}-console.log"
        log.write_text(str(index))
        os.utime(log, ns=(index * 10**9, index * 10**9))
    (tmp_path / "other.txt").write_text("not a console log")
    prune_console_logs(tmp_path, keep=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"pod{index}-console.log" for index in range(15, 20)] + ["other.txt"]
    )
