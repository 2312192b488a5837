"""``pysandbox pull``, ``images``, ``rmi`` and ``run REF`` against real registries on loopback.

Two registries run for the whole module (Debian's ``docker-registry``): ``plain`` speaks
HTTP without auth; ``secure`` speaks TLS (a self-signed certificate) with htpasswd auth.
Images are built here from the project's busybox image and pushed with skopeo:

- ``pysandbox/bb:v1``: busybox, one layer (OCI manifest);
- ``pysandbox/layered:v1``: busybox plus two layers with a whiteout and an opaque directory,
  pushed as docker schema 2 (so the store converts it to OCI);
- ``pysandbox/multi:v1``: an index with the busybox image for amd64 and a tiny arm64 one;
- ``pysandbox/arm:v1``: an arm64 image only;
- ``private/bb:v1`` on ``secure``.

Every pysandbox call runs as a user would (``python -m sandbox``), with a private store
(``PYSANDBOX_IMAGE_STORE``), HOME and XDG_RUNTIME_DIR, so no host credentials or registry
config take part. Only ``test_run_ref_end_to_end`` boots a VM.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import pty
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.image import store as images
from tests.integration.pods import PodFactory
from tests.integration.registry import (
    Layout,
    Registry,
    environment,
    files_tar,
    free_port,
    manifest_digest,
    sha,
    start_registry,
    tampered,
    tree_tar,
)

ROOT = Path(__file__).resolve().parents[2]
USER, PASSWORD = "tester", "Corr3ct-horse-pysandbox"
WRONG_PASSWORD = "wr0ng-Secret-pysandbox-42"
MOTD_LAYERS = [
    [("data", None), ("data/a", b"a\n"), ("data/b", b"b\n"), ("etc/motd", b"one\n"),
     ("opt", None), ("opt/gone", None), ("opt/gone/old", b"old\n"),
     ("opt/gone/sub", None), ("opt/gone/sub/x", b"x\n")],
    [("data/.wh.a", b""), ("opt/gone/.wh..wh..opq", b""), ("opt/gone/new", b"new\n"),
     ("etc/motd", b"three\n")],
]  # fmt: skip


def _require_tools() -> None:
    missing = [
        t for t in ("docker-registry", "skopeo", "htpasswd", "openssl") if not shutil.which(t)
    ]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run scripts/install-host-packages.sh")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The test images in one OCI layout; their descriptors by tag."""
    _require_tools()
    layout = Layout(tmp_path_factory.mktemp("layout"))
    busybox = tree_tar(images.ensure_default_image())
    bb = layout.image([busybox], Cmd=["sh"])
    layered = layout.image(
        [busybox, files_tar(MOTD_LAYERS[0]), files_tar(MOTD_LAYERS[1])],
        Cmd=["cat", "/etc/motd"],
        Env=["GREETING=hello"],
        WorkingDir="/data",
    )
    arm = layout.image([files_tar([("arm", b"arm64\n")])], arch="arm64")
    multi = layout.index({"amd64": bb, "arm64": arm})
    for tag, descriptor in (("bb", bb), ("layered", layered), ("arm", arm), ("multi", multi)):
        layout.tag(tag, descriptor)
    return {
        "layout": layout.root,
        "busybox_layer": sha(__import__("gzip").compress(busybox, mtime=0)),
        "bb": bb,
        "multi": multi,
    }


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, built: dict[str, Any]) -> Iterator[Registry]:
    registry = start_registry(tmp_path_factory.mktemp("plain-registry"))
    try:
        layout = built["layout"]
        registry.push(layout, "bb", "pysandbox/bb:v1")
        registry.push(layout, "layered", "pysandbox/layered:v1", "--format=v2s2")
        registry.push(layout, "multi", "pysandbox/multi:v1", "--all")
        registry.push(layout, "arm", "pysandbox/arm:v1")
        yield registry
    finally:
        registry.stop()


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory, built: dict[str, Any]) -> Iterator[Registry]:
    registry = start_registry(
        tmp_path_factory.mktemp("secure-registry"), credentials=(USER, PASSWORD), tls=True
    )
    try:
        registry.push(built["layout"], "bb", "private/bb:v1")
        yield registry
    finally:
        registry.stop()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def env(home: Path, store: Path) -> dict[str, str]:
    return environment(home, store)


