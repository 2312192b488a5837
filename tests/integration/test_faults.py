"""A pod process killed, or the CLI terminated, while a command starts a container.

What a user relies on (issue 11, section 2): when virtiofsd, the agent proxy or QEMU dies
under ``create``, ``run -d`` or ``exec``, the command fails within about a second (it used to
wait out a 60-120 s deadline) with one line naming the process and where its log was kept,
exits non-zero and leaves nothing: no QEMU, virtiofsd, proxy or shim, no mount, socket,
state or pod directory, virtiofsd pid file, lock or cgroup of it. SIGTERM to ``create`` or
``run`` at any moment of the start-up leaves nothing either.

Each kill is aimed at a moment the command is known to be in (read from the pod's record or
the container's output); when the command was faster than the aim, the iteration is retried.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hypervisor.virtiofsd import PID_DIR
from sandbox import store as state
from sandbox.pod.hostfs import mounts_below
from tests.integration.pods import PodFactory
from tests.integration.test_runtime_cli import RUNTIME, make_bundle
from tests.processes import processes_mentioning, wait_until

pytestmark = pytest.mark.vm

#: ``PYSANDBOX_CAMPAIGN=large`` (``make campaign``): every moment, several times.
LARGE = os.environ.get("PYSANDBOX_CAMPAIGN") == "large"
CAMPAIGN_REPEATS = 3

#: How long a command may take to fail once a process of its pod died (the watch looks every
#: 0.2 s; the rest is the undo: QEMU, proxy, virtiofsd stopped, mounts removed).
PROMPT = 5.0


@pytest.fixture
def root(pod_factory: PodFactory) -> Path:
    return pod_factory.new_root("flt")


def cli(root: Path, *args: str) -> list[str]:
    return [RUNTIME, "--root", str(root), *args]


def spawn(root: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cli(root, *args),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def pod_record(root: Path, pod_id: str) -> dict[str, object]:
    """The pod's pod.json ({} while there is none or it is being replaced)."""
    try:
        data: dict[str, object] = json.loads(
            (root / "p" / state.pod_dir_name(pod_id) / "pod.json").read_text()
        )
    except (OSError, ValueError):
        return {}
    return data


def recorded_pid(root: Path, pod_id: str, name: str) -> int | None:
    processes = pod_record(root, pod_id).get("processes")
    if not isinstance(processes, dict) or name not in processes:
        return None
    return int(processes[name]["pid"])


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        found += [int(c) for c in task.read_text().split()]
    return found


def assert_nothing_left(root: Path, name: str) -> None:
    """Nothing of container/pod ``name`` under ``root`` or anywhere on the host."""
    pod_dir = root / "p" / state.pod_dir_name(name)
    for text in (str(pod_dir), f"--root {root} --id {name} "):
        assert wait_until(lambda t=text: not processes_mentioning(t, live_only=True), 10), (
            processes_mentioning(text, live_only=True)
        )
    assert not pod_dir.exists(), f"{pod_dir} is left"
    assert not (root / name).exists(), f"state directory of {name} is left"
    assert mounts_below(root) == []
    sockets = [str(p) for p in root.rglob("*") if stat.S_ISSOCK(p.lstat().st_mode)]
    assert sockets == []
    mark = str(root).replace("/", ".") + "."
    assert [p.name for p in PID_DIR.iterdir() if p.name.startswith(mark)] == []
    locks = root / "locks"
    assert not locks.exists() or [p.name for p in locks.iterdir() if name in p.name] == []
    # The names this root's pod may have: a bundle's default (/pysandbox/ID, or the systemd
    # scope), a run's (NAME-ROOTHASH); other roots' pods of the same name are not ours.
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
    ours = {name, f"{name}-{digest}", f"pysandbox-{name}.scope"}
    cgroups = [
        os.path.join(d, n) for d, names, _ in os.walk("/sys/fs/cgroup") for n in names if n in ours
    ]
    assert cgroups == []


