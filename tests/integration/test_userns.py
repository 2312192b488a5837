"""User namespaces (issue 10 §4): a bundle with a user namespace and uid/gid mappings, as
podman ``--userns=auto`` or Kubernetes ``hostUsers: false`` write it, runs in the VM as it
runs under runc on the host.

The same bundle (a busybox rootfs chowned to the mapped range, as podman prepares it, and a
host volume) is run by runc and by pysandbox; a user relies on: the ids the process sees
(``/proc/self/uid_map``, ``id``), the owners it sees (the mapped range as container ids, the
rest as the overflow id 65534), and the owners on the host of the files it creates or chowns
(container uid N → host uid hostID+N). docs/user-namespaces.md explains why this holds in the
VM: the guest kernel applies the mapping, virtiofsd creates files with the caller's ids.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.image import store as images
from sandbox.run.default_spec import default_spec
from tests.integration.pods import PodFactory
from tests.integration.test_runtime_cli import RUNTIME, Runtime
from tests.processes import assert_capless, netns_holders, wait_until

pytestmark = pytest.mark.vm

HOST_ID = 100000
SIZE = 65536

#: Run as the container's root; every line is compared between runc and pysandbox.
SCRIPT = (
    "cat /proc/self/uid_map /proc/self/gid_map; id -u; id -g; "
    "stat -c '%n %u:%g' / /etc/passwd /vol /vol/host-root-file; "
    "touch /vol/created && echo created; "
    "mkdir /vol/chowned && chown 1000:2000 /vol/chowned && echo chowned; "
    "touch /in-rootfs && echo rootfs-writable; "
    "chown 0:0 /vol/host-root-file 2>/dev/null || echo unmapped-file-not-chownable"
)


def _bundle(base: Path) -> Path:
    """A bundle whose rootfs belongs to the mapped range, with a volume at /vol."""
    bundle = base / "bundle"
    bundle.mkdir(parents=True)
    rootfs = bundle / "rootfs"
    shutil.copytree(images.ensure_default_image(), rootfs, symlinks=True)
    subprocess.run(["chown", "-R", f"{HOST_ID}:{HOST_ID}", str(rootfs)], check=True)
    (rootfs / "vol").mkdir(exist_ok=True)
    volume = base / "vol"
    volume.mkdir()
    volume.chmod(0o1777)  # owned by the host's root, writable by everyone (like /tmp)
    (volume / "host-root-file").write_text("x")
    spec = default_spec(["sh", "-c", SCRIPT], rootfs="rootfs")
    spec["process"]["terminal"] = False
    spec["root"]["readonly"] = False
    spec["mounts"].append(
        {"destination": "/vol", "type": "bind", "source": str(volume), "options": ["rbind", "rw"]}
    )
    spec["linux"]["namespaces"].append({"type": "user"})
    mapping = [{"containerID": 0, "hostID": HOST_ID, "size": SIZE}]
    spec["linux"]["uidMappings"] = mapping
    spec["linux"]["gidMappings"] = mapping
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def _owners(base: Path) -> dict[str, tuple[int, int]]:
    """Host uid:gid of what the container created, by name."""
    paths = {
        "created": base / "vol" / "created",
        "chowned": base / "vol" / "chowned",
        "in-rootfs": base / "bundle" / "rootfs" / "in-rootfs",
        "host-root-file": base / "vol" / "host-root-file",
    }
    owners = {}
    for name, path in paths.items():
        if path.exists():
            st = path.lstat()
            owners[name] = (st.st_uid, st.st_gid)
    return owners


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory the mapped root can traverse (mkdtemp's 0700 would stop runc's container)."""
    path = Path(tempfile.mkdtemp(prefix="pysandbox-userns-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _run_runc(base: Path) -> list[str]:
    if shutil.which("runc") is None:
        pytest.fail("runc is missing: run 'make deps' (Debian's containerd package brings it)")
    done = subprocess.run(
        ["runc", "--root", str(base / "runc-state"), "run", "--bundle", str(base / "bundle"), "u"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return [" ".join(line.split()) for line in done.stdout.splitlines()]


def _run_pysandbox(base: Path, root: Path) -> list[str]:
    runtime = Runtime(root)
    out, err = base / "out", base / "err"
    try:
        # The container inherits create's stdout and stderr (as under conmon): files, not
        # pipes, or reading them would wait for the container.
        with out.open("wb") as sink, err.open("wb") as errors:
            created = subprocess.run(
                runtime.argv("create", "--bundle", str(base / "bundle"), "u"),
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=errors,
                timeout=300,
            )
        assert created.returncode == 0, err.read_text()
        runtime.ok("start", "u")
        assert wait_until(lambda: runtime.state("u")["status"] == "stopped", 120)
        runtime.ok("delete", "u")
    finally:
        subprocess.run(
            [RUNTIME, "--root", str(runtime.root), "delete", "--force", "u"], check=False
        )
    return [" ".join(line.split()) for line in out.read_text().splitlines()]


def test_user_namespace_bundle_matches_runc(base: Path, pod_factory: PodFactory) -> None:
    runc_base = base / "runc"
    ours_base = base / "pysandbox"
    for where in (runc_base, ours_base):
        where.mkdir()
        where.chmod(0o755)
        _bundle(where)
    runc_lines = _run_runc(runc_base)
    runc_owners = _owners(runc_base)
    lines = _run_pysandbox(ours_base, pod_factory.new_root("rt"))
    owners = _owners(ours_base)

    assert lines[:4] == [f"0 {HOST_ID} {SIZE}", f"0 {HOST_ID} {SIZE}", "0", "0"]
    # The mapped rootfs is the container root's; the host's root is the overflow id.
    assert lines[4:8] == [
        "/ 0:0",
        "/etc/passwd 0:0",
        "/vol 65534:65534",
        "/vol/host-root-file 65534:65534",
    ]
    assert lines[8:] == [
        "created",
        "chowned",
        "rootfs-writable",
        "unmapped-file-not-chownable",
    ]
    assert owners == {
        "created": (HOST_ID, HOST_ID),
        "chowned": (HOST_ID + 1000, HOST_ID + 2000),
        "in-rootfs": (HOST_ID, HOST_ID),
        "host-root-file": (0, 0),
    }
    assert (lines, owners) == (runc_lines, runc_owners)


#: ioctl on a namespace fd: an fd of the user namespace that owns it (ioctl_ns(2)).
NS_GET_USERNS = 0xB701


def _netns_owner_map(pid: int) -> tuple[str, str]:
    """(``dev:inode`` of ``pid``'s network namespace, the uid_map of the user namespace that
    owns it, as a process inside that user namespace reads it)."""
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        owner = fcntl.ioctl(fd, NS_GET_USERNS)
        try:
            mine = os.stat("/proc/self/ns/user")
            if (os.fstat(owner).st_ino, os.fstat(owner).st_dev) == (mine.st_ino, mine.st_dev):
                # setns(2) into one's own user namespace is EINVAL
                return f"{st.st_dev}:{st.st_ino}", " ".join(
                    Path("/proc/self/uid_map").read_text().split()
                )
            done = subprocess.run(
                ["nsenter", f"--user=/proc/{os.getpid()}/fd/{owner}", "cat", "/proc/self/uid_map"],
                capture_output=True,
                text=True,
                timeout=30,
            )
        finally:
            os.close(owner)
    finally:
        os.close(fd)
    assert done.returncode == 0, done.stderr
    return f"{st.st_dev}:{st.st_ino}", " ".join(done.stdout.split())


@pytest.mark.parametrize("userns", [True, False], ids=["userns", "netns-only"])
def test_pid_file_process_is_not_in_the_hosts_network_namespace(
    base: Path, pod_factory: PodFactory, userns: bool
) -> None:
    """The ``--pid-file`` process of a container whose spec asks for a network namespace
    without a path is in a new, empty one (never the host's: podman configures the network
    namespace of that pid after create), owned by a user namespace with the spec's mapping
    when the spec has one -- as runc's container process is."""
    bundle = _bundle(base)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["args"] = ["sleep", "300"]
    if not userns:
        spec["linux"]["namespaces"] = [
            ns for ns in spec["linux"]["namespaces"] if ns["type"] != "user"
        ]
        del spec["linux"]["uidMappings"], spec["linux"]["gidMappings"]
    assert {"type": "network"} in spec["linux"]["namespaces"]
    (bundle / "config.json").write_text(json.dumps(spec))
    host_netns, host_map = _netns_owner_map(os.getpid())
    expected_map = f"0 {HOST_ID} {SIZE}" if userns else host_map

    runc_state = base / "runc-state"
    try:
        runc_netns, runc_map = _netns_owner_map(_runc_create(base, runc_state, bundle))
    finally:
        subprocess.run(["runc", "--root", str(runc_state), "delete", "--force", "u"], check=False)
    assert runc_netns != host_netns
    assert runc_map == expected_map

    runtime = Runtime(pod_factory.new_root("rt"))
    pid_file = base / "ours.pid"
    try:
        with (base / "ours.err").open("wb") as errors:  # the stand-in inherits them
            created = subprocess.run(
                runtime.argv("create", "--bundle", str(bundle), "--pid-file", str(pid_file), "u"),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors,
                timeout=300,
            )
        assert created.returncode == 0, (base / "ours.err").read_text()
        pid = int(pid_file.read_text())
        netns, owner_map = _netns_owner_map(pid)
        assert netns != host_netns
        assert owner_map == runc_map
        # It made that namespace with root's capabilities, then gave them all up (it stands
        # in for the container on the host: docs/trust-boundaries.md).
        assert_capless(pid)
        # Empty: loopback only (nothing of the host's), as runc's new namespace.
        links = subprocess.run(
            ["nsenter", f"--net=/proc/{pid}/ns/net", "ip", "-o", "link"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert [line.split(":")[1].strip() for line in links.stdout.splitlines()] == ["lo"]
        runtime.ok("start", "u")
        assert runtime.state("u")["status"] == "running"
        runtime.ok("delete", "--force", "u")
        assert wait_until(lambda: not netns_holders(netns), 30), netns_holders(netns)
    finally:
        subprocess.run(
            [RUNTIME, "--root", str(runtime.root), "delete", "--force", "u"], check=False
        )


#: What a member of the pod shows of the pod network (compared between runc and pysandbox).
MEMBER_SCRIPT = (
    "cat /proc/self/uid_map; ip -o -4 addr show eth0 | awk '{print $2, $4}'; "
    "cat /proc/net/route; ping -c 1 -W 10 10.250.7.1 >/dev/null && echo ping-ok"
)


def _cni(pid: int, peer: str) -> None:
    """What CNI does after create in ``pid``'s network namespace: a veth ``eth0`` (its peer
    in netns ``peer``, 10.250.7.1), 10.250.7.2/24, default route via the peer."""
    steps = [
        ["ip", "netns", "add", peer],
        [
            "ip",
            "-n",
            peer,
            "link",
            "add",
            "p0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            str(pid),
        ],
        ["ip", "-n", peer, "addr", "add", "10.250.7.1/24", "dev", "p0"],
        ["ip", "-n", peer, "link", "set", "p0", "up"],
        [
            "nsenter",
            f"--net=/proc/{pid}/ns/net",
            "ip",
            "addr",
            "add",
            "10.250.7.2/24",
            "dev",
            "eth0",
        ],
        ["nsenter", f"--net=/proc/{pid}/ns/net", "ip", "link", "set", "eth0", "up"],
        [
            "nsenter",
            f"--net=/proc/{pid}/ns/net",
            "ip",
            "route",
            "add",
            "default",
            "via",
            "10.250.7.1",
        ],
    ]
    for argv in steps:
        subprocess.run(argv, check=True, capture_output=True, timeout=30)


def _member_bundle(base: Path, owner_pid: int) -> Path:
    """A CRI-style member of pod ``u``: joins the owner's user and network namespaces by
    path, runs :data:`MEMBER_SCRIPT` on the owner's rootfs."""
    owner = json.loads((base / "bundle" / "config.json").read_text())
    spec = json.loads(json.dumps(owner))
    spec["root"] = {"path": str(base / "bundle" / "rootfs"), "readonly": False}
    spec["mounts"] = [m for m in spec["mounts"] if m["destination"] != "/vol"]
    spec["process"]["args"] = ["sh", "-c", MEMBER_SCRIPT]
    spec["linux"]["namespaces"] = [
        ns for ns in spec["linux"]["namespaces"] if ns["type"] not in ("network", "user")
    ] + [
        {"type": "network", "path": f"/proc/{owner_pid}/ns/net"},
        {"type": "user", "path": f"/proc/{owner_pid}/ns/user"},
    ]
    # The mappings stay: runc requires them with a user namespace given by path as well.
    spec["annotations"] = {
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.sandbox-id": "u",
    }
    member = base / "member"
    member.mkdir()
    (member / "config.json").write_text(json.dumps(spec))
    return member


def _owner_spec(base: Path) -> None:
    bundle = _bundle(base)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["args"] = ["sleep", "300"]
    (bundle / "config.json").write_text(json.dumps(spec))


def _runc_create(base: Path, state: Path, bundle: Path) -> int:
    """``runc create`` container ``u`` of ``bundle``; the pid of its ``--pid-file``."""
    # runc's container process inherits create's stdio: a file, not a pipe to wait on.
    with (base / "runc.err").open("wb") as errors:
        created = subprocess.run(
            [
                *("runc", "--root", str(state), "create", "--bundle", str(bundle)),
                *("--pid-file", str(base / "runc.pid"), "u"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=errors,
            timeout=120,
        )
    assert created.returncode == 0, (base / "runc.err").read_text()
    return int((base / "runc.pid").read_text())


def _members_view_runc(base: Path) -> list[str]:
    _owner_spec(base)
    state = base / "runc-state"
    peer = f"psbt-usernet-runc-{os.getpid()}"
    try:
        pid = _runc_create(base, state, base / "bundle")
        _cni(pid, peer)
        subprocess.run(["runc", "--root", str(state), "start", "u"], check=True, timeout=60)
        done = subprocess.run(
            ["runc", "--root", str(state), "run", "--bundle", str(_member_bundle(base, pid)), "m"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return [" ".join(line.split()) for line in done.stdout.splitlines()]
    finally:
        subprocess.run(["runc", "--root", str(state), "delete", "--force", "u"], check=False)
        subprocess.run(["ip", "netns", "del", peer], check=False, capture_output=True)


def _members_view_ours(base: Path, root: Path) -> tuple[list[str], str]:
    """The member's lines, and the identity of the owner stand-in's network namespace."""
    _owner_spec(base)
    runtime = Runtime(root)
    peer = f"psbt-usernet-ours-{os.getpid()}"
    try:
        with (base / "ours.err").open("wb") as errors:
            created = subprocess.run(
                [
                    *runtime.argv("create", "--bundle", str(base / "bundle")),
                    "--pid-file",
                    str(base / "ours.pid"),
                    "u",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors,
                timeout=300,
            )
        assert created.returncode == 0, (base / "ours.err").read_text()
        pid = int((base / "ours.pid").read_text())
        netns, _ = _netns_owner_map(pid)
        _cni(pid, peer)
        runtime.ok("start", "u")
        out = base / "member.out"
        with out.open("wb") as sink, (base / "member.err").open("wb") as errors:
            member = subprocess.run(
                runtime.argv("create", "--bundle", str(_member_bundle(base, pid)), "m"),
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=errors,
                timeout=300,
            )
        assert member.returncode == 0, (base / "member.err").read_text()
        runtime.ok("start", "m")
        assert wait_until(lambda: runtime.state("m")["status"] == "stopped", 120)
        runtime.ok("delete", "m")
        runtime.ok("delete", "--force", "u")
        return [" ".join(line.split()) for line in out.read_text().splitlines()], netns
    finally:
        for cid in ("m", "u"):
            subprocess.run(
                [RUNTIME, "--root", str(root), "delete", "--force", cid],
                check=False,
                capture_output=True,
            )
        subprocess.run(["ip", "netns", "del", peer], check=False, capture_output=True)


def test_a_pod_network_set_up_after_create_is_the_pods(base: Path, pod_factory: PodFactory) -> None:
    """containerd 1.7's flow for a user-namespaced pod, through the runtime CLI: the sandbox
    is created, CNI configures the network namespace of its --pid-file process, it starts;
    a member joins its user and network namespaces by path. The member sees the pod's
    address and routes and reaches the peer, as under runc; nothing of it is left after the
    pod is deleted."""
    for name in ("runc", "ours"):
        (base / name).mkdir()
        (base / name).chmod(0o755)
    theirs = _members_view_runc(base / "runc")
    ours, netns = _members_view_ours(base / "ours", pod_factory.new_root("rt"))
    assert theirs == [
        f"0 {HOST_ID} {SIZE}",
        "eth0 10.250.7.2/24",
        "Iface Destination Gateway Flags RefCnt Use Metric Mask MTU Window IRTT",
        "eth0 00000000 0107FA0A 0003 0 0 0 00000000 0 0 0",
        "eth0 0007FA0A 00000000 0001 0 0 0 00FFFFFF 0 0 0",
        "ping-ok",
    ]
    assert ours == theirs
    assert wait_until(lambda: not netns_holders(netns), 30), netns_holders(netns)