def psb(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandbox", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def one_line_failure(result: subprocess.CompletedProcess[str], status: int = 125) -> str:
    """The single stderr line of a failed call (no traceback), after checking the status."""
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def listed(env: dict[str, str]) -> list[dict[str, Any]]:
    result = psb(env, "images", "--format", "json")
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows


def snapshot(store: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every blob and store entry: what a no-op pull must not change."""
    found = {}
    for path in [*(store / "blobs" / "sha256").iterdir(), *(store / "sha256").iterdir()]:
        st = path.stat()
        found[str(path.relative_to(store))] = (st.st_ino, st.st_mtime_ns)
    return found


def leftovers(store: Path) -> list[str]:
    """Temporary directories of pulls or unpacks still in the store."""
    return [
        str(p.relative_to(store))
        for sub in ("blobs", "sha256")
        if (store / sub).is_dir()
        for p in (store / sub).iterdir()
        if p.name.startswith(".tmp-")
    ]


def entry(store: Path, key: str) -> Path:
    return store / "sha256" / key.partition(":")[2]


def file_digest(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


# --- pulling -------------------------------------------------------------------------------


def test_pull_by_tag_unpacks_lists_and_a_second_pull_is_a_no_op(
    plain: Registry, env: dict[str, str], store: Path
) -> None:
    ref = f"{plain.host}/pysandbox/layered:v1"
    digest = manifest_digest(plain, "pysandbox/layered:v1")
    started = time.monotonic()
    first = psb(env, "pull", "--tls-verify=false", ref)
    pull_seconds = time.monotonic() - started
    assert first.returncode == 0, first.stderr
    assert first.stdout == f"{plain.host}/pysandbox/layered@{digest}\n"
    steps = first.stderr.splitlines()
    assert sorted(s.split(" sha256:")[0] for s in steps[:3]) == [
        f"pysandbox: layer {n}/3" for n in (1, 2, 3)
    ]  # in the order they finished
    assert all(s.endswith(")") and " fetched (" in s for s in steps[:3]), steps
    assert steps[-2:] == [
        f"pysandbox: unpacked {ref} (3 layers)",
        f"pysandbox: pulled {ref} ({digest}) in {steps[-1].rsplit(' in ', 1)[1]}",
    ]

    (row,) = listed(env)
    assert row["name"] == ref and row["digest"] == digest
    assert row["platform"] == "linux/amd64" and row["created"] == "2024-05-01T00:00:00Z"
    assert row["id"] != digest  # pushed as docker schema 2, stored as OCI
    rootfs = entry(store, row["id"]) / "rootfs"
    assert row["size"] >= (rootfs / "bin" / "busybox").stat().st_size
    assert (rootfs / "etc" / "motd").read_text() == "three\n"
    assert sorted(os.listdir(rootfs / "data")) == ["b"]  # .wh.a removed a
    assert sorted(os.listdir(rootfs / "opt" / "gone")) == ["new"]  # opaque: old and sub gone
    assert not leftovers(store)

    before = snapshot(store)
    started = time.monotonic()
    again = psb(env, "pull", "--tls-verify=false", ref)
    repull_seconds = time.monotonic() - started
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout
    assert again.stderr == f"pysandbox: {ref} is up to date ({digest})\n"
    assert snapshot(store) == before  # nothing fetched, nothing unpacked
    print(f"\npull {pull_seconds:.2f}s, re-pull {repull_seconds:.2f}s")


def test_pull_by_digest_is_served_from_the_store_without_the_registry(
    tmp_path: Path, built: dict[str, Any], env: dict[str, str]
) -> None:
    registry = start_registry(tmp_path / "registry")
    try:
        registry.push(built["layout"], "bb", "solo/bb:v1")
        digest = manifest_digest(registry, "solo/bb:v1")
        pinned = f"{registry.host}/solo/bb@{digest}"
        first = psb(env, "pull", "--tls-verify=false", pinned)
        assert first.returncode == 0, first.stderr
        assert first.stdout == pinned + "\n"
    finally:
        registry.stop()
    again = psb(env, "pull", "--tls-verify=false", pinned)
    assert again.returncode == 0, again.stderr
    assert again.stderr == ""  # nothing to say: the registry was not asked
    by_tag = psb(env, "pull", "--tls-verify=false", f"{registry.host}/solo/bb:v1")
    line = one_line_failure(by_tag)
    assert line == (
        f"pysandbox: pull {registry.host}/solo/bb:v1: the registry cannot be reached "
        f"({line.split('(', 1)[1].split(')')[0]}); check that {registry.host} is up and "
        "reachable from this host"
    )
    assert "connection refused" in line
    assert [row["name"] for row in listed(env)] == [pinned]


def test_multi_arch_index_resolves_to_this_platform_and_shares_layers(
    plain: Registry, built: dict[str, Any], env: dict[str, str], store: Path
) -> None:
    assert (
        psb(env, "pull", "-q", "--tls-verify=false", f"{plain.host}/pysandbox/bb:v1").returncode
        == 0
    )
    ref = f"{plain.host}/pysandbox/multi:v1"
    result = psb(env, "pull", "--tls-verify=false", ref)
    assert result.returncode == 0, result.stderr
    index_digest = manifest_digest(plain, "pysandbox/multi:v1")
    assert index_digest == built["multi"]["digest"]
    assert result.stdout == f"{plain.host}/pysandbox/multi@{index_digest}\n"
    short = built["bb"]["digest"][:19]
    assert f"pysandbox: {ref}: linux/amd64 image {short}…" in result.stderr
    assert "pysandbox: layer 1/1 sha256:" in result.stderr
    assert "already present" in result.stderr  # the busybox layer came with pysandbox/bb
    rows = {row["name"]: row for row in listed(env)}
    assert rows[ref]["digest"] == index_digest and rows[ref]["id"] == built["bb"]["digest"]
    assert (entry(store, built["bb"]["digest"]) / "rootfs" / "bin" / "busybox").is_file()

    arm = one_line_failure(psb(env, "pull", "--platform", "linux/arm64", ref))
    assert arm == (
        "pysandbox: --platform linux/arm64: a pysandbox VM on this host runs linux/amd64, "
        "linux/386 images only"
    )
    i386 = one_line_failure(psb(env, "pull", "--tls-verify=false", "--platform", "linux/386", ref))
    assert i386 == (
        f"pysandbox: pull {ref}: no image for linux/386 in it (only linux/amd64, linux/arm64); "
        "a pysandbox VM here runs linux/amd64, linux/386 images"
    )
    only_arm = one_line_failure(
        psb(env, "pull", "--tls-verify=false", f"{plain.host}/pysandbox/arm:v1")
    )
    assert only_arm == (
        f"pysandbox: pull {plain.host}/pysandbox/arm:v1: the image is built for linux/arm64, "
        "not linux/amd64; a pysandbox VM here cannot run it (use an image for this platform)"
    )
    assert sorted(rows) == sorted(row["name"] for row in listed(env))  # nothing recorded


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_a_corrupt_blob_in_the_registry_is_refused_and_nothing_is_kept(
    damage: str, plain: Registry, built: dict[str, Any], env: dict[str, str], store: Path
) -> None:
    layer = built["busybox_layer"]
    ref = f"{plain.host}/pysandbox/bb:v1"
    blob = plain.blob_file(layer)
    change = blob.read_bytes()[:1000] if damage == "truncated" else None
    with tampered(blob, change):
        line = one_line_failure(psb(env, "pull", "--tls-verify=false", ref))
    assert line.startswith(f"pysandbox: pull {ref}: ")
    assert ("does not match its digest" in line) or ("cut short" in line), line
    assert listed(env) == []
    assert not (store / "blobs" / "sha256" / layer[7:]).exists()
    assert not (store / "sha256").exists() or not list((store / "sha256").iterdir())
    assert not leftovers(store)
    # The registry is repaired: the next pull starts over cleanly.
    result = psb(env, "pull", "--tls-verify=false", ref)
    assert result.returncode == 0, result.stderr
    assert file_digest(store / "blobs" / "sha256" / layer[7:]) == layer


def test_a_corrupt_blob_in_the_store_is_detected_and_fetched_again(
    plain: Registry, built: dict[str, Any], env: dict[str, str], store: Path
) -> None:
    assert (
        psb(env, "pull", "-q", "--tls-verify=false", f"{plain.host}/pysandbox/bb:v1").returncode
        == 0
    )
    layer = built["busybox_layer"]
    stored = store / "blobs" / "sha256" / layer[7:]
    data = bytearray(stored.read_bytes())
    data[100] ^= 0xFF
    stored.write_bytes(bytes(data))
    result = psb(env, "pull", "--tls-verify=false", f"{plain.host}/pysandbox/layered:v1")
    assert result.returncode == 0, result.stderr
    assert (
        f"1 blob(s) in the store did not match their digest ({layer[:19]}…); fetching them again"
        in result.stderr
    )
    assert file_digest(stored) == layer


def test_unknown_tag_and_unknown_image(plain: Registry, env: dict[str, str]) -> None:
    tag = one_line_failure(
        psb(env, "pull", "--tls-verify=false", f"{plain.host}/pysandbox/bb:nope")
    )
    assert tag == (
        f"pysandbox: pull {plain.host}/pysandbox/bb:nope: {plain.host}/pysandbox/bb has no "
        "tag 'nope' (tags: v1); check the tag"
    )
    image = one_line_failure(psb(env, "pull", "--tls-verify=false", f"{plain.host}/nothing/here"))
    assert image == (
        f"pysandbox: pull {plain.host}/nothing/here:latest: no image {plain.host}/nothing/here "
        f"in {plain.host}; check the name"
    )
    digest = "sha256:" + "0" * 64
    pinned = one_line_failure(
        psb(env, "pull", "--tls-verify=false", f"{plain.host}/pysandbox/bb@{digest}")
    )
    assert "has no manifest sha256:000000000000…; check the digest" in pinned
    bad = one_line_failure(psb(env, "pull", "Pysandbox/BB"))
    assert bad == (
        "pysandbox: invalid image reference 'Pysandbox/BB': repository name 'Pysandbox/BB' "
        "must be lowercase"
    )
    assert listed(env) == []


def _auth_json(path: Path, host: str, password: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    token = base64.b64encode(f"{USER}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": token}}}))


def test_credentials_from_auth_files_and_wrong_ones_never_shown(
    secure: Registry, tmp_path: Path, home: Path, store: Path
) -> None:
    ref = f"{secure.host}/private/bb:v1"
    env = environment(home, store)
    anonymous = one_line_failure(psb(env, "pull", "--tls-verify=false", ref))
    assert anonymous.startswith(f"pysandbox: pull {ref}: the registry refused access (")
    assert anonymous.endswith(
        "the image does not exist or needs credentials: check the name, or log in "
        f"(skopeo login {secure.host}) or give --authfile FILE"
    )

    wrong = tmp_path / "wrong.json"
    _auth_json(wrong, secure.host, WRONG_PASSWORD)
    log = tmp_path / "pysandbox.log"
    args = ["--log", str(log), "--log-format", "json", "pull", "--tls-verify=false"]
    refused = psb(env, *args, "--authfile", str(wrong), ref)
    line = one_line_failure(refused)
    assert "the registry refused access" in line
    token = base64.b64encode(f"{USER}:{WRONG_PASSWORD}".encode()).decode()
    for text in (refused.stdout, refused.stderr, log.read_text()):
        assert WRONG_PASSWORD not in text and token not in text
    assert listed(env) == []

    right = tmp_path / "right.json"
    _auth_json(right, secure.host, PASSWORD)
    assert (
        psb(env, "pull", "-q", "--tls-verify=false", "--authfile", str(right), ref).returncode == 0
    )
    # The places podman and docker keep credentials, each in a fresh store.
    for place in ("run/containers/auth.json", ".docker/config.json"):
        fresh = environment(home, tmp_path / f"store-{place.split('/')[0]}")
        (home / "run" / "containers" / "auth.json").unlink(missing_ok=True)
        (home / ".docker" / "config.json").unlink(missing_ok=True)
        _auth_json(home / place, secure.host, PASSWORD)
        result = psb(fresh, "pull", "--tls-verify=false", ref)
        assert result.returncode == 0, (place, result.stderr)
        assert [row["name"] for row in listed(fresh)] == [ref]

    tls = one_line_failure(psb(env, "pull", "--authfile", str(right), ref))
    assert tls.startswith(f"pysandbox: pull {ref}: TLS verification failed (")
    assert "x509" in tls and f"/etc/containers/certs.d/{secure.host}/ca.crt" in tls


def test_plain_http_registry_needs_tls_verify_false(plain: Registry, env: dict[str, str]) -> None:
    ref = f"{plain.host}/pysandbox/bb:v1"
    line = one_line_failure(psb(env, "pull", ref))
    assert line.startswith(f"pysandbox: pull {ref}: the registry speaks plain HTTP (")
    assert line.endswith(
        f"use --tls-verify=false for a local registry, or mark {plain.host} insecure in "
        "registries.conf"
    )


def test_mirror_and_insecure_registry_from_registries_conf(
    plain: Registry, home: Path, store: Path
) -> None:
    conf = home / "registries.conf"
    home.mkdir(parents=True, exist_ok=True)
    conf.write_text(
        "[[registry]]\n"
        'prefix = "docker.io/library/pysandbox-mirrored"\n'
        f'location = "127.0.0.1:{free_port()}/nowhere"\n'
        "[[registry.mirror]]\n"
        f'location = "{plain.host}/pysandbox/bb"\n'
        "insecure = true\n"
    )
    env = environment(home, store)
    result = psb(env, "pull", "pysandbox-mirrored:v1")  # a short name; no --tls-verify
    assert result.returncode == 0, result.stderr
    digest = manifest_digest(plain, "pysandbox/bb:v1")
    assert result.stdout == f"docker.io/library/pysandbox-mirrored@{digest}\n"
    assert [row["name"] for row in listed(env)] == ["docker.io/library/pysandbox-mirrored:v1"]


def test_rmi_removes_names_images_and_unshared_blobs(
    plain: Registry, built: dict[str, Any], env: dict[str, str], store: Path
) -> None:
    for name in ("bb", "layered"):
        assert (
            psb(
                env, "pull", "-q", "--tls-verify=false", f"{plain.host}/pysandbox/{name}:v1"
            ).returncode
            == 0
        )
    rows = {row["name"]: row for row in listed(env)}
    layered = rows[f"{plain.host}/pysandbox/layered:v1"]
    blobs = store / "blobs" / "sha256"
    before = set(os.listdir(blobs))

    removed = psb(env, "rmi", f"{plain.host}/pysandbox/layered:v1")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout == (
        f"untagged {plain.host}/pysandbox/layered:v1\ndeleted {layered['id']}\n"
    )
    assert not entry(store, layered["id"]).exists()
    left = set(os.listdir(blobs))
    assert built["busybox_layer"][7:] in left  # still used by pysandbox/bb
    assert left < before and len(before - left) == 4  # 2 layers, config, manifest

    bb = rows[f"{plain.host}/pysandbox/bb:v1"]
    by_digest = psb(env, "rmi", bb["digest"])
    assert by_digest.returncode == 0, by_digest.stderr
    assert listed(env) == [] and os.listdir(blobs) == []
    assert [p for p in (store / "sha256").iterdir()] == []
    gone = one_line_failure(psb(env, "rmi", f"{plain.host}/pysandbox/bb:v1"), status=1)
    assert gone == (
        f"pysandbox: image {plain.host}/pysandbox/bb:v1 is not in the store "
        "(see 'pysandbox images')"
    )


@pytest.mark.parametrize("size", ["512k", "1600k"])  # fails while fetching / while unpacking
def test_a_full_disk_is_one_clear_line_and_leaves_nothing(
    size: str, plain: Registry, tmp_path: Path, home: Path
) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test mounts a small tmpfs: run it as root, as CI does")
    store = tmp_path / "small"
    store.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(store)], check=True)
    try:
        env = environment(home, store)
        ref = f"{plain.host}/pysandbox/layered:v1"
        line = one_line_failure(psb(env, "pull", "-q", "--tls-verify=false", ref))
        assert line.startswith(f"pysandbox: pull {ref}: ")
        assert "no space left on device" in line.lower()
        assert f"the image store {store} is full" in line
        assert "PYSANDBOX_IMAGE_STORE" in line
        assert listed(env) == []
        assert not leftovers(store)
    finally:
        subprocess.run(["umount", str(store)], check=True)


def test_progress_on_a_terminal_and_quiet(plain: Registry, env: dict[str, str]) -> None:
    ref = f"{plain.host}/pysandbox/layered:v1"
    quiet = psb(env, "pull", "--quiet", "--tls-verify=false", f"{plain.host}/pysandbox/bb:v1")
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert quiet.stdout.startswith(f"{plain.host}/pysandbox/bb@sha256:")

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "sandbox", "pull", "--tls-verify=false", ref],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, cwd=ROOT, env=env,
    )  # fmt: skip
    os.close(slave)
    screen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        screen += data
    os.close(master)
    assert process.wait(60) == 0
    text = screen.decode()
    assert "pysandbox:   layer 1/3 " in text and "already present" in text  # busybox layer
    assert "pysandbox:   layer 3/3 " in text and " fetched" in text
    assert f"pysandbox: unpacked {ref} (3 layers)" in text
    assert "\x1b[" in text  # redrawn in place


# --- run -----------------------------------------------------------------------------------


def test_run_reports_pull_failures_with_125_and_boots_nothing(
    plain: Registry, env: dict[str, str], tmp_path: Path
) -> None:
    root = tmp_path / "state"
    ref = f"{plain.host}/pysandbox/bb:v1"
    never = one_line_failure(psb(env, "--root", str(root), "run", "--pull=never", ref, "true"))
    assert never == (
        f"pysandbox: image {ref} is not in the image store and --pull=never was given; "
        f"pull it first (pysandbox pull {ref}) or use --pull=missing"
    )
    closed = f"127.0.0.1:{free_port()}/x:y"
    down = one_line_failure(
        psb(env, "--root", str(root), "run", "--tls-verify=false", closed, "true")
    )
    assert down.startswith(f"pysandbox: pull {closed}: the registry cannot be reached (")
    bad = one_line_failure(psb(env, "--root", str(root), "run", "No/Such", "true"))
    assert "invalid image reference 'No/Such'" in bad
    assert not root.exists() or os.listdir(root) == []


@pytest.mark.vm
def test_run_ref_end_to_end(
    plain: Registry, env: dict[str, str], pod_factory: PodFactory, store: Path
) -> None:
    """``run REF`` pulls on first use, applies the image config, and the image cannot be
    removed while the run uses it. One VM."""
    ref = f"{plain.host}/pysandbox/layered:v1"
    script = (
        'echo "$GREETING"; pwd; cat /etc/motd; ls /data /opt/gone; echo ready; read x; '
        'echo "got $x"'
    )
    vm_root = pod_factory.new_root()
    process = subprocess.Popen(
        [sys.executable, "-m", "sandbox", "--root", str(vm_root), "run", "-i",
         "--tls-verify=false", ref, "sh", "-c", script],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env,
    )  # fmt: skip
    assert process.stdout is not None and process.stdin is not None
    try:
        lines = []
        while not lines or lines[-1] != "ready":
            line = process.stdout.readline().decode()
            assert line, f"the run ended early: {process.communicate(timeout=30)}"
            lines.append(line.rstrip("\n"))
        assert lines == ["hello", "/data", "three", "/data:", "b", "", "/opt/gone:", "new", "ready"]
        busy = one_line_failure(psb(env, "rmi", ref), status=1)
        assert busy.startswith(f"pysandbox: image {ref} (sha256:")
        assert busy.endswith(
            "is used by a running container; stop it first (pysandbox ps, pysandbox stop)"
        )
        out, err = process.communicate(b"go\n", timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert out == b"got go\n"
    assert f"pysandbox: pulled {ref} (sha256:".encode() in err
    removed = psb(env, "rmi", ref)
    assert removed.returncode == 0, removed.stderr
    assert listed(env) == []
