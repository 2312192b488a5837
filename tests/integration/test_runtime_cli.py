"""The runc CLI surface, driven as containerd and conmon drive it: ``pysandbox`` subprocesses.

One VM carries the whole lifecycle (create → state → start → exec in every form → ps → list →
pause/resume → update → kill → delete) and the failed creates that join its pod. Errors that
need no VM (unknown ids, bad bundles) are checked against an empty root. A failed create that
already booted its pod, and ``delete --force`` after QEMU, virtiofsd, the agent proxy or the
shim were killed with SIGKILL, each cost one boot: they are the cleanup paths a client cannot
do itself.

Containers are created through :data:`CONMON`, a small subreaper standing in for conmon/the
containerd shim: it runs the runtime command, then waits for the pid of ``--pid-file`` and
reports its exit status, which must be the container's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sandbox import store as state
from sandbox.image import store as images
from sandbox.pod.hostfs import mounts_below
from sandbox.run.default_spec import default_spec

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

    def fails(self, *args: str, match: str, tmp: Path) -> str:
        """Run a call that must fail the runc way: non-zero, one line on stderr, no
        traceback, and exactly one JSON line in the ``--log`` file; return the message."""
        log = tmp / f"log-{time.monotonic_ns()}.json"
        done = self("--log", str(log), "--log-format", "json", *args)
        assert done.returncode != 0, f"{args} succeeded: {done.stdout}"
        assert "Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith("pysandbox: ") and done.stderr.count("\n") == 1, done.stderr
        message = done.stderr.removeprefix("pysandbox: ").strip()
        assert match in message, f"{args}: {message!r} does not say {match!r}"
        lines = log.read_text().splitlines()
        assert len(lines) == 1, lines
        entry = json.loads(lines[0])
        assert entry["level"] == "error" and entry["msg"] == message and entry["time"]
        return message

    def conmon(self, pid_file: Path, out: Path, *args: str) -> Conmon:
        proc = subprocess.Popen(
            [sys.executable, "-c", CONMON, str(pid_file), str(out), *self.argv(*args)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        return Conmon(proc, pid_file, out)


@pytest.fixture
def runtime(vm_root: Path) -> Iterator[Runtime]:
    """A runtime with a root of its own (short: sockets live below it); torn down after."""
    root = Path(tempfile.mkdtemp(prefix="rt", dir=vm_root))
    yield Runtime(root)
    for entry in sorted(root.iterdir()):
        if (entry / "state.json").exists():
            subprocess.run(
                [RUNTIME, "--root", str(root), "delete", "--force", entry.name],
                capture_output=True,
                timeout=120,
                check=False,
            )
    from sandbox.pod.lifecycle import Pod

    for pod in Pod.list(root):
        with contextlib.suppress(Exception):
            pod.destroy()
    if not mounts_below(root):
        shutil.rmtree(root, ignore_errors=True)


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


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if text in cmdline and (entry / "stat").read_text().split(")")[-1].split()[0] != "Z":
                found.append(f"{entry.name}: {cmdline.strip()}")
    return found


def wait_until(check: Callable[[], object], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def pod_dir(root: Path, pod_id: str) -> Path:
    return root / "p" / state.pod_dir_name(pod_id)


def assert_nothing_left(runtime: Runtime, cid: str, pod_id: str | None = None) -> None:
    """No record, pod directory, process, mount or socket of ``cid`` (and its pod)."""
    root = runtime.root
    assert not (root / cid).exists(), f"state directory of {cid} is left"
    shim = f"--root {root} --id {cid} "
    assert wait_until(lambda: not processes_mentioning(shim), 15), processes_mentioning(shim)
    if pod_id is not None:
        where = str(pod_dir(root, pod_id))
        assert wait_until(lambda: not processes_mentioning(where), 15), processes_mentioning(where)
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


def test_runc_lifecycle_on_one_vm(runtime: Runtime, tmp_path: Path) -> None:
    cid = "life"
    bundle = make_bundle(
        tmp_path, ["sh", "-c", CONTAINER_SCRIPT], annotations={"org.example.key": "value"}
    )
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
    pid = init.pid
    assert alive(pid)

    created = runtime.state(cid)
    assert created["ociVersion"].startswith("1.")
    assert created["id"] == cid and created["status"] == "created"
    assert created["pid"] == pid
    assert created["bundle"] == str(bundle.resolve())
    assert created["annotations"] == {"org.example.key": "value"}
    assert "started" not in init.output()

    # A duplicate id is refused and leaves the existing container alone.
    runtime.fails(
        "create", "--bundle", str(bundle), cid, match=f"{cid} already exists", tmp=tmp_path
    )
    assert runtime.state(cid)["status"] == "created"
    runtime.fails("exec", cid, "true", match="cannot exec in a created container", tmp=tmp_path)

    runtime.ok("start", cid)
    assert runtime.state(cid)["status"] == "running"
    assert wait_until(lambda: "started" in init.output()), init.output()
    runtime.fails("start", cid, match="cannot start an already running container", tmp=tmp_path)
    runtime.fails("delete", cid, match="use --force", tmp=tmp_path)

    # exec, argv form: --env, --cwd, --user; the exit status is the process's.
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

    # An attached exec relays the signals it gets to its process (runc exec does).
    attached = subprocess.Popen(
        runtime.argv(
            "exec",
            cid,
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
    assert json.loads(runtime.ok("ps", "--format", "json", cid)) == [pid, attached.pid]
    attached.send_signal(signal.SIGINT)
    assert attached.wait(60) == 5
    assert attached.stdout.read() == "got-int\n"

    # exec --process file.json (containerd's and conmon's form), attached.
    process = {
        "args": ["sh", "-c", 'echo "proc $X $(pwd) $(id -u)"'],
        "env": ["PATH=/bin:/usr/bin", "X=y"],
        "cwd": "/etc",
        "user": {"uid": 5, "gid": 5},
        "terminal": False,
    }
    (tmp_path / "process.json").write_text(json.dumps(process))
    assert runtime.ok("exec", "--process", str(tmp_path / "process.json"), cid) == "proc y /etc 5\n"

    # exec --detach --pid-file: the pid is a host process whose exit status is the process's;
    # clients kill(2) it directly (containerd does for exec ids).
    (tmp_path / "sleep.json").write_text(json.dumps({**process, "args": ["sleep", "1000"]}))
    sleeper = runtime.conmon(
        tmp_path / "exec1.pid",
        tmp_path / "exec1.out",
        "exec",
        "--process",
        str(tmp_path / "sleep.json"),
        "--detach",
        "--pid-file",
        str(tmp_path / "exec1.pid"),
        cid,
    )
    assert sleeper.rc() == 0, sleeper.output()
    (tmp_path / "exit.json").write_text(json.dumps({**process, "args": ["sh", "-c", "exit 4"]}))
    quick = runtime.conmon(
        tmp_path / "exec2.pid",
        tmp_path / "exec2.out",
        "exec",
        "--process",
        str(tmp_path / "exit.json"),
        "--detach",
        "--pid-file",
        str(tmp_path / "exec2.pid"),
        cid,
    )
    assert quick.rc() == 0, quick.output()
    assert quick.exit_status() == 4
    stay = runtime.conmon(
        tmp_path / "exec3.pid",
        tmp_path / "exec3.out",
        "exec",
        "--detach",
        "--pid-file",
        str(tmp_path / "exec3.pid"),
        cid,
        "sleep",
        "1000",
    )
    assert stay.rc() == 0, stay.output()

    # ps --format json: host pids a client can signal and read /proc of (runc's callers
    # do): the init's --pid-file process, then the live detached execs', oldest first.
    pids = json.loads(runtime.ok("ps", "--format", "json", cid))
    assert pids == [pid, sleeper.pid, stay.pid], pids
    for host_pid in pids:
        cmdline = Path(f"/proc/{host_pid}/cmdline").read_bytes().split(b"\0")
        assert b"sandbox.runtime.shim" in cmdline and cmdline[cmdline.index(b"--id") + 1] == (
            cid.encode()
        ), cmdline
    # ps: the guest's process table for people, as the container sees it (sh is its pid 1),
    # each process next to the host pid standing for it.
    rows = [line.split(None, 4) for line in runtime.ok("ps", cid).splitlines()]
    assert rows[0] == ["PID", "PPID", "UID", "HOST-PID", "CMD"], rows
    assert ["1", "0", "0", str(pid), f"sh -c {CONTAINER_SCRIPT}"] in rows, rows
    sleeps = sorted(row[1:4] for row in rows[1:] if row[4] == "sleep 1000")
    # sh's own sleep; the execs' parent is outside the container (ppid 0), as under runc.
    assert sleeps == sorted(
        [["1", "0", "-"], ["0", "5", str(sleeper.pid)], ["0", "0", str(stay.pid)]]
    )
    os.kill(sleeper.pid, signal.SIGTERM)
    assert sleeper.exit_status() == 128 + signal.SIGTERM
    assert wait_until(
        lambda: json.loads(runtime.ok("ps", "--format", "json", cid)) == [pid, stay.pid]
    )

    listed = json.loads(runtime.ok("list", "--format", "json"))
    assert [(s["id"], s["status"], s["pid"]) for s in listed] == [(cid, "running", pid)]
    assert runtime.ok("list", "--quiet") == f"{cid}\n"
    table = runtime.ok("list").splitlines()
    assert table[0].split()[:3] == ["ID", "PID", "STATUS"] and table[1].split()[:3] == [
        cid,
        str(pid),
        "running",
    ]

    runtime.ok("pause", cid)
    assert runtime.state(cid)["status"] == "paused"
    runtime.fails("exec", cid, "true", match="cannot exec in a paused container", tmp=tmp_path)
    runtime.fails("pause", cid, match="container not running", tmp=tmp_path)
    runtime.ok("resume", cid)
    assert runtime.state(cid)["status"] == "running"
    runtime.fails("resume", cid, match="container not paused", tmp=tmp_path)

    # update: a resources file, and stdin as containerd's CRI plugin passes it.
    (tmp_path / "resources.json").write_text(json.dumps({"memory": {"limit": 200 * 1024 * 1024}}))
    runtime.ok("update", "--resources", str(tmp_path / "resources.json"), cid)
    assert runtime.ok("exec", cid, "cat", "/sys/fs/cgroup/memory.max") == f"{200 << 20}\n"
    runtime.ok("update", "--resources", "-", cid, stdin=json.dumps({"pids": {"limit": 77}}))
    assert runtime.ok("exec", cid, "cat", "/sys/fs/cgroup/pids.max") == "77\n"
    runtime.ok("update", "--memory", str(150 << 20), cid)
    assert runtime.ok("exec", cid, "cat", "/sys/fs/cgroup/memory.max") == f"{150 << 20}\n"

    # A container joining this pod whose create fails after it joined leaves the pod as it
    # was: no record, no files in the pod share, not a member, and the VM still serves.
    join = {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": cid}
    bad_root = make_bundle(tmp_path, ["true"], annotations=join)
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
        annotations=join,
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

    # Created, never started: killed then deleted (podman rm -f), or deleted outright.
    member = make_bundle(tmp_path, ["sleep", "1000"], annotations=join)
    for joiner in ("joiner3", "joiner4"):
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
        if joiner == "joiner3":
            runtime.ok("kill", joiner, "KILL")
            assert joined.exit_status() == 128 + signal.SIGKILL
            assert runtime.state(joiner)["status"] == "stopped"
        runtime.ok("delete", joiner)
        if joiner == "joiner4":
            assert joined.exit_status() in (128 + signal.SIGTERM, 128 + signal.SIGKILL)
        assert_nothing_left(runtime, joiner)
    assert json.loads((pod_dir(runtime.root, cid) / "pod.json").read_text())["containers"] == [cid]
    assert runtime.ok("exec", cid, "echo", "still-here") == "still-here\n"

    # Signals: SIGNAME, NAME and numbers; kill --all reaches exec'd processes too.
    runtime.ok("kill", cid, "SIGUSR1")
    assert wait_until(lambda: "got-usr1" in init.output()), init.output()
    runtime.ok("kill", cid, "usr2")
    assert wait_until(lambda: "got-usr2" in init.output()), init.output()
    runtime.ok("kill", cid, str(int(signal.SIGUSR1)))
    assert wait_until(lambda: init.output().count("got-usr1") == 2), init.output()
    runtime.fails("kill", cid, "SIGNOPE", match="invalid signal", tmp=tmp_path)
    assert alive(pid) and runtime.state(cid)["status"] == "running"
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
        "create", "--bundle", str(no_args), "c3", match="process.args is required", tmp=tmp_path
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
    record = {"id": "gone", "status": "running", "pod_id": "gone", "bundle": "/nonexistent"}
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
        # proxy (started by the next call) and relays what the container prints next (but
        # for the first chunk, which the agent's reader of the broken stream still takes).
        time.sleep(1)
        assert alive(init.pid) and runtime.state(cid)["status"] == "running"
        runtime.ok("exec", cid, "touch", "/dev/go")
        assert wait_until(lambda: "three" in init.output()), init.output()
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


@pytest.fixture
def runc_container(tmp_path: Path) -> Iterator[RuncContainer]:
    if shutil.which("runc") is None:
        pytest.skip("needs runc on the host (apt install runc)")
    bundle = tmp_path / "runc-bundle"
    bundle.mkdir()
    shutil.copytree(images.ensure_default_image(), bundle / "rootfs", symlinks=True)
    subprocess.run(["runc", "spec"], cwd=bundle, check=True, timeout=30)
    spec = json.loads((bundle / "config.json").read_text())
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
        assert done.stderr == f"pysandbox: agent ExecProcess failed: {reason}\n"
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
