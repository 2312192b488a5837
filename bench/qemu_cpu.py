"""``pysandbox run ROOTFS CMD`` of several variants, interleaved: wall time and QEMU's CPU time.

On a host shared with other VMs the wall time of a run moves by a second or more between
rounds (load 6-9 on 2 cores); the CPU time QEMU spends on the run (its vCPU thread runs the
whole guest under TCG) moves far less, so it resolves a change in the guest's work that the
wall time hides. For each run this prints and records:

* ``wall``: the CLI's spawn to its exit, seconds;
* ``qemu_cpu_at_exit``: QEMU's utime + stime (``/proc/PID/stat``, clock ticks) when the CLI
  exited: the VM's CPU on the run's path (state load, the guest's Restored, CreateContainer,
  the program, WaitProcess);
* ``qemu_cpu``: the same at QEMU's exit (the teardown included).

QEMU is found by its command line naming the run's private ``--root`` and sampled every
5 ms (so up to 5 ms of its end can be missed, alike for every variant).

Run as root from the repository root::

    .venv/bin/python bench/qemu_cpu.py --runs 9 [--json FILE] [--cmd true] \\
        new=/work/wt/a,/var/lib/pysandbox/guest-a,/var/lib/pysandbox/templates-a \\
        old=/work/main,/var/lib/pysandbox/guest,/var/lib/pysandbox/templates

Each variant is ``NAME=REPO[,GUEST_IMAGE[,TEMPLATE_DIR[,KEY=VALUE...]]]``: that checkout's
``.venv`` python with its tree on ``PYTHONPATH``, and more environment variables if given (an
empty field keeps the default). Rounds alternate the order of the variants.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

ROOTFS = "/var/lib/pysandbox/images/default/rootfs"
TICK = os.sysconf("SC_CLK_TCK")


def _find_qemu(root: str, stop: threading.Event) -> str | None:
    """The pid (text) of the QEMU whose command line names ``root``; None once ``stop``."""
    needle = root.encode()
    while not stop.is_set():
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(b"/usr/bin/qemu-system") and needle in cmdline:
                return entry
        time.sleep(0.01)
    return None


class Sampler(threading.Thread):
    """Samples the CPU seconds of the run's QEMU until it exits (or :attr:`stop`)."""

    def __init__(self, root: str) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.stop = threading.Event()
        self.latest: float | None = None

    def run(self) -> None:
        pid = _find_qemu(self.root, self.stop)
        while pid is not None:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                return
            if fields[0] == "Z":
                return
            self.latest = (int(fields[11]) + int(fields[12])) / TICK
            time.sleep(0.005)


def one_run(name: str, variant: dict[str, str], command: list[str]) -> dict[str, Any]:
    root = f"/tmp/psb-qemu-cpu-{os.getpid()}-{name}"
    env = {**os.environ, "PYTHONPATH": variant["repo"], "PYTHONSAFEPATH": "1"}
    env.update({key: value for key, value in variant.items() if key != "repo" and value})
    python = f"{variant['repo']}/.venv/bin/python"
    sampler = Sampler(root + "/")
    sampler.start()
    start = time.monotonic()
    done = subprocess.run(
        [python, "-m", "sandbox", "--root", root, "run", ROOTFS, *command],
        capture_output=True,
        env=env,
        timeout=180,
        check=False,
    )
    wall = time.monotonic() - start
    at_exit = sampler.latest
    sampler.join(60)
    sampler.stop.set()
    if done.returncode != 0:
        raise SystemExit(f"{name}: run failed ({done.returncode}): {done.stderr.decode()[-300:]}")
    return {"wall": wall, "qemu_cpu_at_exit": at_exit, "qemu_cpu": sampler.latest}


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition("=")
    repo, image, templates, *extra = [*rest.split(","), "", ""]
    pairs = [item.partition("=") for item in extra if item]
    if not name or not repo or any(not key or not sep for key, sep, _ in pairs):
        raise SystemExit(
            f"bad variant {text!r}: use NAME=REPO[,GUEST_IMAGE[,TEMPLATE_DIR[,KEY=VALUE...]]]"
        )
    return name, {
        "repo": str(Path(repo).resolve()),
        "PYSANDBOX_GUEST_IMAGE": image,
        "PYSANDBOX_TEMPLATE_DIR": templates,
        **{key: value for key, _, value in pairs},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--cmd", default="true", help="the container's command (split on spaces)")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds between runs")
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    variants = dict(parse_variant(v) for v in options.variants)
    command = options.cmd.split()
    raw: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    loads: list[float] = []
    for round_ in range(options.runs):
        order = list(variants) if round_ % 2 == 0 else list(reversed(variants))
        for name in order:
            raw[name].append(one_run(name, variants[name], command))
            time.sleep(options.settle)
        loads.append(round(os.getloadavg()[0], 2))
        row = {n: {k: round(v, 3) if v else v for k, v in raw[n][-1].items()} for n in variants}
        print(round_, row, "load", loads[-1], flush=True)
    summary: dict[str, dict[str, float | None]] = {}
    for name, runs in raw.items():
        summary[name] = {}
        for key in ("wall", "qemu_cpu_at_exit", "qemu_cpu"):
            values = [r[key] for r in runs if r[key] is not None]
            summary[name][key + "_median"] = round(statistics.median(values), 3) if values else None
        print(name, summary[name])
    if options.json is not None:
        options.json.write_text(
            json.dumps(
                {
                    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "command": command,
                    "variants": variants,
                    "load_after_round": loads,
                    "summary": summary,
                    "raw": raw,
                },
                indent=1,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
