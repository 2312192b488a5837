"""containerd 1.6 drives pysandbox through its io.containerd.runc.v2 shim, as ``ctr`` does.

A private containerd (own config, root, state and socket; see containerd_env.py) imports a
busybox image built here; ``ctr run --runc-binary pysandbox --runc-root R`` then takes the path
every containerd client takes: the shim calls ``pysandbox create/start/exec/kill/delete`` with
``--root R/<namespace> --log <bundle>/log.json --log-format json``.
"""

from __future__ import annotations

import itertools
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration import containerd_env
from tests.integration.containerd_env import IMAGE, RUNTIME, Containerd, wait_until

_ids = itertools.count()


@pytest.fixture(scope="module")
def containerd(request: pytest.FixtureRequest) -> Iterator[Containerd]:
    """A private containerd for this module, its log kept when a test failed."""
    with containerd_env.running(lambda: request.session.testsfailed > 0) as daemon:
        yield daemon


def _runtime_flags(daemon: Containerd) -> list[str]:
    return [
        "--runtime",
        "io.containerd.runc.v2",
        "--runc-binary",
        RUNTIME,
        "--runc-root",
        str(daemon.runtime_root),
    ]


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
    assert wait_until(lambda: not containerd_env.processes_mentioning(shim), 15), (
        containerd_env.processes_mentioning(shim)
    )
    # QEMU, virtiofsd, the agent proxy and our shim all name their pod dir below the Root.
    assert wait_until(lambda: not containerd_env.processes_mentioning(str(root)), 15), (
        containerd_env.processes_mentioning(str(root))
    )
    assert daemon.pod_dirs() == []
    assert not (root / cid).exists(), "the container record is left"
    assert containerd_env.mounts_below(root) == []
    bundle = daemon.base / "state" / "io.containerd.runtime.v2.task" / daemon.namespace / cid
    assert containerd_env.mounts_below(bundle) == []
    assert not bundle.exists()
    listed = subprocess.run(
        [RUNTIME, "--root", str(root), "list", "-q"], capture_output=True, text=True, timeout=30
    )
    assert cid not in listed.stdout.split()
    assert cid not in daemon.ctr("containers", "ls", "-q").stdout.split()


def test_run_echo_and_exit_codes(containerd: Containerd) -> None:
    cid = _cid("echo")
    done = containerd.ctr("run", "--rm", *_runtime_flags(containerd), IMAGE, cid, "echo", "hi")
    assert (done.returncode, done.stdout) == (0, "hi\n"), done.stderr
    assert_nothing_left(containerd, cid)

    cid = _cid("exit")
    done = containerd.ctr(
        "run", "--rm", *_runtime_flags(containerd), IMAGE, cid, "sh", "-c", "echo out; exit 3"
    )
    assert (done.returncode, done.stdout) == (3, "out\n"), done.stderr
    assert_nothing_left(containerd, cid)


def test_image_defaults_reach_the_container(containerd: Containerd) -> None:
    """No command: the image's Cmd (sh) runs with its PATH; stdin is closed, so sh exits 0."""
    cid = _cid("defaults")
    done = containerd.ctr(
        "run",
        "--rm",
        "--env",
        "GREETING=hello",
        *_runtime_flags(containerd),
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
            *_runtime_flags(containerd),
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
    done = containerd.ctr("run", "-d", *_runtime_flags(containerd), IMAGE, cid, "sh", "-c", script)
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
    done = containerd.ctr("run", "-d", *_runtime_flags(containerd), IMAGE, cid, "sleep", "1000")
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
    done = containerd.ctr("run", "-d", *_runtime_flags(containerd), IMAGE, cid, "sleep", "1000")
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
        "run", "--rm", "--cwd", "relative/dir", *_runtime_flags(containerd), IMAGE, cid, "true"
    )
    assert done.returncode != 0
    assert "OCI runtime create failed" in done.stderr, done.stderr
    assert '"relative/dir" is not an absolute path' in done.stderr, done.stderr
    assert_nothing_left(containerd, cid)

    cid = _cid("nocmd")
    done = containerd.ctr("run", "--rm", *_runtime_flags(containerd), IMAGE, cid, "/nonexistent")
    assert done.returncode != 0
    assert "/nonexistent" in done.stderr and "no such file" in done.stderr, done.stderr
    assert_nothing_left(containerd, cid)
