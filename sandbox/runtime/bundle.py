"""An OCI bundle as the runtime reads it: config.json (bounded, checked) and the pod it names.

Pods (design decision 1): a container whose annotations mark it as a CRI sandbox boots the
pod VM under the pod id from its sandbox-id annotation; containers naming that sandbox id join
it; a container without annotations is a pod of its own (pod id = container id).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox.errors import ConfigError

if TYPE_CHECKING:
    pass


MAX_CONFIG_BYTES = 4 * 1024 * 1024
SANDBOX_TYPE_KEYS = ("io.kubernetes.cri.container-type", "io.kubernetes.cri-o.ContainerType")
SANDBOX_ID_KEYS = ("io.kubernetes.cri.sandbox-id", "io.kubernetes.cri-o.SandboxID")
#: Annotation of a pod's first (sandbox) container: "false" makes files the pod's guest
#: creates through the share powerless on the host (docs/security.md); default "true", as
#: runc, whose bundles' images may install setuid binaries or create device nodes.
PRIVILEGED_FILES_KEY = "org.pysandbox.privileged-files"


def load_bundle(bundle: Path) -> dict[str, Any]:
    """config.json of ``bundle``, parsed and minimally checked; ConfigError when unusable."""
    path = bundle / "config.json"
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"bundle {bundle} has no config.json") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        spec = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(spec, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    if not isinstance(spec.get("process"), dict) or not spec["process"].get("args"):
        raise ConfigError(f"{path}: process.args is required")
    return spec


def pod_of(container_id: str, spec: dict[str, Any]) -> tuple[str, bool]:
    """(pod id, whether this container owns the pod) from the CRI annotations."""
    annotations = spec.get("annotations") or {}
    kind = next((annotations[k] for k in SANDBOX_TYPE_KEYS if k in annotations), None)
    sandbox_id = next((annotations[k] for k in SANDBOX_ID_KEYS if k in annotations), None)
    if kind == "sandbox" or sandbox_id is None:
        return container_id if sandbox_id is None else str(sandbox_id), True
    return str(sandbox_id), False


def privileged_files(spec: dict[str, Any]) -> bool:
    """The :data:`PRIVILEGED_FILES_KEY` annotation of ``spec``; ConfigError unless it is
    absent (True), "true" or "false"."""
    value = (spec.get("annotations") or {}).get(PRIVILEGED_FILES_KEY, "true")
    if value not in ("true", "false"):
        raise ConfigError(f"annotation {PRIVILEGED_FILES_KEY} must be 'true' or 'false'")
    return bool(value == "true")
