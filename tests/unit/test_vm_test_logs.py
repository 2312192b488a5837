"""The VM test fixtures keep the logs of the pods a failed test used (tests/integration/conftest.py,
tests/integration/pods.py), and only those: a pytest run of a generated module with fake pod
directories (no VM), whose results and kept files are read back."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CONFTEST = """
import pytest
from tests.integration.conftest import *  # noqa: F403 - the fixtures and hooks under test


@pytest.fixture(scope="session")
def vm_root(tmp_path_factory):  # no VM host needed: nothing here boots a VM
    return tmp_path_factory.mktemp("vm")
"""

TESTS = '''
import json

import pytest

from sandbox.store import pod_dir_name


def fake_pod(root, pod_id, failed_boot=False):
    """What a booted pod leaves in its directory (or a failed boot under <root>/logs)."""
    if failed_boot:
        (root / "logs").mkdir(exist_ok=True)
        (root / "logs" / f"{pod_id}-console.log").write_text(f"panic of {pod_id}\\n")
        return
    directory = root / "p" / pod_dir_name(pod_id)
    directory.mkdir(parents=True)
    (directory / "pod.json").write_text(json.dumps({"id": pod_id, "status": "running"}))
    (directory / "console.log").write_text(f"console of {pod_id}\\n")
    (directory / "proxy.log").write_text(f"proxy of {pod_id}\\n")


@pytest.fixture(scope="module")
def shared(module_pods):
    root = module_pods.new_root()
    fake_pod(root, "shared-pod")
    return root


def test_fails_with_its_own_pods(pod_factory):
    root = pod_factory.new_root()
    fake_pod(root, "own-pod")
    fake_pod(root, "never-booted", failed_boot=True)
    assert False, "failing on purpose"


def test_passes_with_its_own_pod(pod_factory):
    fake_pod(pod_factory.new_root(), "passing-pod")


def test_passes_with_the_shared_pod(shared):
    pass


def test_fails_with_the_shared_pod(shared):
    assert False, "failing on purpose"


def test_fails_without_pods():
    assert False, "failing on purpose"


def test_pods_are_gone_after_their_tests(vm_root):
    assert sorted(p.name for p in vm_root.rglob("*") if p.name.endswith(".log")) == [
        "console.log",
        "proxy.log",
    ]  # the module's shared pod only
'''


def test_failed_tests_keep_the_logs_of_the_pods_they_used(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_generated.py").write_text(TESTS)
    kept = tmp_path / "kept"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rN", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYSANDBOX_KEEP_LOGS_DIR": str(kept)},
    )
    assert "3 failed, 3 passed" in done.stdout, done.stdout + done.stderr
    files = sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file())
    own = "test_generated.py-test_fails_with_its_own_pods"
    shared = "test_generated.py-test_fails_with_the_shared_pod"
    assert files == [
        f"{own}/failed-boot-never-booted-console.log",
        f"{own}/own-pod-console.log",
        f"{own}/own-pod-proxy.log",
        f"{shared}/shared-pod-console.log",
        f"{shared}/shared-pod-proxy.log",
    ]
    assert (kept / own / "own-pod-console.log").read_text() == "console of own-pod\n"
    # Named with the failure, and again at the end.
    for fixture, directory in (("pod_factory", kept / own), ("module_pods", kept / shared)):
        assert re.search(rf" VM logs kept \({fixture}\) -+\n{directory}\n", done.stdout), (
            done.stdout
        )
    summary = done.stdout.split("VM logs of failed tests")[1]
    assert f"test_fails_with_its_own_pods: {kept / own}" in summary
    assert f"test_fails_with_the_shared_pod: {kept / shared}" in summary
