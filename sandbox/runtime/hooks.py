"""OCI hooks run by the runtime (runtime spec, config.md "POSIX-platform Hooks")."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from sandbox.errors import ConfigError
from sandbox.runtime.record import ContainerRecord

if TYPE_CHECKING:
    pass


def run_hooks(spec: dict[str, Any], name: str, record: ContainerRecord) -> None:
    """Run the OCI hooks ``name`` on the host with the state on stdin (runtime spec)."""
    import subprocess

    for hook in (spec.get("hooks") or {}).get(name) or []:
        path = hook.get("path")
        if not isinstance(path, str) or not os.path.isabs(path):
            raise ConfigError(f"hooks.{name}: path must be absolute")
        env = dict(item.split("=", 1) for item in hook.get("env") or [] if "=" in item)
        try:
            done = subprocess.run(
                hook.get("args") or [path],
                executable=path,
                env=env,
                capture_output=True,
                input=json.dumps(record.oci_state()).encode(),
                timeout=hook.get("timeout") or 30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"{name} hook {path} failed: {exc}") from exc
        if done.returncode != 0:
            detail = done.stderr.decode(errors="replace").strip()[:200]
            raise ConfigError(f"{name} hook {path} exited {done.returncode}: {detail}")
