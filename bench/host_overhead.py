"""The host memory a pod's VM needs beyond its containers' limits (docs/cgroups.md "The
overhead"; ``sandbox.pod.host_cgroup.MEMORY_OVERHEAD`` and the RuntimeClass overhead).

Run from the repository root as root with the project venv::

    .venv/bin/python bench/host_overhead.py [--limit-mib 64] [--name hostcg-bench]

One ``pysandbox run -d --memory LIMIT default sleep`` in its host cgroup, the host limit lifted
so that nothing is reclaimed or killed. Printed, in MiB of the cgroup's ``rss + shmem`` (what no
reclaim can take; page cache is left out): idle; after a container ``awk`` that allocates
without end was OOM-killed in the guest three times; after file-tree churn in the guest; the
peak over all of it (sampled every 0.2 s); PSS and RSS of each process when idle; the idle CPU
(milli-CPU over 30 s). The run is removed in ``finally``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import threading
import time
from pathlib import Path

from sandbox import store as state
from sandbox.pod import host_cgroup

PYSANDBOX = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "pysandbox")
MIB = 2**20


def _pod_placement(name: str) -> host_cgroup.Placement:
    for pod_json in (state.DEFAULT_ROOT / "p").glob("*/pod.json"):
        data = json.loads(pod_json.read_text())
        if name in data.get("containers", []):
            placement = host_cgroup.Placement.from_json(data.get("host_cgroup"))
            if placement is not None:
                return placement
    raise SystemExit(f"no pod with a host cgroup for {name}")


def _stat(memory: Path) -> dict[str, int]:
    values = {}
    for line in (memory / "memory.stat").read_text().splitlines():
        key, _, value = line.partition(" ")
        values[key] = int(value)
    return values


def _unreclaimable(memory: Path) -> int:
    stat = _stat(memory)
    return stat["rss"] + stat["shmem"]


def _smaps(pid: int) -> tuple[int, int]:
    pss = rss = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            pss = int(line.split()[1]) * 1024
        elif line.startswith("Rss:"):
            rss = int(line.split()[1]) * 1024
    return pss, rss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit-mib", type=int, default=64)
    parser.add_argument("--name", default="hostcg-bench")
    args = parser.parse_args()
    name = args.name
    argv = [PYSANDBOX, "run", "-d", "--name", name, "--memory", f"{args.limit_mib}m"]
    started = subprocess.run(
        [*argv, "default", "sleep", "3600"],
        capture_output=True,
        text=True,
    )
    if started.returncode != 0:
        raise SystemExit(started.stderr)
    try:
        placement = _pod_placement(name)
        memory = placement.memory_dir()
        cpuacct = next(Path(d) for d in placement.dirs if (Path(d) / "cpuacct.usage").exists())
        assert memory is not None
        (memory / "memory.limit_in_bytes").write_text("-1")
        time.sleep(5)
        before = int((cpuacct / "cpuacct.usage").read_text())
        time.sleep(30)
        idle_cpu = (int((cpuacct / "cpuacct.usage").read_text()) - before) / 30 / 1e6
        print(f"idle: {_unreclaimable(memory) / MIB:.0f} MiB, {idle_cpu:.0f} milli-CPU")
        for pid in sorted(host_cgroup.pids(placement)):
            pss, rss = _smaps(pid)
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:60]
            print(f"  PSS {pss / MIB:6.1f}  RSS {rss / MIB:6.1f}  {cmd.decode(errors='replace')}")
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _unreclaimable(memory))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for _ in range(3):
            subprocess.run(
                [PYSANDBOX, "exec", name, "awk", 'BEGIN{s="x"; while(1) s=s s}'],
                capture_output=True,
            )
        print(f"after 3 guest OOM kills: {_unreclaimable(memory) / MIB:.0f} MiB")
        churn = "for i in 1 2 3 4; do find / -xdev >/dev/null 2>&1; ls -lR /usr >/dev/null; done"
        subprocess.run([PYSANDBOX, "exec", name, "sh", "-c", churn], capture_output=True)
        print(f"after churn: {_unreclaimable(memory) / MIB:.0f} MiB")
        done.set()
        sampler.join()
        extra = (peak[0] - args.limit_mib * MIB) / MIB
        print(f"peak: {peak[0] / MIB:.0f} MiB = limit + {extra:.0f} MiB")
        print(f"MEMORY_OVERHEAD: {host_cgroup.MEMORY_OVERHEAD / MIB:.0f} MiB")
    finally:
        subprocess.run([PYSANDBOX, "rm", "-f", name], capture_output=True)


if __name__ == "__main__":
    main()
