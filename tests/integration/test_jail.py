"""What a guest that took over its QEMU (or virtiofsd) could do on the host, seen from the host.

docs/trust-boundaries.md: QEMU runs jailed (its own uid/gid, no capabilities, no_new_privs,
seccomp, its own namespaces, a root holding only what it needs); virtiofsd in its own
sandbox with a few capabilities and a bounded number of fds. These tests read the running
processes in /proc and, for what the uid could reach, run commands as QEMU's uid/gid with
setpriv (no capabilities, no groups), as code in a compromised QEMU would run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hypervisor import jail_ids
from hypervisor.virtiofsd import DEFAULT_MAX_FDS, fd_limit
from sandbox.pod.lifecycle import Pod
from tests.integration.cli import pysandbox
from tests.integration.pods import PodFactory
from tests.processes import assert_capless, proc_status, processes_mentioning

REPO = Path(__file__).resolve().parents[2]
#: Capabilities virtiofsd keeps in a share without privileged files: CHOWN, DAC_OVERRIDE,
#: FOWNER, SETGID, SETUID (bits 0, 1, 3, 6, 7).
VIRTIOFSD_CAPS = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 6) | (1 << 7)
NAMESPACES = ("mnt", "pid", "ipc", "uts", "net")


def qemu_pid(pod: Pod) -> int:
    handle = pod.process("qemu")
    assert handle is not None and handle.alive()
    return handle.pid


def qemu_ids(pod: Pod) -> tuple[int, int]:
    fields = proc_status(qemu_pid(pod))
    return int(fields["Uid"].split()[0]), int(fields["Gid"].split()[0])


def as_ids(uid: int, gid: int, *argv: str) -> subprocess.CompletedProcess[str]:
    """``argv`` run with QEMU's uid and gid and nothing else (no groups, no capabilities)."""
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={gid}",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture(scope="module")
def other_pod(module_pods: PodFactory) -> Pod:
    """A second pod, whose files and sockets the first pod's QEMU must not reach."""
    return module_pods("jail-other")


def test_qemu_runs_unprivileged(shared_pod: Pod) -> None:
    fields = proc_status(qemu_pid(shared_pod))
    uids, gids = set(fields["Uid"].split()), set(fields["Gid"].split())
    assert len(uids) == 1 and len(gids) == 1, (fields["Uid"], fields["Gid"])
    first, last = jail_ids.settings().ids
    uid, gid = int(uids.pop()), int(gids.pop())
    assert first <= uid <= last and gid == uid
    assert fields["Groups"] == ""
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[caps], 16) == 0, (caps, fields[caps])
    assert fields["NoNewPrivs"] == "1"
    assert fields["Seccomp"] == "2"  # QEMU's -sandbox filter


def test_each_pod_has_its_own_id(shared_pod: Pod, other_pod: Pod) -> None:
    assert qemu_ids(shared_pod) != qemu_ids(other_pod)


def test_qemu_namespaces_are_its_own(shared_pod: Pod) -> None:
    pid = qemu_pid(shared_pod)
    for kind in NAMESPACES:
        assert os.readlink(f"/proc/{pid}/ns/{kind}") != os.readlink(f"/proc/self/ns/{kind}"), kind
    assert proc_status(pid)["NSpid"].split()[-1] == "1"  # the only process of its pid namespace


def root_image(argv: list[str]) -> Path:
    """The guest's root image on QEMU's command line (its virtio-pmem memory backend)."""
    backend = next(arg for arg in argv if arg.startswith("memory-backend-file,"))
    return Path(next(o for o in backend.split(",") if o.startswith("mem-path=")).split("=", 1)[1])


def _listing(root: Path) -> set[str]:
    """Every path below ``root`` (relative), not descending into ``usr``."""
    found = set()
    for directory, dirnames, filenames in os.walk(root):
        rel = Path(directory).relative_to(root)
        for name in dirnames + filenames:
            found.add(str(rel / name) if rel != Path(".") else name)
        if rel == Path("."):
            dirnames[:] = [d for d in dirnames if d != "usr"]
    return found


def test_qemu_root_holds_only_what_it_needs(shared_pod: Pod) -> None:
    """Its root: /usr (its code), four device nodes, the guest image files; nothing else —
    no pod directory, template, /etc, /proc, /tmp. And it is read-only."""
    root = Path(f"/proc/{qemu_pid(shared_pod)}/root")
    expected = {"usr", "dev", "dev/null", "dev/zero", "dev/urandom", "dev/random"}
    for link in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        if os.path.islink(f"/{link}"):
            expected.add(link)
            assert os.readlink(root / link) == os.readlink(f"/{link}")
    argv = Path(f"/proc/{qemu_pid(shared_pod)}/cmdline").read_text().split("\0")
    in_use = [
        Path(argv[argv.index("-kernel") + 1]),
        Path(argv[argv.index("-initrd") + 1]),
        root_image(argv),
    ]
    for path in in_use:
        assert path.is_relative_to(shared_pod.record.image), path
        parts = path.relative_to("/").parts
        expected.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    assert _listing(root) == expected
    host_usr, jail_usr = os.stat("/usr"), os.stat(root / "usr")
    assert (jail_usr.st_dev, jail_usr.st_ino) == (host_usr.st_dev, host_usr.st_ino)
    assert not (root / str(shared_pod.dir).lstrip("/")).exists()
    with pytest.raises(OSError) as info:
        (root / "planted").write_text("x")
    assert info.value.errno == 30  # EROFS


