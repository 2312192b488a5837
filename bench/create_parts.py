"""What each part of a container's spec costs the guest: CreateContainer ablations in one pod.

Boots one pod (restored from its template, files cached as a ``pysandbox run`` of a stored
image), then creates, starts and waits for ``true`` containers of the ``default`` image built
exactly as ``pysandbox run default true`` builds them (:func:`sandbox.run.spec.build_spec`),
each with one part of the spec taken away (:data:`VARIANTS`: the seccomp filter, the masked
and read-only paths, the mounts beyond /proc, /dev and /dev/pts, one namespace type, the
cgroup resources). The variants alternate in rounds (the first round is left out: it warms
the guest); per variant it prints the medians, seconds, of the agent's CreateContainer with
start (``create``: overlay, runtime fork, namespaces, mounts, pivot_root, process set-up,
``execve``) and of WaitProcess (``wait``: ``true`` runs and is reaped), and the difference to
the full spec. A part whose removal saves nothing is not worth optimising.

Run as root from the repository root (the guest image and templates as for ``pysandbox``)::

    .venv/bin/python bench/create_parts.py --rounds 8 [--json FILE]

Numbers are noisy on a loaded host: compare variants of the same run only, and look at the
load average printed with them. The pod is stopped in a ``finally``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sandbox.cli.main import build_parser  # noqa: E402
from sandbox.image import store as images  # noqa: E402
from sandbox.pod.lifecycle import Pod  # noqa: E402
from sandbox.pod.sharing import HeldSources, share_container_files, unshare_container_files  # noqa: E402
from sandbox.run.spec import build_spec  # noqa: E402

Spec = dict[str, Any]


def _without_linux(*keys: str) -> Callable[[Spec], None]:
    def change(spec: Spec) -> None:
        for key in keys:
            spec["linux"].pop(key, None)

    return change


def _without_namespaces(*types: str) -> Callable[[Spec], None]:
    def change(spec: Spec) -> None:
        spec["linux"]["namespaces"] = [
            ns for ns in spec["linux"]["namespaces"] if ns["type"] not in types
        ]
        if "uts" in types:
            spec.pop("hostname", None)  # a hostname needs a UTS namespace of its own
        if "network" in types:  # net.* sysctls need a network namespace of their own
            sysctl = spec["linux"].get("sysctl") or {}
            for key in [k for k in sysctl if k.startswith("net.")]:
                del sysctl[key]

    return change


def _few_mounts(spec: Spec) -> None:
    spec["mounts"] = [
        m for m in spec["mounts"] if m["destination"] in ("/proc", "/dev", "/dev/pts")
    ]


def _minimal(spec: Spec) -> None:
    for change in (
        _without_linux("seccomp", "maskedPaths", "readonlyPaths", "resources"),
        _few_mounts,
        _without_namespaces("network", "ipc", "uts"),
    ):
        change(spec)
    spec["process"].pop("rlimits", None)


#: name -> what it takes away from ``pysandbox run default true``'s spec.
VARIANTS: dict[str, Callable[[Spec], None]] = {
    "full": lambda spec: None,
    "no seccomp": _without_linux("seccomp"),
    "no masked/readonly paths": _without_linux("maskedPaths", "readonlyPaths"),
    "only /proc, /dev, /dev/pts": _few_mounts,
    "no network namespace": _without_namespaces("network"),
    "no pid namespace": _without_namespaces("pid"),
    "no ipc, uts namespaces": _without_namespaces("ipc", "uts"),
    "no cgroup resources": _without_linux("resources"),
    "all of the above": _minimal,
}


def measure(pod: Pod, rounds: int) -> dict[str, dict[str, list[float]]]:
    """``{variant: {"create": [...], "wait": [...]}}`` seconds, the first round left out."""
    args = build_parser().parse_args(["run", "default", "true"])
    image = images.resolve("default")
    samples: dict[str, dict[str, list[float]]] = {
        name: {"create": [], "wait": []} for name in VARIANTS
    }
    count = 0
    with pod.client() as client:
        for round_ in range(rounds + 1):
            for name, change in VARIANTS.items():
                count += 1
                container_id = f"part{count}"
                with HeldSources() as held:
                    spec = build_spec(args, image, held, container_id)
                    change(spec)
                    rootfs, guest_spec = share_container_files(
                        pod,
                        container_id,
                        copy.deepcopy(spec),
                        image.rootfs.parent,
                        rootfs_readonly=True,
                        held=held,
                    )
                try:
                    began = time.monotonic()
                    client.create_and_start(
                        container_id, json.dumps(guest_spec).encode(), rootfs, overlay=True
                    )
                    created = time.monotonic()
                    client.wait_process(container_id, timeout=120)
                    waited = time.monotonic()
                    client.remove_container(container_id)
                finally:
                    unshare_container_files(pod, container_id)
                if round_ > 0:
                    samples[name]["create"].append(created - began)
                    samples[name]["wait"].append(waited - created)
    return samples


def _remove_empty(root: Path) -> None:
    """Remove ``root`` and the empty directories below it (never a file, never through a
    mount point: after a failed stop the pod's share may still be mounted)."""
    for path, _dirs, _files in os.walk(root, topdown=False):
        if not os.path.ismount(path):
            with contextlib.suppress(OSError):
                os.rmdir(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    load = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="psb-parts-", dir="/tmp"))
    pod = Pod.boot(root, f"parts-{os.getpid()}", cached_files=True)
    try:
        samples = measure(pod, options.rounds)
    finally:
        pod.stop()
        _remove_empty(root)
    medians = {
        name: {kind: statistics.median(values) for kind, values in kinds.items()}
        for name, kinds in samples.items()
    }
    full = medians["full"]
    print(f"load average {load[0]:.1f} -> {os.getloadavg()[0]:.1f}; medians of {options.rounds}")
    print(f"{'variant':30s} {'create':>8s} {'wait':>8s} {'Δ create':>9s} {'Δ wait':>8s}")
    for name, median in medians.items():
        print(
            f"{name:30s} {median['create']:8.3f} {median['wait']:8.3f} "
            f"{median['create'] - full['create']:+9.3f} {median['wait'] - full['wait']:+8.3f}"
        )
    if options.json is not None:
        options.json.write_text(
            json.dumps({"load": load, "medians": medians, "samples": samples}, indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
