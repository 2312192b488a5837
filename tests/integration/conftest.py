"""Fixtures for tests that boot real VMs (TCG on these hosts).

Every pod a VM test uses comes from a :class:`~tests.integration.pods.PodFactory`: booted by
it, or booted by a CLI, shim or daemon under a root it watches. There is one factory per test
(``pod_factory``), per module (``module_pods``) and per session (``session_pods``, which boots
``shared_pod``: one VM for the tests that only read from it, so the suite does not pay a boot
per test). When a test fails, each factory it used, directly or through other fixtures, copies
the logs of its pods (serial console, agent proxy, virtiofsd, boot notes) to
``$PYSANDBOX_KEEP_LOGS_DIR/<test>/`` (default /tmp/pysandbox-test-logs) while they still run;
the path is printed with the failure and again in the summary. A shared pod's logs are thus
kept whenever any test using it failed.

``boot_mode`` runs a test once with pods restored from a template VM and once with pods booted
cold (``PYSANDBOX_TEMPLATES=0``, sandbox/pod/template.py), for what both paths must get right.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from hypervisor.errors import GuestImageError
from hypervisor.guest_image import find_image
from sandbox.pod.lifecycle import Pod
from tests.integration.pods import KEEP_LOGS, PodFactory

#: The factories alive now, with the name of the fixture that made each.
_ACTIVE = pytest.StashKey[list[tuple[str, PodFactory]]]()
#: (test, directory) of every log kept in this session, for the summary.
_KEPT = pytest.StashKey[list[tuple[str, Path]]]()


def _require_vm_host() -> None:
    if os.geteuid() != 0:
        pytest.fail("VM tests need root (virtiofsd); run them as root, as CI does")
    try:
        find_image()
    except GuestImageError as exc:
        pytest.fail(f"VM tests need the guest image: {exc}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On a failed setup or call, keep the logs of the pods of every factory the test used
    (their pods still run: teardown comes later) and name the place in the report."""
    report = yield
    if not report.failed or report.when not in ("setup", "call"):
        return report
    names = set(getattr(item, "fixturenames", ()))
    for fixture, factory in item.config.stash.get(_ACTIVE, []):
        if fixture not in names:
            continue
        kept = factory.keep_logs(item.nodeid)
        if kept is not None:
            item.config.stash.setdefault(_KEPT, []).append((item.nodeid, kept))
            report.sections.append((f"VM logs kept ({fixture})", f"{kept}\n"))
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    kept = terminalreporter.config.stash.get(_KEPT, [])
    if kept:
        terminalreporter.section("VM logs of failed tests")
        for test, directory in dict.fromkeys(kept):  # one line per test and directory
            terminalreporter.write_line(f"{test}: {directory}")


@pytest.fixture(scope="session")
def vm_root() -> Iterator[Path]:
    """A private --root for VM tests (short path: unix sockets live below it)."""
    _require_vm_host()
    root = Path(tempfile.mkdtemp(prefix="psb-", dir="/tmp"))
    yield root
    for pod in Pod.list(root):
        pod.destroy()
    shutil.rmtree(root, ignore_errors=True)


def _factory(request: pytest.FixtureRequest, vm_root: Path, label: str) -> Iterator[PodFactory]:
    factory = PodFactory(vm_root, label, KEEP_LOGS)
    active = request.config.stash.setdefault(_ACTIVE, [])
    entry = (str(request.fixturename), factory)
    active.append(entry)
    try:
        yield factory
    finally:
        active.remove(entry)
        factory.close()


@pytest.fixture
def pod_factory(vm_root: Path, request: pytest.FixtureRequest) -> Iterator[PodFactory]:
    """This test's pods: ``pod_factory(**Pod.boot options)`` boots one; ``.new_root()`` is a
    --root for CLI runs; all destroyed after the test, their logs kept if it failed."""
    yield from _factory(request, vm_root, request.node.name)


@pytest.fixture(scope="module")
def module_pods(vm_root: Path, request: pytest.FixtureRequest) -> Iterator[PodFactory]:
    """Pods shared by a module's tests (as ``pod_factory``; logs kept when any of the tests
    using them failed)."""
    yield from _factory(request, vm_root, request.module.__name__.rsplit(".", 1)[-1])


@pytest.fixture(scope="session")
def session_pods(vm_root: Path, request: pytest.FixtureRequest) -> Iterator[PodFactory]:
    yield from _factory(request, vm_root, "session")


@pytest.fixture(scope="session")
def shared_pod(session_pods: PodFactory) -> Pod:
    """One pod for the whole session, for tests that do not change the VM."""
    return session_pods("shared-session-pod")


@pytest.fixture(params=["restored", "cold"])
def boot_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """ "restored" or "cold": how pods booted in this test start (CLI subprocesses too).

    Restored pods use the usual template directory (built there by the first boot if missing).
    """
    monkeypatch.setenv("PYSANDBOX_TEMPLATES", "1" if request.param == "restored" else "0")
    return str(request.param)
