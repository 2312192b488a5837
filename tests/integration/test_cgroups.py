"""A container sees its own cgroup limits, as under runc, whatever spec the client wrote.

The same bundle — a spec without a cgroup namespace, as podman and containerd write on cgroup
v1 hosts, with memory, pids, cpu shares/quota and cpuset limits — runs under runc on this host
and under pysandbox in both guest layouts (v2, the default, and v1, chosen by annotation).
Inside each, :data:`cgroup_view.READER` reads the limits the way a program does, before and
after ``update --resources``. runc on a v1 host shows v1 files: the v1 layout must read the
same, file for file; the v2 layout the same limits in v2 files (shares as runc's cpu.weight).
One VM per layout; the spec-with-a-cgroup-namespace variant, a layout conflict and a container
that names no layout join them as further containers of their pod.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.image import store as images
from sandbox.run.default_spec import default_spec
from tests.integration.cgroup_view import READER, as_runc_v1, parse, runc_weight
from tests.integration.pods import PodFactory

pytestmark = pytest.mark.vm

ROOT = Path(__file__).resolve().parents[2]
PYSANDBOX = str(ROOT / ".venv" / "bin" / "pysandbox")

RESOURCES = {
    "memory": {"limit": 64 << 20},
    "pids": {"limit": 100},
    "cpu": {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0", "mems": "0"},
}
UPDATE = {
    "memory": {"limit": 96 << 20},
    "pids": {"limit": 50},
    "cpu": {"shares": 256, "quota": 25000, "period": 100000},
}
JOIN = "io.kubernetes.cri.container-type", "io.kubernetes.cri.sandbox-id"
#: Device access from an exec (docs/cgroups.md, "Devices"): a node of a disk made and read,
#: then the v1 device cgroup's list when there is one.
DEVICES = (
    "mknod /dev/disk b 259 0 && head -c1 /dev/disk > /dev/null 2>&1; echo disk=$?; "
    "cat /sys/fs/cgroup/devices/devices.list 2>/dev/null; true"
)


def bundle(base: Path, name: str, cgroupns: bool, annotations: dict[str, str]) -> Path:
    """``sleep`` with :data:`RESOURCES`, no cgroup namespace unless ``cgroupns``."""
    spec: dict[str, Any] = default_spec(
        ["sleep", "1000"], rootfs=str(images.ensure_default_image())
    )
    if not cgroupns:
        spec["linux"]["namespaces"] = [
            n for n in spec["linux"]["namespaces"] if n["type"] != "cgroup"
        ]
    spec["linux"]["resources"] = copy.deepcopy(RESOURCES)
    spec["annotations"] = annotations
    path = base / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(spec))
    return path


class Cli:
    """runc or pysandbox with a root of its own."""

    def __init__(self, binary: str, root: Path) -> None:
        self.binary, self.root = binary, root

    def __call__(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.binary, "--root", str(self.root), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=180,
        )

    def ok(self, *args: str, stdin: str | None = None) -> str:
        done = self(*args, stdin=stdin)
        assert done.returncode == 0, f"{self.binary} {args}: {done.stderr}"
        return done.stdout

    def create(self, cid: str, path: Path) -> None:
        # The container's stdio must not be our pipes: sleep would hold them open.
        with tempfile.TemporaryFile("w+") as errors:
            done = subprocess.run(
                [self.binary, "--root", str(self.root), "create", "--bundle", str(path), cid],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors,
                timeout=180,
            )
            errors.seek(0)
            assert done.returncode == 0, f"{self.binary} create: {errors.read()}"
        self.ok("start", cid)

    def readings(self, cid: str, tmp: Path) -> tuple[dict[str, str], dict[str, str]]:
        """The limits seen inside ``cid`` before and after ``update --resources``."""
        before = parse(self.ok("exec", cid, "sh", "-c", READER))
        (tmp / "update.json").write_text(json.dumps(UPDATE))
        self.ok("update", "--resources", str(tmp / "update.json"), cid)
        after = parse(self.ok("exec", cid, "sh", "-c", READER))
        return before, after


@pytest.fixture
def clis(pod_factory: PodFactory) -> Iterator[tuple[Cli, Cli]]:
    """(runc, pysandbox), each with a fresh root (removed with the pods' by ``pod_factory``);
    every container is deleted afterwards."""
    if shutil.which("runc") is None:
        pytest.fail("runc is missing: run 'make deps' (scripts/install-host-packages.sh)")
    roots = [pod_factory.new_root("cg") for _ in range(2)]
    pair = Cli("runc", roots[0]), Cli(PYSANDBOX, roots[1])
    yield pair
    for cli in pair:
        for cid in cli("list", "--quiet").stdout.split():
            cli("delete", "--force", cid)


def host_layout() -> str:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == "/sys/fs/cgroup":
            return "v2" if fields[fields.index("-") + 1] == "cgroup2" else "v1"
    return "v2"


def assert_v2_shows_runcs_limits(v2: dict[str, str], runc: dict[str, str], shares: int) -> None:
    """The v2 layout reads the limits runc gives (runc's v1 files on a v1 host)."""
    assert v2["version"] == "v2", v2
    limits = {k: v for k, v in as_runc_v1(runc).items() if k not in ("version", "shares")}
    assert as_runc_v1(v2) == limits
    assert v2["weight"] == str(runc_weight(shares)), v2


def test_limits_seen_inside_as_runc_shows_them_before_and_after_update(
    clis: tuple[Cli, Cli], tmp_path: Path
) -> None:
    runc, pysandbox = clis
    runc.create("ref", bundle(tmp_path, "runc", cgroupns=False, annotations={}))
    runc_before, runc_after = runc.readings("ref", tmp_path)
    # An exec's device access: a node of a disk is made (CAP_MKNOD) but does not open.
    runc_devices = runc.ok("exec", "ref", "sh", "-c", DEVICES)
    assert runc_devices.startswith("disk=1\n"), runc_devices
    # runc: the spec's limits, in the files of the host's layout.
    assert runc_before["version"] == host_layout()
    assert runc_before["direct"] == runc_before["memory"] == str(64 << 20)
    assert runc_after["memory"] == str(96 << 20) and runc_after["pids"] == "50"

    # pysandbox, default layout (v2): a spec without a cgroup namespace...
    pysandbox.create("v2", bundle(tmp_path, "v2", cgroupns=False, annotations={}))
    v2_before, v2_after = pysandbox.readings("v2", tmp_path)
    assert pysandbox.ok("exec", "v2", "sh", "-c", DEVICES) == "disk=1\n"
    if runc_before["version"] == "v1":
        assert_v2_shows_runcs_limits(v2_before, runc_before, 512)
        assert_v2_shows_runcs_limits(v2_after, runc_after, 256)
    else:
        assert (v2_before, v2_after) == (runc_before, runc_after)
    # ... and one with a cgroup namespace, in the same VM, read the same.
    join = {JOIN[0]: "container", JOIN[1]: "v2"}
    pysandbox.create("v2ns", bundle(tmp_path, "v2ns", cgroupns=True, annotations=join))
    assert parse(pysandbox.ok("exec", "v2ns", "sh", "-c", READER)) == v2_before
    # The VM has one layout: a container asking for the other is refused, clearly.
    conflicting = bundle(tmp_path, "v1in2", False, {**join, "org.pysandbox.cgroup": "v1"})
    refused = pysandbox("create", "--bundle", str(conflicting), "v1in2")
    assert refused.returncode != 0
    assert "asks for cgroup v1" in refused.stderr and "use cgroup v2" in refused.stderr
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert "v1in2" not in pysandbox.ok("list", "--quiet").split()
    for cid in ("v2ns", "v2"):
        pysandbox.ok("delete", "--force", cid)

    # pysandbox, v1 layout: what runc shows on this (v1) host, file for file.
    v1 = bundle(tmp_path, "v1", cgroupns=False, annotations={"org.pysandbox.cgroup": "v1"})
    pysandbox.create("v1", v1)
    v1_before, v1_after = pysandbox.readings("v1", tmp_path)
    # The v1 layout's device cgroup is runc's, line for line (on a v1 host runc shows it).
    v1_devices = pysandbox.ok("exec", "v1", "sh", "-c", DEVICES)
    assert v1_devices.startswith("disk=1\n"), v1_devices
    if runc_before["version"] == "v1":
        assert v1_devices == runc_devices
    if runc_before["version"] == "v1":
        assert (v1_before, v1_after) == (runc_before, runc_after)
    else:
        assert v1_before["version"] == "v1" and v1_before["memory"] == str(64 << 20)
    # A container of the pod that names no layout gets its VM's (the annotation may be on
    # the pod's first container only); with a cgroup namespace in its spec, the same view.
    joiner = bundle(tmp_path, "v1join", True, {JOIN[0]: "container", JOIN[1]: "v1"})
    pysandbox.create("v1join", joiner)
    assert parse(pysandbox.ok("exec", "v1join", "sh", "-c", READER)) == v1_before
