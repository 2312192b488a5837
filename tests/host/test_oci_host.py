"""Real containers on this host: ``agent.oci.init`` / ``agent.oci.exec`` driven like the agent.

Each test builds an OCI spec around a busybox-static rootfs, spawns the runtime with the spec
on a memfd and a socketpair for the sync protocol (exactly what agent/containers.py does),
reads ``ready <pid>``, sends ``start`` and waits for the container's process, which this test
process inherits as a child subreaper (the agent inherits it as PID 1). The checks run inside
the container (``id``, /proc/self/status, ``ulimit``...).

Needs root (namespaces, mounts) and /bin/busybox (Debian's busybox-static): without them
every test fails, naming the fix (a test that could not run has not passed). cgroup checks
need a cgroup2 hierarchy: on a hybrid host /sys/fs/cgroup/unified serves for joining, limits
need controllers there and are skipped otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ocispec.syscall_table import table
from tests.processes import wait_until

REPO = Path(__file__).resolve().parents[2]
BUSYBOX = Path("/bin/busybox")
# The guest runs Debian's python3.11 with the stdlib only: use the same here when present.
PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
PR_SET_CHILD_SUBREAPER = 36
CGROUP2_SUPER_MAGIC = 0x63677270


DEFAULT_CAPS = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]


@pytest.fixture(scope="module", autouse=True)
def host_requirements() -> None:
    if os.geteuid() != 0:
        pytest.fail("real containers need root (namespaces, mounts): run as root, as CI does")
    if not BUSYBOX.exists():
        pytest.fail("needs /bin/busybox: run 'make deps' (apt package busybox-static)")


@pytest.fixture(scope="module", autouse=True)
def subreaper(host_requirements: None) -> Iterator[None]:
    """Become a subreaper, as the agent is PID 1: the runtime's child is reparented to us.

    Only for this module: later tests' orphans (QEMU of a finished CLI) must go to init,
    which reaps them, not to pytest, which would leave them as zombies.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox rootfs: /bin/busybox plus one symlink per applet, passwd and group."""
    root = tmp_path_factory.mktemp("oci") / "rootfs"
    for sub in ("bin", "etc", "proc", "sys", "dev", "tmp", "root", "home/user", "data"):
        (root / sub).mkdir(parents=True)
    (root / "bin" / "busybox").write_bytes(BUSYBOX.read_bytes())
    (root / "bin" / "busybox").chmod(0o755)
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True)
    for applet in applets.stdout.split():
        link = root / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\nuser:x:1000:\nten:x:10:\ntwenty:x:20:\n")
    (root / "data" / "file").write_text("not executable\n")
    return root


def make_spec(rootfs: Path, args: list[str], **process: Any) -> dict[str, Any]:
    """runc's default spec (``runc spec``), with a tmpfs /tmp."""
    proc: dict[str, Any] = {
        "terminal": False,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/usr/local/bin:/usr/bin:/bin", "TERM=xterm"],
        "cwd": "/",
        "capabilities": {
            name: list(DEFAULT_CAPS) for name in ("bounding", "effective", "permitted")
        },
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": True,
    }
    proc.update(process)
    return {
        "ociVersion": "1.0.2",
        "process": proc,
        "root": {"path": str(rootfs), "readonly": False},
        "hostname": "box",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            },
            {
                "destination": "/dev/mqueue",
                "type": "mqueue",
                "source": "mqueue",
                "options": ["nosuid", "noexec", "nodev"],
            },
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            },
            {
                "destination": "/sys/fs/cgroup",
                "type": "cgroup",
                "source": "cgroup",
                "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
            },
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
        ],
        "linux": {
            "namespaces": [
                {"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "cgroup")
            ],
            "maskedPaths": [
                "/proc/acpi",
                "/proc/kcore",
                "/proc/keys",
                "/proc/timer_list",
                "/sys/firmware",
            ],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys"],
        },
    }


class Result:
    def __init__(self, status: int, stdout: str, stderr: str) -> None:
        self.status = status
        self.stdout = stdout
        self.stderr = stderr

    @property
    def code(self) -> int | None:
        return os.WEXITSTATUS(self.status) if os.WIFEXITED(self.status) else None

    @property
    def signal(self) -> int | None:
        return os.WTERMSIG(self.status) if os.WIFSIGNALED(self.status) else None

    def __repr__(self) -> str:
        return (
            f"Result(code={self.code}, signal={self.signal}, "
            f"out={self.stdout!r}, err={self.stderr!r})"
        )