def test_qemu_maps_the_root_image_read_only_and_shared(shared_pod: Pod) -> None:
    """The guest reads its root image straight from the host's page cache: QEMU maps the file
    shared (one copy for every VM) and read-only, from an fd opened read-only, so neither it
    nor its guest can change what the other VMs read (docs/root-device.md)."""
    pid = qemu_pid(shared_pod)
    argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    image = root_image(argv)
    maps = [
        line.split()
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
        if line.endswith(str(image))
    ]
    assert maps, f"{image} is not mapped"
    assert {fields[1] for fields in maps} == {"r--s"}, maps
    mapped = sum(int(end, 16) - int(start, 16) for start, end in (f[0].split("-") for f in maps))
    assert mapped == image.stat().st_size  # the whole image, nothing more
    fds = [
        fd
        for fd in os.listdir(f"/proc/{pid}/fd")
        if os.readlink(f"/proc/{pid}/fd/{fd}") == str(image)
    ]
    assert fds, f"QEMU holds no fd of {image}"
    for fd in fds:
        flags = next(
            line
            for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines()
            if line.startswith("flags:")
        )
        assert int(flags.split()[1], 8) & os.O_ACCMODE == os.O_RDONLY, (fd, flags)


def test_qemu_uid_cannot_read_host_or_other_pods(shared_pod: Pod, other_pod: Pod) -> None:
    uid, gid = qemu_ids(shared_pod)
    secrets = [Path("/etc/shadow"), other_pod.dir / "pod.json", other_pod.console_log]
    for path in secrets:
        assert path.read_bytes() is not None  # root can: the paths are right
        result = as_ids(uid, gid, "cat", str(path))
        assert result.returncode != 0 and "Permission denied" in result.stderr, (path, result)
    listed = as_ids(uid, gid, "ls", str(other_pod.shared_dir))
    assert listed.returncode != 0 and "Permission denied" in listed.stderr
    for name in ("agent.sock", "qmp.sock", "agent-serial.sock", "virtiofsd.sock"):
        for pod in (other_pod, shared_pod):
            sock = pod.dir / name
            assert sock.exists(), sock
            probe = (
                "import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
                "try:\n s.connect(sys.argv[1])\nexcept OSError as e:\n print(e.errno)\n"
                "else:\n print('connected')\n"
            )
            result = as_ids(uid, gid, "/usr/bin/python3", "-c", probe, str(sock))
            assert result.stdout.strip() == "13", (sock, result)  # EACCES


def _virtiofsd_server(pod: Pod) -> int:
    """The virtiofsd process that serves the share (the child of the recorded one)."""
    parent = pod.process("virtiofsd")
    assert parent is not None
    children = [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and status_or_empty(int(entry.name)).get("PPid") == str(parent.pid)
    ]
    assert len(children) == 1, children
    return children[0]


def status_or_empty(pid: int) -> dict[str, str]:
    try:
        return proc_status(pid)
    except OSError:
        return {}


def test_virtiofsd_keeps_only_what_it_needs(shared_pod: Pod) -> None:
    assert not shared_pod.record.privileged_files
    server = _virtiofsd_server(shared_pod)
    fields = proc_status(server)
    assert int(fields["CapEff"], 16) == VIRTIOFSD_CAPS
    assert int(fields["CapPrm"], 16) == VIRTIOFSD_CAPS
    assert int(fields["CapBnd"], 16) == 0
    assert fields["NoNewPrivs"] == "1"
    assert fields["Seccomp"] == "2"
    limits = Path(f"/proc/{server}/limits").read_text()
    line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    assert line.split()[3:5] == [str(fd_limit(DEFAULT_MAX_FDS))] * 2
    for kind in ("mnt", "pid", "net"):
        assert os.readlink(f"/proc/{server}/ns/{kind}") != os.readlink(f"/proc/self/ns/{kind}")
    # Its root is the share itself: nothing of the host beyond it.
    assert sorted(os.listdir(f"/proc/{server}/root")) == sorted(os.listdir(shared_pod.shared_dir))


def test_agent_proxy_has_no_capabilities(shared_pod: Pod) -> None:
    """The proxy relays bytes between root's 0600 sockets: uid 0, but no capability."""
    proxy = shared_pod.process("proxy")
    assert proxy is not None and proxy.alive()
    assert_capless(proxy.pid)
    with shared_pod.client() as agent:  # and it still relays
        agent.info()


