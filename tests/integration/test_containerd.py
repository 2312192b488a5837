"""containerd 1.6 drives pysandbox through its io.containerd.runc.v2 shim, as ``ctr`` does.

A private containerd (own config, root, state and socket; see containerd_env.py) imports a
busybox image built here; ``ctr run --runc-binary pysandbox --runc-root R`` then takes the path
every containerd client takes: the shim calls ``pysandbox create/start/exec/kill/delete`` with
``--root R/<namespace> --log <bundle>/log.json --log-format json``.
"""

from __future__ import annotations

import itertools
import os
import select
import shlex
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.pod.hostfs import mounts_below
from tests.integration import containerd_env
from tests.integration.containerd_env import IMAGE, RUNTIME, Containerd
from tests.integration.pods import PodFactory
from tests.processes import alive, processes_mentioning, wait_until

_ids = itertools.count()


@pytest.fixture(scope="module")
def containerd(request: pytest.FixtureRequest, module_pods: PodFactory) -> Iterator[Containerd]:
    """A private containerd for this module, its log kept when a test failed (and the logs
    of the pods it started, by ``module_pods``)."""
    with containerd_env.running(lambda: request.session.testsfailed > 0) as daemon:
        module_pods.watch(daemon.runtime_root)
        yield daemon


def _cid(name: str) -> str:
    return f"{name}-{next(_ids)}-{int(time.time())}"


