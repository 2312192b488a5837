"""podman drives pysandbox as its OCI runtime, unchanged (conmon, pid file, console socket)."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import shlex
import shutil
import struct
import subprocess
import tarfile
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox import store as state
from sandbox.image import store as images
from tests.integration.cgroup_view import READER, parse
from tests.integration.pods import PodFactory

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = str(ROOT / ".venv" / "bin" / "pysandbox")
IMAGE = "localhost/pysandbox-busybox:latest"
#: ``lock_type = "file"``: locks under this podman's own tmp dir. The default shm locks live
#: in one /dev/shm segment per host, so another podman with another --root running at the same
#: time (a developer's, another test run) takes the same lock numbers ("acquiring lock 0 for
#: container ...: file exists", then "container state improper").
CONF = """[containers]
default_ulimits = ["nofile=1024:1024"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
lock_type = "file"
"""


@pytest.fixture(scope="module")
def podman(
    tmp_path_factory: pytest.TempPathFactory, module_pods: PodFactory
) -> Iterator[list[str]]:
    """A podman with private storage and config, the busybox image imported. It runs
    pysandbox with its default --root, which ``module_pods`` watches (logs kept on failure)."""
    module_pods.watch(state.DEFAULT_ROOT)
    if shutil.which("podman") is None:
        pytest.fail("podman is missing: run 'make deps' (scripts/install-host-packages.sh)")
    base = Path(tmp_path_factory.mktemp("podman"))
    conf = base / "containers.conf"
    conf.write_text(CONF)
    os.environ["CONTAINERS_CONF"] = str(conf)
    # podman (through conmon) runs the runtime with an environment of its own: a wrapper
    # hands it this run's PYSANDBOX_* settings (the guest image under test, its templates).
    runtime = base / "pysandbox"
    settings = "".join(
        f"export {key}={shlex.quote(value)}\n"
        for key, value in os.environ.items()
        if key.startswith("PYSANDBOX_")
    )
    runtime.write_text(f'#!/bin/sh\n{settings}exec {shlex.quote(RUNTIME)} "$@"\n')
    runtime.chmod(0o755)
    cmd = [
        "podman",
        "--root",
        str(base / "storage"),
        "--runroot",
        str(base / "run"),
        "--runtime",
        str(runtime),
    ]
    tar = base / "busybox.tar"
    with tarfile.open(tar, "w") as archive:
        archive.add(images.ensure_default_image(), arcname=".")
    subprocess.run([*cmd, "import", "-q", str(tar), IMAGE], check=True, capture_output=True)
    yield cmd
    subprocess.run([*cmd, "rm", "-af", "-t", "0"], capture_output=True, timeout=120)
    subprocess.run(
        [
            "podman",
            "--root",
            str(base / "storage"),
            "--runroot",
            str(base / "run"),
            "system",
            "reset",
            "-f",
        ],
        capture_output=True,
        timeout=120,
    )
    os.environ.pop("CONTAINERS_CONF", None)


def pm(podman: list[str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*podman, *args], capture_output=True, text=True, timeout=timeout)


def test_run_echo_and_exit_code(podman: list[str]) -> None:
    done = pm(podman, "run", "--rm", IMAGE, "echo", "hi")
    assert (done.returncode, done.stdout) == (0, "hi\n"), done.stderr
    assert pm(podman, "run", "--rm", IMAGE, "sh", "-c", "exit 3").returncode == 3


def test_env_workdir_user_readonly(podman: list[str]) -> None:
    done = pm(
        podman,
        "run",
        "--rm",
        "-e",
        "FOO=bar",
        "-w",
        "/tmp",
        "-u",
        "1000:1000",
        "--read-only",
        IMAGE,
        "sh",
        "-c",
        "echo $FOO; pwd; id -u; touch /x 2>/dev/null || echo ro",
    )
    assert done.stdout.split() == ["bar", "/tmp", "1000", "ro"], done.stderr


def test_volume_read_and_write(podman: list[str], tmp_path: Path) -> None:
    (tmp_path / "in").write_text("from host\n")
    done = pm(
        podman,
        "run",
        "--rm",
        "-v",
        f"{tmp_path}:/v",
        IMAGE,
        "sh",
        "-c",
        "cat /v/in; echo from guest > /v/out",
    )
    assert done.stdout == "from host\n", done.stderr
    assert (tmp_path / "out").read_text() == "from guest\n"


def test_memory_limit_reaches_the_guest_cgroup(podman: list[str]) -> None:
    done = pm(
        podman,
        "run",
        "--rm",
        "--memory",
        "32m",
        IMAGE,
        "sh",
        "-c",
        "cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/memory.max",
    )
    assert done.stdout.strip() == str(32 * 2**20), done.stderr


def read_limits(podman: list[str], name: str) -> dict[str, str]:
    done = pm(podman, "exec", name, "sh", "-c", READER)
    assert done.returncode == 0, done.stderr
    return parse(done.stdout)


def test_cgroup_limits_seen_inside_as_runc_shows_them_and_after_update(
    podman: list[str],
) -> None:
    """podman's flags, as a program inside reads them (tests/integration/cgroup_view.py).

    runc on this host gives the same numbers from v1 files for such a spec
    (test_cgroups.py compares them side by side); the default guest layout gives them in v2
    files, the v1 layout (annotation org.pysandbox.cgroup=v1) in v1 files.
    """
    limits = ["--memory", "64m", "--pids-limit", "100", "--cpus", "0.5", "--cpuset-cpus", "0"]
    name = "pysandbox-cgroup"
    started = pm(podman, "run", "-d", "--name", name, *limits, IMAGE, "sleep", "1000")
    assert started.returncode == 0, started.stderr
    try:
        seen = read_limits(podman, name)
        assert seen == {
            "version": "v2",
            "memory": str(64 << 20),
            "pids": "100",
            "quota": "50000",
            "period": "100000",
            "weight": "100",  # podman sets no shares: the default weight
            "cpus": "0",
            "mems": "0",
            "direct": str(64 << 20),
        }
        updated = pm(podman, "update", "--memory", "96m", "--cpus", "0.25", name)
        assert updated.returncode == 0, updated.stderr
        seen = read_limits(podman, name)
        assert (seen["memory"], seen["quota"], seen["direct"]) == (
            str(96 << 20),
            "25000",
            str(96 << 20),
        )
    finally:
        pm(podman, "rm", "-f", "-t", "0", name)
    v1 = pm(
        podman,
        "run",
        "--rm",
        "--annotation",
        "org.pysandbox.cgroup=v1",
        *limits,
        IMAGE,
        "sh",
        "-c",
        READER,
    )
    assert v1.returncode == 0, v1.stderr
    assert parse(v1.stdout) == {
        "version": "v1",
        "memory": str(64 << 20),
        "pids": "100",
        "quota": "50000",
        "period": "100000",
        "shares": "1024",  # the v1 default, as runc shows it when podman sets none
        "cpus": "0",
        "mems": "0",
        "direct": str(64 << 20),
    }, v1.stderr


def test_detached_exec_logs_pause_stop_rm(podman: list[str]) -> None:
    name = "pysandbox-detached"
    started = pm(
        podman,
        "run",
        "-d",
        "--name",
        name,
        IMAGE,
        "sh",
        "-c",
        'echo started; trap "echo got-term; exit 0" TERM; while true; do sleep 1; done',
    )
    assert started.returncode == 0, started.stderr
    try:
        exec_ = pm(podman, "exec", name, "sh", "-c", "echo in-exec; exit 5")
        assert (exec_.returncode, exec_.stdout) == (5, "in-exec\n"), exec_.stderr
        assert pm(podman, "pause", name).returncode == 0
        status = pm(podman, "inspect", "--format", "{{.State.Status}}", name).stdout.strip()
        assert status == "paused"
        assert pm(podman, "unpause", name).returncode == 0
        assert pm(podman, "stop", "-t", "10", name).returncode == 0
        logs = pm(podman, "logs", name).stdout
        assert logs == "started\ngot-term\n"
        code = pm(podman, "inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        assert code == "0"
    finally:
        assert pm(podman, "rm", "-f", name).returncode == 0


@pytest.mark.parametrize(
    ("command", "status", "says"),
    [
        ("no-such-cmd", 127, 'exec: "no-such-cmd": executable file not found in $PATH'),
        ("/etc/passwd", 126, 'exec: "/etc/passwd": permission denied'),
    ],
    ids=["not-found", "not-executable"],
)
def test_a_command_that_cannot_run_exits_127_or_126(
    podman: list[str], command: str, status: int, says: str
) -> None:
    """podman run's documented statuses (podman-run(1), "Exit Status": 127 the command
    cannot be found, 126 it cannot be invoked), with runc's reason in the message. (podman
    with runc itself cannot be the baseline here: runc fails on this host setting
    RLIMIT_NPROC before it looks for the command.)"""
    done = pm(podman, "run", "--rm", IMAGE, command)
    assert done.returncode == status, done.stderr
    assert says in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("flag", "says"),
    [
        ("--network=host", "--network host"),
        ("--ipc=host", "--ipc host"),
        ("--pid=host", "--pid host"),
        ("--uts=host", "--uts host"),
    ],
)
def test_host_namespaces_are_refused(podman: list[str], flag: str, says: str) -> None:
    """A VM cannot share the node's namespaces: podman drops the entry from
    linux.namespaces and pysandbox refuses the container with one line naming the option,
    before a VM boots (under runc it would share the host's). Nothing is left: podman removes
    the container and the runtime has no record of it."""
    name = f"pysandbox-host-{flag.split('=')[0].strip('-')}"
    done = pm(podman, "create", "--name", name, flag, IMAGE, "true")
    assert done.returncode == 0, done.stderr
    try:
        cid = done.stdout.strip()
        started = pm(podman, "start", name)
        assert started.returncode != 0, started.stdout
        assert "cannot be VM-isolated" in started.stderr and says in started.stderr, started.stderr
        assert "Traceback" not in started.stderr
        assert not (Path("/run/pysandbox") / cid).exists()
    finally:
        pm(podman, "rm", "-f", name)


def test_kill_reports_signal_exit(podman: list[str]) -> None:
    name = "pysandbox-killed"
    assert pm(podman, "run", "-d", "--name", name, IMAGE, "sleep", "600").returncode == 0
    try:
        assert pm(podman, "kill", name).returncode == 0
        pm(podman, "wait", name, timeout=60)
        code = pm(podman, "inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        assert code == "137"
    finally:
        pm(podman, "rm", "-f", name)


def test_interactive_tty(podman: list[str]) -> None:
    pid, fd = pty.fork()
    if pid == 0:
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
        os.execvp(
            podman[0],
            [
                *podman,
                "run",
                "--rm",
                "-it",
                IMAGE,
                "sh",
                "-c",
                "tty; stty size; read line; echo got:$line",
            ],
        )
    output = b""
    sent = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                data = os.read(fd, 4096)
            except OSError:
                break
            if not data:
                break
            output += data
        if not sent and b"/dev/" in output:
            os.write(fd, b"typed\r")
            sent = True
    else:
        os.kill(pid, 9)
    _, status = os.waitpid(pid, 0)
    text = output.decode(errors="replace")
    # The terminal is the container's console; its size is the one podman gave the pty.
    assert "/dev/console" in text and "got:typed" in text, text
    assert "33 101" in text, text  # the size podman's terminal has reached the guest pty
    assert os.waitstatus_to_exitcode(status) == 0


#: podman's --uidmap/--gidmap as --userns=auto writes them (auto needs /etc/subuid entries).
USERNS = ["--uidmap", "0:100000:65536", "--gidmap", "0:100000:65536"]
USERNS_SCRIPT = (
    "cat /proc/self/uid_map /proc/self/gid_map; id -u; stat -c '%u:%g' / /etc/passwd; "
    "stat -c '%a %u:%g' /vol; "
    "touch /vol/by-root && mkdir /vol/dir && chown 1000:1000 /vol/dir && echo written"
)


def _run_with_userns(podman: list[str], volume: Path) -> tuple[list[str], dict[str, str]]:
    """Run :data:`USERNS_SCRIPT` with a user namespace and ``volume`` at /vol.

    /vol is not in the image: the runtime creates it in podman's rootfs, whose ``/`` (mode
    0555) belongs to the namespace's root (docs/user-namespaces.md).

    ``--network none``: with a user namespace podman sets up the bridge network after the
    runtime's create, in the created process's namespace, which the VM does not use
    (docs/user-namespaces.md). ``--ulimit``: podman's default RLIMIT_NPROC and NOFILE are above
    the hard limit of this host, where the namespace's root may not raise it, so runc needs it
    (a --ulimit replaces the containers.conf defaults); pysandbox does not
    (:func:`test_user_namespace_with_podman_default_limits`)."""
    volume.mkdir()
    volume.chmod(0o1777)
    done = pm(
        podman,
        "run",
        "--rm",
        "--network",
        "none",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        *USERNS,
        "-v",
        f"{volume}:/vol",
        IMAGE,
        "sh",
        "-c",
        USERNS_SCRIPT,
    )
    assert done.returncode == 0, done.stderr
    owners = {}
    for name in ("by-root", "dir"):
        st = (volume / name).stat()
        owners[name] = f"{st.st_uid}:{st.st_gid}"
    return [" ".join(line.split()) for line in done.stdout.splitlines()], owners


def test_user_namespace_ids_and_volume_owners_match_runc(podman: list[str], tmp_path: Path) -> None:
    """podman --uidmap: the ids seen inside and the host owners of files written to a volume
    are runc's (container uid N is host uid 100000+N)."""
    tmp_path.chmod(0o755)  # runc's namespace root must traverse to the volume
    lines, owners = _run_with_userns(podman, tmp_path / "ours")
    assert lines == [
        "0 100000 65536",
        "0 100000 65536",
        "0",
        "0:0",
        "0:0",
        "1777 65534:65534",
        "written",
    ]
    assert owners == {"by-root": "100000:100000", "dir": "101000:101000"}
    if shutil.which("runc") is None:
        return
    runc = list(podman)
    runc[runc.index("--runtime") + 1] = "runc"
    assert _run_with_userns(runc, tmp_path / "runc") == (lines, owners)


def test_user_namespace_with_podman_default_limits(podman: list[str]) -> None:
    """podman's default rlimits (NOFILE from containers.conf, its own large NPROC) are set in a
    user namespace: the guest's PID 1 raised its hard limits, which the namespace's root
    cannot do (docs/user-namespaces.md)."""
    spec_limits = pm(podman, "run", "--rm", "--network", "none", IMAGE, "sh", "-c", "ulimit -Hu")
    assert spec_limits.returncode == 0, spec_limits.stderr
    done = pm(
        podman,
        "run",
        "--rm",
        "--network",
        "none",
        *USERNS,
        IMAGE,
        "sh",
        "-c",
        "cat /proc/self/uid_map; ulimit -Hn; ulimit -Hu",
    )
    assert done.returncode == 0, done.stderr
    lines = [" ".join(line.split()) for line in done.stdout.splitlines()]
    assert lines == ["0 100000 65536", "1024", spec_limits.stdout.strip()]
