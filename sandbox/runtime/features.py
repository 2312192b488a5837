"""``features``: what this runtime supports, as the OCI runtime spec's features document.

Shape: runtime-spec ``features.md`` (``ociVersionMin``/``Max``, ``hooks``, ``mountOptions``,
``linux.namespaces``/``capabilities``/``cgroup``/``seccomp``, ``annotations``). Clients
(containerd, podman) read it from ``pysandbox features``.
"""

from __future__ import annotations

from typing import Any

from sandbox.run.default_spec import DEFAULT_CAPABILITIES


def features() -> dict[str, Any]:
    """The features document (a fresh dict each call)."""
    return {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.1.0",
        "hooks": [
            "prestart",
            "createRuntime",
            "createContainer",
            "startContainer",
            "poststart",
            "poststop",
        ],
        "mountOptions": [
            "ro",
            "rw",
            "bind",
            "rbind",
            "nosuid",
            "nodev",
            "noexec",
            "private",
            "rprivate",
            "shared",
            "rshared",
            "slave",
            "rslave",
        ],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"],
            "capabilities": DEFAULT_CAPABILITIES,
            "cgroup": {"v1": True, "v2": True, "systemd": True},
            "seccomp": {
                "enabled": True,
                "actions": [
                    "SCMP_ACT_ALLOW",
                    "SCMP_ACT_ERRNO",
                    "SCMP_ACT_KILL",
                    "SCMP_ACT_KILL_PROCESS",
                    "SCMP_ACT_KILL_THREAD",
                    "SCMP_ACT_LOG",
                    "SCMP_ACT_TRACE",
                    "SCMP_ACT_TRAP",
                ],
            },
        },
        "annotations": {"org.pysandbox.isolation": "vm"},
    }
