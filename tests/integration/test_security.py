"""The guest attacks the host through the share: one test per class of escape (docs/security.md).

The guest is untrusted, its kernel included: attacks run in containers holding every
capability, no seccomp profile and every device allowed -- what a guest root has. Each test
is named after the class it covers (most after a Kata Containers CVE) and checks the host
the way a host user would see it: file contents, modes, device nodes, mounts. Attacks are
aimed at copies (a private rootfs, the guest image's first sector, which erofs never reads),
so a broken defence fails the test without damaging what other tests use.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hypervisor.guest_image import find_image
from ocispec.capabilities import NAMES as ALL_CAPABILITIES
from sandbox.errors import ConfigError
from sandbox.image import store as images
from sandbox.pod import hostfs
from sandbox.pod.lifecycle import Pod
from sandbox.pod.sharing import share_container_files, unshare_container_files
from tests.integration.helpers import busybox_spec, run_container
from tests.integration.pods import PodFactory
from tests.processes import wait_until

ROOT = Path(__file__).resolve().parents[2]
PYSANDBOX = [sys.executable, "-m", "sandbox"]


def attacker(
    script: str, *mounts: dict[str, Any], rootfs: Path | None = None, readonly: bool = False
) -> dict[str, Any]:
    """A spec running ``script`` as a guest root can: all capabilities, no seccomp, every
    device, no masked paths; ``mounts`` added."""
    spec = busybox_spec("sh", "-c", script)
    spec["root"]["readonly"] = readonly
    if rootfs is not None:
        spec["root"]["path"] = str(rootfs)
    process = spec["process"]
    process["noNewPrivileges"] = False
    for kind in ("bounding", "effective", "permitted"):
        process["capabilities"][kind] = list(ALL_CAPABILITIES)
    linux = spec["linux"]
    linux.pop("seccomp")
    linux["resources"]["devices"] = [{"allow": True, "access": "rwm"}]
    linux["maskedPaths"] = []
    linux["readonlyPaths"] = []
    spec["mounts"] += list(mounts)
    return spec


def volume(source: Path, destination: str, *options: str) -> dict[str, Any]:
    return {
        "destination": destination,
        "type": "bind",
        "source": str(source),
        "options": ["rbind", *options],
    }


def tree(path: Path) -> dict[str, tuple[int, bytes]]:
    """Every entry below ``path`` (not followed): relative name -> (st_mode, content)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            st = full.lstat()
            content = full.read_bytes() if stat.S_ISREG(st.st_mode) else b""
            found[str(full.relative_to(path))] = (st.st_mode, content)
    return found


@contextlib.contextmanager
def tmpfs_at(path: Path, files: dict[str, str]) -> Iterator[Path]:
    """A host tmpfs mounted at ``path`` holding ``files``; unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "canary", str(path)], check=True)
    try:
        for name, text in files.items():
            (path / name).write_text(text)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture(scope="module")
def pod(module_pods: PodFactory) -> Iterator[Pod]:
    """One pod for the read-only tests, booted as ``run`` boots (no privileged files)."""
    booted = module_pods("security")
    yield booted
    booted.stop()


@pytest.fixture(scope="module")
def rootfs_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the default busybox image (attacks must not hit the real store)."""
    copy = tmp_path_factory.mktemp("image") / "rootfs"
    shutil.copytree(images.ensure_default_image(), copy, symlinks=True)
    (copy / "canary").write_text("image\n")
    return copy


