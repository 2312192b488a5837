"""The runc CLI surface, driven as containerd and conmon drive it: ``pysandbox`` subprocesses.

One VM, created and started once for the module (:func:`life`), carries the lifecycle checks
(state, exec in every form, ps, list, pause/resume, update, signals) and the failed and
created-only containers that join its pod; each test leaves that container running as it found
it, and its final delete must leave nothing. Ending a container with ``kill --all`` and deleting
it runs on a VM of its own, restored and cold. Errors that need no VM (unknown ids, bad
bundles) are checked against an empty root. A failed create that already booted its pod, and
``delete --force`` after QEMU, virtiofsd, the agent proxy or the shim were killed with
SIGKILL, each cost one boot: they are the cleanup paths a client cannot do itself.

Containers are created through :data:`CONMON`, a small subreaper standing in for conmon/the
containerd shim: it runs the runtime command, then waits for the pid of ``--pid-file`` and
reports its exit status, which must be the container's.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sandbox import store as state
from sandbox.image import store as images
from sandbox.pod.hostfs import mounts_below
from sandbox.run.default_spec import default_spec
from tests.integration.pods import PodFactory
from tests.processes import alive, pristine_signals, processes_mentioning, wait_until

pytestmark = pytest.mark.vm

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = str(ROOT / ".venv" / "bin" / "pysandbox")

#: A subreaper like conmon: runs argv[3:] with stdout/stderr to argv[2], prints "rc N"; then
#: (on success) waits for the pid in the pid file argv[1] and prints "exit N" with its status.
CONMON = r"""
import ctypes, os, sys, subprocess
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
pid_file, out = sys.argv[1], sys.argv[2]
with open(out, "ab") as sink:
    rc = subprocess.run(sys.argv[3:], stdin=subprocess.DEVNULL, stdout=sink, stderr=sink).returncode
print("rc", rc, flush=True)
if rc == 0:
    pid = int(open(pid_file).read())
    while True:
        done, status = os.wait()
        if done == pid:
            code = os.waitstatus_to_exitcode(status)
            print("exit", code if code >= 0 else 128 - code, flush=True)
            break