class Runtime:
    """One run of agent.oci.init or agent.oci.exec, spawned the way the agent spawns it."""

    def __init__(self, module: str, payload: dict[str, Any], args: list[str]) -> None:
        self.pid = 0
        self.reply = ""
        payload_fd = os.memfd_create("oci-spec", os.MFD_CLOEXEC)
        os.write(payload_fd, json.dumps(payload).encode())
        os.lseek(payload_fd, 0, os.SEEK_SET)
        args = [str(payload_fd) if arg == "{payload}" else arg for arg in args]
        self._early = b""  # stdout read by read_until before the program exited
        self.control, theirs = socket.socketpair()
        terminal = bool(payload.get("terminal") or payload.get("process", {}).get("terminal"))
        self.master: int | None = None
        if terminal:
            # The runtime allocates the pty in the container (its devpts, as runc does) and
            # sends the master with its ready line; until then its stdio is /dev/null.
            null = os.open(os.devnull, os.O_RDWR)
            stdio = (null, null, null)
            child_ends = [null]
        else:
            in_r, self.stdin = os.pipe()
            self.stdout, out_w = os.pipe()
            self.stderr, err_w = os.pipe()
            stdio = (in_r, out_w, err_w)
            child_ends = [in_r, out_w, err_w]
        self.proc = subprocess.Popen(
            [PYTHON, "-m", module, *args, "--sync-fd", str(theirs.fileno())],
            pass_fds=(payload_fd, theirs.fileno()),
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO)},
            cwd="/",
            stdin=stdio[0],
            stdout=stdio[1],
            stderr=stdio[2],
        )
        for fd in (*child_ends, payload_fd):
            os.close(fd)
        theirs.close()
        self.control.settimeout(30)
        line = b""
        with contextlib.suppress(OSError):
            while not line.endswith(b"\n"):
                chunk, fds, _flags, _addr = socket.recv_fds(self.control, 4096, 1)
                for fd in fds:  # the terminal's master, attached to ``ready``
                    self.master = fd
                if not chunk:
                    break
                line += chunk
        self.reply = line.decode().strip()
        self.runtime_status = self.proc.wait(timeout=30)
        if self.reply.startswith("ready "):
            self.pid = int(self.reply.split()[1])

    def start(self) -> None:
        self.control.sendall(b"start\n")
        self.control.close()

    def read_until(self, marker: bytes, timeout: float = 30) -> None:
        """Read the program's stdout (a pipe) until it has printed ``marker``; what was read
        stays part of :meth:`wait`'s result. AssertionError on EOF or timeout."""
        deadline = time.monotonic() + timeout
        while marker not in self._early:
            left = deadline - time.monotonic()
            ready = left > 0 and select.select([self.stdout], [], [], left)[0]
            assert ready, f"no {marker!r} within {timeout}s: {self._early!r}"
            chunk = os.read(self.stdout, 65536)
            assert chunk, f"EOF before {marker!r}: {self._early!r}"
            self._early += chunk

    def wait(self, timeout: float = 30) -> Result:
        assert self.pid, f"runtime did not report ready: {self.reply!r}"
        deadline = time.monotonic() + timeout
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                raise AssertionError("container did not exit in time")
            time.sleep(0.01)
        return Result(status, *self._output())

    def _output(self) -> tuple[str, str]:
        if self.master is not None:
            data = b""
            with contextlib.suppress(OSError):
                os.set_blocking(self.master, False)
                while chunk := os.read(self.master, 65536):
                    data += chunk
            os.close(self.master)
            return data.decode(errors="replace"), ""
        os.close(self.stdin)
        out = _drain(self.stdout, self._early)
        err = _drain(self.stderr)
        return out, err

    def close(self) -> None:
        """Kill and reap whatever is left (idempotent)."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self.pid = 0
        with contextlib.suppress(OSError):
            self.control.close()


def _drain(fd: int, data: bytes = b"") -> str:
    while chunk := os.read(fd, 65536):
        data += chunk
    os.close(fd)
    return data.decode(errors="replace")


@pytest.fixture
def runtimes() -> Iterator[list[Runtime]]:
    """Every runtime a test creates is killed and reaped at teardown."""
    made: list[Runtime] = []
    yield made
    for runtime in made:
        runtime.close()


def create(runtimes: list[Runtime], spec: dict[str, Any], cgroup: str | None = None) -> Runtime:
    """Spawn agent.oci.init for ``spec`` and wait for its report."""
    extra = ["--cgroup", cgroup] if cgroup else []
    return _spawn(runtimes, "agent.oci.init", spec, ["--bundle-fd", "{payload}", *extra])


def _spawn(
    runtimes: list[Runtime], module: str, payload: dict[str, Any], args: list[str]
) -> Runtime:
    """``{payload}`` in ``args`` becomes the number of the memfd holding ``payload``."""
    runtime = Runtime(module, payload, args)
    runtimes.append(runtime)
    return runtime


def run(runtimes: list[Runtime], spec: dict[str, Any], cgroup: str | None = None) -> Result:
    """Create, start and wait; assert it got to ready."""
    runtime = create(runtimes, spec, cgroup)
    assert runtime.reply.startswith("ready "), runtime.reply
    assert runtime.runtime_status == 0
    runtime.start()
    return runtime.wait()


def sh(rootfs: Path, script: str, **process: Any) -> dict[str, Any]:
    return make_spec(rootfs, ["sh", "-c", script], **process)


# -- basics ---------------------------------------------------------------------------------


def test_runs_the_program_with_its_output_and_exit_code(
    rootfs: Path, runtimes: list[Runtime]
) -> None:
    result = run(runtimes, sh(rootfs, "echo hello; echo oops >&2; exit 3"))
    assert result.code == 3
    assert result.stdout == "hello\n"
    assert result.stderr == "oops\n"


def test_ready_pid_is_the_program_and_it_is_pid_1_inside(
    rootfs: Path, runtimes: list[Runtime]
) -> None:
    runtime = create(runtimes, sh(rootfs, "echo $$; cat /proc/1/cmdline | tr '\\0' ' '"))
    with open(f"/proc/{runtime.pid}/status", encoding="ascii") as status:
        nspid = next(line for line in status if line.startswith("NSpid:")).split()[1:]
    assert nspid == [str(runtime.pid), "1"]
    runtime.start()
    result = runtime.wait()
    assert result.stdout.split("\n")[:2] == [
        "1",
        "sh -c echo $$; cat /proc/1/cmdline | tr '\\0' ' ' ",
    ]


def test_kill_9_from_outside_is_seen_as_signal_9(rootfs: Path, runtimes: list[Runtime]) -> None:
    runtime = create(runtimes, make_spec(rootfs, ["sleep", "100"]))
    runtime.start()
    cmdline = Path(f"/proc/{runtime.pid}/cmdline")
    assert wait_until(lambda: cmdline.read_bytes() == b"sleep\x00100\x00", 10)  # the program
    os.kill(runtime.pid, signal.SIGKILL)
    result = runtime.wait()
    assert result.signal == signal.SIGKILL


def test_signal_with_a_handler_reaches_the_program(rootfs: Path, runtimes: list[Runtime]) -> None:
    script = "trap 'echo got-term; exit 7' TERM; echo armed; while :; do sleep 0.05; done"
    runtime = create(runtimes, sh(rootfs, script))
    runtime.start()
    runtime.read_until(b"armed\n")  # the trap is set
    os.kill(runtime.pid, signal.SIGTERM)
    result = runtime.wait()
    assert result.code == 7
    assert result.stdout == "armed\ngot-term\n"


def test_env_home_cwd_and_hostname(rootfs: Path, runtimes: list[Runtime]) -> None:
    spec = sh(
        rootfs, 'echo "$A|$HOME|$PATH"; pwd; hostname', env=["A=b c", "PATH=/bin"], cwd="/tmp"
    )
    result = run(runtimes, spec)
    assert result.stdout == "b c|/root|/bin\n/tmp\nbox\n"


def test_user_groups_and_umask(rootfs: Path, runtimes: list[Runtime]) -> None:
    user = {"uid": 1000, "gid": 1000, "additionalGids": [10, 20], "umask": 0o077}
    result = run(runtimes, sh(rootfs, "id -u; id -g; id -G; umask; echo $HOME", user=user))
    lines = result.stdout.split("\n")
    assert lines[0] == "1000"
    assert lines[1] == "1000"
    assert set(lines[2].split()) == {"1000", "10", "20"}
    assert lines[3] == "0077"
    assert lines[4] == "/home/user"


def test_rlimits(rootfs: Path, runtimes: list[Runtime]) -> None:
    rlimits = [{"type": "RLIMIT_NOFILE", "soft": 100, "hard": 200}]
    result = run(runtimes, sh(rootfs, "ulimit -n; ulimit -Hn", rlimits=rlimits))
    assert result.stdout == "100\n200\n"


# -- capabilities and seccomp -------------------------------------------------------------


def _status(text: str) -> dict[str, str]:
    return {
        key: value.strip()
        for key, _, value in (line.partition(":") for line in text.splitlines())
        if value
    }


def test_capabilities_of_root(rootfs: Path, runtimes: list[Runtime]) -> None:
    result = run(runtimes, make_spec(rootfs, ["cat", "/proc/self/status"]))
    status = _status(result.stdout)
    # CAP_KILL (5) | CAP_NET_BIND_SERVICE (10) | CAP_AUDIT_WRITE (29)
    assert status["CapEff"] == "0000000020000420"
    assert status["CapPrm"] == "0000000020000420"
    assert status["CapBnd"] == "0000000020000420"
    assert status["CapInh"] == "0000000000000000"
    assert status["CapAmb"] == "0000000000000000"
    assert status["NoNewPrivs"] == "1"


def test_ambient_capabilities_of_a_user(rootfs: Path, runtimes: list[Runtime]) -> None:
    caps = {
        name: ["CAP_NET_BIND_SERVICE"]
        for name in ("bounding", "effective", "permitted", "inheritable", "ambient")
    }
    spec = make_spec(
        rootfs,
        ["cat", "/proc/self/status"],
        user={"uid": 1000, "gid": 1000},
        capabilities=caps,
        noNewPrivileges=False,
    )
    status = _status(run(runtimes, spec).stdout)
    assert status["Uid"].split() == ["1000"] * 4
    assert status["CapEff"] == "0000000000000400"
    assert status["CapAmb"] == "0000000000000400"
    assert status["CapBnd"] == "0000000000000400"
    assert status["NoNewPrivs"] == "0"


def _deny_mkdir_profile() -> dict[str, Any]:
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
            {
                "names": ["kill"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": 13,
                "args": [{"index": 1, "value": 15, "op": "SCMP_CMP_EQ"}],
            },
        ],
    }


@pytest.mark.parametrize("nnp", [True, False], ids=["nnp", "no-nnp"])
def test_seccomp_denies_what_the_profile_says(
    rootfs: Path, runtimes: list[Runtime], nnp: bool
) -> None:
    script = (
        "grep Seccomp: /proc/self/status; "
        "mkdir /tmp/x 2>&1 || echo mkdir-denied; "
        "kill -0 $$ && echo kill0-ok; "
        "kill -15 $$ 2>&1 || echo term-denied; "
        "touch /tmp/file && echo touch-ok"
    )
    spec = sh(rootfs, script, noNewPrivileges=nnp)
    spec["linux"]["seccomp"] = _deny_mkdir_profile()
    result = run(runtimes, spec)
    out = result.stdout
    assert "Seccomp:\t2" in out
    assert "Operation not permitted" in out and "mkdir-denied" in out
    assert "kill0-ok" in out
    assert "Permission denied" in out and "term-denied" in out
    assert "touch-ok" in out


#: What Docker's default profile denies to a container without CAP_SYS_ADMIN & co (x86_64).
DOCKER_DENIED = frozenset(
    [
        "acct",
        "add_key",
        "bpf",
        "chroot",
        "clock_adjtime",
        "clock_settime",
        "clone",
        "clone3",
        "create_module",
        "delete_module",
        "fanotify_init",
        "finit_module",
        "fsconfig",
        "fsmount",
        "fsopen",
        "fspick",
        "get_kernel_syms",
        "get_mempolicy",
        "init_module",
        "ioperm",
        "iopl",
        "kcmp",
        "kexec_file_load",
        "kexec_load",
        "keyctl",
        "lookup_dcookie",
        "mbind",
        "mount",
        "mount_setattr",
        "move_mount",
        "name_to_handle_at",
        "nfsservctl",
        "open_by_handle_at",
        "open_tree",
        "perf_event_open",
        "personality",
        "pidfd_getfd",
        "pivot_root",
        "process_madvise",
        "process_vm_readv",
        "process_vm_writev",
        "ptrace",
        "query_module",
        "quotactl",
        "quotactl_fd",
        "reboot",
        "request_key",
        "set_mempolicy",
        "setdomainname",
        "sethostname",
        "setns",
        "settimeofday",
        "swapoff",
        "swapon",
        "sysfs",
        "syslog",
        "umount2",
        "unshare",
        "uselib",
        "userfaultfd",
        "ustat",
        "vhangup",
        "vm86",
        "vm86old",
    ]
)


def docker_like_profile() -> dict[str, Any]:
    """The shape of Docker's rendered default profile: deny by default, a large allowlist,
    clone only without namespace flags, clone3 ENOSYS (so libc falls back to clone)."""
    allowed = sorted(set(table("x86_64") or {}) - DOCKER_DENIED)
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": allowed, "action": "SCMP_ACT_ALLOW"},
            *(
                {
                    "names": ["personality"],
                    "action": "SCMP_ACT_ALLOW",
                    "args": [{"index": 0, "value": value, "op": "SCMP_CMP_EQ"}],
                }
                for value in (0, 8, 131072, 131080, 4294967295)
            ),
            {
                "names": ["clone"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": 2114060288, "op": "SCMP_CMP_MASKED_EQ"}],
            },
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
        ],
    }


@pytest.mark.parametrize("nnp", [True, False], ids=["nnp", "no-nnp"])
def test_docker_like_default_profile(rootfs: Path, runtimes: list[Runtime], nnp: bool) -> None:
    script = (
        "echo start; (echo in-a-fork); "
        "mount -t tmpfs none /tmp 2>/dev/null || echo mount-denied; "
        "unshare -n true 2>/dev/null || echo unshare-denied; "
        "hostname other 2>/dev/null || echo hostname-denied; "
        "grep Seccomp: /proc/self/status"
    )
    spec = sh(rootfs, script, noNewPrivileges=nnp)
    spec["linux"]["seccomp"] = docker_like_profile()
    result = run(runtimes, spec)
    assert result.code == 0, result
    assert result.stdout.split("\n") == [
        "start",
        "in-a-fork",
        "mount-denied",
        "unshare-denied",
        "hostname-denied",
        "Seccomp:\t2",
        "",
    ]


def test_seccomp_unknown_action_is_a_create_error(rootfs: Path, runtimes: list[Runtime]) -> None:
    spec = make_spec(rootfs, ["true"])
    spec["linux"]["seccomp"] = {"defaultAction": "SCMP_ACT_BOGUS"}
    runtime = create(runtimes, spec)
    assert (
        runtime.reply
        == 'error INVALID_SPEC linux.seccomp.defaultAction: unknown action "SCMP_ACT_BOGUS"'
    )
    assert runtime.runtime_status == 1


# -- file system ---------------------------------------------------------------------------


def test_masked_and_readonly_paths(rootfs: Path, runtimes: list[Runtime]) -> None:
    script = (
        "wc -c < /proc/keys; "
        "ls -A /sys/firmware | wc -l; "
        "touch /sys/firmware/x 2>/dev/null || echo firmware-ro; "
        "echo 1 > /proc/sys/kernel/ns_last_pid 2>/dev/null || echo sys-ro"
    )
    result = run(runtimes, sh(rootfs, script))
    assert result.stdout.split() == ["0", "0", "firmware-ro", "sys-ro"]


def test_readonly_root(rootfs: Path, runtimes: list[Runtime]) -> None:
    spec = sh(rootfs, "touch /x 2>&1 || echo root-ro; touch /tmp/y && echo tmp-rw")
    spec["root"]["readonly"] = True
    result = run(runtimes, spec)
    assert "Read-only file system" in result.stdout
    assert result.stdout.endswith("root-ro\ntmp-rw\n")


def test_devices_and_dev_links(rootfs: Path, runtimes: list[Runtime]) -> None:
    script = (
        "ls -l /dev/null /dev/zero /dev/full /dev/random /dev/urandom /dev/tty "
        "| awk '{print $1, $5 $6, $NF}'; "
        "for l in /dev/ptmx /dev/fd /dev/stdin; do readlink $l; done; "
        "head -c 4 /dev/zero | wc -c; echo x > /dev/null && echo null-ok"
    )
    result = run(runtimes, sh(rootfs, script))
    lines = result.stdout.splitlines()
    assert lines[:6] == [
        "crw-rw-rw- 1,7 /dev/full",
        "crw-rw-rw- 1,3 /dev/null",
        "crw-rw-rw- 1,8 /dev/random",
        "crw-rw-rw- 5,0 /dev/tty",
        "crw-rw-rw- 1,9 /dev/urandom",
        "crw-rw-rw- 1,5 /dev/zero",
    ]
    assert lines[6:] == ["pts/ptmx", "/proc/self/fd", "/proc/self/fd/0", "4", "null-ok"]


def test_bind_mounts_with_options(rootfs: Path, runtimes: list[Runtime], tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "in").write_text("from host\n")
    spec = sh(
        rootfs,
        "cat /mnt/ro/in; touch /mnt/ro/new 2>/dev/null || echo ro-ok; "
        "echo out > /mnt/rw/out && echo rw-ok; grep /mnt/ro /proc/mounts | cut -d' ' -f4",
    )
    spec["mounts"] += [
        {
            "destination": "/mnt/ro",
            "type": "bind",
            "source": str(shared),
            "options": ["rbind", "ro", "nosuid", "nodev"],
        },
        {
            "destination": "/mnt/rw",
            "type": "none",
            "source": str(shared),
            "options": ["bind", "rprivate"],
        },
    ]
    result = run(runtimes, spec)
    lines = result.stdout.splitlines()
    assert lines[:3] == ["from host", "ro-ok", "rw-ok"]
    assert set(lines[3].split(",")) >= {"ro", "nosuid", "nodev"}
    assert (shared / "out").read_text() == "out\n"
    assert not (shared / "new").exists()
    # Nothing of the container is left mounted in our (the agent's) namespace.
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        assert str(rootfs) not in mountinfo.read()


def test_sysctl_in_the_network_namespace(rootfs: Path, runtimes: list[Runtime]) -> None:
    spec = make_spec(rootfs, ["cat", "/proc/sys/net/ipv4/ip_forward"])
    spec["linux"]["sysctl"] = {"net.ipv4.ip_forward": "1"}
    assert run(runtimes, spec).stdout == "1\n"


def test_terminal_is_the_controlling_tty(rootfs: Path, runtimes: list[Runtime]) -> None:
    script = "test -t 0 && echo isatty; awk '{print \"tty_nr=\" ($7 != 0)}' /proc/self/stat"
    result = run(runtimes, sh(rootfs, script, terminal=True))
    assert "isatty" in result.stdout
    assert "tty_nr=1" in result.stdout


# -- protocol ------------------------------------------------------------------------------


def test_not_found_is_a_create_error_with_127(rootfs: Path, runtimes: list[Runtime]) -> None:
    runtime = create(runtimes, make_spec(rootfs, ["nope"]))
    assert runtime.reply == (
        'error EXECUTABLE_NOT_FOUND exec: "nope": executable file not found in $PATH'
    )
    assert runtime.runtime_status == 127


def test_not_executable_is_a_create_error_with_126(rootfs: Path, runtimes: list[Runtime]) -> None:
    runtime = create(runtimes, make_spec(rootfs, ["/data/file"]))
    assert runtime.reply == 'error NOT_EXECUTABLE exec: "/data/file": permission denied'
    assert runtime.runtime_status == 126


def test_a_script_whose_interpreter_is_missing_fails_at_execve_with_127(
    rootfs: Path, runtimes: list[Runtime]
) -> None:
    """The file exists and is executable, so create finds it; execve then fails (ENOENT for
    the ``#!`` interpreter): status 127 and one line naming the program, as runc's ``exec
    /x: no such file or directory``."""
    name = f"interp-{uuid.uuid4().hex[:8]}"
    script = rootfs / "data" / name
    script.write_text("#!/nonexistent/interpreter\necho never\n")
    script.chmod(0o755)
    try:
        result = run(runtimes, make_spec(rootfs, [f"/data/{name}"]))
        assert (result.code, result.stdout) == (127, "")
        assert result.stderr == f"pysandbox: exec /data/{name}: No such file or directory\n"
    finally:
        script.unlink()


def test_bad_spec_fails_before_anything(rootfs: Path, runtimes: list[Runtime]) -> None:
    spec = make_spec(rootfs, ["true"])
    spec["linux"]["namespaces"].append({"type": "bogus"})
    runtime = create(runtimes, spec)
    assert (
        runtime.reply
        == 'error INVALID_SPEC linux.namespaces[6].type: unknown namespace type "bogus"'
    )
    assert runtime.runtime_status == 1


def test_a_missing_cwd_is_made_as_runc_does(rootfs: Path, runtimes: list[Runtime]) -> None:
    """runc makes a missing process.cwd (mkdir -p, root's, 0755) inside the container, for
    another user and on a read-only root too (``docker run -w /new``); a cwd that cannot be
    a directory still fails create, with the chdir reason."""
    top = f"made-{uuid.uuid4().hex[:8]}"
    spec = sh(rootfs, "pwd; stat -c '%u:%g %a' . ..", cwd=f"/{top}/sub")
    spec["process"]["user"] = {"uid": 1000, "gid": 1000}
    spec["root"]["readonly"] = True
    try:
        result = run(runtimes, spec)
        assert (result.code, result.stdout) == (0, f"/{top}/sub\n0:0 755\n0:0 755\n")
    finally:
        shutil.rmtree(rootfs / top, ignore_errors=True)
    runtime = create(runtimes, make_spec(rootfs, ["true"], cwd="/etc/passwd/x"))
    assert runtime.reply.startswith(
        "error SETUP_FAILED chdir to cwd (/etc/passwd/x) set in config.json"
    )
    assert runtime.runtime_status == 1


def test_eof_instead_of_start_runs_nothing(
    rootfs: Path, runtimes: list[Runtime], tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    spec = sh(rootfs, "touch /host/ran")
    spec["mounts"].append(
        {"destination": "/host", "type": "bind", "source": str(tmp_path), "options": ["rbind"]}
    )
    runtime = create(runtimes, spec)
    assert runtime.reply.startswith("ready ")
    runtime.control.close()
    result = runtime.wait()
    assert result.code == 1
    assert not marker.exists()


# -- exec ----------------------------------------------------------------------------------


def test_exec_joins_the_running_container(rootfs: Path, runtimes: list[Runtime]) -> None:
    init = create(runtimes, sh(rootfs, "echo started; sleep 100"))
    init.start()
    process = make_spec(
        rootfs,
        [
            "sh",
            "-c",
            "hostname; id -u; echo $$; cat /proc/1/cmdline | tr '\\0' ' '; echo; pwd; ulimit -n",
        ],
        user={"uid": 1000, "gid": 1000},
        cwd="/tmp",
        rlimits=[{"type": "RLIMIT_NOFILE", "soft": 64, "hard": 64}],
    )["process"]
    exec_rt = _spawn(
        runtimes,
        "agent.oci.exec",
        process,
        ["--target-pid", str(init.pid), "--process-fd", "{payload}"],
    )
    assert exec_rt.reply.startswith("ready "), exec_rt.reply
    exec_rt.start()
    result = exec_rt.wait()
    lines = result.stdout.splitlines()
    assert lines[0] == "box"
    assert lines[1] == "1000"
    assert int(lines[2]) > 1  # a pid in the container's namespace, not ours
    assert int(lines[2]) != exec_rt.pid
    assert lines[3] == "sleep 100 "  # busybox sh execs its last command
    assert lines[4:] == ["/tmp", "64"]
    assert result.code == 0
    os.kill(init.pid, signal.SIGKILL)
    assert init.wait().signal == signal.SIGKILL


def test_exec_with_seccomp_and_a_missing_program(rootfs: Path, runtimes: list[Runtime]) -> None:
    init = create(runtimes, make_spec(rootfs, ["sleep", "100"]))
    init.start()
    process = make_spec(rootfs, ["sh", "-c", "mkdir /tmp/d 2>&1; true"])["process"]
    process["seccomp"] = _deny_mkdir_profile()
    exec_rt = _spawn(
        runtimes,
        "agent.oci.exec",
        process,
        ["--target-pid", str(init.pid), "--process-fd", "{payload}"],
    )
    exec_rt.start()
    assert "Operation not permitted" in exec_rt.wait().stdout
    missing = copy.deepcopy(process)
    missing["args"] = ["nope"]
    failed = _spawn(
        runtimes,
        "agent.oci.exec",
        missing,
        ["--target-pid", str(init.pid), "--process-fd", "{payload}"],
    )
    assert failed.reply == (
        'error EXECUTABLE_NOT_FOUND exec: "nope": executable file not found in $PATH'
    )
    assert failed.runtime_status == 127


# -- user namespace and cgroups --------------------------------------------------------------


@pytest.fixture
def userns_rootfs(rootfs: Path) -> Iterator[Path]:
    """A copy of the rootfs on a path the namespace's root (host uid 100000) can traverse."""
    base = Path(tempfile.mkdtemp(prefix="pysandbox-userns-", dir="/tmp"))
    base.chmod(0o755)
    copy_root = base / "rootfs"
    shutil.copytree(rootfs, copy_root, symlinks=True)
    yield copy_root
    shutil.rmtree(base, ignore_errors=True)


def test_user_namespace_maps_root(userns_rootfs: Path, runtimes: list[Runtime]) -> None:
    rootfs = userns_rootfs
    spec = sh(rootfs, "id -u; cat /proc/self/uid_map; cat /proc/self/gid_map; ls -ln /bin/busybox")
    spec["linux"]["namespaces"].append({"type": "user"})
    spec["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    spec["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    # sysfs needs a network namespace owned by the user namespace; ours is, so keep it.
    result = run(runtimes, spec)
    lines = [" ".join(line.split()) for line in result.stdout.splitlines()]
    assert lines[0] == "0"
    assert lines[1] == "0 100000 65536"
    assert lines[2] == "0 100000 65536"
    # Files owned by the host's root are unmapped in the container: the overflow id.
    assert lines[3].split()[2:4] == ["65534", "65534"]


def _cgroup2_root() -> Path | None:
    for candidate in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        buf = ctypes.create_string_buffer(256)
        libc = ctypes.CDLL(None, use_errno=True)
        found = libc.statfs(str(candidate).encode(), buf) == 0
        if found and ctypes.c_long.from_buffer(buf).value == CGROUP2_SUPER_MAGIC:
            return candidate
    return None


@pytest.fixture
def cgroup_dir() -> Iterator[Path]:
    root = _cgroup2_root()
    if root is None:
        pytest.skip("no cgroup2 hierarchy on this host")
    path = root / "pysandbox-test" / uuid.uuid4().hex[:12]
    yield path
    for directory in (path, path.parent):
        with contextlib.suppress(OSError):
            directory.rmdir()


def test_cgroup_is_created_and_joined(
    rootfs: Path, runtimes: list[Runtime], cgroup_dir: Path
) -> None:
    runtime = create(runtimes, sh(rootfs, "cat /proc/self/cgroup"), cgroup=str(cgroup_dir))
    assert runtime.reply.startswith("ready "), runtime.reply
    assert str(runtime.pid) in (cgroup_dir / "cgroup.procs").read_text().split()
    runtime.start()
    result = runtime.wait()
    # The cgroup namespace was unshared after joining: the container sees itself at the root.
    assert "0::/\n" in result.stdout


#: Opens the node it made of /dev/loop-control (10:237, on every host with the loop driver),
#: then runc's default devices. busybox sh reports a failed redirection on stderr.
DEVICE_SCRIPT = (
    "mknod /tmp/lc c 10 237 && echo made; (: < /tmp/lc) && echo opened; "
    "echo x > /dev/null && head -c 3 /dev/zero | wc -c && head -c 3 /dev/urandom | wc -c"
)


def test_device_cgroup_denies_opening_a_made_node_unless_a_rule_allows_it(
    rootfs: Path, cgroup_dir: Path, runtimes: list[Runtime]
) -> None:
    """The device filter (BPF on cgroup2, loaded and attached by the runtime on this host's
    kernel): with CAP_MKNOD a container makes a node of a host device but cannot open it
    (EPERM, as under runc), nor can an exec joining its cgroup; runc's default devices
    work; a spec rule allowing the device opens it; a privileged spec (allow all) too."""
    caps = [*DEFAULT_CAPS, "CAP_MKNOD"]
    process = {"capabilities": {k: caps for k in ("bounding", "effective", "permitted")}}
    spec = sh(rootfs, f"{DEVICE_SCRIPT}; echo end; sleep 100", **process)
    spec["linux"]["resources"] = {"devices": [{"allow": False, "access": "rwm"}]}
    init = create(runtimes, spec, cgroup=str(cgroup_dir))
    assert init.reply.startswith("ready "), init.reply
    init.start()
    init.read_until(b"end\n")
    exec_process = make_spec(rootfs, ["sh", "-c", "(: < /tmp/lc) && echo opened"], **process)
    exec_rt = _spawn(
        runtimes,
        "agent.oci.exec",
        exec_process["process"],
        ["--target-pid", str(init.pid), "--process-fd", "{payload}", "--cgroup", str(cgroup_dir)],
    )
    assert exec_rt.reply.startswith("ready "), exec_rt.reply
    exec_rt.start()
    denied = exec_rt.wait()
    assert (denied.code, denied.stdout) == (1, ""), denied
    assert "Operation not permitted" in denied.stderr, denied
    os.kill(init.pid, signal.SIGKILL)
    first = init.wait()
    assert first.stdout.splitlines() == ["made", "3", "3", "end"], first
    assert "Operation not permitted" in first.stderr, first

    allow_one = {"allow": True, "type": "c", "major": 10, "minor": 237, "access": "r"}
    for i, rules in enumerate(
        ([{"allow": False, "access": "rwm"}, allow_one], [{"allow": True, "access": "rwm"}])
    ):
        spec = sh(rootfs, DEVICE_SCRIPT, **process)
        spec["linux"]["resources"] = {"devices": rules}
        other = cgroup_dir.parent / f"{cgroup_dir.name}-{i}"
        try:
            allowed = run(runtimes, spec, cgroup=str(other))
        finally:
            with contextlib.suppress(OSError):
                other.rmdir()
        assert allowed.stdout.splitlines() == ["made", "opened", "3", "3"], (rules, allowed)


# cgroup limits need cgroup v2 controllers, which these hosts lack: they are tested in the
# VM (tests/integration/test_containers.py::test_cgroup_limits_written).


def test_exec_into_a_user_namespace_container(userns_rootfs: Path, runtimes: list[Runtime]) -> None:
    spec = make_spec(userns_rootfs, ["sleep", "100"])
    spec["linux"]["namespaces"].append({"type": "user"})
    spec["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    spec["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    init = create(runtimes, spec)
    assert init.reply.startswith("ready "), init.reply
    init.start()
    process = make_spec(
        userns_rootfs,
        ["sh", "-c", "id -u; cat /proc/self/uid_map"],
        user={"uid": 1000, "gid": 1000},
    )["process"]
    exec_rt = _spawn(
        runtimes,
        "agent.oci.exec",
        process,
        ["--target-pid", str(init.pid), "--process-fd", "{payload}"],
    )
    assert exec_rt.reply.startswith("ready "), exec_rt.reply
    exec_rt.start()
    lines = [" ".join(line.split()) for line in exec_rt.wait().stdout.splitlines()]
    assert lines == ["1000", "0 100000 65536"]


# -- startContainer hooks ----------------------------------------------------------------------

#: What a startContainer hook sees, one line: its argv[0] and argument, environment, cwd, user
#: and the state on its stdin (busybox runs the applet named by argv[0]: "sh" only if args[0]
#: really is argv[0]).
HOOK_SCRIPT = (
    'read -r state; echo "$0 $1 foo=${FOO-unset} home=${HOME-unset} path=${PATH-unset}'
    ' cwd=$(pwd) uid=$(id -u) $state" >> /tmp/hooks.out'
)


def _start_hooks(with_state: bool, bundle: Path) -> dict[str, Any]:
    hooks: list[dict[str, Any]] = [
        {"path": "/bin/busybox", "args": ["sh", "-c", HOOK_SCRIPT, "first", "a"]},
        {
            "path": "/bin/busybox",
            "args": ["sh", "-c", HOOK_SCRIPT, "second", "b"],
            "env": ["FOO=1"],
        },
    ]
    extra: dict[str, Any] = {"hooks": {"startContainer": hooks}}
    if with_state:
        for hook in hooks:
            hook["timeout"] = 30
        extra["pysandbox.hookState"] = {
            "ociVersion": "1.0.2",
            "id": "hooked",
            "bundle": str(bundle),
            "annotations": {"org.example/k": "v"},
        }
    return extra


def _hook_lines(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(the line before the state, the state without ociVersion) per line."""
    found = []
    for line in text.splitlines():
        head, _, state = line.partition(" {")
        doc = json.loads("{" + state)
        doc.pop("ociVersion")
        found.append((head, doc))
    return found


def test_start_container_hooks_see_what_they_see_under_runc(
    rootfs: Path, runtimes: list[Runtime], tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    spec = sh(rootfs, "cat /tmp/hooks.out; echo program", cwd="/root")
    spec["annotations"] = {"org.example/k": "v"}
    result = run(runtimes, {**spec, **_start_hooks(True, bundle)})
    assert result.code == 0, result

    (bundle / "config.json").write_text(json.dumps({**spec, **_start_hooks(False, bundle)}))
    runc = subprocess.run(
        ["runc", "--root", str(tmp_path / "runc"), "run", "--bundle", str(bundle), "hooked"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert runc.returncode == 0, runc.stderr
    assert _hook_lines(result.stdout.removesuffix("program\n")) == _hook_lines(
        runc.stdout.removesuffix("program\n")
    )
    # What runc gives, spelt out: in the container's pid namespace (pid 1), in the process's
    # cwd and environment (HOME added) unless the hook has an env of its own.
    lines = _hook_lines(result.stdout.removesuffix("program\n"))
    assert [head for head, _ in lines] == [
        "first a foo=unset home=/root path=/usr/local/bin:/usr/bin:/bin cwd=/root uid=0",
        # PATH: busybox sh's own default, as the hook's environment has none.
        "second b foo=1 home=unset path=/sbin:/usr/sbin:/bin:/usr/bin cwd=/root uid=0",
    ]
    assert lines[0][1] == {
        "id": "hooked",
        "status": "created",
        "pid": 1,
        "bundle": str(bundle),
        "annotations": {"org.example/k": "v"},
    }
    assert result.stdout.endswith("program\n")


def _start_and_reply(runtime: Runtime) -> str:
    """Send ``start`` as the agent does and read what the runtime answers (EOF: "")."""
    runtime.control.sendall(b"start\n")
    runtime.control.settimeout(30)
    data = b""
    while chunk := runtime.control.recv(4096):
        data += chunk
    return data.decode().strip()


@pytest.mark.parametrize(
    ("hook", "reply"),
    [
        (
            {"path": "/bin/sh", "args": ["sh", "-c", "echo out; echo bad >&2; exit 3"]},
            "startContainer hook #1 (/bin/sh) failed: exit status 3, stdout: out, stderr: bad",
        ),
        (
            {"path": "/nope"},
            "startContainer hook #1 (/nope) failed: exit status 127, "
            "stderr: exec /nope: No such file or directory",
        ),
        (
            {"path": "/bin/sleep", "args": ["sleep", "30"], "timeout": 1},
            "startContainer hook #1 (/bin/sleep) ran past its timeout of 1s and was killed",
        ),
    ],
)
def test_failing_start_container_hook_fails_start_and_runs_nothing(
    rootfs: Path, runtimes: list[Runtime], tmp_path: Path, hook: dict[str, Any], reply: str
) -> None:
    spec = sh(rootfs, "touch /host/ran")
    spec["mounts"].append(
        {"destination": "/host", "type": "bind", "source": str(tmp_path), "options": ["rbind"]}
    )
    first = {"path": "/bin/sh", "args": ["sh", "-c", "touch /host/first"], "timeout": 10}
    spec["hooks"] = {"startContainer": [first, {"timeout": 10, **hook}]}
    runtime = create(runtimes, spec)
    assert runtime.reply.startswith("ready "), runtime.reply
    began = time.monotonic()
    assert _start_and_reply(runtime) == f"error HOOK_FAILED {reply}"
    assert time.monotonic() - began < 10
    assert runtime.wait().code == 1
    assert (tmp_path / "first").exists()
    assert not (tmp_path / "ran").exists()


def test_without_hooks_start_answers_eof_at_exec(rootfs: Path, runtimes: list[Runtime]) -> None:
    runtime = create(runtimes, sh(rootfs, "echo ran"))
    assert runtime.reply.startswith("ready "), runtime.reply
    assert _start_and_reply(runtime) == ""
    assert runtime.wait().stdout == "ran\n"
