"""A real container registry on loopback for the pull tests, and images to push to it.

The registry is Debian's ``docker-registry`` (the distribution project's registry, v2 API),
started as a child process on ``127.0.0.1`` with a private storage directory; optionally
with TLS (a self-signed certificate made with openssl) and htpasswd basic auth (bcrypt, as
the registry requires, made with ``htpasswd -B``). Images are built here with tarfile/json
as OCI layouts and pushed with ``skopeo copy``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import io
import json
import os
import socket
import ssl
import subprocess
import tarfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
EPOCH = 1_700_000_000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Registry:
    """A running registry: ``host`` is ``127.0.0.1:PORT``."""

    host: str
    storage: Path
    process: subprocess.Popen[bytes]
    log: Path
    tls: bool
    credentials: tuple[str, str] | None

    def blob_file(self, digest: str) -> Path:
        """Where the registry keeps a blob's bytes."""
        hexpart = digest.partition(":")[2]
        return self.storage / f"docker/registry/v2/blobs/sha256/{hexpart[:2]}/{hexpart}/data"

    def push(self, layout: Path, tag: str, target: str, *flags: str) -> None:
        """``skopeo copy oci:LAYOUT:TAG docker://HOST/TARGET`` (with this registry's creds)."""
        argv = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", *flags]
        if self.credentials is not None:
            argv.append(f"--dest-creds={self.credentials[0]}:{self.credentials[1]}")
        argv += [f"oci:{layout}:{tag}", f"docker://{self.host}/{target}"]
        subprocess.run(argv, check=True, capture_output=True, timeout=120)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_registry(
    directory: Path, *, credentials: tuple[str, str] | None = None, tls: bool = False
) -> Registry:
    """Start a registry storing into ``directory``; wait until it answers."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(directory / "data")}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": "pysandbox-test"},
    }
    if tls:
        cert, key = directory / "cert.pem", directory / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        config["http"]["tls"] = {"certificate": str(cert), "key": str(key)}
    if credentials is not None:
        htpasswd = directory / "htpasswd"
        made = subprocess.run(
            ["htpasswd", "-Bbn", *credentials], check=True, capture_output=True, timeout=60
        )
        htpasswd.write_bytes(made.stdout)
        config["auth"] = {"htpasswd": {"realm": "pysandbox-test", "path": str(htpasswd)}}
    config_file = directory / "config.yml"
    config_file.write_text(json.dumps(config))  # YAML is a superset of JSON
    log = directory / "registry.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["docker-registry", "serve", str(config_file)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    registry = Registry(f"127.0.0.1:{port}", directory / "data", process, log, tls, credentials)
    deadline = time.monotonic() + 30
    while not _answers(port, tls):
        if process.poll() is not None or time.monotonic() > deadline:
            registry.stop()
            raise RuntimeError(f"docker-registry did not start: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    return registry


def _answers(port: int, tls: bool) -> bool:
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            "127.0.0.1", port, timeout=2, context=context
        )
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/v2/")
        return conn.getresponse().status in (200, 401)
    except OSError:
        return False
    finally:
        conn.close()


# --- images --------------------------------------------------------------------------------


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _normalised(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime = EPOCH
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def tree_tar(root: Path) -> bytes:
    """An uncompressed layer tar of the directory ``root`` (sorted, owned by root)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(root)), recursive=False,
                    filter=_normalised)  # fmt: skip
    return buffer.getvalue()


def files_tar(entries: Iterable[tuple[str, bytes | None]]) -> bytes:
    """A layer tar of (name, content) pairs: content None is a directory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in entries:
            info = _normalised(tarfile.TarInfo(name))
            if content is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(content), 0o644
                tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


class Layout:
    """An OCI image layout being written (``oci-layout``, ``index.json``, ``blobs``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        self.entries: list[dict[str, Any]] = []

    def put(self, data: bytes, media_type: str) -> dict[str, Any]:
        (self.root / "blobs" / "sha256" / sha(data)[7:]).write_bytes(data)
        return {"mediaType": media_type, "digest": sha(data), "size": len(data)}

    def image(
        self, plain_layers: list[bytes], *, arch: str = "amd64", **config: Any
    ) -> dict[str, Any]:
        """Write one image (gzip layers); return its manifest descriptor."""
        document = {
            "architecture": arch,
            "os": "linux",
            "created": "2024-05-01T00:00:00Z",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [sha(p) for p in plain_layers]},
        }
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": self.put(json.dumps(document).encode(), OCI_CONFIG),
            "layers": [self.put(gzip.compress(p, mtime=0), OCI_LAYER_GZIP) for p in plain_layers],
        }
        return self.put(json.dumps(manifest).encode(), OCI_MANIFEST)

    def index(self, platforms: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Write an image index of ``{arch: manifest descriptor}``; return its descriptor."""
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {**desc, "platform": {"os": "linux", "architecture": arch}}
                for arch, desc in platforms.items()
            ],
        }
        return self.put(json.dumps(index).encode(), OCI_INDEX)

    def tag(self, name: str, descriptor: dict[str, Any]) -> None:
        self.entries.append(
            {**descriptor, "annotations": {"org.opencontainers.image.ref.name": name}}
        )
        index = {"schemaVersion": 2, "manifests": self.entries}
        (self.root / "index.json").write_text(json.dumps(index))


def manifest_digest(registry: Registry, reference: str, *flags: str) -> str:
    """The digest the registry gives ``reference`` (skopeo's own view, as an oracle)."""
    raw = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", *flags,
         f"docker://{registry.host}/{reference}"],
        check=True, capture_output=True, timeout=60,
    ).stdout  # fmt: skip
    return sha(raw)


@contextlib.contextmanager
def tampered(path: Path, change: bytes | None = None) -> Any:
    """Flip one byte of ``path`` (or write ``change``) for the duration; restore after."""
    original = path.read_bytes()
    try:
        if change is None:
            data = bytearray(original)
            data[len(data) // 2] ^= 0xFF
            change = bytes(data)
        path.write_bytes(change)
        yield
    finally:
        path.write_bytes(original)


def environment(home: Path, store: Path, **extra: str) -> dict[str, str]:
    """An environment isolated from the host's registry config and credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REGISTRY_", "CONTAINERS_"))}
    runtime = home / "run"
    runtime.mkdir(parents=True, exist_ok=True)
    conf = home / "registries.conf"
    if not conf.exists():
        conf.write_text("")
    env.update(
        HOME=str(home),
        XDG_RUNTIME_DIR=str(runtime),
        CONTAINERS_REGISTRIES_CONF=str(conf),
        PYSANDBOX_IMAGE_STORE=str(store),
    )
    env.update(extra)
    return env
