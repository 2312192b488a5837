"""A private containerd 1.6 for the containerd and CRI tests, and images built in Python.

:func:`start_containerd` runs ``containerd`` with a config, root, state and gRPC socket of its
own below a short temporary directory (unix socket paths of the pods live below the runtime
Root there too), with the runtime handler ``pysandbox`` = io.containerd.runc.v2 using our
binary and a private runc ``Root``. :func:`write_image_archive` writes a docker-archive tarball
(``docker save`` format) of the busybox root filesystem that ``ctr images import`` accepts.
Nothing here reaches any network address: images are imported from local files.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox.image import store as images
from sandbox.pod.hostfs import mounts_below
from tests.integration.pods import KEEP_LOGS
from tests.processes import processes_mentioning

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = str(ROOT / ".venv" / "bin" / "pysandbox")
HANDLER = "pysandbox"
NAMESPACE = "psbtest"
IMAGE = "localhost/pysandbox-busybox:latest"
PAUSE_IMAGE = "localhost/pysandbox-pause:latest"
ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
CNI_BRIDGE = "psbcni0"

CRI = 'plugins."io.containerd.grpc.v1.cri"'
CONFIG = """version = 2
root = "{base}/root"
state = "{base}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{base}/containerd.sock"

[ttrpc]
  address = "{base}/containerd.sock.ttrpc"

[debug]
  level = "debug"

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{base}/opt"
  [{cri}]
    sandbox_image = "{pause}"
    netns_mounts_under_state_dir = true
    enable_selinux = false
{cri_settings}
    [{cri}.cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "{base}/cni"
    [{cri}.containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [{cri}.containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
{runtime}
"""
# The runtime handler and CRI settings come from the documented snippet, so the tests run
# what docs/kubernetes.md tells users to install (with our binary and a private Root).
DEPLOY_CONFIG = ROOT / "deploy" / "containerd" / "config.toml"


@dataclass
class Containerd:
    """A running private containerd."""

    base: Path
    proc: subprocess.Popen[bytes]
    log: Path
    address: str
    runtime_root: Path
    namespace: str = NAMESPACE
    imported: list[str] = field(default_factory=list)

    def ctr(
        self, *args: str, timeout: float = 120, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr`` against this containerd, in the test namespace."""
        done = subprocess.run(
            ["ctr", "-a", self.address, "-n", self.namespace, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} failed ({done.returncode}): {done.stderr}")
        return done

    def pod_dirs(self) -> list[Path]:
        """The pod directories the runtime has under its Root."""
        return sorted((self.runtime_root / "p").glob("*"))

    def runtime_flags(self) -> list[str]:
        """``ctr run`` flags that make containerd's runc shim call pysandbox with this Root."""
        return [
            "--runtime",
            "io.containerd.runc.v2",
            "--runc-binary",
            RUNTIME,
            "--runc-root",
            str(self.runtime_root),
        ]


def _toml_table(name: str, values: dict[str, Any], indent: str) -> list[str]:
    lines = [f"{indent}[{name}]"] if name else []
    for key, value in values.items():
        if isinstance(value, dict):
            lines += _toml_table(f"{name}.{key}", value, indent + "  ")
        else:
            lines.append(f"{indent}  {key} = {json.dumps(value)}")
    return lines


def deployed_settings(binary: str, runtime_root: Path) -> dict[str, str]:
    """CRI settings and the ``pysandbox`` runtime entry of deploy/containerd/config.toml,
    rendered for the test config with ``binary`` and ``runtime_root`` in its options."""
    deployed = tomllib.loads(DEPLOY_CONFIG.read_text())["plugins"]["io.containerd.grpc.v1.cri"]
    entry = deployed["containerd"]["runtimes"][HANDLER]
    entry["options"].update(BinaryName=binary, Root=str(runtime_root))
    settings = {k: v for k, v in deployed.items() if not isinstance(v, dict)}
    return {
        "cri_settings": "\n".join(_toml_table("", settings, "  ")),
        "runtime": "\n".join(_toml_table(f"{CRI}.containerd.runtimes.{HANDLER}", entry, "      ")),
    }


def _layer_tar(rootfs: Path) -> bytes:
    """An uncompressed layer: the root filesystem with root ownership."""

    def owned_by_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = 0
        return info

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as layer:
        for path in sorted(rootfs.rglob("*")):
            layer.add(
                path, arcname=str(path.relative_to(rootfs)), recursive=False, filter=owned_by_root
            )
    return buf.getvalue()


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    archive.addfile(info, io.BytesIO(data))


def write_image_archive(target: Path, tagged_cmds: dict[str, Sequence[str]]) -> None:
    """A docker-archive of the busybox rootfs: one image per tag, each with its own Cmd.

    All images share the one (gzip) layer; each config carries Cmd, PATH and the diff id.
    """
    raw = _layer_tar(images.ensure_default_image())
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    layer = gzip.compress(raw, compresslevel=1, mtime=0)
    layer_name = hashlib.sha256(layer).hexdigest() + "/layer.tar"
    manifest = []
    with tarfile.open(target, "w") as archive:
        _add_bytes(archive, layer_name, layer)
        for tag, cmd in tagged_cmds.items():
            config = json.dumps(
                {
                    "architecture": "amd64",
                    "os": "linux",
                    "created": "1970-01-01T00:00:00Z",
                    "config": {"Cmd": list(cmd), "Env": ENV, "WorkingDir": "/"},
                    "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                    "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "tests"}],
                },
                sort_keys=True,
            ).encode()
            config_name = hashlib.sha256(config).hexdigest() + ".json"
            _add_bytes(archive, config_name, config)
            manifest.append({"Config": config_name, "RepoTags": [tag], "Layers": [layer_name]})
        _add_bytes(archive, "manifest.json", json.dumps(manifest).encode())


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"containerd exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            return
        time.sleep(0.1)
    raise RuntimeError(f"containerd did not listen on {path} within {timeout}s")


def _cni_config(base: Path, subnet: str) -> str:
    """A bridge network (containernetworking-plugins) on ``subnet``, no masquerading."""
    return json.dumps(
        {
            "cniVersion": "1.0.0",
            "name": "pysandbox-test",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": CNI_BRIDGE,
                    "isGateway": True,
                    "ipMasq": False,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": subnet}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(base / "cni-ipam"),
                    },
                },
                {"type": "loopback"},
            ],
        }
    )


