"""``pysandbox exec RUN true`` of several checkouts, interleaved: wall time and CPU per exec.

On a host shared with other VMs the wall time of an exec moves by tens of milliseconds
between rounds; the CPU time spent on it moves far less. For every variant this starts one
detached run (``run -d default sleep``) and then, round after round, times ``exec NAME true``
into it and records:

* ``wall``: the CLI's spawn to its exit, seconds;
* ``cli_cpu``: the CLI's own utime + stime (its rusage);
* ``qemu_cpu``: QEMU's CPU time (its threads' schedstat; the vCPU thread runs the whole guest
  under TCG) from before the exec to its CLI's exit: the guest's work on the exec's path;
* ``qemu_cpu_settled``: the same to ``--settle`` seconds later (the exec's teardown and the
  spare runtime the zygote forks once idle included);
* ``proxy_cpu``: the pod's agent proxy's CPU time (schedstat) over the exec (it serves the call).

Run as root from the repository root, each checkout byte-compiled first (as installed)::

    .venv/bin/python bench/exec_cpu.py --runs 15 [--json FILE] \\
        new=/work/wt/a,/var/lib/pysandbox/guest-a,/var/lib/pysandbox/templates-a \\
        old=/work/main,/var/lib/pysandbox/guest,/var/lib/pysandbox/templates

Variants are written as for bench/qemu_cpu.py. Rounds alternate the order of the variants.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qemu_cpu import parse_variant

NAME = "cpu"


def _cpu(pid: str) -> float:
    """CPU time of every thread of ``pid`` in seconds: the sum of their
    ``/proc/PID/task/TID/schedstat`` run times (nanoseconds; utime + stime in /proc/PID/stat
    counts 10 ms ticks, too coarse for one exec)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            continue  # a thread that ended meanwhile
    return total / 1e9


def _find(root: str, prefix: bytes, marker: bytes = b"") -> str:
    """The pid of the process whose command line starts with ``prefix`` (or contains
    ``marker``) and names ``root``."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if root.encode() in cmdline and cmdline.startswith(prefix) and marker in cmdline:
            return entry
    raise SystemExit(f"no process {prefix!r} {marker!r} for {root}")


class Variant:
    def __init__(self, name: str, spec: dict[str, str]) -> None:
        self.name = name
        self.root = f"/tmp/psb-exec-cpu-{os.getpid()}-{name}"
        self.env = {**os.environ, "PYTHONPATH": spec["repo"], "PYTHONSAFEPATH": "1"}
        self.env.update({k: v for k, v in spec.items() if k != "repo" and v})
        self.argv = [f"{spec['repo']}/.venv/bin/python", "-m", "sandbox", "--root", self.root]
        subprocess.run(
            [
                self.argv[0],
                "-m",
                "compileall",
                "-q",
                "-j0",
                spec["repo"] + "/sandbox",
                spec["repo"] + "/agentapi",
                spec["repo"] + "/ocispec",
                spec["repo"] + "/hypervisor",
            ],
            check=False,
            capture_output=True,
        )

    def start(self) -> None:
        subprocess.run(
            [*self.argv, "run", "-d", "--name", NAME, "default", "sleep", "3600"],
            check=True,
            capture_output=True,
            env=self.env,
            timeout=300,
        )
        self.qemu = _find(self.root + "/", b"/usr/bin/qemu-system")
        self.proxy = _find(self.root + "/", b"", b"agent_proxy")

    def stop(self) -> None:
        subprocess.run(
            [*self.argv, "rm", "-f", NAME], capture_output=True, env=self.env, timeout=300
        )

    def one(self, settle: float) -> dict[str, float]:
        qemu0, proxy0 = _cpu(self.qemu), _cpu(self.proxy)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.monotonic()
        done = subprocess.run(
            [*self.argv, "exec", NAME, "true"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=self.env,
            timeout=120,
            check=False,
        )
        wall = time.monotonic() - start
        qemu1 = _cpu(self.qemu)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise SystemExit(f"{self.name}: exec failed: {done.stderr.decode()[-300:]}")
        time.sleep(settle)
        return {
            "wall": wall,
            "cli_cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "qemu_cpu": qemu1 - qemu0,
            "qemu_cpu_settled": _cpu(self.qemu) - qemu0,
            "proxy_cpu": _cpu(self.proxy) - proxy0,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--settle", type=float, default=0.8, help="seconds after each exec")
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    variants = [Variant(*parse_variant(v)) for v in options.variants]
    raw: dict[str, list[dict[str, float]]] = {v.name: [] for v in variants}
    loads: list[float] = []
    try:
        for variant in variants:
            variant.start()
        time.sleep(3)
        for variant in variants:  # a first exec each, not counted (the spare, caches)
            variant.one(options.settle)
        for round_ in range(options.runs):
            for variant in variants if round_ % 2 == 0 else list(reversed(variants)):
                raw[variant.name].append(variant.one(options.settle))
            loads.append(round(os.getloadavg()[0], 2))
            row = {n: {k: round(v, 3) for k, v in r[-1].items()} for n, r in raw.items()}
            print(round_, row, "load", loads[-1], flush=True)
    finally:
        for variant in variants:
            variant.stop()
    summary: dict[str, dict[str, float]] = {}
    for name, runs in raw.items():
        summary[name] = {
            key + "_median": round(statistics.median(r[key] for r in runs), 4) for key in runs[0]
        }
        print(name, summary[name])
    if options.json is not None:
        document: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "variants": {v.name: v.argv[0] for v in variants},
            "load_after_round": loads,
            "summary": summary,
            "raw": raw,
        }
        options.json.write_text(json.dumps(document, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
