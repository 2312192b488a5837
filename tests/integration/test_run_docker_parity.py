"""``pysandbox run`` and ``exec`` where a docker user has habits, side by side with podman
running runc on the host (the same busybox image, ``--network none``).

What a user relies on: ``localhost`` and the container's own hostname resolve (a server on
loopback is reachable by name), ``hostname``, ``uname -n``, /etc/hostname and ``$HOSTNAME``
agree, /etc/hosts, /etc/hostname (and /etc/resolv.conf with a network) are root's, mode
0644, bind mounts that root in the container may change, and a change stays in that
container (the next one, and the host, never see it); ``exec -u NAME`` finds the user in the
container's /etc/passwd as it is now, ``exec -w DIR`` starts there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.image import store as images
from tests.integration.cli import REPO
from tests.integration.cli import pysandbox as run
from tests.integration.pods import PodFactory
from tests.processes import pristine_signals, processes_mentioning, wait_until

IMAGE = "localhost/etc-files:1"

#: Prints what a user would check, in words that do not depend on the runtime: the hostname
#: is shown as "H" (podman's is its container id, ours the run's).
SCRIPT = r"""
h=$(hostname)
echo "hostname: $(echo "$h" | grep -qE '^[0-9a-f]{12}$' && echo 12-hex || echo "$h")"
[ "$(uname -n)" = "$h" ] && echo "uname -n: H"
[ "$(cat /etc/hostname)" = "$h" ] && echo "/etc/hostname: H"
e=$(env | sed -n 's/^HOSTNAME=//p')  # the environment's (busybox sh sets its own variable)
[ "$e" = "$h" ] && echo "HOSTNAME: H" || echo "HOSTNAME: $e"
for f in /etc/hosts /etc/hostname /etc/resolv.conf; do
  if [ -e $f ]; then
    echo "$f: $(stat -c '%u:%g %a' $f), mounts: $(grep -c " $f " /proc/self/mountinfo)"
  else
    echo "$f: missing"
  fi