@contextlib.contextmanager
def network_namespace() -> Iterator[str]:
    """A network namespace of our own (``ip netns``), deleted with all its devices after."""
    name = f"psbcri-{os.urandom(4).hex()}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def start_containerd(
    binary: str = RUNTIME, netns: str | None = None, cni_subnet: str | None = None
) -> Containerd:
    """Start a private containerd, import the test images; raise if it does not come up.

    With ``netns`` (a name under /run/netns) containerd runs in that network namespace (its
    mount namespace stays ours), so the CNI bridge it sets up for pods (``cni_subnet``: a
    bridge network, see :func:`_cni_config`) lives there and never on the host.
    """
    if os.geteuid() != 0:
        raise RuntimeError("containerd tests need root, as CI runs them")
    for tool in ("containerd", "ctr"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is missing: run 'make deps' (apt package containerd)")
    base = Path(tempfile.mkdtemp(prefix="psc-", dir="/tmp"))
    runtime_root = base / "rt"
    for sub in ("cni", "opt", runtime_root):
        (base / sub).mkdir()
    if cni_subnet is not None:
        if shutil.which("bridge", path="/usr/lib/cni") is None:
            raise RuntimeError("CNI plugins missing: run 'make deps' (containernetworking-plugins)")
        (base / "cni" / "10-pysandbox-test.conflist").write_text(_cni_config(base, cni_subnet))
    config = base / "config.toml"
    config.write_text(
        CONFIG.format(
            base=base,
            pause=PAUSE_IMAGE,
            cri=CRI,
            **deployed_settings(binary, runtime_root),
        )
    )
    log = base / "containerd.log"
    with open(log, "wb") as out:
        enter = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
        proc = subprocess.Popen(
            [*enter, "containerd", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    daemon = Containerd(base, proc, log, str(base / "containerd.sock"), runtime_root)
    try:
        _wait_for_socket(base / "containerd.sock", proc, 30)
        archive = base / "images.tar"
        write_image_archive(archive, {IMAGE: ["sh"], PAUSE_IMAGE: ["sleep", "inf"]})
        daemon.ctr("images", "import", str(archive), timeout=120, check=True)
        # The CRI plugin keeps its own namespace (k8s.io): import there as well.
        done = subprocess.run(
            ["ctr", "-a", daemon.address, "-n", "k8s.io", "images", "import", str(archive)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"import into k8s.io failed: {done.stderr}")
        archive.unlink()
    except BaseException:
        stop_containerd(daemon, keep_log=True)
        raise
    return daemon


def stop_containerd(daemon: Containerd, keep_log: bool) -> None:
    """Stop containerd (by its pid), its leftovers, and remove its directories."""
    if keep_log:
        KEEP_LOGS.mkdir(parents=True, exist_ok=True)
        kept = KEEP_LOGS / f"containerd-{daemon.base.name}.log"
        with contextlib.suppress(OSError):
            shutil.copyfile(daemon.log, kept)
            print(f"\ncontainerd log kept at {kept}")
    if daemon.proc.poll() is None:
        daemon.proc.send_signal(signal.SIGTERM)
        try:
            daemon.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.proc.kill()
            daemon.proc.wait()
    # Whatever containers and pods failed tests left behind, then the shims of this daemon.
    from sandbox.pod.lifecycle import Pod

    for root in [p for p in daemon.runtime_root.iterdir() if p.is_dir()]:
        listed = subprocess.run(
            [RUNTIME, "--root", str(root), "list", "-q"], capture_output=True, text=True, timeout=30
        )
        for cid in listed.stdout.split():
            subprocess.run(
                [RUNTIME, "--root", str(root), "delete", "--force", cid],
                capture_output=True,
                timeout=60,
            )
        for pod in Pod.list(root):
            with contextlib.suppress(Exception):
                pod.destroy()
    for line in processes_mentioning(f"-address {daemon.address}"):
        with contextlib.suppress(OSError):
            os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
    for point in mounts_below(daemon.base):  # deepest first
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)
    shutil.rmtree(daemon.base, ignore_errors=True)


@contextlib.contextmanager
def running(
    failed: Callable[[], bool],
    binary: str = RUNTIME,
    netns: str | None = None,
    cni_subnet: str | None = None,
) -> Iterator[Containerd]:
    """A private containerd for the duration of the block; its log is kept if ``failed()``."""
    daemon = start_containerd(binary, netns, cni_subnet)
    try:
        yield daemon
    finally:
        stop_containerd(daemon, keep_log=failed())


def iter_log_errors(daemon: Containerd) -> Iterator[str]:
    """Error lines in the containerd log (for failure messages)."""
    with contextlib.suppress(OSError), open(daemon.log, encoding="utf-8", errors="replace") as f:
        for line in f:
            if "level=error" in line:
                yield line.rstrip()
