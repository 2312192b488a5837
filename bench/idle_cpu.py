"""Host CPU of idle detached runs, per process role: what each idle sandbox costs a core.

Starts ``--runs`` idle ``pysandbox run -d NAME IMAGE sleep 3000`` (one after another, all
kept running), waits ``--settle`` seconds, then reads the CPU time (utime + stime of every
thread, ``/proc/PID/stat``) of each run's host processes (roles as in :mod:`bench.footprint`:
QEMU, virtiofsd, the agent proxy, the shim and its watcher) over ``--window`` seconds.
Prints, per role, the median over the runs of its share of one core (percent), and the
total; with ``--json FILE`` writes the samples too. Every run started is removed in a
``finally``. The idle cost is what bounds density (issue #12): 30 sandboxes at 1 % each
keep a third of a core busy doing nothing.

Run as root from the repository root with a private ``--root``::

    .venv/bin/python bench/idle_cpu.py --runs 3 --window 60
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.footprint import remove, run_processes, start_run  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), seconds; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def measure(root: Path, names: list[str], window: float) -> list[dict[str, float]]:
    """Per run: role -> percent of one core over ``window`` seconds (and ``total``)."""
    processes = {name: run_processes(root, name) for name in names}
    before = {name: {pid: cpu_seconds(pid) for pid in procs} for name, procs in processes.items()}
    began = time.monotonic()
    time.sleep(window)
    elapsed = time.monotonic() - began
    samples = []
    for name, procs in processes.items():
        sample: dict[str, float] = {}
        for pid, what in procs.items():
            used = cpu_seconds(pid) - before[name][pid]
            sample[what] = sample.get(what, 0.0) + 100.0 * used / elapsed
        sample["total"] = sum(sample.values())
        samples.append(sample)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--window", type=float, default=60.0, help="seconds measured")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds before measuring")
    parser.add_argument("--image", default="default")
    parser.add_argument("--root", type=Path, default=Path("/run/pysandbox-idle-cpu"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    names: list[str] = []
    try:
        for index in range(args.runs):
            name = f"ic-{os.getpid()}-{index}"
            names.append(name)
            start_run(args.root, name, args.image)
        time.sleep(args.settle)
        samples = measure(args.root, names, args.window)
    finally:
        for name in names:
            remove(args.root, name)
    roles = sorted({k for s in samples for k in s})
    medians = {k: round(statistics.median(s.get(k, 0.0) for s in samples), 2) for k in roles}
    print(f"idle CPU, % of one core, median of {len(samples)} runs over {args.window:.0f} s:")
    for what, value in medians.items():
        print(f"  {what:<14} {value:6.2f}")
    result: dict[str, Any] = {
        "window_s": args.window,
        "loadavg": os.getloadavg(),
        "runs": samples,
        "median_percent": medians,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
