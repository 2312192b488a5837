"""podman drives pysandbox as its OCI runtime, unchanged (conmon, pid file, console socket)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import shlex
import shutil
import socket
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
from sandbox.pod import hostfs
from tests.integration.cgroup_view import READER, parse
from tests.integration.pods import PodFactory
from tests.processes import netns_holders, netns_identity, wait_until

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
    # Its own --tmpdir too: the default, /run/libpod, is shared by every podman of the host
    # (lock files, exit files, the "alive" mark). Another test run's 'system reset' removed
    # it under this one, whose podman then took the host for rebooted and reset its running
    # containers' state ("can only create exec sessions on running containers").
    private = ["--root", str(base / "storage"), "--runroot", str(base / "run")]
    private += ["--tmpdir", str(base / "tmp")]
    cmd = ["podman", *private, "--runtime", str(runtime)]
    tar = base / "busybox.tar"
    with tarfile.open(tar, "w") as archive:
        archive.add(images.ensure_default_image(), arcname=".")
    subprocess.run([*cmd, "import", "-q", str(tar), IMAGE], check=True, capture_output=True)
    yield cmd
    subprocess.run([*cmd, "rm", "-af", "-t", "0"], capture_output=True, timeout=120)
    subprocess.run(["podman", *private, "system", "reset", "-f"], capture_output=True, timeout=120)
    # podman's overlay driver binds its storage/overlay directory onto itself and keeps that
    # mount after 'system reset': without this, pytest cannot remove its temporary tree.
    for point in hostfs.mounts_below(base):
        subprocess.run(["umount", "-l", point], check=False, timeout=60)
    os.environ.pop("CONTAINERS_CONF", None)


def pm(podman: list[str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*podman, *args], capture_output=True, text=True, timeout=timeout)


def runc_podman(podman: list[str]) -> list[str]:
    """The same podman command running runc instead: the reference of the comparisons."""
    if shutil.which("runc") is None:
        pytest.fail("runc is missing: run 'make deps' (scripts/install-host-packages.sh)")
    runc = list(podman)
    runc[runc.index("--runtime") + 1] = "runc"
    return runc


def test_run_echo_and_exit_code(podman: list[str]) -> None:
    done = pm(podman, "run", "--rm", IMAGE, "echo", "hi")
    assert (done.returncode, done.stdout) == (0, "hi\n"), done.stderr
    assert pm(podman, "run", "--rm", IMAGE, "sh", "-c", "exit 3").returncode == 3


def test_stdin_is_dev_null_without_i_and_a_pipe_with_it_as_under_runc(podman: list[str]) -> None:
    """conmon gives the runtime /dev/null as stdin without -i: runc passes it on, so does
    the stand-in (the container's stdin was an empty pipe; breaker4)."""
    probe = ["sh", "-c", "readlink /proc/self/fd/0 | sed 's/:.*//'; cat"]
    done = pm(podman, "run", "--rm", IMAGE, *probe)
    assert (done.returncode, done.stdout) == (0, "/dev/null\n"), done.stderr
    piped = subprocess.run(
        [*podman, "run", "--rm", "-i", IMAGE, *probe],
        input="relayed\n",
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert (piped.returncode, piped.stdout) == (0, "pipe\nrelayed\n"), piped.stderr


def test_device_and_privileged_as_podman_writes_them(podman: list[str]) -> None:
    """podman writes a device's whole st_mode as its fileMode (020600 for /dev/fuse), as runc
    takes it; --privileged lists every host device so. Both were refused ("fileMode: 8576 is
    out of range"). The device opens (podman adds a device cgroup rule for it; --privileged
    allows every device); a node made without --device does not open (docs/cgroups.md)."""
    script = "ls -l /dev/fuse && (exec 3<>/dev/fuse) && echo opened"
    done = pm(podman, "run", "--rm", "--device", "/dev/fuse", IMAGE, "sh", "-c", script)
    assert done.returncode == 0, done.stderr
    mode, _links, _owner, _group, major, minor = done.stdout.split()[:6]
    assert (mode, major, minor) == ("crw-------", "10,", "229"), done.stdout
    assert done.stdout.endswith("\nopened\n"), done.stdout  # its device rule lets it open
    # Without --device the node can be made (CAP_MKNOD) but not opened, as with runc.
    made = "mknod /dev/fu c 10 229 && (exec 3<>/dev/fu); echo $?"
    denied = pm(podman, "run", "--rm", IMAGE, "sh", "-c", made)
    assert (denied.returncode, denied.stdout) == (0, "1\n"), denied.stderr
    assert "Operation not permitted" in denied.stderr, denied.stderr
    script = "echo ok; (exec 3<>/dev/fuse) && echo opened"
    privileged = pm(podman, "run", "--rm", "--privileged", IMAGE, "sh", "-c", script)
    assert (privileged.returncode, privileged.stdout) == (0, "ok\nopened\n"), privileged.stderr


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
    # The terminal is a pty of the container's own devpts (podman with runc prints
    # /dev/pts/0 here too; /dev/console is that pty); its size is the one podman gave it.
    assert text.startswith("/dev/pts/0\r\n") and "got:typed" in text, text
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

    ``--network none``: this compares ids and owners; the bridge network podman sets up
    after the runtime's create with a user namespace has a test of its own
    (:func:`test_user_namespace_with_the_default_bridge_network`). ``--ulimit``: podman's
    default RLIMIT_NPROC and NOFILE are above the hard limit of this host, where the
    namespace's root may not raise it, so runc needs it (a --ulimit replaces the
    containers.conf defaults); pysandbox does not
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


#: runc fails on this host setting podman's default RLIMIT_NPROC/NOFILE (above the host's hard
#: limits): the comparisons with runc pass limits it can set (:func:`_run_with_userns`).
RUNC_SETTABLE_LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
SHM_PROBE = (
    "grep ' /dev/shm ' /proc/mounts | sed 's/,inode64//'; stat -f -c '%T %b %S' /dev/shm; "
    "stat -c '%a %U' /dev/shm; echo data > /dev/shm/f && cat /dev/shm/f"
)


@pytest.mark.parametrize("size", [None, "1g"])
def test_dev_shm_is_the_tmpfs_runc_gives(podman: list[str], size: str | None) -> None:
    """podman's /dev/shm (a host tmpfs named ``shm`` of --shm-size, bound in) is a tmpfs of
    that size, mode and flags in the guest: the same /proc/mounts line, statfs type and size
    as under runc (it was a virtio-fs share: type fuse, the share's df). (The guest kernel
    adds ``inode64`` to every tmpfs's options; the host's does not: left out.)"""
    args = ["run", "--rm", "--network", "none", *RUNC_SETTABLE_LIMITS]
    args += ["--shm-size", size] if size else []
    done = pm(podman, *args, IMAGE, "sh", "-c", SHM_PROBE)
    assert done.returncode == 0, done.stderr
    wanted_kib = 1048576 if size else 64000
    assert done.stdout.splitlines() == [
        f"shm /dev/shm tmpfs rw,nosuid,nodev,noexec,relatime,size={wanted_kib}k 0 0",
        f"tmpfs {wanted_kib // 4} 4096",
        "1777 root",
        "data",
    ]
    runc = runc_podman(podman)
    theirs = pm(runc, *args, IMAGE, "sh", "-c", SHM_PROBE)
    assert (theirs.returncode, theirs.stdout) == (0, done.stdout), theirs.stderr


def test_a_tmpfs_starts_with_the_images_content_as_under_runc(podman: list[str]) -> None:
    """podman's ``--tmpfs`` asks for runc's ``tmpcopyup``: the tmpfs starts with what the
    image has in that directory, its root with the directory's mode (it was empty: a
    ``--tmpfs /etc`` lost /etc/passwd)."""
    probe = (
        "head -2 /etc/passwd; stat -c '%a %U' /etc /etc/passwd; ls /etc | wc -l; "
        "grep ' /etc ' /proc/mounts | sed 's/,inode64//'"
    )
    args = ["run", "--rm", "--network", "none", *RUNC_SETTABLE_LIMITS, "--tmpfs", "/etc:mode=700"]
    done = pm(podman, *args, IMAGE, "sh", "-c", probe)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "root:x:0:0:root:/root:/bin/sh"
    runc = runc_podman(podman)
    theirs = pm(runc, *args, IMAGE, "sh", "-c", probe)
    assert (theirs.returncode, theirs.stdout) == (0, done.stdout), theirs.stderr


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
    runc = runc_podman(podman)
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


def _host_net() -> dict[str, str]:
    """The host network namespace as a user inspects it (links with MACs, addresses,
    routes, iptables rules)."""
    views = {
        "links": ["ip", "-o", "link"],
        "addresses": ["ip", "-o", "addr"],
        "routes": ["ip", "route", "show", "table", "all"],
        "rules": ["iptables-save"],
    }
    found = {}
    for name, argv in views.items():
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        found[name] = done.stdout
    return found


def _mentions(text: str, word: str) -> list[str]:
    """Lines of ``text`` naming ``word`` (an address, a MAC) as a whole token."""
    return [
        line
        for line in text.splitlines()
        if re.search(rf"(^|[^\w.:]){re.escape(word)}(/|\s|$)", line)
    ]


def _bridge_container(podman: list[str], name: str) -> dict[str, str]:
    """Start ``name`` (user namespace, podman's default bridge network), return what podman
    reports and what the container sees of its network."""
    started = pm(
        podman,
        "run",
        "-d",
        "--name",
        name,
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "--sysctl",
        "net.ipv4.ping_group_range=0 1000",
        *USERNS,
        IMAGE,
        "sleep",
        "600",
    )
    assert started.returncode == 0, started.stderr
    fmt = (
        "{{.Id}} {{.State.Pid}} {{.NetworkSettings.IPAddress}} "
        "{{.NetworkSettings.IPPrefixLen}} {{.NetworkSettings.MacAddress}} "
        "{{.NetworkSettings.Gateway}}"
    )
    inspected = pm(podman, "inspect", "--format", fmt, name)
    assert inspected.returncode == 0, inspected.stderr
    cid, pid, ip, prefix, mac, gateway = inspected.stdout.split()
    seen = pm(
        podman,
        "exec",
        name,
        "sh",
        "-c",
        "ip -o -4 addr show | awk '{print $2, $4}'; cat /sys/class/net/eth0/address; "
        "cat /proc/net/route",
    )
    assert seen.returncode == 0, seen.stderr
    lines = seen.stdout.splitlines()
    # The container's root acts in its own network namespace as far as its capabilities go
    # (podman grants NET_RAW, not NET_ADMIN): the namespace belongs to its user namespace.
    powers = pm(
        podman,
        "exec",
        name,
        "sh",
        "-c",
        "cat /proc/sys/net/ipv4/ping_group_range; "
        f"ping -c 1 -W 10 {gateway} >/dev/null && echo ping-ok; "
        "ip link add probe0 type dummy 2>&1; ip route add 10.250.0.0/24 dev eth0 2>&1",
    )
    return {
        "powers": " ".join(powers.stdout.split()),
        "id": cid,
        "pid": pid,
        "ip": ip,
        "prefix": prefix,
        "mac": mac,
        "gateway": gateway,
        "addresses": "\n".join(lines[:2]),
        "nic_mac": lines[2],
        "routes": "\n".join(" ".join(line.split()) for line in lines[3:]),
    }


def _reaches(podman: list[str], name: str, gateway: str) -> str:
    """What a listener on the host's bridge address ``gateway`` got from ``name``."""
    with socket.socket() as server:
        server.bind((gateway, 0))
        server.listen(1)
        server.settimeout(60)
        port = server.getsockname()[1]
        token = f"hello-from-{name}"
        sent = subprocess.Popen(
            [*podman, "exec", name, "sh", "-c", f"echo {token} | nc -w 5 {gateway} {port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(30)
                return conn.recv(100).decode().strip()
        finally:
            sent.wait(60)


def _netns_in_use(identity: str) -> list[str]:
    """Processes and mounts still holding network namespace ``identity``."""
    inode = identity.split(":")[1]
    held = [
        line
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if f"net:[{inode}]" in line
    ]
    return held + [f"pid {pid}" for pid in netns_holders(identity)]


def test_user_namespace_with_the_default_bridge_network(podman: list[str]) -> None:
    """podman --uidmap with its default bridge network: podman configures the network after
    the runtime's create, in the namespace of the --pid-file process (docs/networking.md,
    "Network set up after create"). The container gets the address podman reports, runc's
    routes, reaches the host's bridge address; the host's network namespace is never the one
    configured (nothing of the container's lands there beyond what runc's adds: the host end
    of the veth and CNI's iptables rules), and nothing is left after ``podman rm -f``."""
    runc = runc_podman(podman)
    host_netns = netns_identity("self")
    before = _host_net()
    try:
        ours = _bridge_container(podman, "userns-bridge")
        theirs = _bridge_container(runc, "userns-bridge-runc")
        for seen in (ours, theirs):
            assert seen["addresses"] == f"lo 127.0.0.1/8\neth0 {seen['ip']}/{seen['prefix']}"
            assert seen["nic_mac"] == seen["mac"]
        assert ours["routes"] == theirs["routes"]
        assert (
            ours["powers"]
            == theirs["powers"]
            == (
                "0 1000 ping-ok ip: RTNETLINK answers: Operation not permitted "
                "ip: RTNETLINK answers: Operation not permitted"
            )
        )
        assert ours["gateway"] == theirs["gateway"]
        # The --pid-file process (podman's State.Pid) is not in the host's netns.
        ours_netns = netns_identity(ours["pid"])
        assert ours_netns != host_netns
        assert _reaches(podman, "userns-bridge", ours["gateway"]) == "hello-from-userns-bridge"
        assert _reaches(runc, "userns-bridge-runc", theirs["gateway"]) == (
            "hello-from-userns-bridge-runc"
        )
        during = _host_net()
        for seen in (ours, theirs):
            # The container's address and MAC are not the host's.
            assert not _mentions(during["addresses"], seen["ip"])
            assert not _mentions(during["links"], seen["mac"])
        # Routes: none of them names a container; CNI's rules for each are alike.
        assert during["routes"].count(ours["ip"]) == during["routes"].count(theirs["ip"]) == 0
        assert len(_mentions(during["rules"], ours["ip"])) == len(
            _mentions(during["rules"], theirs["ip"])
        )
        assert "_psb" not in during["links"]
        assert not [
            line
            for line in during["routes"].splitlines()
            if line not in before["routes"] and "cni-podman0" not in line and "veth" not in line
        ]
    finally:
        pm(podman, "rm", "-f", "-t", "0", "userns-bridge")
        pm(runc, "rm", "-f", "-t", "0", "userns-bridge-runc")
    after = _host_net()
    assert not _mentions(after["rules"], ours["ip"])
    assert not _mentions(after["addresses"], ours["ip"])
    assert "_psb" not in after["links"]
    assert wait_until(lambda: not _netns_in_use(ours_netns), 30), _netns_in_use(ours_netns)
    assert not (state.DEFAULT_ROOT / ours["id"]).exists()
    assert not Path(f"/proc/{ours['pid']}").exists() or netns_identity(ours["pid"]) != ours_netns
