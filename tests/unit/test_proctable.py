"""The container process table the agent reports (agent/proctable.py), read from this host's
/proc: pids at the depth of the container's pid namespace, parents inside it, commands."""

from __future__ import annotations

import os
import subprocess
import sys

from agent import proctable

SLEEPER = "print('up', flush=True); import time; time.sleep(30)"


def _sleeper(*args: str) -> subprocess.Popen[str]:
    """A child that has exec'd its program (its cmdline is final) and sleeps."""
    child = subprocess.Popen(
        [sys.executable, "-c", SLEEPER, *args], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdout.readline() == "up\n"
    return child


def test_table_of_live_processes() -> None:
    child = _sleeper()
    try:
        rows = proctable.table([os.getpid(), child.pid, 2**22 + 5], os.getpid(), {child.pid: "e1"})
    finally:
        child.kill()
        child.communicate()
    assert [row.guest_pid for row in rows] == [os.getpid(), child.pid]  # the gone one left out
    me, kid = rows
    # Same namespace here: the pids as given; our parent is outside the listed processes.
    assert (me.pid, me.ppid, me.init, me.exec_id) == (os.getpid(), 0, True, "")
    assert (kid.pid, kid.ppid, kid.init, kid.exec_id) == (child.pid, os.getpid(), False, "e1")
    assert kid.command == f"{sys.executable} -c {SLEEPER}"
    assert kid.uid == os.getuid()


def test_command_is_bounded() -> None:
    long_arg = "a" * (proctable.MAX_COMMAND_BYTES * 2)
    child = _sleeper(long_arg)
    try:
        (row,) = proctable.table([child.pid], 0, {})
    finally:
        child.kill()
        child.communicate()
    assert len(row.command.encode()) <= proctable.MAX_COMMAND_BYTES