def _task_status(daemon: Containerd, cid: str) -> str | None:
    for line in daemon.ctr("tasks", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return fields[-1]
    return None


def assert_nothing_left(daemon: Containerd, cid: str) -> None:
    """No process, pod directory, mount or record of ``cid`` is left anywhere."""
    root = daemon.runtime_root / daemon.namespace
    shim = f"-id {cid} -address {daemon.address}"
    assert wait_until(lambda: not processes_mentioning(shim), 15), processes_mentioning(shim)
    # QEMU, virtiofsd, the agent proxy and our shim all name their pod dir below the Root.
    assert wait_until(lambda: not processes_mentioning(str(root)), 15), processes_mentioning(
        str(root)
    )
    assert daemon.pod_dirs() == []
    assert not (root / cid).exists(), "the container record is left"
    assert mounts_below(root) == []
    bundle = daemon.base / "state" / "io.containerd.runtime.v2.task" / daemon.namespace / cid
    assert mounts_below(bundle) == []
    assert not bundle.exists()
    listed = subprocess.run(
        [RUNTIME, "--root", str(root), "list", "-q"], capture_output=True, text=True, timeout=30
    )
    assert cid not in listed.stdout.split()
    assert cid not in daemon.ctr("containers", "ls", "-q").stdout.split()


def test_run_echo_and_exit_codes(containerd: Containerd) -> None:
    cid = _cid("echo")
    done = containerd.ctr("run", "--rm", *containerd.runtime_flags(), IMAGE, cid, "echo", "hi")
    assert (done.returncode, done.stdout) == (0, "hi\n"), done.stderr
    assert_nothing_left(containerd, cid)

    cid = _cid("exit")
    done = containerd.ctr(
        "run", "--rm", *containerd.runtime_flags(), IMAGE, cid, "sh", "-c", "echo out; exit 3"
    )
    assert (done.returncode, done.stdout) == (3, "out\n"), done.stderr
    assert_nothing_left(containerd, cid)


def test_without_a_spec_hostname_the_container_sees_the_hosts_as_with_runc(
    containerd: Containerd,
) -> None:
    """ctr's spec has a UTS namespace and no ``hostname``: under runc the container's name is
    the host's (a new UTS namespace starts as a copy); ours is the same, not the guest
    kernel's "(none)" (programs resolve their own hostname and choke on that). (The short
    sleep: ctr once lost the output of runc's container, which had exited at once.)"""
    seen = {}
    for name, flags in (("runc", []), ("pysandbox", containerd.runtime_flags())):
        cid = _cid(f"hostname-{name}")
        probe = ["sh", "-c", "sleep 0.2; hostname"]
        done = containerd.ctr("run", "--rm", *flags, IMAGE, cid, *probe)
        seen[name] = (done.returncode, done.stdout, done.stderr)
    assert seen["pysandbox"] == seen["runc"] == (0, f"{socket.gethostname()}\n", ""), seen


def test_image_defaults_reach_the_container(containerd: Containerd) -> None:
    """No command: the image's Cmd (sh) runs with its PATH; stdin is closed, so sh exits 0."""
    cid = _cid("defaults")
    done = containerd.ctr(
        "run",
        "--rm",
        "--env",
        "GREETING=hello",
        *containerd.runtime_flags(),
        IMAGE,
        cid,
        "sh",
        "-c",
        'echo "$GREETING $PATH"; pwd',
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"hello {containerd_env.ENV[0].removeprefix('PATH=')}",
        "/",
    ]


def test_exec_kill_and_exit_status(containerd: Containerd) -> None:
    """A foreground ``ctr run``: exec into it, SIGKILL it, its status is 137; all gone after."""
    cid = _cid("kill")
    run = subprocess.Popen(
        [
            "ctr",
            "-a",
            containerd.address,
            "-n",
            containerd.namespace,
            "run",
            "--rm",
            *containerd.runtime_flags(),
            IMAGE,
            cid,
            "sleep",
            "1000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_until(lambda: _task_status(containerd, cid) == "RUNNING", 90), containerd.ctr(
            "tasks", "ls"
        ).stdout
        done = containerd.ctr(
            "tasks", "exec", "--exec-id", "e1", cid, "sh", "-c", "echo in-exec; exit 5"
        )
        assert (done.returncode, done.stdout) == (5, "in-exec\n"), done.stderr
        done = containerd.ctr("tasks", "exec", "--exec-id", "e2", cid, "cat", "/proc/1/cmdline")
        assert (done.returncode, done.stdout) == (0, "sleep\x001000\x00"), done.stderr
        # pause/resume go through the shim to `pysandbox pause/resume`.
        assert containerd.ctr("tasks", "pause", cid).returncode == 0
        assert _task_status(containerd, cid) == "PAUSED"
        assert containerd.ctr("tasks", "resume", cid).returncode == 0
        assert _task_status(containerd, cid) == "RUNNING"
        killed = containerd.ctr("tasks", "kill", "--signal", "SIGKILL", cid)
        assert killed.returncode == 0, killed.stderr
        out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 137, (out, err)
    assert_nothing_left(containerd, cid)


def test_detached_term_task_delete_container_delete(containerd: Containerd) -> None:
    """``run -d``; SIGTERM reaches the container's handler; ``task delete`` reports the
    status; ``container delete`` leaves nothing behind."""
    cid = _cid("detached")
    script = 'trap "echo got-term; exit 7" TERM; echo started; while :; do sleep 1; done'
    done = containerd.ctr("run", "-d", *containerd.runtime_flags(), IMAGE, cid, "sh", "-c", script)
    assert done.returncode == 0, done.stderr
    try:
        assert _task_status(containerd, cid) == "RUNNING"
        # The shim's pid is the one containerd reports: a host process of ours.
        pid = int(containerd.ctr("tasks", "ls").stdout.split(cid, 1)[1].split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert b"sandbox.runtime.shim" in cmdline, cmdline
        done = containerd.ctr("tasks", "exec", "--exec-id", "x", cid, "sh", "-c", "exit 0")
        assert done.returncode == 0, done.stderr
        assert containerd.ctr("tasks", "kill", cid).returncode == 0  # SIGTERM by default
        assert wait_until(lambda: _task_status(containerd, cid) == "STOPPED", 30)
        done = containerd.ctr("tasks", "delete", cid)
        assert done.returncode == 0, done.stderr
        assert "exit code 7" in done.stderr, done.stderr
    finally:
        containerd.ctr("tasks", "delete", "--force", cid)
        deleted = containerd.ctr("containers", "delete", cid)
    assert deleted.returncode == 0, deleted.stderr
    assert_nothing_left(containerd, cid)


def _ctr_exec(daemon: Containerd, cid: str, exec_id: str, script: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            "ctr",
            "-a",
            daemon.address,
            "-n",
            daemon.namespace,
            "tasks",
            "exec",
            "--exec-id",
            exec_id,
            cid,
            "sh",
            "-c",
            script,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_signals_to_exec_processes(containerd: Containerd) -> None:
    """containerd signals an exec process through the pid in its --pid-file (our host shim):
    SIGTERM must reach the guest process, and SIGKILL must not leave it running in the VM."""
    cid = _cid("execsig")
    done = containerd.ctr("run", "-d", *containerd.runtime_flags(), IMAGE, cid, "sleep", "1000")
    assert done.returncode == 0, done.stderr
    procs: list[subprocess.Popen[str]] = []
    try:
        term = _ctr_exec(
            containerd, cid, "term", 'trap "echo got-term; exit 9" TERM; while :; do sleep 1; done'
        )
        hang = _ctr_exec(containerd, cid, "hang", "exec sleep 301")
        procs += [term, hang]

        def both_running() -> bool:
            ps = containerd.ctr("tasks", "exec", "--exec-id", f"ps{next(_ids)}", cid, "ps")
            return "while :" in ps.stdout and "sleep 301" in ps.stdout

        assert wait_until(both_running, 60, interval=1)
        killed = containerd.ctr("tasks", "kill", "--exec-id", "term", cid)  # SIGTERM
        assert killed.returncode == 0, killed.stderr
        out, err = term.communicate(timeout=60)
        assert (term.returncode, out) == (9, "got-term\n"), err
        killed = containerd.ctr("tasks", "kill", "--exec-id", "hang", "--signal", "SIGKILL", cid)
        assert killed.returncode == 0, killed.stderr
        hang.communicate(timeout=60)
        assert hang.returncode == 137
        ps = containerd.ctr("tasks", "exec", "--exec-id", "ps-after", cid, "ps", "-o", "args")
        assert "sleep 301" not in ps.stdout, ps.stdout
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        containerd.ctr("tasks", "delete", "--force", cid)
        containerd.ctr("containers", "delete", cid)
    assert_nothing_left(containerd, cid)


def test_delete_force_of_a_running_task(containerd: Containerd) -> None:
    """``task delete --force`` kills a running container (kill --all, delete --force)."""
    cid = _cid("force")
    done = containerd.ctr("run", "-d", *containerd.runtime_flags(), IMAGE, cid, "sleep", "1000")
    assert done.returncode == 0, done.stderr
    done = containerd.ctr("tasks", "delete", "--force", cid)
    assert done.returncode == 0, done.stderr
    done = containerd.ctr("containers", "delete", cid)
    assert done.returncode == 0, done.stderr
    assert_nothing_left(containerd, cid)


def test_errors_reach_the_client(containerd: Containerd) -> None:
    """A failing create surfaces the runtime's message (from its --log JSON) through the shim
    to ctr, and leaves nothing behind."""
    cid = _cid("badcwd")
    done = containerd.ctr(
        "run", "--rm", "--cwd", "relative/dir", *containerd.runtime_flags(), IMAGE, cid, "true"
    )
    assert done.returncode != 0
    assert "OCI runtime create failed" in done.stderr, done.stderr
    assert '"relative/dir" is not an absolute path' in done.stderr, done.stderr
    assert_nothing_left(containerd, cid)

    cid = _cid("nocmd")
    done = containerd.ctr("run", "--rm", *containerd.runtime_flags(), IMAGE, cid, "/nonexistent")
    assert done.returncode != 0
    assert "/nonexistent" in done.stderr and "no such file" in done.stderr, done.stderr
    assert_nothing_left(containerd, cid)


# -- one pod (CRI annotations on ctr tasks): terminals, exits, ps -----------------------------

SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
CONTAINER_TYPE = "io.kubernetes.cri.container-type"


def _in_pod(pod: str, kind: str = "container") -> list[str]:
    return ["--annotation", f"{CONTAINER_TYPE}={kind}", "--annotation", f"{SANDBOX_ID}={pod}"]


def _ctr_argv(daemon: Containerd, *args: str) -> list[str]:
    return ["ctr", "-a", daemon.address, "-n", daemon.namespace, *args]


def _under_terminal(argv: list[str]) -> list[str]:
    """``argv`` run by ``script`` on a new pty, as from an interactive shell (``-e``: with
    its exit status)."""
    return ["script", "-qec", shlex.join(argv), "/dev/null"]


def _task_pid(daemon: Containerd, cid: str) -> int:
    for line in daemon.ctr("tasks", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return int(fields[1])
    raise AssertionError(f"no task {cid}: {daemon.ctr('tasks', 'ls').stdout}")


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def _read_until(proc: subprocess.Popen[bytes], marker: bytes, timeout: float) -> bytes:
    """What ``proc`` printed on stdout until ``marker`` appeared (b"" parts on timeout)."""
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
    return seen


def test_pod_terminals_exits_and_ps(containerd: Containerd) -> None:
    """Through containerd's shim, in one pod VM (ctr tasks carrying the CRI annotations):

    - ``ctr run -t`` and ``ctr tasks exec -t`` under a real terminal: create/exec return
      while the process runs (containerd reads their output to EOF before it takes the pty)
      and the bytes are runc's;
    - ``ctr tasks ps`` lists host pids of our shims (with containerd's exec ids);
    - a container sharing the pod's pid namespace whose init leaves a child holding its
      stdout (``sleep 1000 & exec sleep 2000``) is reported exited as soon as the init is
      killed, and the leftover child is killed too (containerd's kill --all, as with runc).
    """
    pod = _cid("pod")
    flags = containerd.runtime_flags()
    done = containerd.ctr("run", "-d", *flags, *_in_pod(pod, "sandbox"), IMAGE, pod, "sleep", "inf")
    assert done.returncode == 0, done.stderr
    members = [f"{pod}-tty", f"{pod}-bg"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # ctr run -t under a terminal, as runc runs it.
        script = "test -t 0 && test -t 1 && echo tty-yes; exit 3"
        outputs = {}
        for name, runtime_flags in (("runc", []), ("pysandbox", [*flags, *_in_pod(pod)])):
            cid = f"{pod}-tty" if name == "pysandbox" else _cid("runc-tty")
            argv = _ctr_argv(containerd, "run", "--rm", "-t", *runtime_flags, IMAGE, cid)
            ran = subprocess.run(
                _under_terminal([*argv, "sh", "-c", script]),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=150,
            )
            outputs[name] = (ran.returncode, ran.stdout)
        assert outputs["pysandbox"] == outputs["runc"], outputs
        assert outputs["runc"][0] == 3 and b"tty-yes" in outputs["runc"][1], outputs

        # exec -t: its output arrives while it runs.
        exec_argv = _ctr_argv(containerd, "tasks", "exec", "-t", "--exec-id", "tty", pod)
        tty_exec = subprocess.Popen(
            _under_terminal([*exec_argv, "sh", "-c", "test -t 1 && echo exec-tty; exec sleep 300"]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        procs.append(tty_exec)
        seen = _read_until(tty_exec, b"exec-tty", 90)
        assert b"exec-tty" in seen, seen
        killed = containerd.ctr("tasks", "kill", "--exec-id", "tty", "--signal", "SIGKILL", pod)
        assert killed.returncode == 0, killed.stderr
        assert tty_exec.wait(60) == 137

        # A member sharing the pod's pid namespace, a child of its init holding stdout.
        bg = f"{pod}-bg"
        share_pid = f"pid:/proc/{_task_pid(containerd, pod)}/ns/pid"
        run = subprocess.Popen(
            _ctr_argv(
                containerd,
                "run",
                "--rm",
                *flags,
                *_in_pod(pod),
                "--with-ns",
                share_pid,
                IMAGE,
                bg,
                "sh",
                "-c",
                "sleep 1000 & exec sleep 2000",
            ),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        procs.append(run)

        def pod_processes() -> str:
            ps = containerd.ctr(
                "tasks", "exec", "--exec-id", f"ps{next(_ids)}", pod, "ps", "-o", "stat,args"
            )
            return "\n".join(line for line in ps.stdout.splitlines() if not line.startswith("Z"))

        assert wait_until(lambda: "sleep 1000" in pod_processes(), 90, interval=1), pod_processes()
        assert "sleep 2000" in pod_processes()
        sleeper = subprocess.Popen(
            _ctr_argv(containerd, "tasks", "exec", "--exec-id", "sleeper", bg, "sleep", "300"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(sleeper)
        init_pid = _task_pid(containerd, bg)

        # ctr tasks ps: host pids (our shims, naming the container), exec ids matched.
        def listed() -> dict[int, str]:
            ps = containerd.ctr("tasks", "ps", bg)
            assert ps.returncode == 0, ps.stderr
            return {int(line.split()[0]): line for line in ps.stdout.splitlines()[1:]}

        assert wait_until(lambda: len(listed()) == 2, 60), listed()
        pids = listed()
        assert init_pid in pids, pids
        (exec_pid,) = set(pids) - {init_pid}
        assert "ExecID:sleeper" in pids[exec_pid], pids
        for pid in pids:
            cmdline = _cmdline(pid)
            assert "sandbox.runtime.shim" in cmdline and bg in cmdline, cmdline

        # The init is killed: its exit is reported at once, whatever holds its stdout.
        killed = containerd.ctr("tasks", "kill", "--signal", "SIGKILL", bg)
        assert killed.returncode == 0, killed.stderr
        started = time.monotonic()
        assert wait_until(lambda: not alive(init_pid), 60, interval=0.05)
        exit_seconds = time.monotonic() - started
        print(f"\nthe init's --pid-file process exited {exit_seconds:.2f}s after kill")
        assert exit_seconds < 5.0, exit_seconds  # was 60 s: the shim waited for stdout's EOF
        assert run.wait(60) == 137, run.stderr.read() if run.stderr else ""
        assert wait_until(lambda: "sleep 1000" not in pod_processes(), 30, interval=1), (
            pod_processes()
        )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for cid in (*members, pod):
            containerd.ctr("tasks", "delete", "--force", cid)
            containerd.ctr("containers", "delete", cid)
    for cid in (*members, pod):
        assert_nothing_left(containerd, cid)