done
mkdir -p /tmp/www && echo served > /tmp/www/i && httpd -p 8080 -h /tmp/www
echo "http://localhost: $(wget -q -O- http://localhost:8080/i 2>&1)"
echo "http://H: $(wget -q -O- "http://$h:8080/i" 2>&1)"
echo "written before: $(grep -c 'written-by' /etc/hosts)"
echo '10.9.9.9 written-by-the-container' >> /etc/hosts && echo "hosts written"
echo "/etc/hosts: $(grep -c 'written-by' /etc/hosts) written line"
"""

#: What both runtimes show without a network, for each options case (podman 4.3 writes no
#: resolv.conf then; the image has none).
EXPECTED = {
    (): "hostname: 12-hex",
    ("--hostname", "myhost"): "hostname: myhost",
    ("-e", "HOSTNAME=set-by-me"): "hostname: 12-hex",
}
COMMON = [
    "uname -n: H",
    "/etc/hostname: H",
    "HOSTNAME: H",
    "/etc/hosts: 0:0 644, mounts: 1",
    "/etc/hostname: 0:0 644, mounts: 1",
    "/etc/resolv.conf: missing",
    "http://localhost: served",
    "http://H: served",
    "written before: 0",
    "hosts written",
    "/etc/hosts: 1 written line",
]


def _expected(options: tuple[str, ...]) -> list[str]:
    lines = [EXPECTED[options], *COMMON]
    if options == ("-e", "HOSTNAME=set-by-me"):  # -e wins over the default, as in docker
        lines[lines.index("HOSTNAME: H")] = "HOSTNAME: set-by-me"
    return lines


@pytest.fixture(scope="module")
def root(module_pods: PodFactory) -> Path:
    return module_pods.new_root("etc")


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """podman with private storage (vfs) and config, running runc, with the default busybox
    image imported as :data:`IMAGE`."""
    if shutil.which("podman") is None or shutil.which("runc") is None:
        pytest.fail("podman or runc is missing: run 'make deps'")
    base = tmp_path_factory.mktemp("podman-etc")
    runroot = Path(tempfile.mkdtemp(prefix="pt-etc-"))  # podman's limit: 50 characters
    conf = base / "containers.conf"
    conf.write_text(
        '[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
        '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\nlock_type = "file"\n'
    )
    cmd = ["env", f"CONTAINERS_CONF={conf}", "podman", "--root", str(base / "storage")]
    cmd += ["--runroot", str(runroot), "--tmpdir", str(base / "tmp")]  # not the shared /run/libpod
    cmd += ["--storage-driver", "vfs", "--runtime", "runc"]
    tar = base / "busybox.tar"
    with tarfile.open(tar, "w") as archive:
        archive.add(images.ensure_default_image(), arcname=".")
    imported = subprocess.run([*cmd, "import", "-q", str(tar), IMAGE], capture_output=True)
    assert imported.returncode == 0, imported.stderr
    try:
        yield cmd
    finally:
        subprocess.run([*cmd, "system", "reset", "-f"], capture_output=True, timeout=120)
        shutil.rmtree(runroot, ignore_errors=True)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"


@pytest.mark.parametrize("options", list(EXPECTED), ids=["default", "hostname", "env"])
def test_etc_files_and_hostname_as_podman_with_runc_gives_them(
    root: Path, podman: list[str], options: tuple[str, ...]
) -> None:
    image_hosts = images.ensure_default_image() / "etc" / "hosts"
    before = (_digest(Path("/etc/hosts")), _digest(image_hosts))
    theirs = subprocess.run(
        [*podman, "run", "--rm", "--net", "none", *options, IMAGE, "sh", "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
    )
    ours = run(root, "run", *options, "default", "sh", "-c", SCRIPT)
    assert (theirs.returncode, theirs.stdout.splitlines()) == (0, _expected(options)), theirs
    assert (ours.returncode, ours.stdout.splitlines()) == (0, _expected(options)), ours.stderr
    # The container's write reached neither the host's /etc/hosts nor the image.
    assert (_digest(Path("/etc/hosts")), _digest(image_hosts)) == before


def test_network_user_files_are_the_containers_own_and_writable(root: Path) -> None:
    """With a network the container also gets /etc/resolv.conf (QEMU's DNS forwarder) and its
    address names the hostname, as docker's bridge network gives it; all three are
    writable by root, even on a read-only root filesystem (docker's --read-only too)."""
    script = (
        "cat /etc/hosts /etc/hostname /etc/resolv.conf; "
        "for f in /etc/hosts /etc/hostname /etc/resolv.conf; do echo x >> $f || exit 9; done; "
        "touch /etc/other 2>/dev/null || echo read-only root"
    )
    done = run(root, "run", "--network", "user", "--read-only", "--name", "etc-user", "-h")
    assert done.returncode == 125 and "expected one argument" in done.stderr  # -h is hostname
    done = run(
        root,
        "run",
        "--network",
        "user",
        "--read-only",
        "--name",
        "etc-user",
        "default",
        "sh",
        "-c",
        script,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "fe00::0\tip6-localnet",
        "ff00::0\tip6-mcastprefix",
        "ff02::1\tip6-allnodes",
        "ff02::2\tip6-allrouters",
        "10.0.2.15\tetc-user",
        "etc-user",
        "nameserver 10.0.2.3",
        "read-only root",
    ]


def test_exec_into_a_detached_run_sees_its_hostname_and_its_changes(root: Path) -> None:
    """``exec`` is in the same container: the same hostname and $HOSTNAME, and what an
    earlier process wrote to /etc/hosts; a second run has its own, unchanged files."""
    started = run(root, "run", "-d", "default", "sleep", "1000")
    assert started.returncode == 0, started.stderr
    name = started.stdout.strip()
    try:
        wrote = run(root, "exec", name, "sh", "-c", "echo '10.1.1.1 written-by-exec' >> /etc/hosts")
        assert wrote.returncode == 0, wrote.stderr
        seen = run(
            root, "exec", name, "sh", "-c", "hostname; env | grep ^HOSTNAME=; tail -1 /etc/hosts"
        )
        assert seen.stdout.splitlines() == [
            name.removeprefix("run-"),
            f"HOSTNAME={name.removeprefix('run-')}",
            "10.1.1.1 written-by-exec",
        ], seen.stderr
        other = run(root, "run", "default", "grep", "-c", "written-by-exec", "/etc/hosts")
        assert (other.returncode, other.stdout) == (1, "0\n"), other.stderr
    finally:
        assert run(root, "rm", "-f", name).returncode == 0
    assert wait_until(lambda: processes_mentioning(str(root), live_only=True) == [], 30)
    assert not (root / name).exists() and os.path.exists(root)


def test_an_empty_program_exits_127_as_with_podman_and_runc(
    root: Path, podman: list[str], tmp_path: Path
) -> None:
    """``run IMAGE ''``: 127 and runc's words, refused before a VM boots (no guest image
    needed)."""
    theirs = subprocess.run(
        [*podman, "run", "--rm", "--net", "none", IMAGE, ""], capture_output=True, text=True
    )
    assert theirs.returncode == 127 and 'exec: "": executable file not found' in theirs.stderr
    ours = run(
        root, "run", "default", "", env={**os.environ, "PYSANDBOX_GUEST_IMAGE": str(tmp_path)}
    )
    assert (ours.returncode, ours.stdout) == (127, "")
    assert ours.stderr == 'pysandbox: exec: "": executable file not found in $PATH\n'


def _both(podman: list[str], root: Path, name: str, *args: str) -> tuple[str, str]:
    """``exec ARGS`` (options, then the command) in podman's container ``name`` and in our
    run ``name``: both stdouts, each command checked to exit 0."""
    split = next(i for i, a in enumerate(args) if a == "--")
    options, command = list(args[:split]), list(args[split + 1 :])
    theirs = subprocess.run(
        [*podman, "exec", *options, name, *command],
        capture_output=True,
        text=True,
        preexec_fn=pristine_signals,  # as from a fresh shell (see the signal test)
    )
    ours = run(root, "exec", *options, name, *command)
    assert theirs.returncode == 0, theirs.stderr
    assert ours.returncode == 0, ours.stderr
    return theirs.stdout, ours.stdout


#: A user and a group the container adds to its own /etc/passwd and /etc/group.
ADD_USER = (
    "echo app:x:1234:4321::/:/bin/sh >> /etc/passwd && echo grp:x:777: >> /etc/group && "
    "echo sup:x:888:nobody,app >> /etc/group"
)
#: The groups of a process, each once, sorted (podman also lists the primary group among the
#: supplementary ones, docker does not: the set is what both give).
GROUPS = "id -G | tr ' ' '\\n' | sort -un | tr '\\n' ' '"


#: A process starts with no signal blocked or ignored under runc (``/proc/PID/status``).
SIGNALS_AT_START = "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n"


def test_run_starts_its_process_with_no_signal_blocked_or_ignored(
    root: Path, podman: list[str]
) -> None:
    """A program that checks its signal dispositions (or relies on a default one, e.g. a
    real-time signal's) finds what it finds under runc: nothing blocked, nothing ignored —
    glibc's internal signals 32 and 33 included."""
    status = ["grep", "^Sig[BI]", "/proc/self/status"]
    # (podman's container inherits what its caller ignores or blocks: a suite run as a
    # background job ignores INT, QUIT and HUP, code earlier tests ran in this process may
    # have changed others; the comparison is with podman run from a fresh shell.)
    theirs = subprocess.run(
        [*podman, "run", "--rm", "--net", "none", IMAGE, *status],
        capture_output=True,
        text=True,
        preexec_fn=pristine_signals,
    )
    ours = run(root, "run", "default", *status)
    assert (theirs.returncode, theirs.stdout) == (0, SIGNALS_AT_START), theirs.stderr
    assert (ours.returncode, ours.stdout) == (0, SIGNALS_AT_START), ours.stderr


def test_without_i_stdin_is_dev_null_as_podman_with_runc_gives_it(
    root: Path, podman: list[str]
) -> None:
    """``run`` without ``-i`` (foreground and ``-d``): the container's stdin is /dev/null,
    not an empty pipe (a program that checks for piped input behaves as under runc);
    with ``-i`` it is a pipe carrying ours (breaker4)."""
    probe = ["sh", "-c", "readlink /proc/self/fd/0 | sed 's/:.*//'; cat"]
    theirs = subprocess.run(
        [*podman, "run", "--rm", "--net", "none", IMAGE, *probe], capture_output=True, text=True
    )
    assert (theirs.returncode, theirs.stdout) == (0, "/dev/null\n"), theirs.stderr
    ours = run(root, "run", "default", *probe, input="ignored\n")
    assert (ours.returncode, ours.stdout) == (0, "/dev/null\n"), ours.stderr
    piped = run(root, "run", "-i", "default", *probe, input="relayed\n")
    assert (piped.returncode, piped.stdout) == (0, "pipe\nrelayed\n"), piped.stderr
    started = run(root, "run", "-d", "--name", "stdin-d", "default", *probe)
    assert started.returncode == 0, started.stderr
    try:
        assert wait_until(lambda: run(root, "logs", "stdin-d").stdout == "/dev/null\n", 30)
    finally:
        assert run(root, "rm", "-f", "stdin-d").returncode == 0


def test_exec_user_by_name_and_workdir_as_podman_with_runc(root: Path, podman: list[str]) -> None:
    """docker's ``exec -u NAME[:GROUP]`` and ``exec -w DIR``: the names as the container's
    /etc/passwd and /etc/group have them now (an entry the container added counts); and an
    exec's process starts with no signal blocked or ignored."""
    name = "exec-habits"
    started = subprocess.run(
        [*podman, "run", "-d", "--name", name, "--net", "none", IMAGE, "sleep", "1000"],
        capture_output=True,
        text=True,
    )
    assert started.returncode == 0, started.stderr
    ours = run(root, "run", "-d", "--name", name, "default", "sleep", "1000")
    assert ours.returncode == 0, ours.stderr
    try:
        for args, expected in (
            (("-u", "nobody", "--", "sh", "-c", "id -u; id -g"), "65534\n65534\n"),
            (("-u", "nobody:root", "--", "sh", "-c", "id -u; id -g"), "65534\n0\n"),
            (("-w", "/etc", "--", "pwd"), "/etc\n"),
            (("--workdir", "/root", "-u", "nobody", "--", "pwd"), "/root\n"),
            (("--", "sh", "-c", ADD_USER), ""),
            (("-u", "app", "--", "sh", "-c", "id -u; id -g"), "1234\n4321\n"),
            (("-u", "app:grp", "--", "sh", "-c", "id -u; id -g"), "1234\n777\n"),
            # A user named without a group gets the groups that list it (docker's rule).
            (("-u", "app", "--", "sh", "-c", GROUPS), "888 4321 "),
            (("-u", "app:grp", "--", "sh", "-c", GROUPS), "777 "),
            (("--", "grep", "^Sig[BI]", "/proc/self/status"), SIGNALS_AT_START),
        ):
            assert _both(podman, root, name, *args) == (expected, expected), args
        unknown = run(root, "exec", "-u", "ghost", name, "true")
        assert (unknown.returncode, unknown.stdout) == (1, "")
        assert unknown.stderr == (
            f"pysandbox: unknown user 'ghost': not in {name}:/etc/passwd; use a numeric "
            "UID[:GID] or a user the container defines\n"
        )
        theirs = subprocess.run(
            [*podman, "exec", "-u", "ghost", name, "true"], capture_output=True, text=True
        )
        assert theirs.returncode != 0 and "ghost" in theirs.stderr
    finally:
        subprocess.run([*podman, "rm", "-f", "-t", "0", name], capture_output=True, timeout=120)
        assert run(root, "rm", "-f", name).returncode == 0


def test_run_w_makes_a_missing_directory_as_runc_does(root: Path, tmp_path: Path) -> None:
    """``docker run -w /new/dir`` starts there: runc makes a missing cwd (mkdir -p, root's,
    0755) inside the container, before a read-only root turns read-only; so do we."""
    script = "pwd; stat -c '%u:%g %a' /new /new/dir; touch /new/dir/f 2>/dev/null || echo ro"
    bundle = tmp_path / "bundle"
    shutil.copytree(images.ensure_default_image(), bundle / "rootfs", symlinks=True)
    subprocess.run(["runc", "spec"], cwd=bundle, check=True)
    config = json.loads((bundle / "config.json").read_text())
    config["process"].update(
        terminal=False, args=["sh", "-c", script], cwd="/new/dir", user={"uid": 1000, "gid": 1000}
    )
    (bundle / "config.json").write_text(json.dumps(config))  # runc spec: root read-only
    theirs = subprocess.run(
        ["runc", "--root", str(tmp_path / "runc"), "run", "--bundle", str(bundle), "cwd-made"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    ours = run(
        root,
        "run",
        "--read-only",
        "-u",
        "1000:1000",
        "-w",
        "/new/dir",
        "default",
        "sh",
        "-c",
        script,
    )
    expected = ["/new/dir", "0:0 755", "0:0 755", "ro"]
    assert (theirs.returncode, theirs.stdout.splitlines()) == (0, expected), theirs.stderr
    assert (ours.returncode, ours.stdout.splitlines()) == (0, expected), ours.stderr


def test_a_detached_run_killed_by_its_timeout_shows_124_in_ps(root: Path) -> None:
    """A foreground ``run --timeout`` exits 124 (as timeout(1)); a detached one killed by its
    ``--timeout`` is shown so (``timed out (124)``), not as the 137 of a ``kill -9``; one that
    ends by itself before keeps its own status."""
    late = run(root, "run", "-d", "--name", "tmo-late", "--timeout", "2", "default", "sleep", "60")
    early = run(root, "run", "-d", "--name", "tmo-early", "--timeout", "60", "default", "true")
    assert late.returncode == 0 and early.returncode == 0, (late.stderr, early.stderr)

    def runs() -> dict[str, dict[str, object]]:
        listed = json.loads(run(root, "ps", "-a", "--format", "json").stdout)
        return {str(item["name"]): item for item in listed}

    try:
        assert wait_until(
            lambda: all(runs()[n]["status"] == "stopped" for n in ("tmo-late", "tmo-early")),
            120,
            interval=0.5,
        ), runs()
        listed = runs()
        assert (listed["tmo-late"]["exit_code"], listed["tmo-late"]["timed_out"]) == (124, True)
        assert (listed["tmo-early"]["exit_code"], listed["tmo-early"]["timed_out"]) == (0, False)
        table = run(root, "ps", "-a").stdout.splitlines()
        assert any(line.startswith("tmo-late ") and "timed out (124)" in line for line in table)
        assert any(line.startswith("tmo-early ") and "exited (0)" in line for line in table)
    finally:
        assert run(root, "rm", "-f", "tmo-late", "tmo-early").returncode == 0


#: The memory limit and memory+swap total a program reads from its cgroup, on either layout
#: (runc on this v1 host: memory.memsw; the guest's v2: memory.max + memory.swap.max).
MEMORY_PROBE = r"""
if [ -f /sys/fs/cgroup/memory.max ]; then
  m=$(cat /sys/fs/cgroup/memory.max); s=$(cat /sys/fs/cgroup/memory.swap.max)
  if [ "$s" = max ]; then t=max; else t=$((m + s)); fi
else
  m=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes)
  t=$(cat /sys/fs/cgroup/memory/memory.memsw.limit_in_bytes)
  [ ${#t} -ge 19 ] && t=max
fi
echo "$m $t"
"""


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--memory", "64m"], "67108864 134217728"),  # docker's default: swap as much again
        (["--memory", "64m", "--memory-swap", "100m"], "67108864 104857600"),
        (["--memory", "64m", "--memory-swap", "-1"], "67108864 max"),
    ],
)
def test_memory_and_swap_limits_as_podman_with_runc_sets_them(
    root: Path, podman: list[str], flags: list[str], expected: str
) -> None:
    """``--memory`` alone lets the container use as much swap again (memory+swap twice the
    limit, docker-run(1)); ``--memory-swap`` sets the total, -1 lifts it (breaker4: swap was
    left unlimited)."""
    theirs = subprocess.run(
        [*podman, "run", "--rm", "--net", "none", *flags, IMAGE, "sh", "-c", MEMORY_PROBE],
        capture_output=True,
        text=True,
    )
    assert (theirs.returncode, theirs.stdout) == (0, expected + "\n"), theirs.stderr
    ours = run(root, "run", *flags, "default", "sh", "-c", MEMORY_PROBE)
    assert (ours.returncode, ours.stdout) == (0, expected + "\n"), ours.stderr


#: Alternating lines on stdout and stderr, then what the two fds are.
INTERLEAVED = (
    "i=0; while [ $i -lt 50 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done; "
    '[ "$(readlink /proc/$$/fd/1)" = "$(readlink /proc/$$/fd/2)" ] && echo one-pipe '
    "|| echo two-pipes"
)


def test_stdout_and_stderr_into_one_file_keep_their_order(root: Path, tmp_path: Path) -> None:
    """``run ... >log 2>&1``: under runc the process inherits the caller's one open file as
    fds 1 and 2, so its lines land in the order written. Here it gets one pipe for both
    (they came over two streams, in whatever order the relay read them); with stdout and
    stderr apart, two pipes and two streams as before."""
    expected = [f"{kind}{i}" for i in range(50) for kind in ("out", "err")]
    log = tmp_path / "log"
    probe = ["sh", "-c", INTERLEAVED]
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "sandbox", "--root", str(root), "run", "default", *probe],
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=300,
            cwd=REPO,
        )
    assert done.returncode == 0
    assert log.read_text().splitlines() == [*expected, "one-pipe"]
    apart = run(root, "run", "default", "sh", "-c", INTERLEAVED)
    assert apart.returncode == 0, apart.stderr
    assert apart.stdout.splitlines() == [f"out{i}" for i in range(50)] + ["two-pipes"]
    assert apart.stderr.splitlines() == [f"err{i}" for i in range(50)]


