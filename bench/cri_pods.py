"""RunPodSandbox through containerd's CRI API: pysandbox against runc, one pod at a time.

Run as root from the repository root with the project venv::

    .venv/bin/python bench/cri_pods.py [--runs N] [--cold-template] [--out DIR]

A private containerd 1.6 (tests/integration/containerd_env.py: its own root, state, socket,
and a network namespace of its own with a CNI bridge) runs pods with the handler
``pysandbox`` and with ``runc``, alternately (runc, pysandbox, runc, ...), each pod stopped and
removed before the next. Times per pod: RunPodSandbox, StopPodSandbox + RemovePodSandbox; for
pysandbox also the runtime's own ``create`` of the sandbox container (the runtime binary is
called through a wrapper that logs each call's wall time), so that what containerd does
around it (CNI, the sandbox image, its shim) is the difference.

``--cold-template`` first empties a private template directory, so that the first pysandbox
pod builds the template VM (the cost of the first pod of a memory size on a node).

Reports median, max and every value; writes ``<out>/<YYYY-MM-DD>-cri-pods.json`` unless
``--no-json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from tests.integration import containerd_env, cri_stubs  # noqa: E402

SUBNET = "10.250.99.0/24"
#: Logs "<verb> <seconds>" per runtime call to $PSB_BENCH_CALLS, then exits with its status.
WRAPPER = """#!/bin/sh
start=$(date +%s.%N)
"{runtime}" "$@"
rc=$?
verb=""
skip=0
for a in "$@"; do
  if [ $skip = 1 ]; then skip=0; continue; fi
  case "$a" in --root|--log|--log-format) skip=1;; -*) ;; *) verb=$a; break;; esac
done
echo "$verb $start $(date +%s.%N) $rc" >> "{calls}"
exit $rc
"""


def _pod_config(pb: Any, name: str, log_root: Path) -> Any:
    """A pod on the CNI network (host-network pods are refused: docs/kubernetes.md)."""
    uid = uuid.uuid4().hex
    log_dir = log_root / f"default_{name}_{uid}"
    log_dir.mkdir()
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, uid=uid, namespace="default", attempt=0),
        hostname=name,
        log_directory=str(log_dir),
        linux=pb.LinuxPodSandboxConfig(
            cgroup_parent=f"/pysandbox-bench/pod{uid}",
            security_context=pb.LinuxSandboxSecurityContext(
                namespace_options=pb.NamespaceOption(network=pb.POD, pid=pb.CONTAINER, ipc=pb.POD)
            ),
        ),
    )


def _creates(calls: Path, since: int) -> list[float]:
    """Wall seconds of the ``create`` calls logged after line ``since``."""
    lines = calls.read_text().splitlines()[since:] if calls.exists() else []
    return [
        float(end) - float(start)
        for verb, start, end, _rc in map(str.split, lines)
        if verb == "create"
    ]


def _summary(values: list[float]) -> dict[str, Any]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "values": [round(v, 3) for v in values],
    }


def _measure(
    args: argparse.Namespace,
    pb: Any,
    pb_grpc: Any,
    wrapper: Path,
    calls: Path,
    work: Path,
    times: dict[str, dict[str, list[float]]],
) -> dict[str, float]:
    """Run the pods; fill ``times``; the first pysandbox pod's figures with --cold-template."""
    first: dict[str, float] = {}
    with (
        containerd_env.network_namespace() as netns,
        containerd_env.running(
            lambda: False, binary=str(wrapper), netns=netns, cni_subnet=SUBNET
        ) as daemon,
    ):
        channel = grpc.insecure_channel(f"unix://{daemon.address}")
        rt = pb_grpc.RuntimeServiceStub(channel)
        logs = work / "logs"
        logs.mkdir()
        for index in range(args.runs):
            for handler in ("runc", "pysandbox"):
                config = _pod_config(pb, f"b{index}{handler[0]}", logs)
                seen = len(calls.read_text().splitlines()) if calls.exists() else 0
                started = time.monotonic()
                pod_id = rt.RunPodSandbox(
                    pb.RunPodSandboxRequest(config=config, runtime_handler=handler), timeout=300
                ).pod_sandbox_id
                ran = time.monotonic() - started
                started = time.monotonic()
                rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
                rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
                removed = time.monotonic() - started
                if args.cold_template and index == 0 and handler == "pysandbox":
                    first = {"run": ran, "create": sum(_creates(calls, seen))}
                    print(f"first pysandbox pod (template build): {ran:.2f}s", flush=True)
                    continue
                times[handler]["run"].append(ran)
                times[handler]["stop_remove"].append(removed)
                times[handler]["create"].extend(_creates(calls, seen))
                print(
                    f"{index:2d} {handler:9s} run {ran:6.2f}s  stop+remove {removed:5.2f}s",
                    flush=True,
                )
        channel.close()
    return first


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--cold-template", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--no-json", action="store_true")
    parser.add_argument(
        "--runtime", default=containerd_env.RUNTIME, help="the pysandbox binary to call"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="psb-cribench-"))
    calls = work / "calls.log"
    wrapper = work / "pysandbox"
    wrapper.write_text(WRAPPER.format(runtime=args.runtime, calls=calls))
    wrapper.chmod(0o755)
    if args.cold_template:
        os.environ["PYSANDBOX_TEMPLATE_DIR"] = str(work / "templates")
    pb, pb_grpc = cri_stubs.generate(work)
    times: dict[str, dict[str, list[float]]] = {
        h: {"run": [], "stop_remove": [], "create": []} for h in ("runc", "pysandbox")
    }
    try:
        first = _measure(args, pb, pb_grpc, wrapper, calls, work, times)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "date": datetime.date.today().isoformat(),
        "runs": args.runs,
        "load": os.getloadavg(),
        "first_pod_cold_template": first or None,
        **{
            handler: {kind: _summary(values) for kind, values in kinds.items() if values}
            for handler, kinds in times.items()
        },
    }
    print(json.dumps({k: v for k, v in result.items()}, indent=1))
    if not args.no_json:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{result['date']}-cri-pods.json").write_text(
            json.dumps(result, indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
