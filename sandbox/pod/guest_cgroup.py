"""Which cgroup layout a container's VM gives it: v2 (default) or v1 (docs/cgroups.md).

The guest kernel can show containers cgroup v2 or v1, not both (a controller lives on one
hierarchy), and decides once per VM with its first container. The host names the layout in
the spec it sends, annotation :data:`ANNOTATION`, from (first found):

1. the same annotation in the client's config.json: ``v1``, ``v2`` or ``host``;
2. the environment variable :data:`ENV` of the runtime process, same values.

``host`` means the layout of the host's own ``/sys/fs/cgroup``: v1 on a cgroup v1 or hybrid
host (where runc shows containers v1 files), v2 on a unified one. With neither, the spec
names no layout: the container gets its VM's, or v2 in a new VM.
"""

from __future__ import annotations

import os
from typing import Any

from sandbox.errors import ConfigError

#: Spec annotation the guest agent reads (agent/cgroup_layout.py).
ANNOTATION = "org.pysandbox.cgroup"
ENV = "PYSANDBOX_CGROUP"
CHOICES = ("v1", "v2", "host")


def host_layout(mountinfo: str = "/proc/self/mountinfo") -> str:
    """The host's layout: "v2" when its /sys/fs/cgroup is cgroup2, else "v1" (v1 or hybrid)."""
    with open(mountinfo, encoding="utf-8") as handle:
        for line in handle:
            fields = line.split()
            if len(fields) > 4 and fields[4] == "/sys/fs/cgroup" and "-" in fields:
                return "v2" if fields[fields.index("-") + 1] == "cgroup2" else "v1"
    return "v2"


def resolve(spec: dict[str, Any]) -> None:
    """Set :data:`ANNOTATION` in ``spec`` (a copy for the guest) to "v1" or "v2" when the
    client or the environment chose a layout; leave it out otherwise.

    ConfigError naming the annotation or variable when its value is not one of
    :data:`CHOICES`.
    """
    annotations = spec.get("annotations")
    if annotations is not None and not isinstance(annotations, dict):
        raise ConfigError("config.json: annotations must be an object")
    value, source = (annotations or {}).get(ANNOTATION), f"annotation {ANNOTATION}"
    if value is None:
        value, source = os.environ.get(ENV) or None, f"environment variable {ENV}"
    if value is None:
        return
    if value not in CHOICES:
        raise ConfigError(f'{source}: "{value}" is not one of v1, v2, host')
    spec["annotations"] = {
        **(annotations or {}),
        ANNOTATION: host_layout() if value == "host" else value,
    }


def layout_for(spec: dict[str, Any]) -> str:
    """The layout a new VM's containers get for ``spec``, as :func:`resolve` names it: "v1"
    or "v2" (v2 when it names none); "" when the annotation or variable is not valid (its
    error is :func:`resolve`'s, when the container's files are shared)."""
    copy = {"annotations": spec.get("annotations")} if "annotations" in spec else {}
    try:
        resolve(copy)
    except ConfigError:
        return ""
    return str((copy.get("annotations") or {}).get(ANNOTATION) or "v2")
