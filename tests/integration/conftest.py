"""Fixtures for tests that boot real VMs (TCG on these hosts).

``pod_factory`` tracks every pod a test boots and destroys them all at teardown; when the test
failed, each pod's serial console log is copied to $PYSANDBOX_KEEP_LOGS_DIR (default
/tmp/pysandbox-test-logs) and its path printed. ``shared_pod`` is one VM booted once per
session for the tests that only read from it, so the suite does not pay a boot per test.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hypervisor.errors import GuestImageError
from hypervisor.guest_image import find_image
from sandbox.pod.lifecycle import Pod

KEEP_LOGS = Path(os.environ.get("PYSANDBOX_KEEP_LOGS_DIR", "/tmp/pysandbox-test-logs"))


def _require_vm_host() -> None:
    if os.geteuid() != 0:
        pytest.fail("VM tests need root (virtiofsd); run them as root, as CI does")
    try:
        find_image()
    except GuestImageError as exc:
        pytest.fail(f"VM tests need the guest image: {exc}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash.setdefault(_FAILED, False)
        if report.failed:
            item.stash[_FAILED] = True


_FAILED = pytest.StashKey[bool]()


@pytest.fixture(scope="session")
def vm_root() -> Iterator[Path]:
    """A private --root for VM tests (short path: unix sockets live below it)."""
    _require_vm_host()
    root = Path(tempfile.mkdtemp(prefix="psb-", dir="/tmp"))
    yield root
    for pod in Pod.list(root):
        pod.destroy()
    shutil.rmtree(root, ignore_errors=True)


def _keep_logs(pods: list[Pod], name: str) -> None:
    KEEP_LOGS.mkdir(parents=True, exist_ok=True)
    for pod in pods:
        if pod.console_log.exists():
            kept = KEEP_LOGS / f"{name}-{pod.id}-console.log"
            shutil.copyfile(pod.console_log, kept)
            print(f"\nserial console log of pod {pod.id} kept at {kept}")


@pytest.fixture
def pod_factory(vm_root: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Pod]]:
    """Boot pods on demand; destroy all of them after the test (keeping logs on failure)."""
    pods: list[Pod] = []
    counter = iter(range(1000))

    def boot(**kwargs: object) -> Pod:
        pod_id = f"{request.node.name[:40].replace('[', '-').replace(']', '')}-{next(counter)}"
        pod = Pod.boot(vm_root, pod_id, **kwargs)  # type: ignore[arg-type]
        pods.append(pod)
        return pod

    yield boot
    if request.node.stash.get(_FAILED, False):
        _keep_logs(pods, request.node.name)
    for pod in pods:
        pod.destroy()


@pytest.fixture(scope="session")
def shared_pod(vm_root: Path) -> Iterator[Pod]:
    """One pod for the whole session, for tests that do not change the VM."""
    pod = Pod.boot(vm_root, "shared-session-pod")
    yield pod
    pod.stop()
