"""Kernel features a privileged container asks for are loaded on demand inside the VM.

Under runc, ``brctl addbr`` or ``ip link add type dummy`` in a container with CAP_NET_ADMIN
makes the host kernel load ``bridge``/``dummy`` through modprobe. In the guest the same
request goes to the image's modprobe (agent/kmod.py); without it brctl says "Package not
installed". Each command is also run under runc on the host: what succeeds there must succeed
in the VM.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from sandbox.image import store as images
from sandbox.pod.lifecycle import Pod
from sandbox.run.default_spec import default_spec
from tests.integration.helpers import busybox_spec, run_container

pytestmark = pytest.mark.vm

#: One line per kernel feature: the command prints "<name> ok" when the kernel provided it.
SCRIPT = " ; ".join(
    [
        "brctl addbr br-test && echo 'bridge ok'",
        "ip link add dm-test type dummy && echo 'dummy ok'",
        "ip link add ve-a type veth peer name ve-b && echo 'veth ok'",
        "ip link add mv-test link ve-a type macvlan && echo 'macvlan ok'",
        "ip link add link ve-a name ve-a.7 type vlan id 7 && echo 'vlan ok'",
        "ip link add vx-test type vxlan id 42 dev ve-a dstport 4789 && echo 'vxlan ok'",
    ]
)
EXPECTED = {"bridge ok", "dummy ok", "veth ok", "macvlan ok", "vlan ok", "vxlan ok"}


def _net_admin(spec: dict[str, object]) -> None:
    caps = spec["process"]["capabilities"]  # type: ignore[index]
    for kind in ("bounding", "effective", "permitted"):
        caps[kind] = sorted({*caps[kind], "CAP_NET_ADMIN"})


def test_network_modules_load_on_demand_as_under_runc(shared_pod: Pod, tmp_path: Path) -> None:
    spec = busybox_spec("sh", "-c", SCRIPT)
    _net_admin(spec)
    ours = set(run_container(shared_pod, spec).out.splitlines())

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    host_spec = default_spec(["sh", "-c", SCRIPT], rootfs=str(images.ensure_default_image()))
    host_spec["root"]["readonly"] = True
    _net_admin(host_spec)
    (bundle / "config.json").write_text(json.dumps(host_spec))
    done = subprocess.run(
        ["runc", "--root", str(tmp_path / "runc"), "run", "--bundle", str(bundle), "mods"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    runc = set(done.stdout.splitlines())
    # This host's kernel lacks some of these (dummy here); what runc gets, we get, and the
    # guest kernel has the whole set.
    assert "bridge ok" in runc and "veth ok" in runc, done.stderr
    assert runc <= ours
    assert ours == EXPECTED
