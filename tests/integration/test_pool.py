"""``run``'s warm pool (``PYSANDBOX_POOL=N``, sandbox/run/pool.py), as its user sees it.

What a user relies on: with the pool on, a run leaves a VM ready for the next run of its
kind (``pool ls``), which that run takes (it is gone from the list, another is restored for
the one after); each run still gets a VM of its own with its own randomness and hostname;
a waiting VM costs only idle CPU (SCHED_IDLE) and goes after ``PYSANDBOX_POOL_IDLE``
seconds or on ``pool drain``, leaving no process, mount or pod behind; a bad setting is one
line before any boot.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration import cli
from tests.integration.pods import PodFactory
from tests.processes import processes_mentioning, wait_until

SCHED_IDLE = 5


def pysandbox(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The command with the pool on (and ``env`` set)."""
    return cli.pysandbox(root, *args, env={**os.environ, "PYSANDBOX_POOL": "1", **env})


def waiting(root: Path) -> list[str]:
    """The ids ``pool ls`` lists as running."""
    listing = pysandbox(root, "pool", "ls")
    assert listing.returncode == 0, listing.stderr
    return [line.split()[0] for line in listing.stdout.splitlines()[1:] if " running " in line]


def policy(pid: int) -> int:
    """The scheduling policy of ``pid`` (``/proc/PID/stat`` field 41)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[38])


def qemu_of(root: Path, pod_id: str) -> int:
    for path in (root / "p").glob("*/pod.json"):
        record = json.loads(path.read_text())
        if record["id"] == pod_id:
            return int(record["processes"]["qemu"]["pid"])
    raise AssertionError(f"no pod {pod_id}")


def nothing_left(root: Path) -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        mounts = [line for line in mountinfo if str(root) in line]
    pods = list((root / "p").glob("*")) if (root / "p").exists() else []
    return mounts == [] and pods == [] and processes_mentioning(str(root), live_only=True) == []


@pytest.fixture
def root(module_pods: PodFactory) -> Iterator[Path]:
    root = module_pods.new_root("pool")
    try:
        yield root
    finally:
        pysandbox(root, "pool", "drain")


def test_a_run_takes_the_vm_the_previous_one_left_ready(root: Path) -> None:
    script = (
        "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; hostname; tail -n 1 /etc/hosts"
    )
    first = pysandbox(root, "run", "default", "sh", "-c", script)
    assert first.returncode == 0, first.stderr
    assert wait_until(lambda: len(waiting(root)) == 1, 120), "no VM was made ready"
    (ready,) = waiting(root)
    assert policy(qemu_of(root, ready)) == SCHED_IDLE  # it waits on idle CPU only
    second = pysandbox(root, "run", "default", "sh", "-c", script)
    assert second.returncode == 0, second.stderr
    assert ready not in waiting(root)  # taken: a VM serves one run
    random1, hostname1, hosts1 = first.stdout.splitlines()
    random2, hostname2, hosts2 = second.stdout.splitlines()
    assert random1 != random2 and hostname1 != hostname2 and len(hostname2) == 12
    # /etc/hosts names the run as a cold one's does, not the pooled VM (breaker5).
    assert hosts1 == f"127.0.0.1\t{hostname1} run-{hostname1}"
    assert hosts2 == f"127.0.0.1\t{hostname2} run-{hostname2}"
    # A detached run takes the next one: it runs at the normal priority, and goes with rm.
    assert wait_until(lambda: len(waiting(root)) == 1, 120)
    (ready,) = waiting(root)
    started = pysandbox(root, "run", "-d", "--name", "d", "default", "sleep", "1000")
    assert started.returncode == 0, started.stderr
    state = json.loads((root / "d" / "state.json").read_text())
    assert state["pod_id"] == ready and policy(qemu_of(root, ready)) == 0
    exec_ = pysandbox(root, "exec", "d", "hostname")
    assert (exec_.returncode, exec_.stdout) == (0, "d\n"), exec_.stderr
    assert pysandbox(root, "rm", "-f", "d").returncode == 0
    assert wait_until(lambda: len(waiting(root)) == 1, 120)
    drained = pysandbox(root, "pool", "drain")
    assert drained.returncode == 0 and len(drained.stdout.split()) == 1, drained
    assert wait_until(lambda: nothing_left(root), 30)


def test_one_run_leaves_n_vms_ready_for_a_burst(root: Path) -> None:
    """``PYSANDBOX_POOL=2``: after one run two VMs of its kind wait (a pool of N, not one VM
    more per run that ended; breaker5), and two runs at once both take one."""
    done = pysandbox(root, "run", "default", "true", PYSANDBOX_POOL="2")
    assert done.returncode == 0, done.stderr
    assert wait_until(lambda: len(waiting(root)) == 2, 180), waiting(root)
    ready = set(waiting(root))
    env = {**os.environ, "PYSANDBOX_POOL": "2"}
    argv = [sys.executable, "-m", "sandbox", "--root", str(root), "run", "default", "true"]
    burst = [subprocess.Popen(argv, cwd=cli.REPO, env=env) for _ in range(2)]
    assert [p.wait(300) for p in burst] == [0, 0]
    assert not ready & set(waiting(root))  # both taken
    # `pod stop` of a waiting VM ends its timer and watcher too (they stayed; breaker5).
    assert wait_until(lambda: len(waiting(root)) == 2, 180), waiting(root)
    victim = waiting(root)[0]
    (record,) = [
        json.loads(p.read_text())
        for p in (root / "p").glob("*/pod.json")
        if json.loads(p.read_text())["id"] == victim
    ]
    timer = int(record["owner"]["pid"])
    stopped = pysandbox(root, "pod", "stop", victim)
    assert stopped.returncode == 0, stopped.stderr
    assert wait_until(lambda: processes_mentioning(victim, live_only=True) == [], 30), (
        processes_mentioning(victim)
    )
    assert not Path(f"/proc/{timer}").exists() or "sleep" not in Path(
        f"/proc/{timer}/cmdline"
    ).read_text(errors="replace")
    drained = pysandbox(root, "pool", "drain")
    assert drained.returncode == 0, drained.stderr
    assert wait_until(lambda: nothing_left(root), 60), processes_mentioning(str(root))


def _memory_cgroup() -> Path:
    """This process's memory cgroup directory (v1 memory hierarchy, or v2)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
        if controllers == "" and not Path("/sys/fs/cgroup/memory").is_dir():
            return Path("/sys/fs/cgroup") / path.lstrip("/")
    raise AssertionError("no memory cgroup")


