"""A pod VM boots under QEMU (restored from a template and cold), its agent answers, its
virtio-fs share works both ways, it runs a container, and stopping it leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from hypervisor.guest_image import find_image
from hypervisor.process import ProcessHandle
from sandbox.errors import AgentError, AgentTimeout, NotFoundError
from sandbox.pod import record as pod_record
from sandbox.pod.hostfs import mounts_below
from sandbox.pod.lifecycle import GUEST_SHARE, Pod
from tests.integration.helpers import busybox_spec, run_container
from tests.integration.pods import PodFactory
from tests.processes import processes_mentioning

ROOT = Path(__file__).resolve().parents[2]


def _pysandbox(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandbox", *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def _assert_gone(pod: Pod, refs: Sequence[ProcessHandle | None]) -> None:
    for ref in refs:
        assert ref is not None and not ref.alive(), f"{ref} still running"
    assert not pod.dir.exists(), f"{pod.dir} left behind"


def test_agent_reports_guest_details(shared_pod: Pod) -> None:
    image = find_image()
    with shared_pod.client() as agent:
        info = agent.info()
        assert agent.health() > 0
    assert info.protocol_version.startswith("1.")
    assert info.transport == "serial"  # no vhost-vsock on these hosts
    assert info.kernel_release == image.manifest["kernel"]["release"]
    assert ("pod", GUEST_SHARE) in info.shares
    assert 400 * 2**20 < info.mem_total_bytes <= 512 * 2**20


def test_virtiofs_share_read_and_written_from_guest(shared_pod: Pod) -> None:
    payload = os.urandom(200_000)
    (shared_pod.shared_dir / "from-host.bin").write_bytes(payload)
    with shared_pod.client() as agent:
        assert agent.read_file(f"{GUEST_SHARE}/from-host.bin") == payload
        agent.write_file(f"{GUEST_SHARE}/from-guest.txt", b"written in the guest\n")
    assert (shared_pod.shared_dir / "from-guest.txt").read_bytes() == b"written in the guest\n"


def test_malformed_requests_get_errors_and_agent_survives(shared_pod: Pod) -> None:
    with shared_pod.client() as agent:
        with pytest.raises(AgentError, match="must be a normalised path under"):
            agent.mount_share("pod", "/etc")
        with pytest.raises(AgentError, match="invalid share tag"):
            agent.mount_share("../../x", f"{GUEST_SHARE}/x")
        with pytest.raises(AgentError, match="no such file"):
            agent.read_file("/does/not/exist")
        assert agent.health() > 0


def test_boot_run_and_stop_leave_nothing(pod_factory: PodFactory, boot_mode: str) -> None:
    pod = pod_factory()
    assert pod.record.boot == boot_mode
    refs = [pod.process(name) for name in ("qemu", "virtiofsd", "proxy")]
    assert all(ref is not None and ref.alive() for ref in refs)
    result = run_container(pod, busybox_spec("sh", "-c", "echo out; echo err >&2; exit 7"))
    assert (result.status, result.stdout, result.stderr) == (7, b"out\n", b"err\n")
    # The guest ends its VM itself once asked (the agent's Shutdown), well within stop()'s
    # 10 s before it kills QEMU: a restored pod's power-off with the virtio-pmem root once
    # waited for ever on a flush QEMU never answered (docs/root-device.md, "Templates").
    pod.begin_stop()
    qemu = refs[0]
    assert qemu is not None and qemu.wait(8.0), "QEMU still runs 8 s after the agent's Shutdown"
    pod.finish_stop()
    _assert_gone(pod, refs)
    assert processes_mentioning(str(pod.dir)) == []
    assert mounts_below(pod.dir) == []


def test_destroy_after_everything_was_killed(pod_factory: PodFactory) -> None:
    pod = pod_factory()
    refs = [pod.process(name) for name in ("qemu", "virtiofsd", "proxy")]
    for ref in refs:
        assert ref is not None
        ref.signal(signal.SIGKILL)
    Pod.load(pod.root, pod.id).destroy()
    _assert_gone(pod, refs)


def test_agent_reachable_after_proxy_restart(pod_factory: PodFactory) -> None:
    pod = pod_factory()
    proxy = pod.process("proxy")
    assert proxy is not None
    proxy.kill()
    # The next client finds the proxy dead, starts a new one, which resynchronises the
    # serial channel (stale bytes from the old session are discarded).
    with pod.client() as agent:
        assert agent.health() > 0
    new_proxy = pod.process("proxy")
    assert new_proxy is not None and new_proxy != proxy and new_proxy.alive()


def test_boot_timeout_kills_vm_and_names_console_log(
    pod_factory: PodFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYSANDBOX_TEMPLATES", "0")  # a cold boot (restores: test_template.py)
    root = pod_factory.new_root()
    with pytest.raises(AgentTimeout, match=r"console log kept at (\S+)") as caught:
        pod_factory("too-slow", root=root, timeout=0.5)
    kept = Path(str(caught.value).rsplit(" ", 1)[1])
    assert kept.exists()
    assert not pod_record.directory(root, "too-slow").exists()
    with pytest.raises(NotFoundError):
        Pod.load(root, "too-slow")
    assert processes_mentioning(str(pod_record.directory(root, "too-slow"))) == []


def test_cli_boot_info_stop(pod_factory: PodFactory) -> None:
    vm_root = pod_factory.new_root()
    booted = _pysandbox("--root", str(vm_root), "pod", "boot", "cli-pod")
    assert booted.returncode == 0, booted.stderr
    assert "running" in booted.stdout
    try:
        info = _pysandbox("--root", str(vm_root), "pod", "info", "cli-pod")
        assert info.returncode == 0, info.stderr
        details = json.loads(info.stdout)
        assert details["transport"] == "serial" and details["status"] == "running"
        listed = _pysandbox("--root", str(vm_root), "pod", "list")
        assert "cli-pod\trunning" in listed.stdout
        dup = _pysandbox("--root", str(vm_root), "pod", "boot", "cli-pod")
        assert dup.returncode != 0 and "already exists" in dup.stderr
    finally:
        stopped = _pysandbox("--root", str(vm_root), "pod", "stop", "cli-pod")
    assert stopped.returncode == 0, stopped.stderr
    gone = _pysandbox("--root", str(vm_root), "pod", "info", "cli-pod")
    assert gone.returncode == 1 and gone.stderr.strip() == "pysandbox: pod cli-pod does not exist"
    assert "Traceback" not in gone.stderr


def test_missing_image_is_reported_with_the_fix(tmp_path: Path) -> None:
    env = {"PYSANDBOX_GUEST_IMAGE": str(tmp_path / "nowhere")}
    booted = _pysandbox("--root", str(tmp_path / "root"), "pod", "boot", "x", env=env)
    assert booted.returncode == 1
    assert "make guest-image" in booted.stderr and "Traceback" not in booted.stderr
    assert not list((tmp_path / "root").glob("p/*"))
    check = _pysandbox("check", env=env)
    assert check.returncode == 1 and "fix: make guest-image" in check.stdout