def kill_when(
    proc: subprocess.Popen[str], aim: Iterator[int | None], timeout: float = 120.0
) -> tuple[int, float] | None:
    """Poll ``aim`` (a pid to SIGKILL once it yields one) while ``proc`` runs; the pid and
    when it was killed, or None when ``proc`` ended first."""
    deadline = time.monotonic() + timeout
    for pid in aim:
        if proc.poll() is not None:
            return None
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            return pid, time.monotonic()
        assert time.monotonic() < deadline, "the moment to kill never came"
        time.sleep(0.01)
    return None


def finish(proc: subprocess.Popen[str], killed_at: float) -> tuple[int, str, float]:
    """Exit status, stderr and the seconds from the kill to the command's end."""
    _out, err = proc.communicate(timeout=150)
    return proc.returncode, err, time.monotonic() - killed_at


def assert_one_line_naming(err: str, label: str, pid: int, pod_id: str, root: Path) -> None:
    assert "Traceback" not in err, err
    assert err.startswith("pysandbox: ") and err.count("\n") == 1, err
    assert f"{label} (pid {pid}) of pod {pod_id} died; its log is kept at " in err, err
    kept = Path(err.split("its log is kept at ", 1)[1].split(";")[0].strip())
    assert kept.parent == root / "logs" and kept.is_file(), err


@pytest.mark.parametrize("verb", ["create", "run -d"])
def test_virtiofsd_killed_during_create_or_run_d_fails_it_at_once(
    root: Path, tmp_path: Path, verb: str
) -> None:
    """The server process (virtiofsd's child) is killed once the pod runs, while the
    command shares the container's files and has the guest create it: the guest would wait
    on the share forever (before: 122 s, "agent did not answer CreateContainer within
    120s")."""
    for attempt in range(3):
        cid = f"fs{attempt}"
        if verb == "create":
            bundle = make_bundle(tmp_path, ["sleep", "1000"])
            command = spawn(root, "create", "--bundle", str(bundle), cid)
        else:
            command = spawn(root, "run", "-d", "--name", cid, "default", "sleep", "1000")
        parents: list[int] = []

        def aim(cid: str = cid, parents: list[int] = parents) -> Iterator[int | None]:
            while True:
                parent = recorded_pid(root, cid, "virtiofsd")
                running = pod_record(root, cid).get("status") == "running"
                servers = children(parent) if running and parent else []
                if servers and parent:
                    parents.append(parent)
                yield servers[0] if servers else None

        hit = kill_when(command, aim())
        if hit is None:  # created before the aim: try again
            assert command.wait() == 0, command.stderr.read() if command.stderr else ""
            remove = ["delete", "--force", cid] if verb == "create" else ["rm", "-f", cid]
            subprocess.run(cli(root, *remove), check=True, timeout=120)
            continue
        _server, killed_at = hit
        code, err, took = finish(command, killed_at)
        assert code == (1 if verb == "create" else 125) and took < PROMPT, (code, took, err)
        assert_one_line_naming(err, "virtiofsd", parents[-1], cid, root)
        assert_nothing_left(root, cid)
        return
    pytest.fail(f"{verb} was done before virtiofsd could be killed, three times")


