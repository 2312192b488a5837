"""Nothing a finished run, detached run or runtime container leaves behind on the host:
virtiofsd's pid file in /var/run/virtiofsd/, lock files under ``<root>/locks/``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hypervisor.virtiofsd import PID_DIR
from tests.integration.helpers import busybox_spec
from tests.integration.pods import PodFactory

ROOT = Path(__file__).resolve().parents[2]


def cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandbox", "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def root(pod_factory: PodFactory) -> Path:
    """An empty --root of this test's (its pods' logs kept if the test fails)."""
    return pod_factory.new_root("psl")


def _pid_files_of(root: Path) -> list[str]:
    """virtiofsd's pid files for sockets below ``root`` (named after the socket path)."""
    mark = str(root).replace("/", ".") + "."
    return [p.name for p in PID_DIR.iterdir() if p.name.startswith(mark)]


def test_runs_and_containers_leave_no_pid_file_or_lock(root: Path, tmp_path: Path) -> None:
    done = cli(root, "run", "default", "true")
    assert done.returncode == 0, done.stderr
    done = cli(root, "run", "-d", "--name", "leak-d", "default", "sleep", "60")
    assert done.returncode == 0, done.stderr
    done = cli(root, "rm", "-f", "leak-d")
    assert done.returncode == 0, done.stderr
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(busybox_spec("true")))
    done = cli(root, "run", "--bundle", str(bundle), "leak-b")
    assert done.returncode == 0, done.stderr
    assert _pid_files_of(root) == []
    locks = root / "locks"
    assert not locks.exists() or sorted(p.name for p in locks.iterdir()) == []
    assert not (root / "p").exists() or list((root / "p").iterdir()) == []