"""


@dataclass
class Conmon:
    """A running :data:`CONMON` and what it reported."""

    proc: subprocess.Popen[str]
    pid_file: Path
    out: Path

    def rc(self) -> int:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        assert line and line[0] == "rc", f"conmon said {line!r}; output: {self.output()}"
        return int(line[1])

    def exit_status(self, timeout: float = 60.0) -> int:
        assert self.proc.stdout is not None
        self.proc.wait(timeout)
        line = self.proc.stdout.readline().split()
        assert line and line[0] == "exit", line
        return int(line[1])

    @property
    def pid(self) -> int:
        return int(self.pid_file.read_text())

    def output(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""


class Runtime:
    """``pysandbox --root R`` as a client runs it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def argv(self, *args: str) -> list[str]:
        return [RUNTIME, "--root", str(self.root), *args]

    def __call__(
        self, *args: str, stdin: str | None = None, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args),
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def ok(self, *args: str, stdin: str | None = None) -> str:
        done = self(*args, stdin=stdin)
        assert done.returncode == 0, f"{args}: rc {done.returncode}: {done.stderr}"
        assert done.stderr == "", done.stderr
        return done.stdout

    def state(self, cid: str) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.ok("state", cid))
        return result

    def attempt(self, *args: str, tmp: Path) -> Attempt:
        """Run a call with a JSON ``--log`` file in ``tmp``, for :meth:`Attempt.failed_with`."""
        log = tmp / f"log-{time.monotonic_ns()}.json"
        return Attempt(args, self("--log", str(log), "--log-format", "json", *args), log)

    def fails(self, *args: str, match: str, tmp: Path) -> str:
        """Run a call that must fail the runc way (see :meth:`Attempt.failed_with`)."""
        return self.attempt(*args, tmp=tmp).failed_with(match)

    def conmon(self, pid_file: Path, out: Path, *args: str) -> Conmon:
        proc = subprocess.Popen(
            [sys.executable, "-c", CONMON, str(pid_file), str(out), *self.argv(*args)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        return Conmon(proc, pid_file, out)


@dataclass
class Attempt:
    """A runtime call made with ``--log FILE --log-format json``, and what it did."""

    args: tuple[str, ...]
    done: subprocess.CompletedProcess[str]
    log: Path

    def failed_with(self, match: str) -> str:
        """Assert the call failed the runc way: non-zero, one line on stderr saying ``match``,
        no traceback, and exactly one JSON line in the log file; return the message."""
        done, args = self.done, self.args
        assert done.returncode != 0, f"{args} succeeded: {done.stdout}"
        assert "Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith("pysandbox: ") and done.stderr.count("\n") == 1, done.stderr
        message = done.stderr.removeprefix("pysandbox: ").strip()
        assert match in message, f"{args}: {message!r} does not say {match!r}"
        lines = self.log.read_text().splitlines()
        assert len(lines) == 1, lines
        entry = json.loads(lines[0])
        assert entry["level"] == "error" and entry["msg"] == message and entry["time"]
        return message


def _runtime_in(pods: PodFactory) -> Iterator[Runtime]:
    """A runtime with a root of its own from ``pods`` (which watches it: logs kept on failure,
    pods destroyed and the root removed after); its containers force-deleted after use."""
    runtime = Runtime(pods.new_root("rt"))
    yield runtime
    for entry in sorted(runtime.root.iterdir()):
        if (entry / "state.json").exists():
            subprocess.run(
                runtime.argv("delete", "--force", entry.name),
                capture_output=True,
                timeout=120,
                check=False,
            )


@pytest.fixture
def runtime(pod_factory: PodFactory) -> Iterator[Runtime]:
    """A runtime for one test."""
    yield from _runtime_in(pod_factory)


@pytest.fixture(scope="module")
def module_runtime(module_pods: PodFactory) -> Iterator[Runtime]:
    """A runtime for the tests of :func:`life`'s container."""
    yield from _runtime_in(module_pods)


def make_bundle(
    base: Path, args: list[str], annotations: dict[str, str] | None = None, **extra: Any
) -> Path:
    """A bundle running ``args`` in the default busybox image (read-only root)."""
    bundle = base / f"bundle-{time.monotonic_ns()}"
    bundle.mkdir()
    spec = default_spec(args, rootfs=str(images.ensure_default_image()))
    if annotations:
        spec["annotations"] = annotations
    spec.update(extra)
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def _processes(text: str) -> list[str]:
    return processes_mentioning(text, live_only=True)


def pod_dir(root: Path, pod_id: str) -> Path:
    return root / "p" / state.pod_dir_name(pod_id)


def assert_nothing_left(runtime: Runtime, cid: str, pod_id: str | None = None) -> None:
    """No record, pod directory, process, mount or socket of ``cid`` (and its pod)."""
    root = runtime.root
    assert not (root / cid).exists(), f"state directory of {cid} is left"
    shim = f"--root {root} --id {cid} "
    assert wait_until(lambda: not _processes(shim), 15), _processes(shim)
    if pod_id is not None:
        where = str(pod_dir(root, pod_id))
        assert wait_until(lambda: not _processes(where), 15), _processes(where)
        assert not Path(where).exists(), f"pod directory {where} is left"
    if pod_id is not None:  # each test's root holds one pod at a time
        assert mounts_below(root) == []
        sockets = [str(p) for p in root.rglob("*") if stat.S_ISSOCK(p.lstat().st_mode)]
        assert sockets == [], sockets
    else:  # the pod lives on: nothing of this container in it
        assert [m for m in mounts_below(root) if cid in m.split("/")] == []
    listed = runtime.ok("list", "--quiet").split()
    assert cid not in listed


# -- the lifecycle, one VM --------------------------------------------------------------------

#: Two processes throughout (sh and one sleep): a trapped signal interrupts ``wait``, the
#: trap runs, and sh waits again.
CONTAINER_SCRIPT = (
    "trap 'echo got-usr1' USR1; trap 'echo got-usr2' USR2; trap 'echo got-term; exit 3' TERM; "
    "sleep 1000 & p=$!; echo started; while :; do wait $p; done"
)


@dataclass
class Life:
    """The module's container (``life``): created, looked at, refused verbs, then started."""

    runtime: Runtime
    cid: str
    tmp: Path
    bundle: Path
    init: Conmon
    pid: int
    created: dict[str, Any]  # its state right after create
    output_when_created: str
    duplicate_create: Attempt  # a second create with its id, while created
    status_after_duplicate: str
    exec_when_created: Attempt

    def ps(self) -> list[int]:
        pids: list[int] = json.loads(self.runtime.ok("ps", "--format", "json", self.cid))
        return pids

    def join(self) -> dict[str, str]:
        """Annotations of a container joining this one's pod."""
        return {
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.sandbox-id": self.cid,
        }


@pytest.fixture(scope="module")
def life(module_runtime: Runtime, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Life]:
    """A container running :data:`CONTAINER_SCRIPT` (two processes), with what was seen
    before it was started. Deleted after the module's tests: that must leave nothing."""
    runtime, cid, tmp = module_runtime, "life", tmp_path_factory.mktemp("life")
    bundle = make_bundle(
        tmp, ["sh", "-c", CONTAINER_SCRIPT], annotations={"org.example.key": "value"}
    )
    pid_file = tmp / "init.pid"
    init = runtime.conmon(
        pid_file,
        tmp / "init.out",
        "create",
        "--bundle",
        str(bundle),
        "--pid-file",
        str(pid_file),
        cid,
    )
    assert init.rc() == 0, init.output()
    created, output = runtime.state(cid), init.output()
    # A duplicate id is refused and leaves the existing container alone.
    duplicate = runtime.attempt("create", "--bundle", str(bundle), cid, tmp=tmp)
    status = runtime.state(cid)["status"]
    exec_created = runtime.attempt("exec", cid, "true", tmp=tmp)
    runtime.ok("start", cid)
    yield Life(
        runtime, cid, tmp, bundle, init, init.pid, created, output, duplicate, status, exec_created
    )
    runtime.ok("delete", "--force", cid)
    assert init.exit_status() in (128 + signal.SIGTERM, 128 + signal.SIGKILL)
    assert_nothing_left(runtime, cid, pod_id=cid)


def test_create_reports_the_state_runc_does(life: Life) -> None:
    created = life.created
    assert alive(life.pid)
    assert created["ociVersion"].startswith("1.")
    assert created["id"] == life.cid and created["status"] == "created"
    assert created["pid"] == life.pid
    assert created["bundle"] == str(life.bundle.resolve())
    assert created["annotations"] == {"org.example.key": "value"}
    assert "started" not in life.output_when_created


def test_a_created_container_refuses_a_duplicate_and_exec(life: Life) -> None:
    life.duplicate_create.failed_with(f"{life.cid} already exists")
    assert life.status_after_duplicate == "created"
    life.exec_when_created.failed_with("cannot exec in a created container")


def test_start_runs_the_process_and_refuses_start_and_delete(life: Life) -> None:
    runtime, cid = life.runtime, life.cid
    assert runtime.state(cid)["status"] == "running"
    assert wait_until(lambda: "started" in life.init.output()), life.init.output()
    runtime.fails("start", cid, match="cannot start an already running container", tmp=life.tmp)
    runtime.fails("delete", cid, match="use --force", tmp=life.tmp)


def test_exec_argv_form_with_env_cwd_user_and_exit_status(life: Life) -> None:
    runtime, cid = life.runtime, life.cid
    out = runtime.ok(
        "exec",
        "--env",
        "FOO=bar baz",
        "--cwd",
        "/tmp",
        "--user",
        "1000:1001",
        cid,
        "sh",
        "-c",
        'echo "$FOO"; pwd; id -u; id -g',
    )
    assert out.split("\n")[:4] == ["bar baz", "/tmp", "1000", "1001"]
    done = runtime("exec", cid, "sh", "-c", "echo to-stderr >&2; exit 7")
    assert done.returncode == 7 and done.stderr == "to-stderr\n"
    # A container probed by an exec every few seconds for weeks must not fill its state dir.
    leftovers = [p.name for p in (runtime.root / cid).iterdir() if p.name.startswith("exec-")]
    assert not leftovers, leftovers


def test_attached_exec_relays_signals(life: Life) -> None:
    # runc exec relays the signals it gets to its process.
    attached = subprocess.Popen(
        life.runtime.argv(
            "exec",
            life.cid,
            "sh",
            "-c",
            "trap 'echo got-int; exit 5' INT; echo ready; while :; do sleep 0.1; done",
        ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert attached.stdout is not None and attached.stdout.readline() == "ready\n"
    # The attached call stands for its process on the host: ps lists it after the init's.
    assert life.ps() == [life.pid, attached.pid]
    attached.send_signal(signal.SIGINT)
    assert attached.wait(60) == 5
    assert attached.stdout.read() == "got-int\n"


def _attached(life: Life, script: str, **popen: Any) -> subprocess.Popen[str]:
    """An attached ``exec`` of ``sh -c SCRIPT``, once its first output line (read here,
    SCRIPT echoes it when set up) is ``ready``."""
    attached = subprocess.Popen(
        life.runtime.argv("exec", life.cid, "sh", "-c", script),
        stdout=subprocess.PIPE,
        text=True,
        **{"stdin": subprocess.DEVNULL, **popen},
    )
    assert attached.stdout is not None and attached.stdout.readline() == "ready\n"
    return attached


def test_attached_exec_runs_without_grpc_in_the_calling_process(life: Life) -> None:
    """The attached call hands its work to the pod's agent proxy: the process a client
    waits on has no gRPC or protobuf library mapped (it would be, had it imported them)."""

    def heavy(pid: int) -> list[str]:
        maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
        return sorted({line.split()[-1] for line in maps if "grpc" in line or "protobuf" in line})

    # The check sees them where they are: in a process that imported grpcio (the pod's
    # agent proxy no longer does either: tests/unit/test_grpc_relay.py).
    importer = subprocess.Popen(
        [sys.executable, "-c", "import grpc, sys; print(1, flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert importer.stdout is not None and importer.stdout.readline() == b"1\n"
        assert any("cygrpc" in lib for lib in heavy(importer.pid)), heavy(importer.pid)
    finally:
        importer.kill()
        importer.wait()
    attached = _attached(life, "echo ready; exec sleep 1234")
    try:
        assert heavy(attached.pid) == []
    finally:
        attached.send_signal(signal.SIGTERM)
        assert attached.wait(60) == 128 + signal.SIGTERM  # sleep has no handler: killed


def test_attached_exec_forwards_sigterm_and_sighup(life: Life) -> None:
    for signum, name in ((signal.SIGTERM, "TERM"), (signal.SIGHUP, "HUP")):
        trap = f"trap 'echo got-{name}; exit 6' {name}; echo ready; while :; do sleep 0.1; done"
        attached = _attached(life, trap)
        attached.send_signal(signum)
        assert attached.wait(60) == 6
        assert attached.stdout is not None and attached.stdout.read() == f"got-{name}\n"


def test_an_exec_killed_by_sigkill_exits_137_as_with_runc(
    life: Life, runc_container: RuncContainer
) -> None:
    script = "kill -KILL $$"
    runc = runc_container.exec("sh", "-c", script)
    ours = life.runtime("exec", life.cid, "sh", "-c", script)
    assert (ours.returncode, ours.stdout, ours.stderr) == (runc.returncode, "", "") == (137, "", "")


def test_the_exec_ends_when_its_attached_call_is_killed(life: Life) -> None:
    """SIGKILL of the call standing for the exec (a client giving up on it) takes the
    process down in the guest, as for a detached exec's shim."""
    attached = _attached(life, "echo ready; exec sleep 1234")
    assert life.ps() == [life.pid, attached.pid]
    assert "sleep 1234" in life.runtime.ok("ps", life.cid)
    attached.kill()
    attached.wait(60)
    assert wait_until(lambda: "sleep 1234" not in life.runtime.ok("ps", life.cid))
    assert life.ps() == [life.pid]


def test_attached_exec_stdin_eof_and_a_terminals_next_input(life: Life) -> None:
    """stdin is relayed until EOF; once the exec is over, input typed later on the same
    terminal is left for the next reader (the shell), not taken by the relay."""
    assert life.runtime.ok("exec", life.cid, "sh", "-c", "cat; echo eof", stdin="a\nb") == (
        "a\nbeof\n"
    )
    master, slave = os.openpty()
    try:
        done = subprocess.run(
            life.runtime.argv("exec", life.cid, "true"),
            stdin=slave,
            capture_output=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        os.write(master, b"typed later\n")
        os.set_blocking(slave, False)
        assert wait_until(lambda: _read_or_none(slave), timeout=5)
    finally:
        os.close(master)
        os.close(slave)


def test_attached_exec_with_a_terminal_follows_its_size(life: Life) -> None:
    """``exec -t`` from a terminal: the process's terminal has the caller's size at once
    and again after a resize (SIGWINCH, as a terminal sends it)."""
    import fcntl
    import struct
    import termios

    def set_size(fd: int, rows: int, cols: int) -> None:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    master, slave = os.openpty()
    set_size(slave, 30, 100)
    script = "stty size; while read x; do stty size; done"
    attached = subprocess.Popen(
        life.runtime.argv("exec", "-t", life.cid, "sh", "-c", script),
        stdin=slave,
        stdout=slave,
        stderr=subprocess.PIPE,
    )
    seen = bytearray()

    def shows(text: bytes) -> bool:
        while select.select([master], [], [], 0.2)[0]:
            seen.extend(os.read(master, 4096))
        return text in seen

    try:
        assert wait_until(lambda: shows(b"30 100"), timeout=60), bytes(seen)
        set_size(slave, 40, 120)
        attached.send_signal(signal.SIGWINCH)

        def resized() -> bool:
            os.write(master, b"x\n")
            return shows(b"40 120")

        assert wait_until(resized, timeout=30, interval=0.5), bytes(seen)
    finally:
        attached.kill()
        attached.wait(60)
        os.close(master)
        os.close(slave)


def _read_or_none(fd: int) -> bytes | None:
    try:
        data = os.read(fd, 100)
    except BlockingIOError:
        return None
    assert data == b"typed later\n"
    return data


#: A process file (containerd's and conmon's exec form).
PROCESS = {
    "args": ["sh", "-c", 'echo "proc $X $(pwd) $(id -u)"'],
    "env": ["PATH=/bin:/usr/bin", "X=y"],
    "cwd": "/etc",
    "user": {"uid": 5, "gid": 5},
    "terminal": False,
}


def test_exec_process_file_attached(life: Life, tmp_path: Path) -> None:
    (tmp_path / "process.json").write_text(json.dumps(PROCESS))
    out = life.runtime.ok("exec", "--process", str(tmp_path / "process.json"), life.cid)
    assert out == "proc y /etc 5\n"


def test_exec_detach_pid_file_is_a_host_process_with_the_status(life: Life, tmp_path: Path) -> None:
    # The pid is a host process whose exit status is the process's; clients kill(2) it
    # directly (containerd does for exec ids).
    runtime, cid = life.runtime, life.cid
    assert wait_until(lambda: life.ps() == [life.pid]), life.ps()  # the init's only

    def detached(name: str, options: list[str], command: list[str]) -> Conmon:
        pid_file = tmp_path / f"{name}.pid"
        exec_args = [*options, "--detach", "--pid-file", str(pid_file), cid, *command]
        started = runtime.conmon(pid_file, tmp_path / f"{name}.out", "exec", *exec_args)
        assert started.rc() == 0, started.output()
        return started

    (tmp_path / "sleep.json").write_text(json.dumps({**PROCESS, "args": ["sleep", "1000"]}))
    (tmp_path / "exit.json").write_text(json.dumps({**PROCESS, "args": ["sh", "-c", "exit 4"]}))
    sleeper = detached("exec1", ["--process", str(tmp_path / "sleep.json")], [])
    quick = detached("exec2", ["--process", str(tmp_path / "exit.json")], [])
    assert quick.exit_status() == 4
    stay = detached("exec3", [], ["sleep", "1000"])
    # ps --format json: host pids a client can signal and read /proc of (runc's callers
    # do): the init's --pid-file process, then the live detached execs', oldest first.
    pids = life.ps()
    assert pids == [life.pid, sleeper.pid, stay.pid], pids
    for host_pid in pids:
        cmdline = Path(f"/proc/{host_pid}/cmdline").read_bytes().split(b"\0")
        assert b"sandbox.runtime.shim" in cmdline and cmdline[cmdline.index(b"--id") + 1] == (
            cid.encode()
        ), cmdline
    # ps: the guest's process table for people, as the container sees it (sh is its pid 1),
    # each process next to the host pid standing for it.
    rows = [line.split(None, 4) for line in runtime.ok("ps", cid).splitlines()]
    assert rows[0] == ["PID", "PPID", "UID", "HOST-PID", "CMD"], rows
    assert ["1", "0", "0", str(life.pid), f"sh -c {CONTAINER_SCRIPT}"] in rows, rows
    sleeps = sorted(row[1:4] for row in rows[1:] if row[4] == "sleep 1000")
    # sh's own sleep; the execs' parent is outside the container (ppid 0), as under runc.
    assert sleeps == sorted(
        [["1", "0", "-"], ["0", "5", str(sleeper.pid)], ["0", "0", str(stay.pid)]]
    )
    os.kill(sleeper.pid, signal.SIGTERM)
    assert sleeper.exit_status() == 128 + signal.SIGTERM
    assert wait_until(lambda: life.ps() == [life.pid, stay.pid]), life.ps()
    os.kill(stay.pid, signal.SIGTERM)
    assert stay.exit_status() == 128 + signal.SIGTERM
    assert wait_until(lambda: life.ps() == [life.pid]), life.ps()


def test_list_formats(life: Life) -> None:
    runtime, cid, pid = life.runtime, life.cid, life.pid
    listed = json.loads(runtime.ok("list", "--format", "json"))
    assert [(s["id"], s["status"], s["pid"]) for s in listed] == [(cid, "running", pid)]
    assert runtime.ok("list", "--quiet") == f"{cid}\n"
    table = runtime.ok("list").splitlines()
    assert table[0].split()[:3] == ["ID", "PID", "STATUS"] and table[1].split()[:3] == [
        cid,
        str(pid),
        "running",
    ]


def test_pause_and_resume_with_their_refusals(life: Life) -> None:
    runtime, cid, tmp = life.runtime, life.cid, life.tmp
    runtime.ok("pause", cid)
    assert runtime.state(cid)["status"] == "paused"
    runtime.fails("exec", cid, "true", match="cannot exec in a paused container", tmp=tmp)
    runtime.fails("pause", cid, match="container not running", tmp=tmp)
    runtime.ok("resume", cid)
    assert runtime.state(cid)["status"] == "running"
    runtime.fails("resume", cid, match="container not paused", tmp=tmp)


def test_update_from_a_file_stdin_and_flags(life: Life, tmp_path: Path) -> None:
    # A resources file, and stdin as containerd's CRI plugin passes it.
    runtime, cid = life.runtime, life.cid
    (tmp_path / "resources.json").write_text(json.dumps({"memory": {"limit": 200 * 1024 * 1024}}))
    runtime.ok("update", "--resources", str(tmp_path / "resources.json"), cid)
    assert runtime.ok("exec", cid, "cat", "/sys/fs/cgroup/memory.max") == f"{200 << 20}\n"
    runtime.ok("update", "--resources", "-", cid, stdin=json.dumps({"pids": {"limit": 77}}))
    assert runtime.ok("exec", cid, "cat", "/sys/fs/cgroup/pids.max") == "77\n"
    runtime.ok("update", "--memory", str(150 << 20), cid)
    assert runtime.ok("exec", cid, "cat", "/sys/fs/cgroup/memory.max") == f"{150 << 20}\n"


def test_failed_creates_joining_the_pod_leave_it_as_it_was(life: Life, tmp_path: Path) -> None:
    # Whether the create fails before it joins (a missing rootfs, found on the host) or after
    # (a refusing hook): no record, no files in the pod share, not a member, and the VM still
    # serves.
    runtime, cid = life.runtime, life.cid
    bad_root = make_bundle(tmp_path, ["true"], annotations=life.join())
    spec = json.loads((bad_root / "config.json").read_text())
    spec["root"]["path"] = str(tmp_path / "missing-rootfs")
    (bad_root / "config.json").write_text(json.dumps(spec))
    runtime.fails(
        "create", "--bundle", str(bad_root), "joiner1", match="is not a directory", tmp=tmp_path
    )
    hook = tmp_path / "failing-hook"
    hook.write_text("#!/bin/sh\necho hook-refuses >&2\nexit 1\n")
    hook.chmod(0o755)
    bad_hook = make_bundle(
        tmp_path,
        ["sleep", "1000"],
        annotations=life.join(),
        hooks={"createRuntime": [{"path": str(hook)}]},
    )
    runtime.fails(
        "create",
        "--bundle",
        str(bad_hook),
        "--pid-file",
        str(tmp_path / "j.pid"),
        "joiner2",
        match="hook-refuses",
        tmp=tmp_path,
    )
    assert not (tmp_path / "j.pid").exists()
    for joiner in ("joiner1", "joiner2"):
        assert_nothing_left(runtime, joiner)
        assert not (pod_dir(runtime.root, cid) / "shared" / joiner).exists()
    pod_record = json.loads((pod_dir(runtime.root, cid) / "pod.json").read_text())
    assert pod_record["containers"] == [cid]
    assert runtime.ok("exec", cid, "echo", "still-here") == "still-here\n"


@pytest.mark.parametrize("how", ["kill-then-delete", "delete"])
def test_created_member_killed_then_deleted_or_deleted_outright(
    life: Life, tmp_path: Path, how: str
) -> None:
    # Created, never started: killed then deleted (podman rm -f), or deleted outright.
    runtime, cid = life.runtime, life.cid
    joiner = "joiner3" if how == "kill-then-delete" else "joiner4"
    member = make_bundle(tmp_path, ["sleep", "1000"], annotations=life.join())
    pid_file = tmp_path / f"{joiner}.pid"
    joined = runtime.conmon(
        pid_file,
        tmp_path / f"{joiner}.out",
        "create",
        "--bundle",
        str(member),
        "--pid-file",
        str(pid_file),
        joiner,
    )
    assert joined.rc() == 0, joined.output()
    assert runtime.state(joiner)["status"] == "created"
    if how == "kill-then-delete":
        runtime.ok("kill", joiner, "KILL")
        assert joined.exit_status() == 128 + signal.SIGKILL
        assert runtime.state(joiner)["status"] == "stopped"
    runtime.ok("delete", joiner)
    if how == "delete":
        assert joined.exit_status() in (128 + signal.SIGTERM, 128 + signal.SIGKILL)
    assert_nothing_left(runtime, joiner)
    assert json.loads((pod_dir(runtime.root, cid) / "pod.json").read_text())["containers"] == [cid]
    assert runtime.ok("exec", cid, "echo", "still-here") == "still-here\n"


def test_kill_takes_signal_names_and_numbers(life: Life) -> None:
    runtime, cid, init = life.runtime, life.cid, life.init
    usr1 = init.output().count("got-usr1")
    usr2 = init.output().count("got-usr2")
    runtime.ok("kill", cid, "SIGUSR1")
    assert wait_until(lambda: init.output().count("got-usr1") == usr1 + 1), init.output()
    runtime.ok("kill", cid, "usr2")
    assert wait_until(lambda: init.output().count("got-usr2") == usr2 + 1), init.output()
    runtime.ok("kill", cid, str(int(signal.SIGUSR1)))
    assert wait_until(lambda: init.output().count("got-usr1") == usr1 + 2), init.output()
    runtime.fails("kill", cid, "SIGNOPE", match="invalid signal", tmp=life.tmp)
    assert alive(life.pid) and runtime.state(cid)["status"] == "running"


# -- ending a container, one VM each way it boots -----------------------------------------------


def test_kill_all_ends_it_and_its_execs_and_delete_leaves_nothing(
    runtime: Runtime, tmp_path: Path, boot_mode: str
) -> None:
    cid = "ending"
    bundle = make_bundle(tmp_path, ["sh", "-c", CONTAINER_SCRIPT])
    init = runtime.conmon(
        tmp_path / "init.pid",
        tmp_path / "init.out",
        "create",
        "--bundle",
        str(bundle),
        "--pid-file",
        str(tmp_path / "init.pid"),
        cid,
    )
    assert init.rc() == 0, init.output()
    pod_record = json.loads((pod_dir(runtime.root, cid) / "pod.json").read_text())
    assert pod_record["boot"] == boot_mode
    runtime.ok("start", cid)
    assert wait_until(lambda: "started" in init.output()), init.output()
    stay = runtime.conmon(
        tmp_path / "exec.pid",
        tmp_path / "exec.out",
        "exec",
        "--detach",
        "--pid-file",
        str(tmp_path / "exec.pid"),
        cid,
        "sleep",
        "1000",
    )
    assert stay.rc() == 0, stay.output()

    # kill --all reaches exec'd processes too.
    runtime.ok("kill", "--all", cid, "TERM")
    assert init.exit_status() == 3
    assert "got-term" in init.output()
    assert stay.exit_status() in (128 + signal.SIGTERM, 128 + signal.SIGKILL)

    stopped = runtime.state(cid)
    assert stopped["status"] == "stopped" and stopped["pid"] == 0
    runtime.fails("start", cid, match="cannot start a container that has stopped", tmp=tmp_path)
    runtime.fails("exec", cid, "true", match="cannot exec in a stopped container", tmp=tmp_path)
    runtime.fails("pause", cid, match="container not running", tmp=tmp_path)
    runtime.fails("kill", cid, "9", match="container not running", tmp=tmp_path)
    runtime.ok("kill", "--all", cid, "9")  # containerd's shutdown path: no error when stopped

    runtime.ok("delete", cid)
    assert_nothing_left(runtime, cid, pod_id=cid)
    runtime.fails("state", cid, match=f"{cid}: container does not exist", tmp=tmp_path)
    runtime.ok("delete", "--force", cid)  # containerd's cleanup after delete: still success


def test_features_and_spec(runtime: Runtime, tmp_path: Path) -> None:
    features = json.loads(runtime.ok("features"))
    assert features["ociVersionMin"] <= features["ociVersionMax"]
    assert "pid" in features["linux"]["namespaces"]
    assert features["linux"]["cgroup"]["v2"] is True
    runtime_dir = tmp_path / "b"
    runtime_dir.mkdir()
    assert runtime.ok("spec", "--bundle", str(runtime_dir)) == ""
    spec = json.loads((runtime_dir / "config.json").read_text())
    assert spec["ociVersion"] and spec["process"]["args"] and spec["root"]["path"] == "rootfs"
    runtime.fails("spec", "--bundle", str(runtime_dir), match="already exists", tmp=tmp_path)


# -- errors without a VM ----------------------------------------------------------------------


def test_errors_are_one_line_logged_once_and_leave_nothing(
    runtime: Runtime, tmp_path: Path
) -> None:
    missing = "nope: container does not exist"
    for args in (
        ["state", "nope"],
        ["start", "nope"],
        ["kill", "nope"],
        ["kill", "nope", "9"],
        ["delete", "nope"],
        ["exec", "nope", "true"],
        ["exec", "--process", str(tmp_path / "p.json"), "--detach", "nope"],
        ["ps", "--format", "json", "nope"],
        ["pause", "nope"],
        ["resume", "nope"],
        ["update", "--memory", "1000000", "nope"],
    ):
        runtime.fails(*args, match=missing, tmp=tmp_path)
    runtime.ok("delete", "--force", "nope")

    empty = tmp_path / "empty"
    empty.mkdir()
    runtime.fails("create", "--bundle", str(empty), "c1", match="has no config.json", tmp=tmp_path)
    malformed = tmp_path / "malformed"
    malformed.mkdir()
    (malformed / "config.json").write_text('{"process": {"args": ["sh"]')
    runtime.fails(
        "create", "--bundle", str(malformed), "c2", match="is not valid JSON", tmp=tmp_path
    )
    no_args = make_bundle(tmp_path, ["sh"])
    spec = json.loads((no_args / "config.json").read_text())
    del spec["process"]["args"]
    (no_args / "config.json").write_text(json.dumps(spec))
    runtime.fails(
        "create",
        "--bundle",
        str(no_args),
        "c3",
        match="process.args: must not be empty",
        tmp=tmp_path,
    )
    good = make_bundle(tmp_path, ["sh"])
    runtime.fails(
        "create", "--bundle", str(good), "../escape", match="invalid container id", tmp=tmp_path
    )
    tty = make_bundle(tmp_path, ["sh"])
    spec = json.loads((tty / "config.json").read_text())
    spec["process"]["terminal"] = True
    (tty / "config.json").write_text(json.dumps(spec))
    runtime.fails("create", "--bundle", str(tty), "c4", match="--console-socket", tmp=tmp_path)
    runtime.fails("kill", "nope", "NOTASIGNAL", match="does not exist", tmp=tmp_path)
    # Usage errors too: one line, and logged (containerd reports what the log file says).
    runtime.fails("create", "--no-such-flag", "c5", match="unrecognized arguments", tmp=tmp_path)
    runtime.fails("kill", match="required: id", tmp=tmp_path)
    for cid in ("c1", "c2", "c3", "c4", "nope"):
        assert_nothing_left(runtime, cid, pod_id=cid)
    assert sorted(p.name for p in runtime.root.iterdir()) in ([], ["locks"], ["locks", "p"])
    assert not (runtime.root / "p").exists() or list((runtime.root / "p").iterdir()) == []


#: Modules the quick verbs must not load before they reach a pod (or at all).
HEAVY_MODULES = (
    "grpc",
    "sandbox.pod.agent_client",
    "sandbox.pod.lifecycle",
    "sandbox.pod.sharing",
    "sandbox.pod.network",
    "sandbox.image.store",
    "sandbox.runtime.shim",
    "hypervisor.qemu_args",
)


def test_quick_verbs_import_only_what_they_use(runtime: Runtime) -> None:
    stopped = runtime.root / "gone"
    stopped.mkdir()
    record: dict[str, object] = {
        "id": "gone",
        "status": "running",
        "pod_id": "gone",
        "bundle": "/nonexistent",
    }
    record["shim"] = {"pid": 1, "start": 1}  # not init's start time: a shim that exited
    (stopped / "state.json").write_text(json.dumps(record))
    for args in (
        ["state", "nope"],
        ["kill", "nope", "9"],
        ["delete", "nope"],
        ["delete", "--force", "nope"],
        ["state", "gone"],
        ["kill", "--all", "gone", "9"],
    ):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "sandbox", *runtime.argv(*args)[1:]],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        loaded = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if "|" in line}
        heavy = sorted(m for m in loaded if m.split(".")[0] == "grpc" or m in HEAVY_MODULES)
        assert heavy == [], f"{args} imports {heavy}"
    assert runtime.state("gone")["status"] == "stopped"


# -- cleanup after failures, one VM each ------------------------------------------------------


def test_failed_create_after_boot_undoes_the_pod(runtime: Runtime, tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.write_text("#!/bin/sh\necho no-thanks >&2\nexit 2\n")
    hook.chmod(0o755)
    bundle = make_bundle(
        tmp_path, ["sleep", "1000"], hooks={"createRuntime": [{"path": str(hook)}]}
    )
    runtime.fails(
        "create",
        "--bundle",
        str(bundle),
        "--pid-file",
        str(tmp_path / "pid"),
        "hooked",
        match="no-thanks",
        tmp=tmp_path,
    )
    assert not (tmp_path / "pid").exists()
    assert_nothing_left(runtime, "hooked", pod_id="hooked")

    # A create stopped with SIGTERM while its VM boots undoes it, as a failure does.
    with open(tmp_path / "create.err", "w+") as err:
        create = subprocess.Popen(
            runtime.argv("create", "--bundle", str(make_bundle(tmp_path, ["true"])), "termed"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        booting = pod_dir(runtime.root, "termed") / "pod.json"
        assert wait_until(booting.exists, 60)
        create.send_signal(signal.SIGTERM)
        assert create.wait(60) == 128 + signal.SIGTERM
        err.seek(0)
        assert "Traceback" not in err.read()
    assert_nothing_left(runtime, "termed", pod_id="termed")


def _recorded_pid(runtime: Runtime, cid: str, victim: str) -> int:
    if victim == "shim":
        record = json.loads((runtime.root / cid / "state.json").read_text())
        return int(record["shim"]["pid"])
    pod = json.loads((pod_dir(runtime.root, cid) / "pod.json").read_text())
    return int(pod["processes"][victim]["pid"])


@pytest.mark.parametrize("victim", ["qemu", "virtiofsd", "proxy", "shim"])
def test_delete_force_after_sigkill(runtime: Runtime, tmp_path: Path, victim: str) -> None:
    cid = f"k-{victim}"
    script = (
        "echo one; until [ -e /dev/go ]; do sleep 0.1; done; echo two; sleep 1; echo three; "
        "sleep 1000"
    )
    bundle = make_bundle(tmp_path, ["sh", "-c", script])
    init = runtime.conmon(
        tmp_path / "pid",
        tmp_path / "out",
        "create",
        "--bundle",
        str(bundle),
        "--pid-file",
        str(tmp_path / "pid"),
        cid,
    )
    assert init.rc() == 0, init.output()
    runtime.ok("start", cid)
    pod = json.loads((pod_dir(runtime.root, cid) / "pod.json").read_text())
    pids = [int(ref["pid"]) for ref in pod["processes"].values()]
    pids.append(_recorded_pid(runtime, cid, "shim"))
    assert all(alive(p) for p in pids)
    assert wait_until(lambda: "one" in init.output()), init.output()

    os.kill(_recorded_pid(runtime, cid, victim), signal.SIGKILL)
    if victim == "proxy":
        # Only a host helper died: the container runs on, its shim reconnects through a new
        # proxy (started by the next call) and relays everything the container prints next
        # (the agent's reader of the broken stream stopped when its session ended).
        time.sleep(1)
        assert alive(init.pid) and runtime.state(cid)["status"] == "running"
        runtime.ok("exec", cid, "touch", "/dev/go")
        assert wait_until(lambda: "three" in init.output()), init.output()
        assert "one\ntwo\nthree\n" in init.output()
        pods = json.loads((pod_dir(runtime.root, cid) / "pod.json").read_text())
        pids.append(int(pods["processes"]["proxy"]["pid"]))
    if victim == "shim":
        assert init.exit_status() == 128 + signal.SIGKILL
        assert wait_until(lambda: runtime.state(cid)["status"] == "stopped")
    runtime.ok("delete", "--force", cid)
    assert wait_until(lambda: not any(alive(p) for p in pids), 15), [p for p in pids if alive(p)]
    assert_nothing_left(runtime, cid, pod_id=cid)
    if victim != "shim":
        assert init.exit_status() in (128 + signal.SIGKILL, 128 + signal.SIGTERM)
    runtime.fails("state", cid, match="does not exist", tmp=tmp_path)


# -- exec of a program that cannot run: the exit status is docker's, the reason runc's ---------


@dataclass
class RuncContainer:
    """A runc container running ``sleep 1000`` on a copy of the default busybox image."""

    root: Path
    cid: str

    def exec(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["runc", "--root", str(self.root), "exec", self.cid, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )


def _runc_spec_bundle(bundle: Path) -> tuple[Path, dict[str, Any]]:
    """``bundle`` made as a runc user makes one: the default image's files as ``rootfs`` and
    ``runc spec``'s config.json (returned parsed, for the caller to change and write back).
    Fails the test when runc is missing."""
    if shutil.which("runc") is None:
        pytest.fail("runc is missing: run 'make deps' (Debian's containerd package brings it)")
    bundle.mkdir()
    shutil.copytree(images.ensure_default_image(), bundle / "rootfs", symlinks=True)
    subprocess.run(["runc", "spec"], cwd=bundle, check=True, timeout=30)
    return bundle, json.loads((bundle / "config.json").read_text())


@pytest.fixture
def runc_container(tmp_path: Path) -> Iterator[RuncContainer]:
    bundle, spec = _runc_spec_bundle(tmp_path / "runc-bundle")
    spec["process"].update(args=["sleep", "1000"], terminal=False)
    (bundle / "config.json").write_text(json.dumps(spec))
    container = RuncContainer(tmp_path / "runc-state", f"errors-{os.getpid()}")
    subprocess.run(
        [
            "runc",
            "--root",
            str(container.root),
            "run",
            "-d",
            "--bundle",
            str(bundle),
            container.cid,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
        timeout=60,
    )
    yield container
    subprocess.run(
        ["runc", "--root", str(container.root), "delete", "--force", container.cid],
        capture_output=True,
        timeout=60,
        check=False,
    )


def test_an_exec_starts_with_no_signal_blocked_or_ignored_as_runc_execs(
    life: Life, runc_container: RuncContainer
) -> None:
    """An exec's process finds what runc exec's finds: nothing blocked, nothing ignored
    (glibc's 32 and 33 included), after the zygote noted which actions its runtimes reset."""
    status = ["grep", "^Sig[BI]", "/proc/self/status"]
    runc = subprocess.run(
        ["runc", "--root", str(runc_container.root), "exec", runc_container.cid, *status],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=pristine_signals,  # as from a fresh shell: runc passes its own on
    )
    expected = "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n"
    assert (runc.returncode, runc.stdout) == (0, expected), runc.stderr
    for _ in range(2):  # the second through the spare runtime forked after the first
        ours = life.runtime("exec", life.cid, *status)
        assert (ours.returncode, ours.stdout) == (0, expected), ours.stderr


@pytest.mark.parametrize("given", ["devnull", "closed", "data"])
def test_an_attached_execs_stdin_is_a_pipe_at_eof_as_runc_execs(
    life: Life, runc_container: RuncContainer, given: str
) -> None:
    """runc exec (attached, no terminal) gives its process a pipe it copies its own stdin
    into, whatever that is (/dev/null, closed, data): ours too. With /dev/null the pipe's EOF
    comes with ExecProcess itself (protocol 1.13, no CloseStdin call)."""
    script = "[ -p /proc/self/fd/0 ] && echo pipe || echo other; cat; echo eof"
    runc_argv = ["runc", "--root", str(runc_container.root), "exec", runc_container.cid]
    seen = []
    for argv in (runc_argv, life.runtime.argv("exec", life.cid)):
        feed: dict[str, Any] = (
            {"input": b"in\n"} if given == "data" else {"stdin": subprocess.DEVNULL}
        )
        done = subprocess.run(
            [*argv, "sh", "-c", script],
            capture_output=True,
            timeout=60,
            preexec_fn=(lambda: os.close(0)) if given == "closed" else None,
            **feed,
        )
        seen.append((done.returncode, done.stdout, done.stderr))
    expected = b"pipe\nin\neof\n" if given == "data" else b"pipe\neof\n"
    assert seen[1] == seen[0] == (0, expected, b"")


def _runc_reason(stderr: str) -> str:
    """The reason in runc exec's error line (``... unable to start container process: R``)."""
    message = json.loads(stderr.strip().split(" msg=", 1)[1])  # a quoted string
    return str(message).rsplit("unable to start container process: ", 1)[1]


def test_exec_of_a_program_that_cannot_run_exits_127_or_126(
    runtime: Runtime, runc_container: RuncContainer, tmp_path: Path
) -> None:
    """``exec`` of a missing program exits 127, of a file that is not executable 126 (docker
    exec's statuses; runc exec exits 255 for both), with runc's reason in the one-line
    message; in both argv and --process forms; the container runs on. ``create`` too."""
    cid = "noexec"
    bundle = make_bundle(tmp_path, ["sleep", "1000"])
    init = runtime.conmon(
        tmp_path / "pid",
        tmp_path / "out",
        "create",
        "--bundle",
        str(bundle),
        "--pid-file",
        str(tmp_path / "pid"),
        cid,
    )
    assert init.rc() == 0, init.output()
    runtime.ok("start", cid)
    cases = [
        (["no-such-cmd"], 127),
        (["/no/such/file"], 127),
        (["/etc/passwd"], 126),
    ]
    for args, status in cases:
        runc = runc_container.exec(*args)
        assert runc.returncode == 255, runc.stderr
        reason = _runc_reason(runc.stderr)
        done = runtime("exec", cid, *args)
        assert (done.returncode, done.stdout) == (status, ""), done.stderr
        assert done.stderr == f"pysandbox: {reason}\n"  # runc's reason, as docker exec says it
        # containerd's and conmon's form: --process JSON, detached, with a pid file.
        process = tmp_path / "process.json"
        process.write_text(json.dumps({"args": args, "cwd": "/", "user": {"uid": 0, "gid": 0}}))
        pid_file = tmp_path / "exec.pid"
        detached = runtime(
            "exec", "--process", str(process), "--detach", "--pid-file", str(pid_file), cid
        )
        assert (detached.returncode, detached.stdout) == (status, ""), detached.stderr
        assert detached.stderr == done.stderr
        assert not pid_file.exists()
    # create of such a program (a container joining this pod: no boot) fails the same way,
    # before "created" (runc's create exits 1 there), and leaves nothing of the joiner.
    join = {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": cid}
    for name, (args, status) in zip(("joiner1", "joiner2"), cases[1:], strict=True):
        log = tmp_path / f"{name}.log.json"
        bundle = make_bundle(tmp_path, args, annotations=join)
        created = runtime(
            "--log", str(log), "--log-format", "json", "create", "--bundle", str(bundle), name
        )
        assert created.returncode == status, created.stderr
        assert created.stderr.startswith("pysandbox: agent CreateContainer failed: exec: ")
        assert created.stderr.count("\n") == 1 and len(log.read_text().splitlines()) == 1
        assert_nothing_left(runtime, name)
    assert runtime.state(cid)["status"] == "running"
    assert runtime("exec", cid, "true").returncode == 0
    runtime.ok("delete", "--force", cid)
    assert init.exit_status() in (128 + signal.SIGKILL, 128 + signal.SIGTERM)
    assert_nothing_left(runtime, cid, pod_id=cid)


# -- terminals: a pty of the container's own devpts, as runc allocates it -----------------------

#: What a process sees of its terminal, the same under runc and here: the name ``tty``
#: prints (ttyname: found in the container's /dev/pts only if the pty is of its devpts
#: instance), whether fd 0 is that very file, the container's /dev/pts, the size, TERM.
#: The size is read once it is set (within 5 s): runc exec -t sets it after the process
#: started, and a first look may see 0x0.
TTY_REPORT = (
    't=$(tty); echo "tty $t"; [ "$(readlink /proc/self/fd/0)" = "$t" ] && echo fd0-is-it; '
    'echo "pts $(ls /dev/pts | tr "\\n" " ")"; i=0; '
    'while s=$(stty size 2>/dev/null); [ "${s:-0 0}" = "0 0" ] && [ $i -lt 50 ]; '
    'do sleep 0.1; i=$((i+1)); done; echo "$s"; echo "TERM=${TERM-unset}"'
)
#: The container's init: the report, /dev/console checked against its terminal, then idle.
TTY_INIT = (
    TTY_REPORT + '; [ "$(stat -c %t:%T /dev/console)" = "$(stat -c %t:%T "$t")" ] '
    "&& echo console-is-it; echo init-done; sleep 1000"
)


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    import fcntl
    import struct
    import termios

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _read_pty(master: int, until: bytes, timeout: float = 90.0) -> str:
    """What ``master`` shows until ``until`` and then 0.5 s of quiet (or EOF/EIO, or
    ``timeout``), line ends as \\n and NULs dropped. A line may end in \\r\\r\\n: runc exec -t
    puts the caller's terminal in raw mode only after the process started, so the first lines
    can pass two ONLCR translations (the container's pty's and the caller's)."""
    seen = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not select.select([master], [], [], 0.5)[0]:
            if until in seen:
                break
            continue
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: every holder of the peer has closed it
            break
        if not chunk:
            break
        seen.extend(chunk)
    lines = re.sub(rb"\r+\n", b"\n", bytes(seen)).replace(b"\0", b"")
    return lines.decode(errors="replace")


def _terminal_session(argv: list[str], base: Path, cid: str) -> tuple[str, str, str]:
    """``argv`` is a runtime (runc, or pysandbox) with its root: create ``cid`` with a
    terminal through a console socket (as containerd/recvtty), start it, then ``exec -t``
    from a terminal of 30x100, in argv form (the config's env) and with a process file whose
    env has no TERM. Returns what the init, the two execs showed."""
    import socket

    bundle = make_bundle(base, ["sh", "-c", TTY_INIT])
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["terminal"] = True
    (bundle / "config.json").write_text(json.dumps(spec))
    process = base / f"process-{cid}.json"
    process.write_text(
        json.dumps(
            {
                "args": ["sh", "-c", TTY_REPORT],
                "env": ["PATH=/usr/bin:/bin"],
                "cwd": "/",
                "user": {"uid": 0, "gid": 0},
                "terminal": True,
            }
        )
    )
    path = base / f"console-{cid}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(120)
    created = subprocess.run(
        [*argv, "create", "--bundle", str(bundle), "--console-socket", str(path), cid],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )
    assert created.returncode == 0, created.stderr
    conn, _ = listener.accept()
    with conn:
        _message, fds, _flags, _addr = socket.recv_fds(conn, 4096, 1)
    listener.close()
    assert len(fds) == 1
    console = fds[0]
    outputs = []
    try:
        _set_winsize(console, 30, 100)
        subprocess.run([*argv, "start", cid], check=True, timeout=120)
        outputs.append(_read_pty(console, b"init-done"))
        for form in ([cid, "sh", "-c", TTY_REPORT], ["--process", str(process), cid]):
            master, slave = os.openpty()
            _set_winsize(slave, 30, 100)
            try:
                done = subprocess.run(
                    [*argv, "exec", "-t", *form],
                    stdin=slave,
                    stdout=slave,
                    stderr=subprocess.PIPE,
                    timeout=120,
                )
                assert done.returncode == 0, done.stderr
                outputs.append(_read_pty(master, b"TERM=", timeout=10))
            finally:
                os.close(master)
                os.close(slave)
    finally:
        os.close(console)
        subprocess.run([*argv, "delete", "--force", cid], capture_output=True, timeout=120)
    return outputs[0], outputs[1], outputs[2]


def test_a_terminal_is_a_pty_of_the_containers_devpts_as_with_runc(
    runtime: Runtime, tmp_path: Path
) -> None:
    """``create --console-socket`` with process.terminal and ``exec -t``: the process's
    terminal is a /dev/pts/N of the container's own devpts (``tty`` names it, fd 0 is it,
    it is listed in /dev/pts), /dev/console is the init's, the caller's size is the
    terminal's, and TERM is the process's own (none is invented): what runc shows."""
    if shutil.which("runc") is None:
        pytest.fail("runc is missing: run 'make deps' (Debian's containerd package brings it)")
    ours = _terminal_session(runtime.argv(), tmp_path, "tty")
    runc = _terminal_session(
        ["runc", "--root", str(tmp_path / "runc-state")], tmp_path, f"tty-{os.getpid()}"
    )
    assert ours[0].splitlines() == [
        "tty /dev/pts/0",
        "fd0-is-it",
        "pts 0 ptmx ",
        "30 100",
        "TERM=xterm",
        "console-is-it",
        "init-done",
    ], ours[0]
    assert ours[1].splitlines() == [
        "tty /dev/pts/1",
        "fd0-is-it",
        "pts 0 1 ptmx ",
        "30 100",
        "TERM=xterm",  # the config's env
    ], ours[1]
    assert ours[2].splitlines()[-1] == "TERM=unset", ours[2]  # runc exec invents none
    assert ours == runc, repr((ours, runc))


def _on_a_pty(argv: list[str], cwd: Path, rows: int, cols: int) -> tuple[int, bytes]:
    """(exit status, everything written to the terminal) of ``argv`` run on a new pty of
    ``rows`` x ``cols``, as from a user's terminal."""
    pid, master = pty.fork()
    if pid == 0:
        try:
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            os.chdir(cwd)
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    output = bytearray()
    deadline = time.monotonic() + 150
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 1.0)[0]:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every holder of the other side is gone
                break
            if not data:
                break
            output += data
    finally:
        os.close(master)
        reaped, status = os.waitpid(pid, os.WNOHANG)
        if reaped == 0:  # still running after the deadline
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), bytes(output)


def test_run_of_a_terminal_bundle_without_console_socket_is_on_the_callers_terminal(
    runtime: Runtime, tmp_path: Path
) -> None:
    """``run --bundle`` of a terminal process (``runc spec``'s default) in the foreground:
    runc takes the pty itself and relays it to its own terminal (a console socket is needed
    only with --detach); it was refused ("--console-socket is required")."""
    bundle, spec = _runc_spec_bundle(tmp_path / "bundle")
    assert spec["process"]["terminal"] is True  # runc spec's default
    # runc sets its pty's size only after it started the process (its signal handler's first
    # resize): a ``stty size`` at once may read 0x0 (busybox then fails with a stale errno,
    # "stty: standard input: No child processes", seen in CI). The second lets runc's resize
    # land, so the reference is stable; we set the size before the start.
    spec["process"]["args"] = ["sh", "-c", "sleep 1; tty; stty size; ls /dev/pts; exit 3"]
    (bundle / "config.json").write_text(json.dumps(spec))
    name = f"ttyrun-{os.getpid()}"
    expected = _on_a_pty(
        ["runc", "--root", str(tmp_path / "runc-state"), "run", name], bundle, 33, 101
    )
    assert expected == (3, b"/dev/pts/0\r\n33 101\r\n0     ptmx\r\n"), expected
    assert _on_a_pty(runtime.argv("run", "--bundle", str(bundle), name), bundle, 33, 101) == (
        expected
    )
    assert_nothing_left(runtime, name)


def test_a_non_root_process_owns_its_stdio_as_under_runc(runtime: Runtime, tmp_path: Path) -> None:
    """runc gives the process's user its stdio (the pipes it made, the pty) before it drops
    root, so a non-root process can reopen them: ``echo > /dev/stdout``, a log file
    symlinked to /dev/stdout (nginx and many images). Ours were root's pipes (mode 0600):
    "can't create /dev/stdout: Permission denied". Pipes and terminal, against runc."""
    bundle, spec = _runc_spec_bundle(tmp_path / "bundle")
    spec["process"]["user"] = {"uid": 1000, "gid": 1000}
    show = "stat -L -c '%u %g %a' /proc/self/fd/0 /proc/self/fd/1 /proc/self/fd/2"
    spec["process"]["terminal"] = False
    spec["process"]["args"] = ["sh", "-c", f"echo out > /dev/stdout; echo err >&2; {show}"]
    (bundle / "config.json").write_text(json.dumps(spec))
    name = f"stdio-{os.getpid()}"

    def outcome(argv: list[str]) -> tuple[int, str, str]:
        done = subprocess.run(
            argv, cwd=bundle, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=150
        )
        return done.returncode, done.stdout, done.stderr

    runc = ["runc", "--root", str(tmp_path / "runc-state"), "run", name]
    expected = outcome(runc)
    assert expected == (0, "out\n" + "1000 0 600\n" * 3, "err\n"), expected
    assert outcome(runtime.argv("run", "--bundle", str(bundle), name)) == expected
    assert_nothing_left(runtime, name)

    spec["process"]["terminal"] = True
    spec["process"]["args"] = ["sh", "-c", f"echo out > /dev/stdout; {show}"]
    (bundle / "config.json").write_text(json.dumps(spec))
    expected_tty = _on_a_pty(runc, bundle, 24, 80)
    assert expected_tty == (0, b"out\r\n" + b"1000 5 620\r\n" * 3), expected_tty
    assert _on_a_pty(runtime.argv("run", "--bundle", str(bundle), name), bundle, 24, 80) == (
        expected_tty
    )
    assert_nothing_left(runtime, name)


def test_create_into_one_file_keeps_the_order_of_stdout_and_stderr(
    runtime: Runtime, tmp_path: Path
) -> None:
    """``create`` with stdout and stderr one open file (``>log 2>&1``): runc's process
    inherits it as fds 1 and 2, so its lines land in the order written and both fds are the
    same file. Ours get one pipe for both (they came as two streams, in the relay's order),
    against runc. (runc's foreground ``run`` makes two pipes whatever its stdio: not this.)"""
    bundle, spec = _runc_spec_bundle(tmp_path / "bundle")
    spec["process"]["terminal"] = False
    spec["process"]["args"] = [
        "sh",
        "-c",
        "i=0; while [ $i -lt 40 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done; "
        '[ "$(readlink /proc/$$/fd/1)" = "$(readlink /proc/$$/fd/2)" ] && echo one || echo two',
    ]
    (bundle / "config.json").write_text(json.dumps(spec))
    name = f"order-{os.getpid()}"

    def outcome(argv: list[str], log: Path) -> str:
        with log.open("w") as out:
            created = subprocess.run(
                [*argv, "create", "--bundle", str(bundle), name],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                timeout=150,
            )
        assert created.returncode == 0, log.read_text()
        subprocess.run([*argv, "start", name], check=True, timeout=60)

        def stopped() -> bool:
            state = subprocess.run([*argv, "state", name], capture_output=True, text=True)
            return json.loads(state.stdout)["status"] == "stopped"

        assert wait_until(stopped, 60)
        subprocess.run([*argv, "delete", name], check=True, timeout=60)
        return log.read_text()

    expected = outcome(["runc", "--root", str(tmp_path / "runc-state")], tmp_path / "runc.log")
    lines = [f"{kind}{i}" for i in range(40) for kind in ("out", "err")]
    assert expected == "\n".join([*lines, "one"]) + "\n", expected
    assert outcome(runtime.argv(), tmp_path / "ours.log") == expected
    assert_nothing_left(runtime, name)