def test_a_run_in_another_cgroup_does_not_take_the_vm(root: Path) -> None:
    """A waiting VM lives below the cgroup of the run whose filler made it: a run of another
    job (another cgroup) boots its own instead of taking it, so its VM is neither charged to
    nor killed with the other job's cgroup (breaker5: it was)."""
    done = pysandbox(root, "run", "default", "true")
    assert done.returncode == 0, done.stderr
    assert wait_until(lambda: len(waiting(root)) == 1, 120)
    (ready,) = waiting(root)
    job = _memory_cgroup() / f"psb-other-job-{os.getpid()}"
    job.mkdir()
    try:
        script = f'echo $$ > {job}/cgroup.procs && exec "$@"'
        argv = ["sh", "-c", script, "sh", sys.executable, "-m", "sandbox", "--root", str(root)]
        env = {**os.environ, "PYSANDBOX_POOL": "1"}
        other = subprocess.run(
            [*argv, "run", "default", "sh", "-c", "cat /proc/self/cgroup >/dev/null; echo ran"],
            cwd=cli.REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert (other.returncode, other.stdout) == (0, "ran\n"), other.stderr
        assert ready in waiting(root)  # not taken by the other job's run
        pysandbox(root, "pool", "drain")
        assert wait_until(lambda: nothing_left(root), 60), processes_mentioning(str(root))
    finally:
        pysandbox(root, "pool", "drain")
        wait_until(lambda: not (job / "cgroup.procs").read_text().strip(), 60)
        for below in sorted(job.rglob("*/"), reverse=True):
            if below.is_dir():
                below.rmdir()
        job.rmdir()


def test_a_run_with_other_limits_or_namespaces_does_not_take_the_vm(root: Path) -> None:
    """The VM's host processes keep the rlimits and namespaces of the run whose filler made
    them: a run with another fd limit, or in another mount namespace, boots its own (it took
    the VM: virtiofsd ran out of fds at the filler's limit, or saw the filler's mounts and
    gave the run an empty root; breaker5)."""
    done = pysandbox(root, "run", "default", "true")
    assert done.returncode == 0, done.stderr
    assert wait_until(lambda: len(waiting(root)) == 1, 120)
    (ready,) = waiting(root)
    env = {**os.environ, "PYSANDBOX_POOL": "1"}
    base = [sys.executable, "-m", "sandbox", "--root", str(root), "run", "default", "echo", "ran"]
    for wrapper in (
        ["sh", "-c", 'ulimit -n 512 && exec "$@"', "sh"],
        ["unshare", "-m", "--propagation", "unchanged"],
    ):
        other = subprocess.run(
            [*wrapper, *base], cwd=cli.REPO, env=env, capture_output=True, text=True, timeout=300
        )
        assert (other.returncode, other.stdout) == (0, "ran\n"), (wrapper, other.stderr)
        assert ready in waiting(root), wrapper  # not taken
    pysandbox(root, "pool", "drain")
    assert wait_until(lambda: nothing_left(root), 60), processes_mentioning(str(root))


def test_runs_with_user_networking_have_a_pool_of_their_own(root: Path) -> None:
    """``--network user`` is another kind (a VM with QEMU's NIC): a plain run does not take
    its VM; the next run with it does, and has its network and its own /etc files."""
    script = "ip -4 -o addr show eth0 | grep -o '10.0.2.15/24'; cat /etc/resolv.conf; hostname"
    first = pysandbox(root, "run", "--network", "user", "default", "sh", "-c", script)
    assert first.returncode == 0, first.stderr
    assert wait_until(lambda: len(waiting(root)) == 1, 120)
    (ready,) = waiting(root)
    plain = pysandbox(root, "run", "default", "true")
    assert plain.returncode == 0 and ready in waiting(root)  # not its kind
    second = pysandbox(root, "run", "--network", "user", "-h", "web", "default", "sh", "-c", script)
    assert second.returncode == 0, second.stderr
    assert ready not in waiting(root)
    assert second.stdout == "10.0.2.15/24\nnameserver 10.0.2.3\nweb\n"
    assert first.stdout.splitlines()[:2] == second.stdout.splitlines()[:2]


def test_an_unused_vm_goes_after_its_idle_time_or_when_its_timer_is_killed(root: Path) -> None:
    done = pysandbox(root, "run", "default", "true", PYSANDBOX_POOL_IDLE="3")
    assert done.returncode == 0, done.stderr
    assert wait_until(lambda: len(waiting(root)) == 1, 120)
    assert wait_until(lambda: nothing_left(root), 60), processes_mentioning(str(root))
    done = pysandbox(root, "run", "default", "true")
    assert done.returncode == 0, done.stderr
    assert wait_until(lambda: len(waiting(root)) == 1, 120)
    (pod,) = [json.loads(p.read_text()) for p in (root / "p").glob("*/pod.json")]
    timer = int(pod["owner"]["pid"])
    assert Path(f"/proc/{timer}/comm").read_text() == "sleep\n"
    os.kill(timer, signal.SIGKILL)  # e.g. the OOM killer: the VM must not outlive it
    assert wait_until(lambda: nothing_left(root), 60), processes_mentioning(str(root))
    # Its owner watcher killed too (breaker5): the next look at the pool removes the VM.
    done = pysandbox(root, "run", "default", "true")
    assert done.returncode == 0, done.stderr
    assert wait_until(lambda: len(waiting(root)) == 1, 120)
    (pod,) = [json.loads(p.read_text()) for p in (root / "p").glob("*/pod.json")]
    watchers = [p for p in processes_mentioning(pod["id"]) if "owner_watch" in p]
    assert len(watchers) == 1, watchers
    os.kill(int(watchers[0].split(":")[0]), signal.SIGKILL)
    os.kill(int(pod["owner"]["pid"]), signal.SIGKILL)
    assert wait_until(lambda: waiting(root) == [] and nothing_left(root), 60), processes_mentioning(
        str(root)
    )


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("PYSANDBOX_POOL", "lots", "PYSANDBOX_POOL='lots': give how many VMs"),
        ("PYSANDBOX_POOL", "99", "PYSANDBOX_POOL='99': give how many VMs"),
        ("PYSANDBOX_POOL_IDLE", "-1", "PYSANDBOX_POOL_IDLE='-1': give the seconds"),
    ],
)
def test_a_bad_setting_is_one_line_before_any_boot(
    root: Path, name: str, value: str, words: str
) -> None:
    done = pysandbox(root, "run", "default", "true", **{name: value})
    assert done.returncode == 125 and done.stdout == ""
    assert done.stderr.startswith(f"pysandbox: {words}") and done.stderr.count("\n") == 1
    assert nothing_left(root)