def test_shims_have_no_capabilities_and_a_runs_watcher_keeps_root(
    pod_factory: PodFactory,
) -> None:
    """A container's host stand-in (its shim) needs uid 0 for root's 0600 files and sockets,
    and no capability; a detached run's watcher keeps root's to release the VM
    (docs/trust-boundaries.md). The shim still relays, forwards signals and reports the
    process's exit status."""
    root = pod_factory.new_root("js")
    script = "trap 'echo got-term; exit 7' TERM; echo started; while :; do sleep 0.1; done"
    started = _cli(root, "run", "-d", "--name", "sh1", "default", "sh", "-c", script, env={})
    assert started.returncode == 0, started.stderr
    try:
        record = json.loads((root / "sh1" / "state.json").read_text())
        shim = int(record["shim"]["pid"])
        assert b"sandbox.runtime.shim" in Path(f"/proc/{shim}/cmdline").read_bytes()
        assert_capless(shim)
        watchers = [
            int(line.split(":")[0])
            for line in processes_mentioning(str(root), live_only=True)
            if "sandbox.runtime.shim_watch" in line
        ]
        assert len(watchers) == 1, watchers
        assert int(proc_status(watchers[0])["CapEff"], 16) != 0  # it stops the jailed QEMU
        log = root / "sh1" / "run.log"
        for _ in range(300):
            if b"started" in log.read_bytes():
                break
            time.sleep(0.1)
        os.kill(shim, signal.SIGTERM)  # a client signalling the pid it waits on
        for _ in range(300):
            listing = _cli(root, "ps", "-a", "--format", "json", env={})
            (run,) = json.loads(listing.stdout)
            if run["status"] == "stopped":
                break
            time.sleep(0.1)
        assert run["status"] == "stopped" and run["exit_code"] == 7, run
        assert log.read_bytes() == b"started\ngot-term\n"
    finally:
        _cli(root, "rm", "-f", "sh1", env={})
    assert _leftovers(root) == []


def _cli(root: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return pysandbox(root, *args, env={**os.environ, **env})


def _leftovers(root: Path) -> list[str]:
    pods = [str(p) for p in (root / "p").glob("*")] if (root / "p").exists() else []
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        mounts = [line.split()[4] for line in mountinfo if str(root) in line]
    return pods + mounts + processes_mentioning(str(root), live_only=True)


def test_misconfigured_id_range_starts_nothing(pod_factory: PodFactory) -> None:
    root = pod_factory.new_root("jb")
    result = _cli(root, "run", "--rm", "default", "true", env={jail_ids.ENV_IDS: "5-3"})
    assert result.returncode == 125
    assert result.stderr.count("\n") == 1 and "PYSANDBOX_JAIL_IDS='5-3'" in result.stderr
    assert "Traceback" not in result.stderr
    assert _leftovers(root) == []


def _lease_owner(path: Path) -> str:
    """The ``owner`` directory a lease file names ("" when unreadable or gone)."""
    try:
        return str(json.loads(path.read_text()).get("owner", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def test_exhausted_id_range_leaves_nothing(shared_pod: Pod, pod_factory: PodFactory) -> None:
    """A range whose only id the shared pod's QEMU holds: the boot fails at QEMU's start,
    and what it started before (virtiofsd, the share mount, the pod directory) is undone."""
    uid, _ = qemu_ids(shared_pod)
    root = pod_factory.new_root("jx")
    leases = set(os.listdir(jail_ids.LEASE_DIR))
    result = _cli(root, "run", "--rm", "default", "true", env={jail_ids.ENV_IDS: f"{uid}-{uid}"})
    assert result.returncode == 125, result
    assert result.stderr.count("\n") == 1, result.stderr
    assert "no free VM id" in result.stderr and jail_ids.ENV_IDS in result.stderr
    assert _leftovers(root) == []
    # No lease of this root's is left (other VMs of the host may take leases meanwhile).
    new = set(os.listdir(jail_ids.LEASE_DIR)) - leases
    assert [n for n in new if str(root) in _lease_owner(jail_ids.LEASE_DIR / n)] == []
    assert qemu_ids(shared_pod)[0] == uid  # the holder is untouched


def test_check_reports_the_jail() -> None:
    def jail_check(env: dict[str, str]) -> tuple[int, dict[str, object], str]:
        result = _cli(Path("/tmp"), "check", "--json", env=env)
        text = _cli(Path("/tmp"), "check", env=env).stdout
        checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
        return result.returncode, checks["vmm jail"], text

    code, check, _ = jail_check({})
    assert code == 0 and check["ok"] and "jailed qemu --version ran" in str(check["detail"])
    code, check, text = jail_check({jail_ids.ENV_JAIL: "off"})
    assert code == 0 and not check["ok"] and not check["required"]
    assert "[warn] vmm jail: OFF" in text
    code, check, _ = jail_check({jail_ids.ENV_IDS: "bogus"})
    assert code != 0 and not check["ok"] and check["required"]
    assert "PYSANDBOX_JAIL_IDS='bogus'" in str(check["detail"])
