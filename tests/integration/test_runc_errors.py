"""Errors clients parse: the runtime refuses a verb with runc's words.

containerd's runc shim reads the text of a failed ``kill``: "container not running" means the
process already finished (StopPodSandbox then goes on), "does not exist" means no such
container. The same container life (created, started, its process exits) is driven through
runc on the host and through pysandbox, and every refusal afterwards must carry runc's words.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox.image import store as images
from sandbox.run.default_spec import default_spec
from tests.integration.pods import PodFactory
from tests.processes import wait_until

pytestmark = pytest.mark.vm

ROOT = Path(__file__).resolve().parents[2]
PYSANDBOX = [sys.executable, "-m", "sandbox"]

#: Verbs refused once the container's process has exited, and an unknown id for each.
REFUSED = [
    ("kill", "{id}", "9"),
    ("start", "{id}"),
    ("exec", "{id}", "true"),
    ("pause", "{id}"),
    ("resume", "{id}"),
    ("update", "--memory", "10000000", "{id}"),
]


def _bundle(tmp: Path) -> Path:
    bundle = tmp / "bundle"
    bundle.mkdir()
    spec = default_spec(["true"], rootfs=str(images.ensure_default_image()))
    spec["root"]["readonly"] = True
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def _message(stderr: str) -> str:
    """runc logs ``time=... level=error msg="..."``; pysandbox prints ``pysandbox: ...``."""
    found = re.search(r'msg="([^"]*)"', stderr)
    return found.group(1) if found else stderr.strip()


def _life(runtime: list[str], bundle: Path, cid: str) -> dict[str, tuple[int, str]]:
    """Create and start ``cid`` (its process exits at once), then try every refused verb."""

    def call(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*runtime, *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
        )

    # create leaves a process holding its stdio (runc's init, our shim): a file, not a pipe.
    log = bundle.parent / f"create-{Path(runtime[0]).name}.log"
    with open(log, "w") as sink:
        rc = subprocess.run(
            [*runtime, "create", "--bundle", str(bundle), cid],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
            timeout=120,
        ).returncode
    assert rc == 0, log.read_text()
    try:
        assert call("start", cid).returncode == 0
        assert wait_until(lambda: json.loads(call("state", cid).stdout)["status"] == "stopped"), (
            "the container's process did not exit"
        )
        seen = {}
        for verb in REFUSED:
            result = call(*(arg.format(id=cid) for arg in verb))
            seen[verb[0]] = (result.returncode, _message(result.stderr))
            unknown = call(*(arg.format(id=f"{cid}-unknown") for arg in verb))
            seen[f"{verb[0]} unknown"] = (unknown.returncode, _message(unknown.stderr))
        return seen
    finally:
        call("delete", "--force", cid)


def test_refusals_use_runc_words(tmp_path: Path, pod_factory: PodFactory) -> None:
    bundle = _bundle(tmp_path)
    runc = _life(["runc", "--root", str(tmp_path / "runc")], bundle, "words")
    ours = _life([*PYSANDBOX, "--root", str(pod_factory.new_root())], bundle, "words")
    for case, (rc, words) in runc.items():
        our_rc, our_words = ours[case]
        assert rc != 0 and our_rc != 0, (case, runc[case], ours[case])
        assert words.removeprefix("exec failed: ") in our_words, (case, runc[case], ours[case])