def test_virtiofsd_killed_under_a_detached_run_stops_the_run(root: Path) -> None:
    """The container's processes cannot go on without their files: the run ends at once,
    ``ps`` shows it stopped, ``logs`` says why, and nothing of it is left after ``rm``
    (before: ``ps`` said running for ever, the workload hung on its next file access, and
    ``stop -t 3`` took 35 s waiting on the guest)."""
    name = "fsrun"
    started = subprocess.run(
        cli(root, "run", "-d", "--name", name, "default", "sh", "-c", "echo up; exec sleep 1000"),
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert started.returncode == 0, started.stderr

    def logs() -> str:
        return subprocess.run(
            cli(root, "logs", name), capture_output=True, text=True, timeout=60
        ).stdout

    assert wait_until(lambda: logs() == "up\n", 30), logs()
    parent = recorded_pid(root, name, "virtiofsd")
    assert parent is not None and children(parent), "no virtiofsd server process"
    os.kill(children(parent)[0], signal.SIGKILL)

    def status() -> str:
        listed = subprocess.run(
            cli(root, "ps", "-a", "--format", "json"), capture_output=True, text=True, timeout=60
        )
        runs = {run["name"]: run["status"] for run in json.loads(listed.stdout or "[]")}
        return str(runs.get(name))

    assert wait_until(lambda: status() == "stopped", 4 * PROMPT), status()
    said = logs()
    assert said.startswith("up\n") and "Traceback" not in said, said
    assert f"virtiofsd (pid {parent}) of pod {name} died" in said, said
    removed = subprocess.run(cli(root, "rm", name), capture_output=True, text=True, timeout=60)
    assert removed.returncode == 0, removed.stderr
    assert_nothing_left(root, name)


def test_agent_proxy_killed_during_run_d_fails_it_at_once(root: Path) -> None:
    """Killed while the pod boots (its agent not yet answering): before, 60 s then "agent
    not healthy within 60s"."""
    for attempt in range(3):
        name = f"px{attempt}"
        run = spawn(root, "run", "-d", "--name", name, "default", "sleep", "1000")

        def aim(name: str = name) -> Iterator[int | None]:
            while True:
                booting = pod_record(root, name).get("status") == "booting"
                yield recorded_pid(root, name, "proxy") if booting else None

        hit = kill_when(run, aim())
        if hit is None:
            assert run.wait() == 0
            subprocess.run(cli(root, "rm", "-f", name), check=True, timeout=120)
            continue
        proxy, killed_at = hit
        code, err, took = finish(run, killed_at)
        if code == 0:  # the boot was past the proxy's last use: a new one serves the pod
            subprocess.run(cli(root, "rm", "-f", name), check=True, timeout=120)
            continue
        assert code == 125 and took < PROMPT, (code, took, err)
        assert_one_line_naming(err, "agent proxy", proxy, name, root)
        assert_nothing_left(root, name)
        return
    pytest.fail("run -d was past the boot before its proxy could be killed, three times")


@pytest.mark.parametrize(("victim", "label"), [("qemu", "QEMU"), ("virtiofsd", "virtiofsd")])
def test_a_pod_process_killed_during_exec_fails_it_at_once(
    root: Path, tmp_path: Path, victim: str, label: str
) -> None:
    cid = f"ex-{victim}"
    bundle = make_bundle(tmp_path, ["sleep", "1000"])
    subprocess.run(cli(root, "create", "--bundle", str(bundle), cid), check=True, timeout=150)
    subprocess.run(cli(root, "start", cid), check=True, timeout=60)
    execd = spawn(root, "exec", cid, "sh", "-c", "echo ready; exec sleep 1000")
    assert execd.stdout is not None and execd.stdout.readline() == "ready\n"
    pid = recorded_pid(root, cid, victim)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    code, err, took = finish(execd, time.monotonic())
    assert code != 0 and took < PROMPT, (code, took, err)
    assert_one_line_naming(err, label, pid, cid, root)
    done = subprocess.run(
        cli(root, "delete", "--force", cid), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert_nothing_left(root, cid)


def _moments(root: Path, name: str) -> dict[str, Callable[[], bool]]:
    """Moments of a start-up, each a check that is true once the start-up reached it."""

    def recorded(process: str) -> Callable[[], bool]:
        return lambda: recorded_pid(root, name, process) is not None

    return {
        "cli starting": lambda: True,
        "pod reserved": lambda: bool(pod_record(root, name)),
        "virtiofsd started": recorded("virtiofsd"),
        "qemu started": recorded("qemu"),
        "proxy started": recorded("proxy"),
        "pod running": lambda: pod_record(root, name).get("status") == "running",
    }


#: The moments the small campaign aims at (``make campaign``: all, several times each).
SMALL_MOMENTS = ("cli starting", "qemu started", "pod running")


@pytest.mark.parametrize("verb", ["create", "run -d", "run"])
def test_sigterm_at_any_moment_of_the_start_up_leaves_nothing(
    root: Path, tmp_path: Path, verb: str
) -> None:
    """SIGTERM at each moment of the start-up (the CLI starting, the pod reserved, each of
    its processes started, the pod running); the command ends with 128+15 (or 0 when it was
    done first) and leaves nothing once removed. The large campaign aims at every moment,
    :data:`CAMPAIGN_REPEATS` times."""
    outcomes = []
    names = list(_moments(root, "x"))
    aims = names if LARGE else list(SMALL_MOMENTS)
    for index, moment in enumerate(aims * (CAMPAIGN_REPEATS if LARGE else 1)):
        name = f"t{index}"
        if verb == "create":
            args = ["create", "--bundle", str(make_bundle(tmp_path, ["sleep", "1000"])), name]
        elif verb == "run -d":
            args = ["run", "-d", "--name", name, "default", "sleep", "1000"]
        else:
            loop = "trap 'exit 143' TERM; while :; do sleep 0.1; done"
            args = ["run", "--name", name, "default", "sh", "-c", loop]
        # Its output goes to a file, not a pipe: a create that was done first has handed its
        # stdio to the container (as runc's does), which keeps a pipe open until deleted.
        errors = tmp_path / f"{name}.err"
        with errors.open("w") as stderr:
            proc = subprocess.Popen(
                cli(root, *args), stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr
            )
        reached = _moments(root, name)[moment]
        wait_until(lambda r=reached, p=proc: r() or p.poll() is not None, 120, interval=0.005)
        if moment == "cli starting":
            time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=150)
        err = errors.read_text()
        assert "Traceback" not in err, err
        outcomes.append((moment, proc.returncode))
        # -15: killed by the signal while Python was still starting (nothing was started).
        if verb == "run":  # once the container runs the signal reaches it: it exits 143
            assert proc.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM), (moment, err)
        else:
            assert proc.returncode in (-signal.SIGTERM, 0, 128 + signal.SIGTERM), (moment, err)
        if proc.returncode == 0:
            remove = ["delete", "--force", name] if verb == "create" else ["rm", "-f", name]
            subprocess.run(cli(root, *remove), check=True, timeout=120)
        assert_nothing_left(root, name)
    print(f"sigterm {verb}: (moment, exit status) = {outcomes}")
    assert sum(code == 128 + signal.SIGTERM for _m, code in outcomes) >= len(aims) - 1