def cli(root: Path, *args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PYSANDBOX, "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )


# -- Kata CVE-2020-28914: read-only shares made writable from the guest ---------------------


def test_read_only_volume_stays_read_only_on_the_host_whatever_the_guest_remounts(
    pod: Pod, tmp_path: Path
) -> None:
    source = tmp_path / "ro"
    source.mkdir()
    (source / "file").write_text("host\n")
    with tmpfs_at(source / "sub", {"file": "host submount\n"}):  # recursive: submounts too
        before = tree(source)
        result = run_container(
            pod,
            attacker(
                "mount -o remount,bind,rw /ro && echo remounted; "
                "echo guest > /ro/file; echo guest > /ro/sub/file; echo guest > /ro/new; "
                "cat /ro/file /ro/sub/file",
                volume(source, "/ro", "ro"),
            ),
        )
        assert result.out == "remounted\nhost\nhost submount\n", result.stderr  # it did run
        assert tree(source) == before


def test_read_only_rootfs_stays_read_only_on_the_host(
    pod: Pod, rootfs_copy: Path, tmp_path: Path
) -> None:
    # A bundle's root.readonly; the container remounts / read-write and writes.
    before = tree(rootfs_copy)
    spec = attacker(
        "mount -o remount,rw / && echo remounted; echo guest > /canary; echo guest > /new; "
        "cat /canary",
        rootfs=rootfs_copy,
        readonly=True,
    )
    result = run_container(pod, spec, overlay=False)
    assert "remounted" in result.out, result.stderr
    assert result.out.endswith("image\n"), result.out
    assert tree(rootfs_copy) == before


def test_read_only_run_gets_its_mountpoints_without_writing_the_image_store(
    tmp_path: Path, pod_factory: PodFactory
) -> None:
    # ``run --read-only`` with a volume whose destination the image lacks: the mountpoint
    # is made in guest memory, never in the (shared) image store; the root stays read-only.
    store_rootfs = images.ensure_default_image()
    before = sorted(os.listdir(store_rootfs))
    (tmp_path / "in").write_text("host\n")
    root = pod_factory.new_root("pss")
    done = cli(
        root,
        "run",
        "--read-only",
        "-v",
        f"{tmp_path}:/pysandbox-new-mountpoint:ro",
        "default",
        "sh",
        "-c",
        "cat /pysandbox-new-mountpoint/in; touch /x 2>/dev/null || echo ro",
    )
    assert (done.returncode, done.stdout) == (0, "host\nro\n"), done.stderr
    assert sorted(os.listdir(store_rootfs)) == before


# -- Kata CVE-2020-2025: writes persisting into an image ------------------------------------


def test_writes_never_reach_an_image_lower_layer_or_the_guest_image(
    pod: Pod, rootfs_copy: Path
) -> None:
    # ``run``'s way: the image is the lower layer of an overlay whose upper layer is in guest
    # memory. The container writes over the image, then, holding every capability, mounts
    # the pod's virtio-fs share itself to write to the lower layer directly, and writes its
    # marker into the first sector of the guest's root device (the guest image file).
    guest_image = find_image().rootfs
    image_sum = hashlib.sha256(guest_image.read_bytes()).hexdigest()
    before = tree(rootfs_copy)
    script = (
        "echo guest > /canary && cat /canary; "
        "mkdir -p /share && mount -t virtiofs pod /share && echo mounted; "
        "for lower in /share/*/rootfs; do echo guest > $lower/canary; echo x > $lower/new; done; "
        "mknod /pmem0 b $(tr : ' ' < /sys/block/pmem0/dev) && echo pysandbox-was-here > /pmem0; "
        "sync"
    )
    result = run_container(pod, attacker(script, rootfs=rootfs_copy), overlay=True)
    assert result.out.startswith("guest\nmounted\n"), (result.out, result.stderr)
    assert "Read-only file system" in result.stderr.decode()  # the lower layer refused it
    assert "write error: Operation not permitted" in result.stderr.decode()  # and the disk
    assert tree(rootfs_copy) == before
    assert hashlib.sha256(guest_image.read_bytes()).hexdigest() == image_sum


def test_a_write_to_the_guest_root_device_fails_at_once_and_the_pod_lives_on(
    pod: Pod, rootfs_copy: Path
) -> None:
    # The guest's root is the image file mapped read-only from the host (virtio-pmem). A
    # container holding every capability makes the device node, tries to make the disk
    # writable again and writes to it with dd, synchronously: the write must fail at once
    # (the guest's disk is read-only: a write into the host's read-only mapping hung the
    # writer instead), the image file stay as it was, and the pod keep serving containers.
    guest_image = find_image().rootfs
    image_sum = hashlib.sha256(guest_image.read_bytes()).hexdigest()
    script = (
        "mknod /pmem0 b $(tr : ' ' < /sys/block/pmem0/dev) && cat /sys/block/pmem0/ro; "
        "blockdev --setrw /pmem0; "
        "dd if=/dev/zero of=/pmem0 bs=4096 count=256 conv=fsync; echo dd=$?"
    )
    started = time.monotonic()
    result = run_container(pod, attacker(script, rootfs=rootfs_copy), timeout=90)
    elapsed = time.monotonic() - started
    assert result.out.endswith("dd=1\n") and result.out.startswith("1\n"), (
        result.out,
        result.stderr,
    )
    assert "Operation not permitted" in result.stderr.decode(), result.stderr
    assert elapsed < 60, elapsed  # a container's start and exit under TCG, no hang
    assert hashlib.sha256(guest_image.read_bytes()).hexdigest() == image_sum
    assert run_container(pod, busybox_spec("echo", "alive")).out == "alive\n"


# -- guest root is not host root: device nodes, setuid/setgid files -------------------------


def test_guest_root_leaves_no_device_node_or_setuid_file_on_a_volume(
    pod: Pod, tmp_path: Path
) -> None:
    source = tmp_path / "rw"
    source.mkdir()
    (source / "host-suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(source / "host-suid", 0o4755)
    script = (
        "cd /v; "
        "mknod blk b 254 0 && chmod 666 blk && echo made-blk; "
        "mknod chr c 1 1 && echo made-chr; "
        "cp /bin/busybox rootme && chmod 4755 rootme && echo made-suid; "
        "chmod 2755 rootme && echo made-sgid; "
        "mkdir d && chmod 2775 d && echo made-sgid-dir; "
        "echo more >> host-suid; "
        # what a volume is for still works as root: files, FIFOs, ownership, modes
        "mkfifo fifo && chown 1000:1000 rootme && chmod 700 rootme && echo usable"
    )
    result = run_container(pod, attacker(script, volume(source, "/v")))
    assert result.out.split() == ["usable"], (result.out, result.stderr)
    assert result.stderr.decode().count("Operation not permitted") == 5, result.stderr
    for entry in source.rglob("*"):
        mode = entry.lstat().st_mode
        assert not (stat.S_ISBLK(mode) or stat.S_ISCHR(mode)), entry
        assert not mode & (stat.S_ISUID | stat.S_ISGID), (entry, oct(mode))
    assert stat.S_ISFIFO((source / "fifo").lstat().st_mode)
    owner = (source / "rootme").stat()
    assert (owner.st_uid, owner.st_gid, stat.S_IMODE(owner.st_mode)) == (1000, 1000, 0o700)


def _setuid_through_run(root: Path, source: Path, *flags: str) -> int:
    """Mode bits of a setuid file a ``run`` container makes on a volume, seen on the host."""
    done = cli(
        root,
        "run",
        *flags,
        "-v",
        f"{source}:/v",
        "default",
        "sh",
        "-c",
        "cp /bin/busybox /v/x && chmod 4755 /v/x; ls -l /v/x",
    )
    assert done.returncode == 0, done.stderr
    return stat.S_IMODE((source / "x").stat().st_mode)


def test_run_refuses_setuid_files_on_volumes_unless_privileged_files(
    tmp_path: Path, pod_factory: PodFactory
) -> None:
    root = pod_factory.new_root("pss")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert _setuid_through_run(root, tmp_path / "a") == 0o755
    assert _setuid_through_run(root, tmp_path / "b", "--privileged-files") == 0o4755


def test_bundle_keeps_runc_behaviour_unless_annotated(
    tmp_path: Path, pod_factory: PodFactory
) -> None:
    # A bundle from podman or containerd behaves as under runc: its image may install
    # setuid binaries. The annotation org.pysandbox.privileged-files=false refuses them.
    root = pod_factory.new_root("pss")
    modes = {}
    for name, notes in (
        ("runc-like", {}),
        ("annotated", {"org.pysandbox.privileged-files": "false"}),
    ):
        source = tmp_path / name
        source.mkdir()
        bundle = tmp_path / f"bundle-{name}"
        bundle.mkdir()
        spec = busybox_spec("sh", "-c", "cp /bin/busybox /tmp/x && chmod 4755 /tmp/x; true")
        spec["mounts"].append(volume(source, "/tmp"))
        spec["annotations"] = notes
        (bundle / "config.json").write_text(json.dumps(spec))
        done = cli(root, "run", "--bundle", str(bundle), f"sec-{name}")
        assert done.returncode == 0, done.stderr
        modes[name] = stat.S_IMODE((source / "x").stat().st_mode)
    assert modes == {"runc-like": 0o4755, "annotated": 0o755}
    bad = tmp_path / "bundle-bad"
    bad.mkdir()
    spec = busybox_spec("true")
    spec["annotations"] = {"org.pysandbox.privileged-files": "yes"}
    (bad / "config.json").write_text(json.dumps(spec))
    done = cli(root, "run", "--bundle", str(bad), "sec-bad")
    assert done.returncode != 0
    assert "org.pysandbox.privileged-files must be 'true' or 'false'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (root / "p").exists() or not list((root / "p").iterdir())


# -- device nodes reaching host devices ------------------------------------------------------


def test_a_device_node_in_a_share_opens_a_guest_device_never_the_host_one(
    pod: Pod, tmp_path: Path
) -> None:
    # The host places a node of its own disk (the one holding tmp_path) on a volume. The
    # guest opening it gets its own device of that number (as through a node it makes in its
    # /dev) -- its data, or the same "no such device" when the guest has none of that number
    # (its root is virtio-pmem, the host's disk may well be virtio-blk) --, never the host's.
    device = os.stat(tmp_path).st_dev
    source = tmp_path / "dev"
    source.mkdir()
    os.mknod(source / "disk", 0o600 | stat.S_IFBLK, device)
    script = (
        f"mknod /dev/own b {os.major(device)} {os.minor(device)}; "
        "for node in /v/disk /dev/own; do "
        "if head -c 65536 $node > /data 2> /error; then sha256sum < /data; "
        "else sed s,$node,NODE, /error; fi; done"
    )
    result = run_container(pod, attacker(script, volume(source, "/v", "ro")))
    assert result.status == 0, result.stderr
    through_share, own = result.out.splitlines()
    assert through_share == own, (through_share, own)
    empty = hashlib.sha256(b"").hexdigest()
    assert through_share.split()[0] != empty, result.out  # it read data, or was refused
    if "NODE" in through_share:
        assert through_share == "head: NODE: No such device or address", through_share
    try:
        with open(source / "disk", "rb") as disk:
            assert through_share.split()[0] != hashlib.sha256(disk.read(65536)).hexdigest()
    except PermissionError:
        pass  # this host may not read its own disk (a sandboxed CI host): nothing to compare


# -- Kata CVE-2020-2024/2026: the host made to follow symlinks the guest planted -------------


def test_planted_symlinks_are_never_followed_by_the_host(
    pod_factory: PodFactory, tmp_path: Path
) -> None:
    # The guest mounts the pod share, plants symlinks to a host directory where the host
    # will create, mount, unmount and remove things -- for its own container (clean-up),
    # for container ids not yet created (the next run), in the pod's volume directory (the
    # next container with a volume) -- and in its volume (the next run with the same
    # volume). The host directory holds a file and a mount of its own.
    own = pod_factory()
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep").write_text("host\n")
    source = tmp_path / "vol"
    source.mkdir()
    with tmpfs_at(canary / "mnt", {"keep": "host mount\n"}):
        before = tree(canary)
        plant = (
            f"mkdir /s && mount -t virtiofs pod /s && cd /s/first && "
            f"ln -s {canary} /s/next && mkdir /s/later && ln -s {canary} /s/later/rootfs && "
            f"ln -s {canary} evil && ln -s {canary}/mnt /s/_volumes/evil && "
            f"mv /s/_volumes /s/moved && ln -s {canary} /s/_volumes && "
            f"ln -s {canary}/mnt rootfs-link && "
            f"ln -s {canary} /v/escape && ln -s {canary}/keep /v/keep && echo planted"
        )
        first = run_container(own, attacker(plant, volume(source, "/v")), cid="first")
        assert first.out == "planted\n", first.stderr
        assert tree(canary) == before  # clean-up of "first" followed nothing
        for cid in ("next", "later"):  # names the guest took: refused, nothing created
            with pytest.raises(ConfigError, match="already has files"):
                share_container_files(own, cid, busybox_spec("true"), tmp_path)
        again = run_container(
            own,
            attacker("ls /v; echo after > /v/after; cat /v/keep", volume(source, "/v")),
            cid="second",
        )
        assert again.out.split() == ["escape", "keep"], again.stderr  # links dangle in the guest
        assert (source / "after").read_text() == "after\n"
        own.destroy()  # what delete does last: the pod directory goes, with the guest's links
        assert not own.dir.exists()
        assert tree(canary) == before
        assert os.path.ismount(canary / "mnt")


# -- a bind-mount source raced between check and mount (TOCTOU) ------------------------------


def test_a_volume_source_swapped_after_the_check_is_not_followed(
    tmp_path: Path, pod_factory: PodFactory
) -> None:
    # ``run`` checks its volumes before it boots and mounts them after the boot. Once the
    # boot started (the pod directory exists), the source is swapped for a symlink to a
    # secret directory: the container must see what was checked.
    root = pod_factory.new_root("pss")
    source, moved, secret = tmp_path / "src", tmp_path / "moved", tmp_path / "secret"
    for directory, text in ((source, "checked\n"), (secret, "secret\n")):
        directory.mkdir()
        (directory / "marker").write_text(text)
    proc = subprocess.Popen(
        [
            *PYSANDBOX,
            "--root",
            str(root),
            "run",
            "-v",
            f"{source}:/v",
            "default",
            "cat",
            "/v/marker",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:

        def booting() -> bool:
            assert proc.poll() is None, proc.communicate()
            return (root / "p").exists() and bool(list((root / "p").iterdir()))

        assert wait_until(booting, 60, interval=0.002), "the pod never started booting"
        source.rename(moved)
        source.symlink_to(secret)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert out == "checked\n"
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


# -- clean-up must not take host mounts with it ------------------------------------------------


@pytest.mark.parametrize("propagation", [(), ("rslave",)], ids=["private", "rslave"])
def test_clean_up_never_unmounts_host_mounts_below_a_shared_source(
    tmp_path: Path, propagation: tuple[str, ...]
) -> None:
    # On a host whose mounts propagate (systemd makes / shared), a bind of a volume joins the
    # source's peer group unless made private: unmounting its copy in the share would then
    # unmount the host's own mounts below the source. No VM needed: the share is a directory.
    # A volume asking for host-to-container propagation (rslave) is a slave: host mounts made
    # later reach the share; still nothing goes back.
    fake = Pod(tmp_path / "root", "fake", {})
    fake.shared_dir.mkdir(parents=True)
    hostfs.make_shared_mountpoint(fake.shared_dir)
    source = tmp_path / "src"
    source.mkdir()
    subprocess.run(["mount", "--bind", str(source), str(source)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(source)], check=True)
        with tmpfs_at(source / "sub", {"keep": "host mount\n"}):
            spec = busybox_spec("true")
            spec["mounts"].append(volume(source, "/v", *propagation))
            share_container_files(fake, "c", spec, tmp_path)
            shared = hostfs.mounts_below(fake.shared_dir / "c")
            shared += hostfs.mounts_below(fake.shared_dir / "_volumes")  # once per pod
            assert len(shared) == 3, shared  # rootfs, the volume and its submount
            with tmpfs_at(source / "later", {"new": "mounted after the share\n"}):
                later = hostfs.mounts_below(fake.shared_dir / "_volumes")
                assert len(later) == (3 if propagation else 2), later
            unshare_container_files(fake, "c")
            assert hostfs.mounts_below(fake.shared_dir / "c") == []
            assert hostfs.mounts_below(fake.shared_dir / "_volumes") == []
            assert os.path.ismount(source / "sub")
            assert (source / "sub" / "keep").read_text() == "host mount\n"
    finally:
        subprocess.run(["umount", "-l", str(source)], check=False)
        hostfs.unmount_tree(fake.dir)


def test_a_guest_flooding_its_serial_console_cannot_fill_the_host(pod: Pod) -> None:
    """A guest root writing its serial port without end (a compromised guest kernel can do
    the same): the host's console.log stays near its bound (sandbox/pod/console_bound.py)."""
    from sandbox.pod import console_bound

    size = console_bound.LIMIT_BYTES + 4 * console_bound.KEEP_BYTES
    flood = (
        f"mknod /dev/flood c 4 64 && head -c {size} /dev/zero | tr '\\0' x > /dev/flood; "
        "echo flooded"
    )
    done = run_container(pod, attacker(flood), cid="flood")
    assert done.out == "flooded\n", done.stderr
    log = pod.console_log.read_bytes()
    assert console_bound.MARKER in log
    assert len(log) < console_bound.LIMIT_BYTES + console_bound.KEEP_BYTES + (8 << 20), len(log)


# -- breaker3 #4: a container opening the guest's devices through nodes it made -------------

#: Run alike by runc on the host and in a pod: nodes made in /dev (a tmpfs in both) of the
#: guest's root disk (259:0, /dev/pmem0) and of /dev/fuse (10:229), opened; then runc's
#: default devices. ``(exec 3<>NODE)`` opens read-write in a subshell (a failed redirection
#: of a special builtin would end the shell).
DEVICE_SCRIPT = (
    "mknod /dev/disk b 259 0 && head -c1 /dev/disk > /dev/null; echo disk=$?; "
    "mknod /dev/fu c 10 229 && (exec 3<>/dev/fu); echo fuse=$?; "
    "echo x > /dev/null; echo null=$?; head -c1 /dev/zero | wc -c; "
    "head -c1 /dev/urandom | wc -c; (exec 3<>/dev/ptmx); echo ptmx=$?"
)
#: Every virtio-serial port of the pod (the agent's and the output ports carrying other
#: containers' stdout/stderr to the host, docs/stream-ports.md): made and written to.
PORTS_SCRIPT = (
    "for port in /sys/class/virtio-ports/*; do name=$(cat $port/name); "
    "mknod /dev/port c $(tr : ' ' < $port/dev) && (echo injected > /dev/port); "
    'echo "$name=$?"; rm /dev/port; done'
)
DENY_ALL = {"allow": False, "access": "rwm"}
ALLOW_FUSE = {"allow": True, "type": "c", "major": 10, "minor": 229, "access": "rw"}


def _under_runc(spec: dict[str, Any], rootfs: Path, bundle: Path) -> tuple[str, str]:
    """(stdout, stderr) of ``spec`` run by runc on the host, on ``rootfs``."""
    if shutil.which("runc") is None:
        pytest.fail("runc is missing: run 'make deps' (Debian's containerd package brings it)")
    spec = json.loads(json.dumps(spec))
    spec["root"]["path"] = str(rootfs)
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(spec))
    state = bundle / "state"
    try:
        done = subprocess.run(
            ["runc", "--root", str(state), "run", "-b", str(bundle), f"dev-{bundle.name}"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        subprocess.run(["runc", "--root", str(state), "delete", "-f", f"dev-{bundle.name}"])
    return done.stdout, done.stderr


def test_devices_a_container_makes_cannot_be_opened_as_under_runc(
    pod: Pod, rootfs_copy: Path, tmp_path: Path
) -> None:
    """With docker's default capabilities (CAP_MKNOD among them) a container may make any
    device node, but opening one is refused (EPERM) unless a device rule allows it: the
    guest's root disk, /dev/fuse, every virtio-serial port of its pod (it could otherwise
    write into another container's output). runc's default devices stay usable. The same
    under runc, whose device cgroup does the same; a rule allowing /dev/fuse opens it in
    both."""
    for name, rules in (("default", [DENY_ALL]), ("fuse", [DENY_ALL, ALLOW_FUSE])):
        spec = busybox_spec("sh", "-c", DEVICE_SCRIPT)
        spec["linux"]["resources"]["devices"] = rules
        ours = run_container(pod, spec)
        runc = _under_runc(spec, rootfs_copy, tmp_path / name)
        assert (ours.out, ours.stderr.decode()) == runc, (name, runc)
        fuse = "0" if name == "fuse" else "1"
        assert ours.out == f"disk=1\nfuse={fuse}\nnull=0\n1\n1\nptmx=0\n", ours.stderr
        refused = ours.stderr.decode().splitlines()
        assert refused[0] == "head: /dev/disk: Operation not permitted", refused
        assert len(refused) == (1 if name == "fuse" else 2), refused
    ports = run_container(pod, busybox_spec("sh", "-c", PORTS_SCRIPT))
    lines = ports.out.splitlines()
    assert "agent.0=1" in lines and len(lines) >= 2, (ports.out, ports.stderr)
    assert all(line.endswith("=1") for line in lines), ports.out
    assert ports.stderr.decode().count("Operation not permitted") == len(lines), ports.stderr


def test_a_privileged_container_opens_every_device(pod: Pod) -> None:
    """A spec allowing every device (podman --privileged, CRI privileged) keeps full access:
    the guest's root disk reads, /dev/fuse opens, as with runc."""
    spec = busybox_spec("sh", "-c", DEVICE_SCRIPT)
    spec["linux"]["resources"]["devices"] = [DENY_ALL, {"allow": True, "access": "rwm"}]
    done = run_container(pod, spec)
    assert done.out == "disk=0\nfuse=0\nnull=0\n1\n1\nptmx=0\n", done.stderr
    assert done.stderr == b""