def test_ulimits_as_podman_with_runc_sets_them(root: Path, podman: list[str]) -> None:
    """``--ulimit NAME=SOFT[:HARD]`` as docker and podman take it (-1 unlimited); without one
    the fd limit is docker's (>= 25) 1024 soft, 524288 hard, so a program may raise its own
    (the hard limit was 1024: Go, Java, nginx stopped there; breaker5)."""
    probe = ["sh", "-c", 'echo "$(ulimit -Sn):$(ulimit -Hn) $(ulimit -Sc):$(ulimit -Hc)"']
    flags = ["--ulimit", "nofile=100:200", "--ulimit", "core=-1"]
    # A --ulimit replaces containers.conf's defaults: podman's own NPROC is above this
    # host's hard limit, which runc may not raise.
    settable = ["--ulimit", "nproc=1024:1024"]
    theirs = subprocess.run(
        [*podman, "run", "--rm", "--net", "none", *settable, *flags, IMAGE, *probe],
        capture_output=True,
        text=True,
    )
    assert (theirs.returncode, theirs.stdout) == (0, "100:200 unlimited:unlimited\n"), theirs.stderr
    ours = run(root, "run", *flags, "default", *probe)
    assert (ours.returncode, ours.stdout) == (0, theirs.stdout), ours.stderr
    default = run(root, "run", "-u", "1000", "default", "sh", "-c", "ulimit -n 4096 && ulimit -n")
    assert (default.returncode, default.stdout) == (0, "4096\n"), default.stderr