def test_a_guest_kernel_crashed_from_a_privileged_container_fails_a_waiting_exec_at_once(
    root: Path, tmp_path: Path
) -> None:
    """A compromised guest takes its agent down with it (a privileged container crashes the
    guest kernel through /proc/sysrq-trigger): an exec waiting on the agent fails at once
    naming QEMU, which exits (``-no-reboot``), and ``delete --force`` leaves nothing."""
    from ocispec.capabilities import NAMES as ALL_CAPABILITIES

    cid = "crash"
    # The go signal comes from the host through a volume: an `exec touch` as the signal
    # raced the crash it triggers (its exit status could be lost with the guest).
    signals = tmp_path / "signals"
    signals.mkdir()
    script = "until [ -e /signals/go ]; do sleep 0.1; done; echo c > /proc/sysrq-trigger"
    bundle = make_bundle(tmp_path, ["sh", "-c", script])
    spec = json.loads((bundle / "config.json").read_text())
    spec["mounts"].append(
        {"destination": "/signals", "type": "bind", "source": str(signals), "options": ["rbind"]}
    )
    for kind in ("bounding", "effective", "permitted"):
        spec["process"]["capabilities"][kind] = list(ALL_CAPABILITIES)
    spec["linux"].pop("seccomp", None)
    spec["linux"]["maskedPaths"] = []
    spec["linux"]["readonlyPaths"] = []
    (bundle / "config.json").write_text(json.dumps(spec))
    subprocess.run(cli(root, "create", "--bundle", str(bundle), cid), check=True, timeout=150)
    subprocess.run(cli(root, "start", cid), check=True, timeout=60)
    waiting = spawn(root, "exec", cid, "sh", "-c", "echo ready; exec sleep 1000")
    assert waiting.stdout is not None and waiting.stdout.readline() == "ready\n", (
        waiting.communicate(timeout=60)
    )
    qemu = recorded_pid(root, cid, "qemu")
    assert qemu is not None
    (signals / "go").touch()
    code, err, took = finish(waiting, time.monotonic())
    assert code != 0 and took < PROMPT + 10, (code, took, err)  # + the guest's panic
    assert_one_line_naming(err, "QEMU", qemu, cid, root)
    done = subprocess.run(
        cli(root, "delete", "--force", cid), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert_nothing_left(root, cid)


def test_rm_f_while_run_d_starts_waits_for_the_start_then_removes_it(root: Path) -> None:
    """``rm -f`` (and ``stop``) of a run that ``run -d`` is still starting waits for the start
    and then removes the run: ``run -d`` succeeds, ``rm -f`` succeeds, nothing is left.
    Before, the removal cut the boot wherever it was: the client was SIGKILLed (137, no
    word), or failed naming the jail ("Connection refused: .../virtiofsd.sock") or QEMU
    ("vhost_backend_init failed"), and ``rm -f`` sometimes failed ("still mounted")."""
    for index, moment in enumerate(("pod reserved", "qemu started", "pod running")):
        name = f"rm{index}"
        run = spawn(root, "run", "-d", "--name", name, "default", "sleep", "1000")
        reached = _moments(root, name)[moment]
        wait_until(lambda r=reached, p=run: r() or p.poll() is not None, 120, interval=0.005)
        removed = subprocess.run(
            cli(root, "rm", "-f", name), capture_output=True, text=True, timeout=150
        )
        out, err = run.communicate(timeout=150)
        assert (run.returncode, out, err) == (0, f"{name}\n", ""), moment
        assert (removed.returncode, removed.stdout, removed.stderr) == (0, f"{name}\n", ""), moment
        assert_nothing_left(root, name)
    # Nothing died: no log was kept for a casualty (the run's watcher took the removal's
    # stopping of virtiofsd for one and kept an empty QEMU log for each run).
    time.sleep(2)
    kept = sorted(p.name for p in (root / "logs").glob("*")) if (root / "logs").exists() else []
    assert kept == []


def test_the_root_deleted_right_after_a_foreground_run_keeps_its_volume_and_leaks_nothing(
    pod_factory: PodFactory, tmp_path: Path
) -> None:
    """A CI script's ``pysandbox --root $(mktemp -d) run -v DIR:/data ...; rm -rf $root``:
    the VM is torn down after the run returned (off its path), but the volume's bind is gone
    by then — ``rm -rf`` emptied the volume on the host through it (breaker4) — and the
    teardown, finding the pod's record deleted, still ends the VM's processes, mounts and
    host cgroup."""
    volume = tmp_path / "precious"
    volume.mkdir()
    for i in range(3):
        (volume / f"f{i}").write_text(f"{i}\n")
    root = pod_factory.new_root("gone")
    name = "vanishing"
    done = subprocess.run(
        [*cli(root, "run", "--name", name, "-v", f"{volume}:/data"), "default", "ls", "/data"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (done.returncode, done.stdout) == (0, "f0\nf1\nf2\n"), done.stderr
    subprocess.run(["rm", "-rf", str(root)], capture_output=True, timeout=60)
    assert sorted(p.name for p in volume.iterdir()) == ["f0", "f1", "f2"]
    assert all((volume / f"f{i}").read_text() == f"{i}\n" for i in range(3))
    pod_dir = root / "p" / state.pod_dir_name(name)
    assert wait_until(lambda: not processes_mentioning(str(pod_dir), live_only=True), 30), (
        processes_mentioning(str(pod_dir), live_only=True)
    )
    assert wait_until(lambda: mounts_below(root) == [], 10) and not pod_dir.exists()
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
    assert wait_until(
        lambda: not any(f"{name}-{digest}" in names for _, names, _ in os.walk("/sys/fs/cgroup")),
        10,
    )
