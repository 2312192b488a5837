"""What ``pysandbox run`` imports before it has a VM: a run that takes one of the warm pool
(docs/warm-pool.md) neither pulls an image nor builds a QEMU command line, so it does not
import the modules for them (~40 ms of a ~1 s run under TCG, docs/performance.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sandbox.image import store as images

REPO = Path(__file__).resolve().parents[2]


def test_the_run_path_imports_neither_the_pull_machinery_nor_qemu_args() -> None:
    code = (
        "import sys, sandbox.run.foreground, sandbox.run.pool, hypervisor.guest_image; "
        "print(sorted(m for m in ('sandbox.image.pull', 'sandbox.image.skopeo', "
        "'hypervisor.qemu_args') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert done.stdout.strip() == "[]"


def test_a_registry_name_is_not_resolved_locally(tmp_path: Path) -> None:
    assert images.resolve_local("docker.io/library/busybox:latest") is None
    assert images.resolve_local("busybox") is None
