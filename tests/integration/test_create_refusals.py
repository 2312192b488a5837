"""``pysandbox create`` on invalid bundles: refused on the host before any VM, like runc.

Every variant of :data:`tests.unit.ocispec.variants.INVALID` is given to the real CLI as
containerd gives a bundle. Each must fail in one line that names config.json and the field,
within about a second, leaving no container or pod directory and no process; and no VM may
have been started. The proof of that: the guest image is pointed at an empty directory, so
any attempt to boot would fail with a message about the image instead. Where runc refuses the
same bundle (``Variant.runc``), it is run on it too, to show the bundle really is invalid.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.image import store as images
from tests.integration.pods import PodFactory
from tests.processes import processes_mentioning
from tests.unit.ocispec.variants import INVALID, Variant, base_config

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = str(ROOT / ".venv" / "bin" / "pysandbox")


@pytest.fixture(autouse=True)
def as_root() -> None:
    """create needs root, as runc does: without it the test fails (a skip is not a pass)."""
    if os.geteuid() != 0:
        pytest.fail("create needs root, as runc does: run the tests as root, as CI does")


@pytest.fixture(scope="module")
def rootfs() -> Path:
    """A busybox root filesystem (the default image): runc can run ``true`` in it."""
    return images.ensure_default_image()


@pytest.fixture(scope="module")
def no_guest_image(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment for the CLI: a guest image directory with nothing in it."""
    empty = tmp_path_factory.mktemp("no-guest-image")
    return {**os.environ, "PYSANDBOX_GUEST_IMAGE": str(empty)}


@pytest.fixture
def state_root() -> Iterator[Path]:
    path = Path(os.path.realpath("/tmp")) / f"psc-{os.getpid()}-{time.monotonic_ns()}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _bundle(directory: Path, variant: Variant, rootfs: Path) -> Path:
    directory.mkdir()
    (directory / "config.json").write_bytes(variant.render(base_config(str(rootfs))))
    return directory


def _runc_refuses(bundle: Path, runc_root: Path, cid: str) -> str:
    """runc's verdict on ``bundle``: its last error line, or '' when it created it."""
    with open(bundle / "runc.err", "w+") as err:
        done = subprocess.run(
            ["runc", "--root", str(runc_root), "create", "--bundle", str(bundle), cid],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            timeout=60,
        )
        err.seek(0)
        text = err.read()
    subprocess.run(
        ["runc", "--root", str(runc_root), "delete", "--force", cid],
        capture_output=True,
        timeout=60,
    )
    return text.strip().splitlines()[-1] if done.returncode != 0 and text.strip() else ""


def test_invalid_bundles_are_refused_before_any_vm(
    tmp_path: Path, rootfs: Path, no_guest_image: dict[str, str], state_root: Path
) -> None:
    durations = []
    runc = shutil.which("runc")
    for number, variant in enumerate(INVALID):
        bundle = _bundle(tmp_path / f"b{number}", variant, rootfs)
        cid = f"bad{number}"
        started = time.monotonic()
        done = subprocess.run(
            [RUNTIME, "--root", str(state_root), "create", "--bundle", str(bundle), cid],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            env=no_guest_image,
        )
        durations.append(time.monotonic() - started)
        what = f"{variant.name}: {done.stderr!r}"
        assert done.returncode == 1, what
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, what
        config = bundle / "config.json"
        if variant.field == "config.json":
            assert done.stderr.startswith(f"pysandbox: {config}"), what
        else:
            assert done.stderr.startswith(f"pysandbox: {config}: {variant.field}: "), what
        assert variant.says in done.stderr, what
        assert not (state_root / cid).exists(), what
        assert not list((state_root / "p").glob("*")) if (state_root / "p").exists() else True
        if variant.runc and runc is not None:
            assert _runc_refuses(bundle, tmp_path / "runc-root", cid), f"runc took {variant.name}"
    assert processes_mentioning(str(state_root), live_only=True) == []
    # A CLI start is ~0.3 s here; a boot, even restored from a template, at least 1 s more.
    assert statistics.median(durations) < 1.0, durations
    assert max(durations) < 5.0, durations


def test_an_id_longer_than_a_file_name_allows_is_refused_at_once(
    tmp_path: Path, rootfs: Path, no_guest_image: dict[str, str], state_root: Path
) -> None:
    good = Variant("valid", "", "", change=lambda config: None)
    bundle = _bundle(tmp_path / "b", good, rootfs)
    for length in (201, 1000):
        done = subprocess.run(
            [RUNTIME, "--root", str(state_root), "create", "--bundle", str(bundle), "x" * length],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            env=no_guest_image,
        )
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1
        assert f"({length} characters): at most 200 characters" in done.stderr
        assert "File name too long" not in done.stderr
    assert not state_root.exists() or sorted(p.name for p in state_root.iterdir()) in (
        [],
        ["locks"],
    )


@pytest.mark.vm
def test_the_longest_id_names_every_file_it_needs(
    pod_factory: PodFactory, tmp_path: Path, rootfs: Path
) -> None:
    """200 characters: the container's directories on the host and in the guest (share,
    overlay, cgroup) are named by it, and a failed boot's console log by its pod id."""
    cid = "i" * 200
    good = Variant("valid", "", "", change=lambda config: None)
    bundle = _bundle(tmp_path / "b", good, rootfs)
    vm_root = pod_factory.new_root()
    runtime = [RUNTIME, "--root", str(vm_root)]
    with open(tmp_path / "create.err", "w+") as err:
        done = subprocess.run(
            [*runtime, "create", "--bundle", str(bundle), cid],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            timeout=300,
        )
        err.seek(0)
        assert done.returncode == 0, err.read()
    try:
        state = subprocess.run([*runtime, "state", cid], capture_output=True, text=True, timeout=60)
        assert state.returncode == 0 and '"status": "created"' in state.stdout, state.stderr
    finally:
        deleted = subprocess.run(
            [*runtime, "delete", "--force", cid], capture_output=True, text=True, timeout=120
        )
    assert deleted.returncode == 0, deleted.stderr
    assert not (vm_root / cid).exists()
